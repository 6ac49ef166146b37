"""Candidates per second on the demo workload: LocalExecutor vs RayExecutor with 1 and 2 actors.

The same candidate plans (random genomes of the demo space, seeded) go to every executor. Start-up (loading the
models, precomputing merge factors, starting Ray and the actors) is timed separately from the evaluation of the
batch; per-candidate time is split into build (merging into the resident model) and evaluate (answering the
subset and estimating).

    python bench/ray_scaling.py [--zoo zoo/digits] [--bank item_banks/digits] [--candidates 120]

Writes bench/results/ray_scaling.json and prints a table. Needs a built zoo (`merge3 zoo build digits`) and, for
IRT estimators, a calibrated bank (`merge3 demo` does both); `--estimator naive` needs no calibration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from merge3.models import write_text_atomic

RESULTS = Path(__file__).parent / "results" / "ray_scaling.json"
TASKS = ["upright", "rot90", "inverted", "flipud", "permuted"]


def demo_space(zoo: Path, bank: Path, estimator: str) -> dict:
    import yaml

    space = yaml.safe_load((Path(__file__).parent.parent / "search_spaces" / "digits_layers.yaml").read_text())
    space["models"] = {"base": str(zoo / "base"), "endpoints": [str(zoo / f"ft-{t}") for t in TASKS], "names": TASKS}
    space["bank"].update(path=str(bank), estimator=estimator)
    return space


def plans_for(factory, space, n: int, seed: int) -> list[list[dict]]:
    from merge3.search import Genome

    genome = Genome(factory.groups, space["genome"]["methods"], factory.n_models,
                    weight_range=(space["genome"]["weights"]["low"], space["genome"]["weights"]["high"]))
    rng = np.random.default_rng(seed)
    return [[c.as_dict() for c in genome.decode(genome.sample(rng))] for _ in range(n)]


def measure(name: str, make_executor, plans) -> dict:
    started = time.perf_counter()
    executor = make_executor()
    startup = time.perf_counter() - started
    try:
        started = time.perf_counter()
        results = [r for _, r in executor.submit(plans)]
        elapsed = time.perf_counter() - started
    finally:
        executor.close()
    failed = sum(not r.ok for r in results)
    return {
        "executor": name, "candidates": len(plans), "failed": failed, "startup_s": round(startup, 2),
        "batch_s": round(elapsed, 3), "candidates_per_s": round(len(plans) / elapsed, 2),
        "build_ms": round(1000 * float(np.mean([r.build_seconds for r in results])), 2),
        "evaluate_ms": round(1000 * float(np.mean([r.eval_seconds for r in results])), 2),
        "workers": sorted({r.worker for r in results}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="zoo/digits")
    parser.add_argument("--bank", default="item_banks/digits")
    parser.add_argument("--estimator", default="gp-irt")
    parser.add_argument("--candidates", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from merge3.runtime import LocalExecutor, RayExecutor
    from merge3.runtime import MergeWorkloadFactory
    from merge3.search import parse_space

    raw = demo_space(Path(args.zoo).resolve(), Path(args.bank).resolve(), args.estimator)
    factory = MergeWorkloadFactory.from_space(parse_space(raw))
    plans = plans_for(factory, raw, args.candidates, args.seed)
    temp = tempfile.mkdtemp(prefix="m3bench-")
    rows = [measure("local", lambda: LocalExecutor(factory), plans)]
    for actors in (1, 2):
        rows.append(measure(f"ray × {actors}", lambda a=actors: RayExecutor(factory, actors=a, temp_dir=temp), plans))
    local = rows[0]["candidates_per_s"]
    for row in rows:
        row["speedup_vs_local"] = round(row["candidates_per_s"] / local, 2)
    result = {
        "workload": f"digits demo space, {args.estimator}, {raw['bank']['items_per_task']} items per task",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads_per_worker": 1, "load_average_at_end": list(os.getloadavg())},
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS, json.dumps(result, indent=2) + "\n")
    print(f"\n{result['workload']} — {args.candidates} candidates\n")
    print("| executor | start-up (s) | candidates/s | × local | build (ms) | evaluate (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['executor']} | {r['startup_s']} | {r['candidates_per_s']} | {r['speedup_vs_local']} | "
              f"{r['build_ms']} | {r['evaluate_ms']} |")


if __name__ == "__main__":
    main()
