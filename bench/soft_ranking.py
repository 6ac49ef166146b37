"""How well a generation of a cheap search is ranked by a few items: 0/1 correctness vs a soft score (the
probability the model gives the right answer), measured against every search item.

For each seed, one cheap row-block search (``bench/search_efficiency.py --genome rows``'s fresh cv-irt fitness with
promotion) runs; then, for a few of its generations, every first-fidelity candidate is rebuilt and answers **every**
search item, recording both whether it is right and the softmax probability of the right class. The truth is the
candidates' accuracy on all 2,995 search items; 300 random draws of n items per task then give the Spearman
correlation, within the generation, of the truth with (a) the mean 0/1 correctness on those items (what the search
ranks by), (b) the mean probability of the right answer, (c) their blend 0/1 + w · soft. Nothing here is used by
a search yet: it measures whether soft scores would rank a generation better (issue #14).

    python bench/soft_ranking.py [--seeds 0 1 2] [--generations 5 10 14] [--draws 300]

Writes bench/results/soft_ranking.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from merge3.models import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "soft_ranking.json"
WORK = ROOT / "bench" / ".cache" / "soft_ranking"
STRATEGY = "fresh-cv-promo-first"
BLENDS = (1.0, 2.0, 4.0)


def answers_on_every_item(run_path: Path, generation: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct, p_correct, task of each search item): candidates × search items, for the generation's rung-0 records."""
    from merge3.methods import plans_from_choices
    from merge3.runs import Run
    from merge3.runtime import MergeWorkloadFactory
    from merge3.search import parse_space

    run = Run.open(run_path)
    space = parse_space({**run.config, "objectives": ["mean"]}, str(run.path / "config.yaml"))
    factory = MergeWorkloadFactory.from_space(space)
    work = factory.build(factory.load_inputs())
    evaluator, bank = work.evaluator, work.bank
    search = np.asarray(bank.search_indices)
    tasks = bank.task_of[search]
    records = [r for r in run.records() if r.error is None and r.rung == 0 and r.generation == generation]
    correct, soft = np.zeros((len(records), search.size)), np.zeros((len(records), search.size))
    with torch.inference_mode():
        for c, record in enumerate(records):
            work.builder.build(plans_from_choices(factory.groups, record.plan), out=work.destination)
            for task in np.unique(tasks):
                where = np.flatnonzero(tasks == task)
                rows = torch.as_tensor(search[where])
                weight, bias = evaluator.heads[task]
                logits = work.module(evaluator.inputs[rows]).float() @ weight.T + bias
                right = torch.as_tensor(evaluator.answers[search[where]])
                soft[c, where] = torch.softmax(logits, -1)[torch.arange(where.size), right].numpy()
                correct[c, where] = (logits.argmax(-1) == right).numpy()
    return correct, soft, tasks


def ranking(correct: np.ndarray, soft: np.ndarray, tasks: np.ndarray, n: int, draws: int, seed: int) -> dict:
    from scipy.stats import spearmanr

    names = np.unique(tasks)
    truth = np.mean([correct[:, tasks == t].mean(1) for t in names], 0)
    rng = np.random.default_rng(seed)
    scores = {"0/1": [], "soft": [], **{f"0/1 + {w:g}·soft": [] for w in BLENDS}}
    for _ in range(draws):
        items = np.concatenate([rng.choice(np.flatnonzero(tasks == t), n, replace=False) for t in names])
        y, s = correct[:, items].mean(1), soft[:, items].mean(1)
        scores["0/1"].append(spearmanr(y, truth)[0])
        scores["soft"].append(spearmanr(s, truth)[0])
        for w in BLENDS:
            scores[f"0/1 + {w:g}·soft"].append(spearmanr(y + w * s, truth)[0])
    return {k: float(np.nanmean(v)) for k, v in scores.items()}


def main() -> None:
    import search_efficiency as se
    from scipy.stats import spearmanr

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generations", type=int, nargs="+", default=[5, 10, 14])
    parser.add_argument("--draws", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    class Args:
        quick = False

    work = se.digits_workload(Args)
    work.update(name="digits_rows", methods=["tsv_merge"], weights={"low": 0.0, "high": 3.0}, row_blocks=16,
                engine={"name": "cmaes"})
    rows = []
    for seed in args.seeds:
        se.run_search(work, STRATEGY, seed, WORK)
        for generation in args.generations:
            correct, soft, tasks = answers_on_every_item(WORK / f"{STRATEGY}-s{seed}", generation)
            truth = np.mean([correct[:, tasks == t].mean(1) for t in np.unique(tasks)], 0)
            full = float(spearmanr(soft.mean(1), truth)[0])
            for n in (10, 20):
                row = {"seed": seed, "generation": generation, "candidates": int(correct.shape[0]), "n_per_task": n,
                       "truth_sd": float(truth.std()), "soft_on_every_item": full,
                       "spearman": ranking(correct, soft, tasks, n, args.draws, seed)}
                rows.append(row)
                print(f"seed {seed} gen {generation:2d} n={n}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in row["spearman"].items()) + f" (soft on every item {full:.2f})", flush=True)
    summary = {}
    for n in (10, 20):
        mine = [r for r in rows if r["n_per_task"] == n]
        summary[str(n)] = {k: float(np.mean([r["spearman"][k] for r in mine])) for k in mine[0]["spearman"]}
    result = {"strategy": STRATEGY, "seeds": args.seeds, "generations": args.generations, "draws": args.draws,
              "rows": rows, "mean_spearman_by_items_per_task": summary,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "total_seconds": round(time.perf_counter() - started, 1)}
    write_text_atomic(RESULTS, json.dumps(result, indent=2) + "\n")
    print("\n| items per task | " + " | ".join(summary["10"]) + " |")
    print("|---|" + "---|" * len(summary["10"]))
    for n, values in summary.items():
        print(f"| {n} | " + " | ".join(f"{v:.2f}" for v in values.values()) + " |")
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
