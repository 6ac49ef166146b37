"""Adaptive testing (CAT), as in Fluid Benchmarking: a candidate answers a few random items per task, then items
chosen in small batches where they tell most about its accuracy, until each task's estimate is precise enough or
``n_max`` items per task are spent.

The test runs on the worker that holds the candidate's weights (no round trip per batch): an :class:`AdaptiveTest`
carries a snapshot of the item parameters and calls ``answer(rows)`` for each batch.

**Which item next.** Fluid Benchmarking picks the item of maximum Fisher information at θ̂; with a D-dimensional
ability the quantity that matters here is not θ itself but a task's accuracy estimate
(``p-irt``: observed answers plus P_j(θ̂) on the rest), whose variance is gᵀΣg + Σ p(1−p)/N² (g its gradient in θ,
Σ the posterior covariance of θ̂). Answering item j reduces it by the c-optimal design gain
(gᵀΣa_j)²·p_j(1−p_j) / (1 + p_j(1−p_j)·a_jᵀΣa_j) plus p_j(1−p_j)/N² (its outcome is then observed, not predicted);
for D = 1 this ranks items as Fisher information p(1−p)a² does. ``randomesque`` picks at random among the best few,
so that candidates do not all meet the same items (seeded: replay is exact).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> a, b = np.abs(rng.normal(1, 0.3, (40, 1))), rng.normal(0, 1, 40)
>>> test = AdaptiveTest(rows=np.arange(100, 140), tasks=np.array(["t"] * 40), a=a, b=b, prior_mean=np.zeros(1),
...                     prior_cov=np.eye(1), start=4, batch=2, n_max=12, target_se=0.0, seed=(0, 1, 2))
>>> rows, correct = test.run(lambda r: (r % 2).astype(np.int8))
>>> len(rows), len(set(rows.tolist())), bool(rows.min() >= 100)
(12, 12, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from merge3._errors import Merge3Error
from merge3.itembank._irt import map_logistic, sigmoid


@dataclass(frozen=True)
class AdaptiveTest:
    """One candidate's adaptive test over the search items (local index k ↔ bank row ``rows[k]``).

    ``start`` random items per task first, then ``batch`` per task and step, chosen by expected variance cut of the
    task's accuracy estimate, until its standard error is ≤ ``target_se`` or it has ``n_max`` items.
    ``seed``: e.g. (run seed, generation, index).
    """

    rows: np.ndarray
    tasks: np.ndarray
    a: np.ndarray
    b: np.ndarray
    prior_mean: np.ndarray
    prior_cov: np.ndarray
    start: int
    batch: int
    n_max: int
    target_se: float
    seed: tuple[int, ...]
    randomesque: int = 3

    def __post_init__(self):
        if not 1 <= self.start <= self.n_max:
            raise Merge3Error(f"adaptive test: n_max ({self.n_max}) must be at least the start size ({self.start})")
        if self.batch < 1:
            raise Merge3Error(f"adaptive test: batch must be ≥ 1, got {self.batch}")

    def run(self, answer: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Ask, in batches; returns (bank rows, 0/1 correctness) of every item answered, in the order asked."""
        rng = np.random.default_rng([int(s) for s in self.seed] + [0xCA7])
        names = list(dict.fromkeys(self.tasks.tolist()))
        asked = np.zeros(len(self.rows), dtype=bool)
        local: list[int] = []
        correct: list[int] = []

        def ask(chosen: list[int]) -> None:
            asked[chosen] = True
            local.extend(chosen)
            correct.extend(np.asarray(answer(self.rows[np.asarray(chosen)]), dtype=np.int8).tolist())

        first = []
        for t in names:
            pool = np.flatnonzero(self.tasks == t)
            first += rng.choice(pool, size=min(self.start, pool.size), replace=False).tolist()
        ask(first)
        precision = np.linalg.inv(self.prior_cov)
        while True:
            idx, y = np.asarray(local), np.asarray(correct, dtype=float)
            theta = map_logistic(self.a[idx], self.b[idx], y[None], np.ones((1, idx.size)), self.prior_mean,
                                 precision)[0]
            P = sigmoid(self.a @ theta - self.b)
            pq = P * (1 - P)
            H = (self.a[idx] * pq[idx][:, None]).T @ self.a[idx] + precision
            cov = np.linalg.inv(H + 1e-9 * np.eye(H.shape[0]))
            chosen = []
            for t in names:
                in_t = self.tasks == t
                unseen = np.flatnonzero(in_t & ~asked)
                N_t, n_t = int(in_t.sum()), int((in_t & asked).sum())
                if n_t >= self.n_max or unseen.size == 0:
                    continue
                g = (pq[unseen][:, None] * self.a[unseen]).sum(0) / N_t
                se = np.sqrt(g @ cov @ g + pq[unseen].sum() / N_t**2)
                if se <= self.target_se:
                    continue
                Sa = self.a[unseen] @ cov  # (u, D)
                gain = (Sa @ g) ** 2 * pq[unseen] / (1 + pq[unseen] * np.einsum("ud,ud->u", Sa, self.a[unseen]))
                gain += pq[unseen] / N_t**2
                take = min(self.batch, self.n_max - n_t, unseen.size)
                best = unseen[np.argsort(-gain, kind="stable")[: take * max(1, self.randomesque)]]
                chosen += rng.choice(best, size=take, replace=False).tolist()
            if not chosen:
                break
            ask(chosen)
        return self.rows[np.asarray(local)], np.asarray(correct, dtype=np.int8)


__all__ = ["AdaptiveTest"]
