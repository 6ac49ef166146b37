"""Checks and conversions of what IRT calibration is given: response matrices with missing answers, item ids,
task labels, and items every subject answered alike."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Sequence

import numpy as np

from merge3._errors import Merge3Error

class ConstantItemWarning(UserWarning):
    """Some items were answered the same way by every subject (or by none): the prior alone places them."""


def min_subjects(dims: int) -> int:
    """Fewest calibration subjects accepted for a ``dims``-dimensional model (a_j has ``dims`` free entries)."""
    return max(5, 3 * dims + 2)


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def response_matrix(responses: Any, mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a subjects × items response matrix; return ``(Y, M)``: Y float64 with 0 where missing, M observed.

    Missing answers are NaN in ``responses`` or False in ``mask``. Values must be 0/1 (bool is fine).

    >>> Y, M = response_matrix([[1, 0, float("nan")], [0, 1, 1]])
    >>> Y.tolist(), M.tolist()
    ([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[True, True, False], [True, True, True]])
    """
    if hasattr(responses, "detach"):  # torch tensor, without importing torch
        responses = responses.detach().cpu().numpy()
    try:
        R = np.asarray(responses, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise Merge3Error(f"response matrix must be numeric 0/1 (NaN = missing): {e}") from None
    if R.ndim != 2:
        raise Merge3Error(f"response matrix must be 2-D (subjects × items), got shape {R.shape}")
    if R.shape[0] < 1 or R.shape[1] < 1:
        raise Merge3Error(f"response matrix is empty: shape {R.shape}")
    if np.isinf(R).any():
        raise Merge3Error("response matrix contains ±inf; use 0/1 for answers and NaN for missing ones")
    M = ~np.isnan(R)
    if mask is not None:
        mask = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask, dtype=bool)
        if mask.shape != R.shape:
            raise Merge3Error(f"mask shape {mask.shape} does not match the response matrix {R.shape}")
        M &= mask
    bad = M & (R != 0) & (R != 1)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise Merge3Error(f"responses must be 0/1 (NaN = missing); found {R[i, j]!r} at subject {i}, item {j}")
    if not M.any():
        raise Merge3Error("response matrix has no observed answers")
    return np.where(M, R, 0.0), M


def check_item_ids(item_ids: Sequence[Any] | None, n_items: int) -> list[str]:
    """Item ids as strings, one per item and unique; default ``"0" … "N-1"``."""
    if item_ids is None:
        return [str(j) for j in range(n_items)]
    ids = [str(x) for x in item_ids]
    if len(ids) != n_items:
        raise Merge3Error(f"{len(ids)} item ids for {n_items} items")
    dups = sorted(x for x, k in Counter(ids).items() if k > 1)
    if dups:
        raise Merge3Error(f"duplicate item ids: {dups[:5]} ({len(dups)} ids appear more than once)")
    return ids


def check_tasks(tasks: Sequence[Any] | None, n_items: int, task_names: Sequence[str] | None = None) -> np.ndarray:
    """Task label per item as a string array; every name in ``task_names`` must own at least one item."""
    if tasks is None:
        labels = np.full(n_items, "all", dtype=object)
    else:
        labels = np.asarray([str(t) if t is not None else "" for t in tasks], dtype=object)
        if labels.shape != (n_items,):
            raise Merge3Error(f"{labels.size} task labels for {n_items} items")
        if (labels == "").any():
            raise Merge3Error(f"{int((labels == '').sum())} items have an empty task label")
    if task_names is not None:
        empty = [t for t in task_names if not (labels == str(t)).any()]
        if empty:
            raise Merge3Error(f"task(s) with no items: {empty}")
        extra = sorted(set(labels) - {str(t) for t in task_names})
        if extra:
            raise Merge3Error(f"items labelled with unknown task(s) {extra}; known: {list(task_names)}")
    return labels


def task_order(tasks: np.ndarray) -> list[str]:
    """Task names in order of first appearance."""
    return list(dict.fromkeys(tasks.tolist()))


def _warn_constant_items(Y: np.ndarray, M: np.ndarray, item_ids: list[str]) -> int:
    n_obs = M.sum(0)
    n_right = (Y * M).sum(0)
    const = (n_right == 0) | (n_right == n_obs)
    if const.any():
        names = [item_ids[j] for j in np.flatnonzero(const)[:5]]
        warnings.warn(
            f"{int(const.sum())} of {len(item_ids)} items have a constant (or empty) response column, e.g. {names}: "
            "they carry no information on abilities and their difficulty comes from the prior",
            ConstantItemWarning,
            stacklevel=3,
        )
    return int(const.sum())


