"""TIES' whole merge of one tensor as one compiled loop on the CPU (numba), for TIES and DARE-ties builds.

The torch sweep in ``_sparsify.ties_merge_into`` runs a dozen elementwise ops per cache-sized chunk; each is fast,
but together they take ~3× as long as reading the inputs once (a TIES build without draws took as long as a
DARE-ties build that reads twice the bytes: the ops, not memory, were the cost). Here every row of a tensor is
taken through the same steps, in the same float32 order, while it sits in L1 — so the result is bit-identical to the
torch sweep (and to the step-by-step merge), tested. numba is optional: without it (or for CUDA tensors, other
dtypes, non-contiguous outputs) the torch sweep runs instead. numba is imported on the first TIES build, not with
merge3, and compiles the loop once per machine (cached next to this file, or in numba's user-wide cache).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

ENV_DISABLE = "MERGE3_NO_NUMBA"
"""Set to 1 to always use the torch sweep (for comparisons and debugging)."""

_kernel = None  # the compiled loop, once built; False when numba is unavailable


def _compile():
    from numba import float32, njit

    @njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def ties_rows(deltas, draws, drops, rescales, below, weights, normalize, scale, tie, anchor, out, r0, r1,
                  cancelled):
        """Rows r0:r1 of ``out = anchor + scale · disjoint_mean(elect(w · sparsify(deltas)))``; returns the sum of the
        raw elected signs and flags in ``cancelled`` each row holding an exact cancellation (its result depends on
        the tie sign). Each loop over a row's columns is branch-free, so LLVM vectorises it."""
        n_models, _, cols = deltas.shape
        one, zero = float32(1.0), float32(0.0)
        half_tie = float32(0.5) * tie
        values = np.empty((n_models, cols), dtype=np.float32)
        total, elected = np.empty(cols, dtype=np.float32), np.empty(cols, dtype=np.float32)
        raw, divisor = np.empty(cols, dtype=np.float32), np.empty(cols, dtype=np.float32)
        sign_sum = 0
        for r in range(r0, r1):
            for t in range(n_models):
                v, d, w, b = values[t], deltas[t, r], weights[t, r], below[t]
                if draws.shape[0] > 0:  # DARE: keep u ≥ p, rescale survivors
                    u, p, rescale = draws[t, r], drops[t], rescales[t]
                    for c in range(cols):
                        v[c] = ((one if u[c] >= p else zero) * d[c]) * rescale
                else:
                    for c in range(cols):
                        v[c] = d[c]
                if b == b:  # a trim threshold (NaN: keep all): hardshrink at b keeps |x| > b
                    for c in range(cols):
                        x = v[c]
                        v[c] = zero if (x >= -b) & (x <= b) else x
                for c in range(cols):
                    v[c] = v[c] * w
            for c in range(cols):
                total[c] = values[0, c]
            for t in range(1, n_models):
                v = values[t]
                for c in range(cols):
                    total[c] = total[c] + v[c]
            votes = 0
            for c in range(cols):
                positive, negative = total[c] > zero, total[c] < zero
                votes += np.int64(positive) - np.int64(negative)
                q = (one if positive else zero) - (one if negative else zero)
                raw[c] = q
                y = q + half_tie  # sign(e) where e ≠ 0, the tie sign where e = 0
                elected[c] = (one if y > zero else zero) - (one if y < zero else zero)
                total[c] = zero
                divisor[c] = zero
            sign_sum += votes
            for t in range(n_models):
                v, w = values[t], weights[t, r]
                for c in range(cols):
                    y = v[c] * elected[c]  # |value| where it agrees with the elected sign
                    agrees = y > zero
                    total[c] = total[c] + (y if agrees else zero)
                    divisor[c] = divisor[c] + (w if agrees else zero)
            exact_cancellations = 0
            for c in range(cols):
                exact_cancellations += np.int64((raw[c] == zero) & (total[c] > zero))
            cancelled[r] = exact_cancellations > 0
            o, a = out[r], anchor[r]
            if normalize:  # mergekit's guard: a zero divisor divides by 1
                for c in range(cols):
                    e = divisor[c]
                    o[c] = ((total[c] * elected[c]) / (e + (one if e == zero else zero))) * scale + a[c]
            else:
                for c in range(cols):
                    o[c] = (total[c] * elected[c]) * scale + a[c]
        return sign_sum

    @njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
    def vote_rows(deltas, below, weights):
        """Σ over entries of sign(Σ_t w_t · trim_t(deltas_t)): TIES' model-wide tie-sign vote, the same steps."""
        n_models, rows, cols = deltas.shape
        zero = float32(0.0)
        total, v = np.empty(cols, dtype=np.float32), np.empty(cols, dtype=np.float32)
        votes = 0
        for r in range(rows):
            for t in range(n_models):
                d, w, b = deltas[t, r], weights[t, r], below[t]
                for c in range(cols):
                    x = d[c]
                    v[c] = (zero if (x >= -b) & (x <= b) else x) * w if b == b else x * w
                if t == 0:
                    for c in range(cols):
                        total[c] = v[c]
                else:
                    for c in range(cols):
                        total[c] = total[c] + v[c]
            for c in range(cols):
                votes += np.int64(total[c] > zero) - np.int64(total[c] < zero)
        return votes

    return ties_rows, vote_rows


def _loop():
    global _kernel
    if _kernel is None:
        try:
            _kernel = _compile()
        except ImportError:
            _kernel = False
    return _kernel or None


def available() -> bool:
    """Whether the compiled TIES loop can run here (numba importable and not disabled by ``MERGE3_NO_NUMBA``)."""
    return os.environ.get(ENV_DISABLE, "") in ("", "0") and _loop() is not None


def _applies(*tensors: torch.Tensor | None) -> bool:
    return available() and all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32
                                             and t.is_contiguous()) for t in tensors)


def _layout(shape: tuple[int, ...], weights: Sequence) -> tuple[int, int]:
    """Rows × columns the loop walks: a matrix's rows (each has one row-block weight), or a vector as one row."""
    row_blocks = any(isinstance(w, torch.Tensor) and w.dim() > 0 for w in weights)
    if not shape or (len(shape) == 1 and not row_blocks):
        return 1, int(np.prod(shape))
    return shape[0], int(np.prod(shape[1:]))


def _per_row(weights: Sequence, rows: int) -> np.ndarray:
    """Each task's weight per row (a scalar repeated, a row-block weight flattened), float32 as torch rounds it."""
    out = np.empty((len(weights), rows), dtype=np.float32)
    for t, w in enumerate(weights):
        out[t] = w.detach().reshape(-1).cpu().numpy() if isinstance(w, torch.Tensor) and w.dim() > 0 else float(w)
    return out


def _thresholds(below: Sequence[float | None] | None, n_models: int) -> np.ndarray:
    return np.asarray([np.nan if b is None else b for b in (below or [None] * n_models)], dtype=np.float32)


def _rows(t: torch.Tensor, *shape: int) -> np.ndarray:
    return t.detach().reshape(*shape).numpy()


def ties_merge_cpu(deltas: torch.Tensor, anchor: torch.Tensor, out: torch.Tensor, weights: Sequence,
                   below: Sequence[float | None] | None, draws: torch.Tensor | None, drop_rates: Sequence[float],
                   rescales: Sequence[float], normalize: bool, tie_sign: float | None, scale: float) -> bool:
    """``_sparsify.ties_merge_into``'s merge of one tensor by the compiled loop; False (nothing written) where it does
    not apply, so the caller runs the torch sweep. ``below`` are the hardshrink thresholds (``_just_below``)."""
    if not _applies(deltas, anchor, out, draws):
        return False
    n_models = deltas.shape[0]
    rows, cols = _layout(tuple(anchor.shape), weights)
    f32 = np.float32
    args = (_rows(deltas, n_models, rows, cols),
            np.empty((0, 1, 1), dtype=f32) if draws is None else _rows(draws, n_models, rows, cols),
            np.asarray(list(drop_rates) or [0.0] * n_models, dtype=f32),
            np.asarray(list(rescales) or [1.0] * n_models, dtype=f32),
            _thresholds(below, n_models), _per_row(weights, rows), bool(normalize), f32(scale))
    a, o = _rows(anchor, rows, cols), _rows(out, rows, cols)
    cancelled = np.zeros(rows, dtype=np.bool_)
    ties_rows = _loop()[0]
    sign_sum = ties_rows(*args, f32(1.0 if tie_sign is None else tie_sign), a, o, 0, rows, cancelled)
    if tie_sign is None and sign_sum <= 0:  # the tensor's tie sign is −1: redo the rows it changes
        for r in np.flatnonzero(cancelled):
            ties_rows(*args, f32(-1.0), a, o, int(r), int(r) + 1, np.zeros(rows, dtype=np.bool_))
    return True


def elected_sign_sum_cpu(deltas: torch.Tensor, weights: Sequence, below: Sequence[float | None] | None) -> int | None:
    """``_sparsify.elected_sign_sum`` by the compiled loop; None where it does not apply."""
    if not _applies(deltas):
        return None
    n_models = deltas.shape[0]
    rows, cols = _layout(tuple(deltas.shape[1:]), weights)
    vote_rows = _loop()[1]
    return int(vote_rows(_rows(deltas, n_models, rows, cols), _thresholds(below, n_models), _per_row(weights, rows)))


__all__ = ["ENV_DISABLE", "available", "elected_sign_sum_cpu", "ties_merge_cpu"]
