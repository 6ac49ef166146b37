"""How far a better ability estimate could take cv-irt: its error on 15 fresh items per task when θ̂ comes from
those items' 0/1 answers (what merge3 does), from their soft scores (the probability of the right answer), and
from every search item (an oracle no cheap search has) — the residuals y − P(θ̂) always on 0/1 answers.

If even the oracle θ̂ leaves cv-irt above the target (MAE ≤ 0.015 at 2.5 % of the search split), the limit is the
item model itself (how well P(θ) predicts single items for merges unlike the calibration), not how θ is estimated.
Merges: random per-layer, mixed-method per-layer and random row-block TSV-M merges (`estimator_fidelity.py`'s
unseen groups, another seed); each answers every search item once (deterministic), several fresh draws each.

    python bench/cv_irt_ceiling.py [--draws 4] [--n 15]   # ~1 min; bench/results/cv_irt_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results" / "cv_irt_ceiling.json"
TASKS = ["upright", "rot90", "inverted", "flipud", "permuted"]


def answer_everything(zoo: Path, bank: Path, plans: list) -> tuple[np.ndarray, np.ndarray]:
    """0/1 answers and soft scores of every plan on every search item, in the search split's order."""
    from merge3.itembank import ItemBank
    from merge3.runtime import EvalRequest, LocalExecutor, MergeWorkloadFactory
    from merge3.search import parse_space

    space = parse_space({"name": "ceiling", "models": {"base": str(zoo / "base"),
                                                       "endpoints": [str(zoo / f"ft-{t}") for t in TASKS]},
                         "bank": {"path": str(bank)},
                         "genome": {"granularity": "layer",
                                    "methods": ["task_arithmetic", "ties", "dare", "tsv_merge"]}})
    search = ItemBank.load(bank, warn=False).search_indices
    rows = tuple(int(i) for i in search)
    Y, S = np.zeros((len(plans), len(rows))), np.zeros((len(plans), len(rows)))
    for i, result in LocalExecutor(MergeWorkloadFactory.from_space(space)).submit(
            [EvalRequest(plan, items=rows, soft=True) for _, plan in plans]):
        if not result.ok:
            raise RuntimeError(result.error)
        answered, correct = result.answered()
        order = np.argsort(answered)  # rows come back in any order: put them in the search split's
        Y[i], S[i] = correct[order], result.soft_answers()[order]
    return Y, S


def cross_fitted(model, names, y: np.ndarray, items: np.ndarray, theta_of, folds: int = 5) -> float:
    """cv-irt's mean accuracy as merge3.itembank computes it, but with θ̂ on each fold's complement from
    ``theta_of`` (checked against the library's own cv-irt when θ̂ comes from the answers, as there)."""
    from merge3.itembank import sigmoid

    task_of = model.tasks[items]
    fold = np.zeros(items.size, dtype=np.int64)
    for t in names:
        where = np.flatnonzero(task_of == t)
        fold[where[np.argsort(items[where])]] = np.arange(where.size) % folds
    residual, predicted = np.zeros(items.size), np.zeros(model.n_items)
    for k in range(folds):
        fit = fold != k
        P = sigmoid(model.a @ theta_of(items[fit]) - model.b)
        residual[~fit] = y[items[~fit]] - P[items[~fit]]
        predicted += P / folds
    answered = np.zeros(model.n_items, dtype=bool)
    answered[items] = True
    per_task = []
    for t in names:
        mine, rest = task_of == t, (model.tasks == t) & ~answered
        per_task.append((y[items[mine]].sum() + predicted[rest].sum() + rest.sum() * residual[mine].mean())
                        / (model.tasks == t).sum())
    return float(np.mean(per_task))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "zoo" / "digits")
    parser.add_argument("--bank", type=Path, default=ROOT / "item_banks" / "digits")
    parser.add_argument("--n", type=int, default=15, help="fresh items per task (15 × 5 = 2.5 %% of 2,995)")
    parser.add_argument("--draws", type=int, default=4, help="fresh draws per merge")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from estimator_fidelity import unseen_plans

    from merge3.itembank import Estimator, estimate_answered
    from merge3.methods import layer_groups
    from merge3.models import open_lazy, write_text_atomic

    started = time.perf_counter()
    estimator = Estimator.load(args.bank / "calibration")
    model, names = estimator.model, estimator.task_names
    groups = list(layer_groups(list(open_lazy(args.zoo / "base")), "layer"))
    plans = unseen_plans(groups, len(TASKS), args.seed, {"random-layer": 20, "mixed-layer": 20, "random-rows": 30})
    Y, S = answer_everything(args.zoo, args.bank, plans)
    truth = np.array([np.mean([y[model.tasks == t].mean() for t in names]) for y in Y])
    every = np.arange(model.n_items)

    def theta(targets):  # the MAP ability from these items' targets (0/1 or soft), calibration prior
        return lambda items: estimate_answered(estimator, items, targets[items], "p-irt").theta

    rng = np.random.default_rng(args.seed)
    kinds = [kind for kind, _ in plans]
    errors: dict[str, list[tuple[str, float]]] = {k: [] for k in ("naive", "cv-irt", "cv-irt, θ from soft scores",
                                                                   "cv-irt, oracle θ (every item)")}
    for _ in range(args.draws):
        for i, (y, s) in enumerate(zip(Y, S)):
            items = np.concatenate([np.sort(rng.choice(np.flatnonzero(model.tasks == t), args.n, replace=False))
                                    for t in names])
            oracle = theta(y)(every)
            library = estimate_answered(estimator, items, y[items], "cv-irt").mean
            ours = cross_fitted(model, names, y, items, theta(y))
            if abs(ours - library) > 1e-9:  # this file's twin must be merge3's cv-irt before its variants mean anything
                raise SystemExit(f"error: cross_fitted {ours} differs from merge3's cv-irt {library}")
            estimates = {
                "naive": float(np.mean([y[items[model.tasks[items] == t]].mean() for t in names])),
                "cv-irt": library,
                "cv-irt, θ from soft scores": cross_fitted(model, names, y, items, theta(s)),
                "cv-irt, oracle θ (every item)": cross_fitted(model, names, y, items, lambda _: oracle),
            }
            for name, value in estimates.items():
                errors[name].append((kinds[i], abs(value - truth[i])))
    table = {name: {"mae": float(np.mean([e for _, e in rows])),
                    **{f"mae {kind}": float(np.mean([e for k, e in rows if k == kind])) for kind in dict.fromkeys(kinds)}}
             for name, rows in errors.items()}
    result = {"items_per_task": args.n, "share_of_search_split": args.n * len(names) / model.n_items,
              "merges": {k: kinds.count(k) for k in dict.fromkeys(kinds)}, "draws": args.draws, "seed": args.seed,
              "truth": "accuracy on every search item", "target_mae": 0.015, "estimators": table,
              "seconds": round(time.perf_counter() - started, 1)}
    write_text_atomic(RESULTS, json.dumps(result, indent=2) + "\n")
    print(f"| estimator ({args.n} fresh items per task) | MAE | " + " | ".join(dict.fromkeys(kinds)) + " |")
    print("|---|---|" + "---|" * len(dict.fromkeys(kinds)))
    for name, row in table.items():
        print(f"| {name} | {row['mae']:.4f} | " + " | ".join(f"{row['mae ' + k]:.4f}" for k in dict.fromkeys(kinds)) + " |")


if __name__ == "__main__":
    main()
