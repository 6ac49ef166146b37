"""Reduced item subsets: which n items per task a candidate answers, and how much each one counts.

Methods (all seeded, all stratified per task):

- ``random``: n items drawn uniformly without replacement, weight 1/n each.
- ``anchor-irt``: k-means (k = n) on the item embeddings ``[a_j; b_j]`` of a fitted IRT model; the item nearest each
  centroid represents its cluster, weight = the cluster's share of the task's items.
- ``anchor-correct``: the same on the items' correctness columns of the calibration matrix.

>>> import numpy as np
>>> tasks = np.array(["x"] * 10 + ["y"] * 5)
>>> s = select_subset(tasks, 3, method="random", seed=0)
>>> s.n_items, sorted(s.by_task)
(6, ['x', 'y'])
>>> [round(float(w.sum()), 6) for _, w in s.by_task.values()]
[1.0, 1.0]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from merge3._errors import Merge3Error
from merge3.itembank._irt import IRTModel
from merge3.itembank._responses import task_order

SUBSET_METHODS = ("random", "anchor-irt", "anchor-correct")


@dataclass(frozen=True)
class Subset:
    """Selected items: ``indices`` into the bank (grouped by task), per-item ``weights`` summing to 1 per task."""

    indices: np.ndarray
    weights: np.ndarray
    tasks: np.ndarray  # task of each selected item
    method: str
    n: int
    seed: int

    @property
    def n_items(self) -> int:
        return int(self.indices.size)

    @property
    def by_task(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """task → (item indices, weights)."""
        return {t: (self.indices[self.tasks == t], self.weights[self.tasks == t]) for t in task_order(self.tasks)}

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "n": self.n,
            "seed": self.seed,
            "indices": self.indices.tolist(),
            "weights": self.weights.tolist(),
            "tasks": [str(t) for t in self.tasks],
        }

    @classmethod
    def from_json(cls, d: dict) -> "Subset":
        return cls(
            np.asarray(d["indices"], dtype=np.int64),
            np.asarray(d["weights"], dtype=np.float64),
            np.asarray(d["tasks"], dtype=object),
            d["method"],
            int(d["n"]),
            int(d["seed"]),
        )


def select_subset(
    tasks: Any,
    n: int,
    *,
    method: str = "random",
    seed: int = 0,
    model: IRTModel | None = None,
    responses: np.ndarray | None = None,
) -> Subset:
    """Pick ``n`` items per task (all of a task's items when it has ≤ n).

    ``model`` is needed for ``anchor-irt``; ``responses`` (calibration subjects × items, NaN = missing) for
    ``anchor-correct``. The same arguments and seed always give the same subset.
    """
    tasks = np.asarray(tasks, dtype=object)
    if method not in SUBSET_METHODS:
        raise Merge3Error(f"unknown subset method {method!r}; use one of {SUBSET_METHODS}")
    if int(n) < 1:
        raise Merge3Error(f"n (items per task) must be ≥ 1, got {n}")
    features = _features(method, tasks.size, model, responses)
    idx, w, lab = [], [], []
    for k, t in enumerate(task_order(tasks)):
        items = np.flatnonzero(tasks == t)
        rng = np.random.default_rng([int(seed), k, int(n)])
        if items.size <= n:
            chosen, weights = items, np.full(items.size, 1.0 / items.size)
        elif features is None:
            chosen = np.sort(rng.choice(items, size=n, replace=False))
            weights = np.full(n, 1.0 / n)
        else:
            chosen, weights = _anchors(items, features[items], n, rng)
        idx.append(chosen)
        w.append(weights)
        lab.append(np.full(chosen.size, t, dtype=object))
    return Subset(np.concatenate(idx), np.concatenate(w), np.concatenate(lab), method, int(n), int(seed))


def _features(method: str, n_items: int, model: IRTModel | None, responses: np.ndarray | None) -> np.ndarray | None:
    if method == "random":
        return None
    if method == "anchor-irt":
        if model is None:
            raise Merge3Error("subset method 'anchor-irt' needs a fitted IRT model")
        if model.n_items != n_items:
            raise Merge3Error(f"IRT model has {model.n_items} items, the bank {n_items}")
        return np.column_stack([model.a, model.b])
    if responses is None:
        raise Merge3Error("subset method 'anchor-correct' needs the calibration response matrix")
    R = np.asarray(responses, dtype=np.float64)
    if R.ndim != 2 or R.shape[1] != n_items:
        raise Merge3Error(f"calibration responses must be subjects × {n_items} items, got shape {R.shape}")
    col_mean = np.nan_to_num(np.nanmean(np.where(np.isnan(R).all(0), 0.5, R), axis=0), nan=0.5)
    return np.where(np.isnan(R), col_mean, R).T  # items × subjects; missing → the item's mean


def _anchors(items: np.ndarray, X: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k = n; the member nearest each centroid stands for its cluster, weight = cluster share."""
    from sklearn.cluster import KMeans

    k = min(n, len(np.unique(X, axis=0)))  # fewer distinct items than n: one anchor per distinct point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning on duplicate points: handled by k above
        km = KMeans(n_clusters=k, n_init=3, random_state=int(rng.integers(2**31 - 1))).fit(X)
    chosen, weights = [], []
    for c in range(k):
        members = np.flatnonzero(km.labels_ == c)
        if members.size == 0:
            continue
        d = ((X[members] - km.cluster_centers_[c]) ** 2).sum(1)
        chosen.append(items[members[np.argmin(d)]])
        weights.append(members.size / items.size)
    order = np.argsort(chosen)
    return np.asarray(chosen)[order], np.asarray(weights)[order]
