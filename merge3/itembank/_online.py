"""Estimates from whatever items a candidate answered: fresh subsets, adaptive tests, promotions to more items.

A calibrated :class:`~merge3.itembank.Estimator` fixes which subset a candidate answers. A search that draws fresh
items every generation, tests adaptively or promotes its best candidates needs an estimate (and its standard error)
from *any* answered set. For answers y on the set A_t of task t (n_t of its N_t search items), ability θ̂ the MAP of
all answers under the calibration population prior, P_j = P(item j right | θ̂):

- ``naive``: mean of y over A_t (items drawn uniformly); SE from the binomial with finite-population correction.
- ``irt``: mean_{j∈t} P_j.
- ``p-irt``: (Σ_{A_t} y + Σ_{t∖A_t} P_j) / N_t. SE by the delta method, Var θ̂ ≈ (Σ_answered p(1−p)aaᵀ + prior
  precision)⁻¹, plus the Bernoulli noise of the unanswered items' own outcomes.
- ``gp-irt``: λ_t·naive + (1 − λ_t)·p-irt. tinyBenchmarks' rule λ = b²/(b² + v/n) fixes how λ changes with n, so the
  λ′ calibrated at n′ items scales to λ(n) = nλ′ / (nλ′ + n′(1 − λ′)). Items chosen adaptively are not a uniform
  sample (they sit near 50 % difficulty), so the naive mean is biased on them: gp-irt is p-irt there.
- ``mp-irt``/``gmp-irt``: θ = Σ_k w_k θ_k over the endpoints' abilities, w fitted on the answers (as MERGE³), then as
  p-irt/gp-irt (δ scaled with n like λ).
- ``cv-irt``: the IRT prediction as a control variate, cross-fitted. The answered items are dealt into K = 5 folds;
  θ̂ fitted without fold k predicts fold k's items, and the task's accuracy is (Σ_{A_t} y + Σ_{unanswered} P̄_j +
  (N_t − n_t)·mean_{A_t}(y − P_{−k(j)})) / N_t, P̄ the fold-average prediction. The model predicts what it can (item
  difficulty, the candidate's ability) and answers it was not fitted on correct its error: on uniformly drawn items
  this is unbiased whatever the item model's errors. (p-irt and gp-irt trust the model on the
  N − n unanswered items, and a merge unlike the calibration subjects — a search's best — is where it errs; fitting
  θ̂ on the same answers the residuals come from would shrink the correction toward the model.) Its variance is that
  of the residuals y − P, below the naive mean's wherever the model knows the items.

>>> import numpy as np
>>> from merge3.itembank._synthetic_irt import simulate_bank
>>> from merge3.itembank import Estimator, IRTFit
>>> bank = simulate_bank(n_subjects=60, items_per_task=60, tasks=("x", "y"), seed=1)
>>> est = Estimator.calibrate(bank.responses, bank.tasks, ns=(10,), subset_methods=("random",),
...                           fit=IRTFit(kind="2pl"), seed=0)
>>> items = np.arange(0, 120, 4)  # any 30 items
>>> e = estimate_answered(est, items, bank.responses[5, items], "gp-irt")
>>> sorted(e.per_task), 0 <= e.mean <= 1, e.se_mean > 0
(['x', 'y'], True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from merge3._errors import Merge3Error
from merge3.itembank._estimators import ESTIMATORS, Estimator, task_means
from merge3.itembank._irt import map_logistic, sigmoid

ONLINE_ESTIMATORS = (*ESTIMATORS, "cv-irt")
CV_FOLDS = 5


@dataclass(frozen=True)
class AnsweredEstimate:
    """Per-task accuracy estimates on the whole search split, their standard errors, and the candidate's ability."""

    per_task: dict[str, float]
    se: dict[str, float]
    mean: float
    se_mean: float
    theta: np.ndarray | None = None


def naive_estimate(tasks_of_items: np.ndarray, correct: np.ndarray, task_sizes: dict[str, int]) -> AnsweredEstimate:
    """Plain per-task means of uniformly drawn answers, with binomial standard errors (finite population)."""
    names, y = list(task_sizes), np.asarray(correct, dtype=float)[None, :]
    means = task_means(y, np.ones_like(y), np.asarray(tasks_of_items), names)[0]
    per_task, var = {}, {}
    for task, mean in zip(names, means):
        answered, N = y[0, tasks_of_items == task], task_sizes[task]
        n = answered.size
        if n == 0:
            raise Merge3Error(f"no answers on task '{task}': every task needs at least one answered item")
        p = (answered.sum() + 0.5) / (n + 1.0)  # shrunk: an all-right subset still has some uncertainty
        per_task[task] = float(mean)
        var[task] = p * (1 - p) / n * max(N - n, 0) / max(N - 1, 1)
    T = len(task_sizes)
    return AnsweredEstimate(per_task, {t: float(np.sqrt(v)) for t, v in var.items()},
                            float(np.mean(list(per_task.values()))), float(np.sqrt(sum(var.values())) / T))


def scaled_weight(calibrated: float, n_calibrated: int, n: int) -> float:
    """λ(n) from λ′ at n′ under λ = b²/(b² + v/n): nλ′ / (nλ′ + n′(1 − λ′)).

    >>> round(scaled_weight(0.5, 20, 20), 3), round(scaled_weight(0.5, 20, 80), 3), scaled_weight(0.0, 20, 80)
    (0.5, 0.8, 0.0)
    """
    num = n * calibrated
    den = num + n_calibrated * (1.0 - calibrated)
    return float(num / den) if den > 0 else 1.0


def _calibrated_constants(estimator: Estimator) -> tuple[dict, int]:
    """The constants of the random subset (else any subset) whose n is nearest the median of those calibrated."""
    keys = sorted(k for k in estimator.constants if k[0] == "random") or sorted(estimator.constants)
    if not keys:
        raise Merge3Error("the calibration holds no fitted λ*/δ: recalibrate the bank")
    key = keys[len(keys) // 2]
    return estimator.constants[key], key[1]


def estimate_answered(estimator: Estimator, items: np.ndarray, correct: np.ndarray, method: str, *,
                      adaptive: bool = False, inclusion: np.ndarray | None = None) -> AnsweredEstimate:
    """Estimate a candidate's accuracy on every search item from its answers on ``items`` (indices into the
    estimator's items) — any set, of any size per task. ``adaptive``: the items were chosen by an adaptive test.
    ``inclusion`` (cv-irt): each item's probability of having been drawn, for items drawn by a weighted design."""
    if method not in ONLINE_ESTIMATORS:
        raise Merge3Error(f"unknown estimator {method!r}; use one of {ONLINE_ESTIMATORS}")
    model, names = estimator.model, estimator.task_names
    items, y = np.asarray(items, dtype=np.int64), np.asarray(correct, dtype=float)
    if items.size != y.size:
        raise Merge3Error(f"{y.size} answers for {items.size} items")
    sizes = {t: int((model.tasks == t).sum()) for t in names}
    naive = naive_estimate(model.tasks[items], y, sizes)
    if method == "naive":
        return naive
    if method == "cv-irt":
        return _cross_fitted(estimator, items, y, naive, inclusion=inclusion)
    if inclusion is not None:
        raise Merge3Error(f"estimator {method!r} assumes uniformly drawn items: use cv-irt with a weighted design")
    a, b = model.a[items], model.b[items]
    ones = np.ones((1, items.size))
    constants, n_cal = _calibrated_constants(estimator)
    if method in ("mp-irt", "gmp-irt"):
        if estimator.endpoint_theta is None:
            raise Merge3Error(f"estimator {method!r} needs endpoint abilities: calibrate with the endpoints")
        E = estimator.endpoint_theta
        scale = constants.get("mp_prior_scale", estimator.mp_prior_scale)
        scale = 1.0 if scale == "auto" else scale
        prec = np.eye(E.shape[0]) * (1e-6 if scale is None else 1.0 / scale**2)
        w = map_logistic(a @ E.T, b, y[None], ones, np.full(E.shape[0], 1.0 / E.shape[0]), prec)[0]
        theta, cov = w @ E, _posterior_cov(a @ E.T, b, w, prec)
        cov = E.T @ cov @ E
    else:
        prec = np.linalg.inv(model.theta_cov)
        theta = map_logistic(a, b, y[None], ones, model.theta_mean, prec)[0]
        cov = _posterior_cov(a, b, theta, prec)
    P = sigmoid(model.a @ theta - model.b)
    answered = np.zeros(model.n_items, dtype=bool)
    answered[items] = True
    observed = np.zeros(model.n_items)
    observed[items] = y
    blend_key = "delta" if method == "gmp-irt" else "lambda"
    per_task, var, grad_mean, bern_mean = {}, {}, np.zeros(theta.size), 0.0
    for t in names:
        in_t = model.tasks == t
        unseen = in_t & ~answered
        N_t, n_t = int(in_t.sum()), int((in_t & answered).sum())
        pq = P[unseen] * (1 - P[unseen])
        if method == "irt":
            value = float(P[in_t].mean())
            g = ((P[in_t] * (1 - P[in_t]))[:, None] * model.a[in_t]).sum(0) / N_t
            bern = 0.0
        else:
            value = float((observed[in_t & answered].sum() + P[unseen].sum()) / N_t)
            g = (pq[:, None] * model.a[unseen]).sum(0) / N_t
            bern = float(pq.sum()) / N_t**2
        lam = 0.0
        if method in ("gp-irt", "gmp-irt") and not adaptive:
            lam = scaled_weight(float(constants.get(blend_key, {}).get(t, 0.0)), n_cal, n_t)
        per_task[t] = lam * naive.per_task[t] + (1 - lam) * value
        var[t] = lam**2 * naive.se[t] ** 2 + (1 - lam) ** 2 * (float(g @ cov @ g) + bern)
        grad_mean += (1 - lam) * g / len(names)
        bern_mean += ((1 - lam) ** 2 * bern + lam**2 * naive.se[t] ** 2) / len(names) ** 2
    se_mean = float(np.sqrt(grad_mean @ cov @ grad_mean + bern_mean))
    return AnsweredEstimate(per_task, {t: float(np.sqrt(v)) for t, v in var.items()},
                            float(np.mean(list(per_task.values()))), se_mean, theta)


def _cross_fitted(estimator: Estimator, items: np.ndarray, y: np.ndarray, naive: AnsweredEstimate,
                  folds: int = CV_FOLDS, inclusion: np.ndarray | None = None) -> AnsweredEstimate:
    """cv-irt (see the module docstring): K folds of the answered items; θ̂ without each fold predicts that fold's
    items (the residuals) and, averaged over folds, the unanswered items. With ``inclusion`` (each answered item's
    probability of having been drawn), the residuals are weighted by its inverse (Horvitz–Thompson), so items drawn
    by a non-uniform design still give an unbiased estimate."""
    model, names = estimator.model, estimator.task_names
    task_of = model.tasks[items]
    if min(int((task_of == t).sum()) for t in names) < 2:
        return naive  # one answer per task cannot be split: nothing to correct with
    fold = np.zeros(items.size, dtype=np.int64)
    for t in names:  # each task's answers dealt round-robin, so every fold holds some of every task
        where = np.flatnonzero(task_of == t)
        fold[where[np.argsort(items[where], kind="stable")]] = np.arange(where.size) % folds
    precision = np.linalg.inv(model.theta_cov)
    residual, own = np.zeros(items.size), np.zeros(items.size)
    predicted, thetas = np.zeros(model.n_items), []
    used = [k for k in range(folds) if (fold == k).any()]
    for k in used:
        fit = fold != k
        theta = map_logistic(model.a[items[fit]], model.b[items[fit]], y[fit][None], np.ones((1, int(fit.sum()))),
                             model.theta_mean, precision)[0]
        P = sigmoid(model.a @ theta - model.b)
        own[~fit] = P[items[~fit]]
        residual[~fit] = y[~fit] - own[~fit]
        predicted += P / len(used)
        thetas.append(theta)
    answered = np.zeros(model.n_items, dtype=bool)
    answered[items] = True
    per_task, var = {}, {}
    for t in names:
        in_t, mine = model.tasks == t, task_of == t
        N_t, n_t = int(in_t.sum()), int(mine.sum())
        rest = in_t & ~answered
        r = residual[mine]
        if inclusion is None:  # a uniform draw: the answered items' mean residual stands for the unanswered ones
            per_task[t] = float((y[mine].sum() + predicted[rest].sum() + rest.sum() * r.mean()) / N_t)
            spread = max(float(r.var(ddof=1)), 1e-4)
            var[t] = (rest.sum() / N_t) ** 2 * spread / n_t * max(N_t - n_t, 0) / max(N_t - 1, 1)
        else:  # Horvitz–Thompson total of the residuals, Hansen–Hurwitz variance
            weighted = r / np.asarray(inclusion, dtype=float)[mine]
            total = float(predicted[rest].sum() + own[mine].sum() + weighted.sum())
            per_task[t] = total / N_t
            var[t] = max(float(((n_t * weighted - weighted.sum()) ** 2).sum()) / (n_t * (n_t - 1)), 1e-4) / N_t**2
    return AnsweredEstimate(per_task, {t: float(np.sqrt(v)) for t, v in var.items()},
                            float(np.mean(list(per_task.values()))), float(np.sqrt(sum(var.values())) / len(names)),
                            np.mean(thetas, axis=0))


def _posterior_cov(X: np.ndarray, c: np.ndarray, x: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Laplace covariance of the MAP ``x`` of P(y_j) = σ(X_j x − c_j): (Σ p(1−p) X_j X_jᵀ + precision)⁻¹."""
    p = sigmoid(X @ x - c)
    H = (X * (p * (1 - p))[:, None]).T @ X + precision
    return np.linalg.inv(H + 1e-9 * np.eye(H.shape[0]))


__all__ = ["ONLINE_ESTIMATORS", "AnsweredEstimate", "estimate_answered", "naive_estimate", "scaled_weight"]
