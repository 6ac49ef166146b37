"""Forgetting as a search goal on the digits zoo: drive one domain's accuracy down to chance while every other
domain stays within 3 points of what the best addition merge gives it.

Objectives ``forget:<task>`` plus ``keep:<other>>=<best addition merge − 0.03>`` for every other task, the
thresholds taken from the best fixed recipe chosen on the search split (merge3's baselines); TSV-Merge weights
per layer and endpoint in [−1.5, 2.5] (negation allowed), a GA seeded with the uniform recipes, every candidate scored on every search item.
Reported on the test split (never seen by the search or the recipe grid) for the top-3 verified candidates, picked
on the search split. Writes bench/results/forget.json and prints a table.

Usage::

    .venv/bin/python bench/forget.py [--task rot90] [--seeds 0 1 2] [--generations 20] [--population 24]
        [--row-blocks 4] [--engine cmaes] [--soft 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "forget.json"


def main(argv=None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rot90")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--population", type=int, default=24)
    parser.add_argument("--margin", type=float, default=0.03)
    parser.add_argument("--row-blocks", type=int, default=1, help="weights per block of output rows (genome.row_blocks)")
    parser.add_argument("--methods", nargs="+", default=["tsv_merge"], help="genome.methods (one per layer group)")
    parser.add_argument("--low", type=float, default=-1.5, help="the lowest weight (negation below 0)")
    parser.add_argument("--engine", choices=["pymoo", "cmaes"], default="pymoo",
                        help="pymoo: the GA; cmaes: CMA-ES (one method only), infeasible ranked by violation")
    parser.add_argument("--soft", type=float, default=None,
                        help="bank.fitness.soft: rank by forget − w × the task's probability of the right answer")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = [run_seed(args, seed) for seed in args.seeds]
    tasks = list(runs[0]["chance_test"])
    result = {"task": args.task, "seeds": args.seeds, "row_blocks": args.row_blocks, "methods": args.methods,
              "low": args.low, "engine": args.engine, "soft": args.soft,
              "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    first = runs[0]
    print(f"| task | chance | base | best addition ({first['best_recipe']['name']}) | forget merge (mean ± sd, "
          f"{len(runs)} seeds) | change |")
    print("|---|---|---|---|---|---|")
    for t in tasks:
        values = np.array([r["chosen"]["test"][t] for r in runs])
        mark = " (forgotten)" if t == args.task else ""
        print(f"| {t}{mark} | {first['chance_test'][t]:.3f} | {first['base_test'][t]:.3f} | "
              f"{first['best_recipe']['test'][t]:.3f} | {values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f} | "
              f"{values.mean() - first['best_recipe']['test'][t]:+.3f} |")
    for r in runs:
        print(f"seed {r['seed']}: {r['candidates']} candidates ({r['feasible']} feasible), {r['seconds']:.0f} s")
    return result


def run_seed(args, seed: int) -> dict:
    import merge3
    from merge3 import verify
    from merge3.itembank import ItemBank
    from merge3.runs import baselines, best_recipe

    space = yaml.safe_load((ROOT / "search_spaces" / "digits_layers.yaml").read_text())
    # one scratch run per configuration: two benches at once must not share (and delete) each other's run folder
    tag = f"{args.engine}-rb{args.row_blocks}-g{args.generations}-p{args.population}-low{args.low:g}" + (
        f"-soft{args.soft:g}" if args.soft else "") + "-" + "-".join(args.methods)
    space.update(name=f"forget-{args.task}-{tag}-s{seed}", seed=seed, device="cpu")
    space["bank"] = {"path": "item_banks/digits", "estimator": "full", "items_per_task": None,
                     **({"fitness": {"soft": args.soft}} if args.soft else {})}
    # TSV-M: each task's singular components scaled by its own weight per layer, so a negative weight removes one
    # task's subspace while the others keep theirs (the best addition merge is uniform TSV-M, λ = 1.5)
    space["genome"] = {"granularity": "layer", "methods": list(args.methods), "weights": {"low": args.low, "high": 2.5},
                       "row_blocks": args.row_blocks}
    space["engine"] = {"name": args.engine, "population": args.population, "generations": args.generations}
    space["executor"] = {"kind": "local"}
    for key in ("models", "bank"):
        block = space[key]
        for field in ("base", "path"):
            if field in block:
                block[field] = str(ROOT / block[field])
        if "endpoints" in block:
            block["endpoints"] = [str(ROOT / p) for p in block["endpoints"]]
    tasks = ItemBank.load(space["bank"]["path"], warn=False).tasks
    if args.task not in tasks:
        raise SystemExit(f"error: --task {args.task!r} is not a digits task ({', '.join(tasks)})")
    recipes = baselines(space, log=lambda *a: None)
    recipe = best_recipe(recipes)
    base = next(r for r in recipes if r.name == "base")
    keep = {t: round(recipe.scores[t] - args.margin, 4) for t in tasks if t != args.task}
    objectives = [f"forget:{args.task}", *(f"keep:{t}>={v}" for t, v in keep.items())]
    runs = ROOT / "bench" / ".cache" / "forget"  # bench scratch (git-ignored), not user runs
    shutil.rmtree(runs / space["name"], ignore_errors=True)
    started = time.perf_counter()
    outcome = merge3.search(space, objectives=objectives, runs_dir=runs, name=space["name"], progress=False)
    seconds = time.perf_counter() - started
    verified = verify(outcome.run.path, top=3, log=lambda *a: None)
    chosen = verified[0]  # verify keeps the search's own order: feasible first, then the forget objective
    chance = ItemBank.load(space["bank"]["path"], warn=False).chance_accuracy("test")
    result = {
        "task": args.task, "seed": seed, "objectives": objectives, "seconds": round(seconds, 1),
        "candidates": len(outcome.result.records), "feasible": sum(r.violation == 0 for r in outcome.result.records),
        "best_recipe": {"name": recipe.name, "search": recipe.scores, "test": recipe.test_scores},
        "base_test": base.test_scores, "chance_test": chance,
        "chosen": {"generation": chosen["generation"], "index": chosen["index"], "search": chosen["search"],
                   "test": chosen["test"]},
    }
    return result


if __name__ == "__main__":
    main()
