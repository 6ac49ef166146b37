"""A real causal-LM search, end to end on 2 CPU cores: the SmolLM2 zoo (`merge3 zoo build smollm`), calibration of
its bank on the search split, `search_spaces/smollm.yaml` (cv-irt on fresh items, promotion), verification of the
top 3 on both splits, and the fixed recipes (TA and TSV-M grids, chosen on the search split) — everything reported on
the test split, with wall times.

    python bench/smollm_search.py            # writes bench/results/smollm_search.json and prints a table
    python bench/smollm_search.py --full     # every candidate on every search item: smollm_search_full.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from merge3.models import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "smollm_search.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full fitness: every search item for every candidate")
    args = parser.parse_args()
    results = RESULTS.with_name("smollm_search_full.json") if args.full else RESULTS
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import merge3
    from merge3 import verify
    from merge3.runs import baselines, best_per_method
    from merge3.search import CalibrationSettings, calibrate_bank, load_space
    from merge3.zoo import build_smollm_zoo

    seconds = {}
    started = time.perf_counter()
    zoo = build_smollm_zoo(ROOT / "zoo" / "smollm", ROOT / "item_banks", log=print)
    seconds["zoo (cached or built)"] = time.perf_counter() - started
    endpoints = [str(p) for p in zoo.finetuned.values()]
    t0 = time.perf_counter()
    settings = CalibrationSettings(random_merges=12, methods=["task_arithmetic", "ties", "tsv_merge"],
                                   granularity="block", recipe_scales=[0.5, 1.0], ns=[8], kind="2pl", dims=1)
    calibrate_bank(zoo.bank, str(zoo.base), endpoints, settings, names=list(zoo.finetuned), log=print)
    seconds["calibration"] = time.perf_counter() - t0
    space = load_space(ROOT / "search_spaces" / "smollm.yaml")
    space = space.model_copy(update={
        "models": space.models.model_copy(update={"base": str(zoo.base), "endpoints": endpoints}),
        "bank": space.bank.model_copy(update={"path": str(zoo.bank)})})
    if args.full:  # the same search, each candidate scored on all 192 search items (no cheap fitness)
        space = space.model_copy(update={"bank": space.bank.model_copy(update={
            "estimator": "full", "items_per_task": None, "fitness": type(space.bank.fitness)()})})
    runs = ROOT / "bench" / ".cache" / "smollm_search"
    shutil.rmtree(runs / ("smollm-full-s0" if args.full else "smollm-s0"), ignore_errors=True)
    t0 = time.perf_counter()
    outcome = merge3.search(space, runs_dir=runs, name="smollm-full-s0" if args.full else "smollm-s0", progress=False)
    seconds["search"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    verified = verify(outcome.run.path, top=3, log=print)
    seconds["verify top 3"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    config = outcome.run.config
    recipes = best_per_method(baselines(config, methods=["task_arithmetic", "tsv_merge"], log=print))
    seconds["fixed recipes (TA, TSV-M grids)"] = time.perf_counter() - t0
    best = max(verified, key=lambda v: v["search_mean"])  # what a user picks: best on the search split
    result = {
        "zoo": str(zoo.path), "space": "search_spaces/smollm.yaml", "fitness": "full" if args.full else "as the space", "candidates": len(outcome.result.records),
        "items_evaluated": outcome.result.items_evaluated, "full_search_split_equivalent": outcome.result.full_bank_equivalent,
        "top1": verified[0], "chosen": best,
        "recipes": [{"name": r.name, "search": r.mean, "test": r.test_mean, "test_scores": r.test_scores}
                    for r in recipes],
        "seconds": {k: round(v, 1) for k, v in seconds.items()}, "total_seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average": list(os.getloadavg())},
    }
    write_text_atomic(results, json.dumps(result, indent=2) + "\n")
    print(f"\n{'merge':40s} {'search':>8s} {'test':>8s}")
    for r in recipes:
        print(f"{r.name:40s} {r.mean:8.3f} {r.test_mean:8.3f}")
    for v in verified:
        print(f"{'evolved gen ' + str(v['generation']) + ' #' + str(v['index']):40s} {v['search_mean']:8.3f} "
              f"{v['test_mean']:8.3f}")
    print(f"items {outcome.result.items_evaluated:,} for {len(outcome.result.records)} candidates; seconds {result['seconds']}")


if __name__ == "__main__":
    main()
