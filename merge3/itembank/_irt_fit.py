"""Fitting IRT models by full-batch MAP (torch), with hierarchical priors refreshed by EM, refits warm-started from a
fitted model, and the choice of the dimension D by held-out likelihood."""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from merge3._errors import Merge3Error
from merge3.itembank._irt import IRTConvergenceWarning, IRTModel, KINDS, LOGIT_CLIP, _loglik, map_logistic, sigmoid
from merge3.itembank._responses import _warn_constant_items, check_item_ids, check_tasks, min_subjects, response_matrix

DIMS_GRID = (1, 2, 5, 10, 15)  # the dimensions select_dims tries
# Inverse-gamma(α, β) hyperprior on prior variances: its MAP floor 2β/(N + 2α + 2) keeps σ > 0.
_IG_ALPHA, _IG_BETA = 1.0, 1.0
_EM_RELAX = 1.5
_SCREEN_EPOCHS, _SCREEN_EM_ROUNDS = 100, 3  # dimension screening: see select_dims


# ----------------------------------------------------------------------------------------------------------------
# Fitting (torch)


@dataclass(frozen=True)
class IRTFit:
    """How an item model is fitted: the model (``kind`` 1pl | 2pl | mirt, and its dimension ``dims``: a number, or
    "auto" to choose among ``dims_grid`` by held-out likelihood), the optimiser (``optimizer``, ``epochs``, ``lr``:
    None = the optimiser's defaults), ``positive_a`` (discriminations kept positive), the ``backend`` (torch MAP or
    py-irt's SVI) and ``refit`` (refit the chosen model on every subject once subsets and blends are fitted).

    >>> IRTFit(kind="2pl").dims, IRTFit().kind
    ('auto', 'mirt')
    """

    kind: str = "mirt"
    dims: int | str = "auto"
    dims_grid: tuple[int, ...] = DIMS_GRID
    optimizer: str = "lbfgs"
    epochs: int | None = None
    lr: float | None = None
    positive_a: bool = False
    backend: str = "torch"
    refit: bool = True


@dataclass
class _Fit:
    theta: np.ndarray
    a: np.ndarray
    b: np.ndarray
    diagnostics: dict


def _fit_map(
    Y: np.ndarray,
    M: np.ndarray,
    *,
    kind: str,
    D: int,
    seed: int,
    optimizer: str,
    epochs: int,
    lr: float,
    positive_a: bool,
    em_rounds: int = 15,
    precision: str = "float64",
    init: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    hyper_init: dict | None = None,
) -> _Fit:
    """MAP of abilities and item parameters; prior scales learned by Laplace-EM between MAP rounds.

    Why not joint MAP on the scales too: with all a_j equal, the a-prior density grows like σ_a^−N as σ_a → 0 and
    on 200 subjects × 2,000 items that funnel out-scores the 2PL fit (it collapses to a 1PL). The EM update adds
    each parameter's posterior variance (inverse diagonal Fisher information + prior precision), which keeps σ_a
    at the spread the data support.

    ``init`` = (θ, a, b) and ``hyper_init`` (the prior scales) warm-start a refit from an earlier fit: the item model
    keeps its rotation and the optimiser starts near the answer (an online recalibration takes a few iterations).
    """
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    dt = getattr(torch, precision)
    S, N = Y.shape
    g = torch.Generator().manual_seed(int(seed))
    y, m = torch.as_tensor(Y, dtype=dt), torch.as_tensor(M, dtype=dt)
    n_obs = float(m.sum())

    # Deterministic, data-driven start: difficulties from item accuracies, first ability axis from subject accuracy.
    p_item = ((y * m).sum(0) + 0.5) / (m.sum(0) + 1.0)
    acc = ((y * m).sum(1) + 0.5) / (m.sum(1) + 1.0)
    z = torch.logit(acc)
    z = (z - z.mean()) / (z.std() + 1e-6) if S > 1 else z * 0
    theta = 0.3 * torch.randn(S, D, generator=g, dtype=dt)
    theta[:, 0] = z
    b = -torch.logit(p_item)
    log_a = kind != "1pl" and (positive_a or D == 1)
    if kind == "1pl":
        raw_a = torch.zeros(N, 1, dtype=dt)
    elif log_a:
        raw_a = math.log(1.0 / math.sqrt(D)) + 0.1 * torch.randn(N, D, generator=g, dtype=dt)
    else:
        raw_a = 1.0 / math.sqrt(D) + 0.3 * torch.randn(N, D, generator=g, dtype=dt)
    if init is not None:
        theta0, a0, b0 = init
        theta = torch.as_tensor(np.asarray(theta0), dtype=dt).clone()
        b = torch.as_tensor(np.asarray(b0), dtype=dt).clone()
        if kind != "1pl":
            a0 = torch.as_tensor(np.asarray(a0), dtype=dt)
            raw_a = a0.clamp_min(1e-6).log() if log_a else a0.clone()
    params = [theta, b] + ([raw_a] if kind != "1pl" else [])
    # Prior: b ~ N(mu_b, s_b²); log a (or a) ~ N(0, s_a²), centred at 0 because a learned centre would let a grow
    # and θ shrink for free; θ ~ N(0, I), or N(0, s_t²) for 1PL where a = 1 fixes the scale instead.
    hyper = {"mu_b": float(b.mean()), "sigma_b": float(b.std()) + 0.1, "sigma_a": 0.5, "sigma_theta": 1.0}
    hyper.update({k: float(v) for k, v in (hyper_init or {}).items() if k in hyper})
    for p in params:
        p.requires_grad_(True)
    ones = torch.ones(N, 1, dtype=dt)

    def item_a():
        return ones if kind == "1pl" else raw_a.exp() if log_a else raw_a

    def neg_log_posterior():
        logits = (theta @ item_a().T - b).clamp(-LOGIT_CLIP, LOGIT_CLIP)
        nll = F.binary_cross_entropy_with_logits(logits, y, weight=m, reduction="sum")
        pen = 0.5 * (((b - hyper["mu_b"]) / hyper["sigma_b"]) ** 2).sum()
        pen = pen + 0.5 * ((theta / hyper["sigma_theta"]) ** 2).sum()
        if kind != "1pl":
            pen = pen + 0.5 * ((raw_a / hyper["sigma_a"]) ** 2).sum()
        return (nll + pen) / n_obs, nll

    iterations, converged, rounds = 0, False, 0
    for rounds in range(1, em_rounds + 1):
        n_iter, opt_ok = _optimise(params, neg_log_posterior, optimizer, epochs, lr)
        iterations += n_iter
        with torch.no_grad():
            new = _em_scales(theta, item_a(), b, raw_a, m, hyper, kind, log_a)
        change = max(abs(math.log(v / hyper[k])) for k, v in new.items() if k.startswith("sigma"))
        # Over-relaxed EM on log σ: plain EM contracts by only ~0.6 per round here; 1.5 brings that to ~0.4.
        for k, v in new.items():
            hyper[k] = v if k == "mu_b" else hyper[k] * (v / hyper[k]) ** _EM_RELAX
        if os.environ.get("MERGE3_IRT_DEBUG"):
            print(f"EM round {rounds}: {n_iter} iterations, scale change {change:.4f}, {hyper}")
        if change < 0.01:
            converged = opt_ok
            break
    with torch.no_grad():
        loss, nll = neg_log_posterior()
        a = item_a()
    if not torch.isfinite(loss):
        raise Merge3Error("IRT fit diverged (non-finite loss); try optimizer='adam' with a smaller lr")
    diag = {
        "loss": float(loss),
        "loglik_per_answer": -float(nll) / n_obs,
        "iterations": iterations,
        "em_rounds": rounds,
        "converged": converged,
        "seconds": time.perf_counter() - t0,
        "n_subjects": S,
        "n_items": N,
        "n_answers": int(n_obs),
        "prior": {k: v for k, v in hyper.items() if not (k == "sigma_a" and kind == "1pl") and not (k == "sigma_theta" and kind != "1pl")},
    }
    if not converged:
        warnings.warn(
            f"IRT fit ({kind}, D={D}) did not converge within {em_rounds} rounds of {epochs} "
            f"{'iterations' if optimizer == 'lbfgs' else 'epochs'}; raise epochs",
            IRTConvergenceWarning,
            stacklevel=3,
        )
    return _Fit(theta.detach().numpy().copy(), a.detach().numpy().copy(), b.detach().numpy().copy(), diag)


def _em_scales(theta, a, b, raw_a, m, hyper: dict, kind: str, log_a: bool) -> dict:
    """Laplace-EM M-step: σ² = (Σ (x − μ)² + Σ posterior variances + 2β) / (n + 2α + 2), inverse-gamma hyperprior."""
    logits = (theta @ a.T - b).clamp(-LOGIT_CLIP, LOGIT_CLIP)
    p = torch_sigmoid(logits)
    w = m * p * (1 - p)  # Fisher information of each answer's logit

    def update(dev2, info, sigma):
        var = 1.0 / (info + 1.0 / sigma**2)
        return math.sqrt(float((dev2 + var).sum() + 2 * _IG_BETA) / (dev2.numel() + 2 * _IG_ALPHA + 2))

    out = {"mu_b": float(b.mean())}
    out["sigma_b"] = update((b - out["mu_b"]) ** 2, w.sum(0), hyper["sigma_b"])
    if kind == "1pl":
        out["sigma_theta"] = update(theta[:, 0] ** 2, w.sum(1), hyper["sigma_theta"])
    else:
        info = w.T @ theta**2  # d logit / d a_jd = θ_id
        if log_a:
            info = info * a**2  # chain rule for log a
        out["sigma_a"] = update(raw_a**2, info, hyper["sigma_a"])
    return out


def torch_sigmoid(x):
    import torch

    return torch.sigmoid(x)


def _optimise(params, objective, optimizer: str, epochs: int, lr: float) -> tuple[int, bool]:
    import torch

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            params,
            lr=lr,
            max_iter=epochs,
            tolerance_grad=1e-6,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss, _ = objective()
            loss.backward()
            return loss

        opt.step(closure)
        n_iter = int(opt.state[opt._params[0]]["n_iter"])
        return n_iter, n_iter < epochs
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
        prev = math.inf
        for epoch in range(epochs):
            opt.zero_grad()
            loss, _ = objective()
            loss.backward()
            opt.step()
            if abs(prev - float(loss)) < 1e-9:
                return epoch + 1, True
            prev = float(loss)
        return epochs, False
    raise Merge3Error(f"unknown optimizer {optimizer!r}; use 'lbfgs' or 'adam'")


def _population_prior(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of calibration abilities, floored so a new subject may lie outside the cloud."""
    D = theta.shape[1]
    if theta.shape[0] <= D + 1:
        return np.zeros(D), np.eye(D)
    cov = np.atleast_2d(np.cov(theta, rowvar=False))
    return theta.mean(0), cov + 0.05 * np.eye(D) * max(1e-3, float(np.trace(cov)) / D)


def _defaults(optimizer: str, epochs: int | None, lr: float | None) -> tuple[int, float]:
    if optimizer == "lbfgs":
        return epochs or 500, lr or 1.0
    return epochs or 2000, lr or 0.1


def _check_kind(kind: str, dims: Any) -> None:
    if kind not in KINDS:
        raise Merge3Error(f"unknown IRT kind {kind!r}; use one of {KINDS}")
    if kind != "mirt" and dims not in (1, "auto", None):
        raise Merge3Error(f"kind {kind!r} is one-dimensional; use kind='mirt' for dims={dims}")


def _check_enough_subjects(n_subjects: int, D: int) -> None:
    need = min_subjects(D)
    if n_subjects < need:
        raise Merge3Error(
            f"{n_subjects} calibration subjects are too few for a {D}-dimensional IRT model (need ≥ {need}); "
            "lower dims or add calibration subjects (e.g. more random merges)"
        )


def fit_irt(
    responses: Any,
    *,
    kind: str = "mirt",
    dims: int | str = "auto",
    dims_grid: Sequence[int] = DIMS_GRID,
    mask: Any = None,
    item_ids: Sequence[Any] | None = None,
    tasks: Sequence[Any] | None = None,
    subject_ids: Sequence[Any] | None = None,
    seed: int = 0,
    optimizer: str = "lbfgs",
    epochs: int | None = None,
    lr: float | None = None,
    positive_a: bool = False,
    validation_fraction: float = 0.2,
    backend: str = "torch",
) -> IRTModel:
    """Fit an IRT model to a subjects × items 0/1 response matrix (NaN or ``mask`` = missing) by MAP.

    ``kind``: ``"1pl"``, ``"2pl"`` or ``"mirt"`` (multidimensional 2PL). ``dims="auto"`` (mirt) picks D from
    ``dims_grid`` by held-out log-likelihood: a seeded ``validation_fraction`` of subjects is held out, each held-out
    subject's ability is fitted on half its answers and scored on the other half; the smallest D within one paired
    standard error of the best wins, then the model is refitted on all subjects. ``positive_a`` keeps
    discriminations positive (log-normal prior, as py-irt); ``False`` gives a rotation-invariant Gaussian prior.
    ``optimizer``: ``"lbfgs"`` (default; ``epochs`` = max iterations, 500) or ``"adam"`` (2000 epochs, lr 0.1).
    ``backend="py-irt"`` fits with py-irt's SVI instead (needs the separate py-irt environment).
    Same inputs and seed → identical parameters.

    >>> import numpy as np
    >>> y = np.random.default_rng(1).random((30, 50)) < 0.6
    >>> fit_irt(y, kind="1pl", seed=3).kind
    '1pl'
    """
    _check_kind(kind, dims)
    Y, M = response_matrix(responses, mask)
    S, N = Y.shape
    ids = check_item_ids(item_ids, N)
    labels = check_tasks(tasks, N)
    subj = None if subject_ids is None else [str(s) for s in subject_ids]
    if subj is not None and len(subj) != S:
        raise Merge3Error(f"{len(subj)} subject ids for {S} subjects")
    n_const = _warn_constant_items(Y, M, ids)
    epochs, lr = _defaults(optimizer, epochs, lr)
    common = dict(kind=kind, seed=seed, optimizer=optimizer, epochs=epochs, lr=lr, positive_a=positive_a)

    selection = None
    if kind == "mirt" and dims in ("auto", None):
        train, val = _split_subjects(S, validation_fraction, seed)
        D, selection, _ = select_dims(Y, M, train, val, dims_grid, **common)
    else:
        D = 1 if kind != "mirt" else int(dims)
        if D < 1:
            raise Merge3Error(f"dims must be ≥ 1, got {D}")
    _check_enough_subjects(S, D)
    if backend == "torch":
        fit = _fit_map(Y, M, D=D, **common)
    elif backend == "py-irt":
        # py-irt trains by SVI with Adam: LBFGS settings do not carry over, so use its own defaults then.
        if optimizer != "adam":
            common.update(optimizer="svi-adam", epochs=2000, lr=0.1)
        from merge3.itembank._pyirt import fit_pyirt  # optional: only when asked for (it imports _Fit from here)

        fit = fit_pyirt(Y, M, kind=kind, D=D, seed=seed, epochs=common["epochs"], lr=common["lr"])
    else:
        raise Merge3Error(f"unknown IRT backend {backend!r}; use 'torch' or 'py-irt'")
    fit.diagnostics["constant_items"] = n_const
    if selection is not None:
        fit.diagnostics["dims_selection"] = selection
    return _to_model(fit, kind, ids, labels, subj, {**common, "backend": backend, "dims": dims, "n_subjects": S})


def refit_irt(model: IRTModel, responses: Any, mask: Any = None, *, subject_ids: Sequence[Any] | None = None,
              em_rounds: int = 4, epochs: int = 200) -> IRTModel:
    """Refit ``model`` on a (possibly larger, sparse) response matrix, warm-started from its parameters.

    The first ``len(model.subject_ids)`` rows must be the model's own subjects (their abilities start where they
    were); further rows (new subjects, e.g. the candidates a search evaluated, NaN where not asked) start at their
    MAP ability under the current items. Online recalibration: the item model follows the region the new subjects
    come from; a few EM rounds from a warm start take seconds. Same inputs → the same parameters.
    """
    Y, M = response_matrix(responses, mask)
    old = 0 if model.theta is None else model.theta.shape[0]
    if Y.shape[1] != model.n_items:
        raise Merge3Error(f"refit: responses have {Y.shape[1]} items, the model {model.n_items}")
    if Y.shape[0] < old:
        raise Merge3Error(f"refit: {Y.shape[0]} subjects, fewer than the model's {old}")
    new = map_logistic(model.a, model.b, Y[old:], M[old:], model.theta_mean, np.linalg.inv(model.theta_cov))
    theta = np.concatenate([model.theta, new]) if old else new
    meta = dict(model.metadata)
    kind, seed = model.kind, int(meta.get("seed", 0))
    with warnings.catch_warnings():  # a few warm rounds are the point: not running to convergence is no failure
        warnings.simplefilter("ignore", IRTConvergenceWarning)
        fit = _fit_map(Y, M, kind=kind, D=model.D, seed=seed, optimizer="lbfgs", epochs=epochs, lr=1.0,
                       positive_a=bool(meta.get("positive_a", False)), em_rounds=em_rounds,
                       init=(theta, model.a, model.b), hyper_init=model.diagnostics.get("prior"))
    ids = list(model.subject_ids or [str(i) for i in range(old)])
    ids += [str(s) for s in subject_ids[old:]] if subject_ids is not None else [f"new-{i}" for i in range(Y.shape[0] - old)]
    return _to_model(fit, kind, list(model.item_ids), model.tasks, ids, {**meta, "refit_from": model.n_items,
                                                                       "refit_subjects": int(Y.shape[0])})


def _to_model(fit: _Fit, kind: str, ids: list[str], tasks: np.ndarray, subject_ids, meta: dict) -> IRTModel:
    mean, cov = _population_prior(fit.theta)
    return IRTModel(
        a=fit.a,
        b=fit.b,
        kind=kind,
        theta=fit.theta,
        item_ids=ids,
        tasks=tasks,
        subject_ids=subject_ids,
        theta_mean=mean,
        theta_cov=cov,
        diagnostics=fit.diagnostics,
        metadata=meta,
    )


def _split_subjects(S: int, fraction: float, seed: int, keep_in_train: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of subject indices; ``keep_in_train`` never lands in validation."""
    rng = np.random.default_rng([int(seed), 7919])
    pool = np.setdiff1d(np.arange(S), np.asarray(keep_in_train, dtype=np.int64))
    n_val = int(round(fraction * S))
    n_val = min(max(n_val, 2), pool.size - 1) if pool.size > 2 else 0
    val = np.sort(rng.choice(pool, size=n_val, replace=False)) if n_val > 0 else np.array([], dtype=np.int64)
    return np.setdiff1d(np.arange(S), val), val


def _heldout_scores(fit: _Fit, Y: np.ndarray, M: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Per held-out subject: fit θ on a random half of its answers, score log-lik and accuracy on the other half."""
    rng = np.random.default_rng([int(seed), 104729])
    half = rng.random(Y.shape) < 0.5
    seen, target = M & half, M & ~half
    mean, cov = _population_prior(fit.theta)
    theta = map_logistic(fit.a, fit.b, Y, seen, mean, np.linalg.inv(cov))
    z = np.clip(theta @ fit.a.T - fit.b, -LOGIT_CLIP, LOGIT_CLIP)
    n_t = np.maximum(target.sum(1), 1)
    loglik = (_loglik(z, Y) * target).sum(1) / n_t
    acc_err = np.abs(((sigmoid(z) - Y) * target).sum(1) / n_t)
    return {"loglik": loglik, "acc_error": acc_err}


def _choose_dims(scores: dict[int, dict[str, np.ndarray]]) -> tuple[int, dict]:
    """Smallest D whose held-out log-lik is within one paired standard error of the best D's (one-SE rule)."""
    means = {D: float(s["loglik"].mean()) for D, s in scores.items()}
    best = max(means, key=means.get)
    table = {}
    for D, s in scores.items():
        diff = scores[best]["loglik"] - s["loglik"]
        se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else 0.0
        table[D] = {
            "heldout_loglik": means[D],
            "heldout_acc_error": float(s["acc_error"].mean()),
            "gap": float(diff.mean()),
            "gap_se": se,
        }
    chosen = min(D for D, t in table.items() if t["gap"] <= t["gap_se"])
    return chosen, table


def select_dims(
    Y: np.ndarray,
    M: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    dims_grid: Sequence[int],
    **fit_kwargs: Any,
) -> tuple[int, dict, dict[int, _Fit]]:
    """Fit each feasible D on ``train`` subjects, score on ``val``; return (D, selection table, fits by D)."""
    if val.size < 2:
        raise Merge3Error(f"{len(train) + len(val)} subjects are too few to choose D by validation; pass dims=1")
    grid = sorted({int(D) for D in dims_grid if D >= 1})
    feasible = [D for D in grid if train.size >= min_subjects(D)]
    if not feasible:
        _check_enough_subjects(train.size, grid[0] if grid else 1)
    fits, scores = {}, {}
    # Screening fits: a few EM rounds of a capped optimiser in float32 rank the dimensions as the converged fits do,
    # for a fraction of the time; only the chosen D is then fitted to convergence (float64).
    screening = {**fit_kwargs, "epochs": min(fit_kwargs.get("epochs") or _SCREEN_EPOCHS, _SCREEN_EPOCHS)}
    for D in feasible:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IRTConvergenceWarning)
            fits[D] = _fit_map(Y[train], M[train], D=D, em_rounds=_SCREEN_EM_ROUNDS, precision="float32", **screening)
        scores[D] = _heldout_scores(fits[D], Y[val], M[val], fit_kwargs.get("seed", 0))
        best = max(float(s["loglik"].mean()) for s in scores.values())
        # Held-out log-lik is unimodal in D in practice: once a larger D scores worse than the best so far, the
        # larger ones (the slowest fits) would only score worse still.
        if len(scores) > 1 and float(scores[D]["loglik"].mean()) < best:
            break
    D, table = _choose_dims(scores)
    fits = {D: _fit_map(Y[train], M[train], D=D, **fit_kwargs)}
    selection = {
        "chosen": D,
        "criterion": "held-out log-lik of screening fits (capped optimiser), one-SE rule; stops at the first D "
                     "scoring below the best; the chosen D is then fitted to convergence",
        "skipped_too_few_subjects": [d for d in grid if d not in feasible],
        "not_tried": [d for d in feasible if d not in scores],
        "n_train": int(train.size),
        "n_validation": int(val.size),
        "scores": table,
    }
    return D, selection, fits


