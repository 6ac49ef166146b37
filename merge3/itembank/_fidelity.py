"""Estimator fidelity: how close each cheap estimate comes to the true full-bank accuracy of unseen candidates.

>>> import numpy as np
>>> from merge3.itembank._synthetic_irt import simulate_bank
>>> bank = simulate_bank(n_subjects=60, items_per_task=40, tasks=("x", "y"), seed=0)
>>> from merge3.itembank import IRTFit
>>> rows = fidelity_benchmark(bank.responses[:45], bank.tasks, bank.responses[45:], ns=(5,),
...                           subset_methods=("random",), fit=IRTFit(kind="2pl"), seed=0)
>>> sorted({r["estimator"] for r in rows})
['gp-irt', 'irt', 'naive', 'p-irt']
>>> print(format_fidelity_table(rows).splitlines()[0].split())
['estimator', 'subset', 'n', 'items', '%bank', 'MAE', 'max', 'Spearman']
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from merge3._errors import Merge3Error
from merge3.itembank._estimators import ESTIMATORS, Estimator, _NEEDS_ENDPOINTS, _task_accuracy
from merge3.itembank._responses import check_tasks, response_matrix
from merge3.itembank._subsets import SUBSET_METHODS

FIDELITY_NS = (5, 10, 20, 50, 100)


def fidelity_benchmark(
    calibration: Any,
    tasks: Sequence[Any],
    new: Any,
    *,
    endpoints: Sequence[int | str] | None = None,
    ns: Sequence[int] = FIDELITY_NS,
    subset_methods: Sequence[str] = SUBSET_METHODS,
    estimators: Sequence[str] | None = None,
    seed: int = 0,
    **calibrate_kwargs: Any,
) -> list[dict]:
    """Calibrate on ``calibration`` (subjects × items), then score every estimator × subset method × n on ``new``.

    ``new``: the full correctness (candidates × items; NaN = missing) of candidates never seen in calibration.
    Each row: estimator, subset, n, items (per candidate), fraction of the bank, ``mae``/``max_error`` of the
    overall (mean-of-tasks) accuracy, ``spearman`` across candidates (None when the truth or the estimates are
    constant), and ``mae_task`` over candidates × tasks. mp-IRT/gmp-IRT need ``endpoints``.
    """
    labels = check_tasks(tasks, np.asarray(calibration, dtype=float).shape[1])
    Yn, Mn = response_matrix(new)
    if Yn.shape[1] != labels.size:
        raise Merge3Error(f"new candidates answer {Yn.shape[1]} items, the calibration bank has {labels.size}")
    if Yn.shape[0] < 2:
        raise Merge3Error("need at least 2 new candidates to compare estimates with the truth")
    est = Estimator.calibrate(
        calibration, labels, endpoints=endpoints, ns=ns, subset_methods=subset_methods, seed=seed, **calibrate_kwargs
    )
    names = est.task_names
    truth = _task_accuracy(Yn, Mn, labels, names)
    chosen = [e for e in (estimators or ESTIMATORS) if endpoints or e not in _NEEDS_ENDPOINTS]
    rows = []
    for (method, n), subset in sorted(est.subsets.items()):
        R = np.where(Mn, Yn, np.nan)
        for e in chosen:
            per_task = est.estimate_matrix(R, e, n=n, subset=method)
            overall, true_overall = per_task.mean(1), truth.mean(1)
            err = np.abs(overall - true_overall)
            rows.append({
                "estimator": e,
                "subset": method,
                "n": n,
                "items": subset.n_items,
                "fraction_of_bank": subset.n_items / labels.size,
                "mae": float(err.mean()),
                "max_error": float(err.max()),
                "spearman": _spearman(overall, true_overall),
                "mae_task": float(np.abs(per_task - truth).mean()),
            })
    return rows


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None  # undefined, not silently NaN
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def format_fidelity_table(rows: list[dict]) -> str:
    """Plain-text table of :func:`fidelity_benchmark` rows."""
    head = f"{'estimator':<9} {'subset':<15} {'n':>4} {'items':>6} {'%bank':>6} {'MAE':>7} {'max':>7} {'Spearman':>8}"
    lines = [head]
    for r in rows:
        rho = "   n/a" if r["spearman"] is None else f"{r['spearman']:8.3f}"
        lines.append(
            f"{r['estimator']:<9} {r['subset']:<15} {r['n']:>4} {r['items']:>6} {100 * r['fraction_of_bank']:>5.1f}% "
            f"{r['mae']:7.4f} {r['max_error']:7.4f} {rho}"
        )
    return "\n".join(lines)
