"""The pieces the sparsifying methods (TIES, DARE, DELLA, Breadcrumbs) are made of: magnitude ranks and thresholds,
seeded uniform draws, trimming, and TIES' sign election with the disjoint mean.

What does not depend on a candidate's coefficients is kept in ``MergeInputs``' cache when the builder asks for it:
each task vector's magnitudes sorted once (a threshold for any density is then an index) and the uniform draws of a
seed (a random mask for any drop rate is then a comparison).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from merge3.methods._arithmetic import add_weighted, safe_divisor
from merge3.methods._fused_cpu import elected_sign_sum_cpu, ties_merge_cpu
from merge3.methods._inputs import MergeInputs


def keep_count(density: float, n: int) -> int | None:
    """How many of n entries a per-tensor trim at ``density`` keeps (mergekit: ``max(1, int(density·n))``, none at
    density ≤ 0); None means all of them (density ≥ 1)."""
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending; on CPU in place through numpy, since torch.sort would also return int64 indices
    (three times the memory of the magnitudes, for a whole model under ``trim="model"``)."""
    if x.device.type == "cpu":
        x.numpy().sort(axis=1)
        return x
    return torch.sort(x, dim=1).values


def sorted_magnitudes(inputs: MergeInputs, key: str) -> torch.Tensor:
    """|τ_t| of ``key``, each task's row sorted ascending (T × n), cached by the builder."""
    return inputs.remember(("sorted", key), lambda: _sorted_rows(inputs.deltas(key).reshape(inputs.n_models, -1).abs()))


def kth_smallest(inputs: MergeInputs, key: str, kth: Sequence[int]) -> torch.Tensor:
    """The ``kth[t]``-smallest (1-based) magnitude of each task's vector of ``key``: a lookup in the sorted rows when
    the builder caches them, else a selection per task."""
    if inputs.caching:
        ordered = sorted_magnitudes(inputs, key)
        return ordered[torch.arange(len(kth), device=ordered.device), torch.tensor(kth, device=ordered.device) - 1]
    magnitudes = inputs.deltas(key).reshape(inputs.n_models, -1).abs()
    return torch.stack([torch.kthvalue(magnitudes[t], k).values for t, k in enumerate(kth)])


def trim_thresholds(inputs: MergeInputs, key: str, densities: Sequence[float]) -> torch.Tensor | None:
    """Per-task magnitude threshold keeping the top ``max(1, int(density_t·n))`` entries of task t's vector
    (mergekit's per-tensor trim, one density per model); 0 keeps a task whole, inf drops it; None keeps everything."""
    n = int(np.prod(inputs.shape(key)))
    counts = [keep_count(float(d), n) for d in densities]
    if all(k is None for k in counts):
        return None
    partial = [t for t, k in enumerate(counts) if k]
    out = torch.zeros(inputs.n_models, device=inputs.deltas(key).device)
    if partial:
        out[partial] = kth_smallest(inputs, key, [n - counts[t] + 1 for t in partial]).to(out.device)
    out[[t for t, k in enumerate(counts) if k == 0]] = float("inf")
    return out


def global_thresholds(inputs: MergeInputs, keys: Sequence[str], densities: Sequence[float]) -> torch.Tensor | None:
    """Per-task threshold over all ``keys`` flattened together, as the official TIES code: with D entries,
    ``thr_t = kthvalue(|τ_t|, D − int(D·density_t))`` and entries with ``|τ_t| ≥ thr_t`` are kept."""
    if all(d >= 1 for d in densities) or not keys:
        return None
    device = inputs.deltas(keys[0]).device

    def magnitudes():
        return torch.cat([inputs.deltas(k).reshape(inputs.n_models, -1).abs().to(device) for k in keys], dim=1)

    total = sum(int(np.prod(inputs.shape(k))) for k in keys)
    kth = [total - int(total * min(float(d), 1.0)) for d in densities]
    if inputs.caching:
        ordered = inputs.remember(("sorted_global", tuple(keys)), lambda: _sorted_rows(magnitudes()))
        values = [ordered[t, k - 1] if k > 0 else ordered.new_zeros(()) for t, k in enumerate(kth)]
    else:
        every = magnitudes()
        values = [torch.kthvalue(every[t], k).values if k > 0 else every.new_zeros(()) for t, k in enumerate(kth)]
    return torch.stack(values)


def magnitude_thresholds(deltas: torch.Tensor, density: float) -> torch.Tensor | None:
    """Per-task threshold that keeps the top ``max(1, int(density·n))`` magnitudes of each row of modified task
    vectors (``trim_thresholds`` is the cached equivalent for the unmodified ones)."""
    n = deltas[0].numel()
    k = keep_count(density, n)
    if k is None:
        return None
    if k == 0:
        return torch.full((deltas.shape[0],), float("inf"), device=deltas.device)
    return torch.kthvalue(deltas.reshape(deltas.shape[0], -1).abs(), n - k + 1, dim=1).values


def trim_into(work: torch.Tensor, deltas: torch.Tensor, thresholds: torch.Tensor | None,
              weights: Sequence[float]) -> torch.Tensor:
    """``work[t] = w_t · deltas[t] · (|deltas[t]| ≥ thr_t)``: trimmed, weighted task vectors, in place.

    ``thresholds`` None keeps everything. The trim is a hard shrink at the largest float below the threshold, which
    keeps exactly the entries with ``|x| ≥ thr`` in one pass (a bool mask times a float tensor takes ten).
    """
    rows = deltas.shape[1] if deltas.dim() > 1 else 1
    return _weigh_and_trim(work, deltas, weights, _just_below(thresholds), None, 0, rows)


def elect_and_merge(inputs: MergeInputs, work: torch.Tensor, weights: Sequence[float], normalize: bool,
                    out: torch.Tensor) -> torch.Tensor:
    """TIES steps 2–3 on ``work``, the T × shape trimmed and weighted task vectors (overwritten), into ``out``, step
    by step over the whole tensor (for masks the fused ``ties_merge_into`` does not make: DELLA, Breadcrumbs, DARE
    trimmed after its drop).

    Weighted entries vote with their sum; each entry keeps only the values of the elected sign (zeros never count)
    and, with ``normalize``, divides by the sum of the weights that agreed (the disjoint mean). Entries whose sum is
    exactly 0 take the sign most entries of this tensor elected (−1 on a draw, as the official code, whose fallback
    is the sign of the sum of the elected signs).
    """
    shape, device = work.shape[1:], work.device
    sign = inputs.scratch("ties.sign", shape, device=device)
    tmp = inputs.scratch("ties.tmp", shape, device=device)
    torch.sum(work, dim=0, out=out)
    torch.sign(out, out=sign)
    tie_sign = 1.0 if float(sign.sum()) > 0 else -1.0
    # sign(sign(e) + tie/2) is sign(e) where e ≠ 0 and the tie sign where e = 0, without a bool mask
    torch.sign(sign.add_(0.5 * tie_sign), out=sign)
    divisor = tmp.zero_() if normalize else None
    for t, w in enumerate(weights):
        row = work[t].mul_(sign).clamp_(min=0.0)  # |value| where it agrees with the elected sign, else 0
        if divisor is not None:
            torch.sign(row, out=out)  # `out` is free until the final sum
            divisor.addcmul_(out, w) if isinstance(w, torch.Tensor) else divisor.add_(out, alpha=w)
    torch.sum(work, dim=0, out=out).mul_(sign)
    if divisor is not None:
        # mergekit's guard: a zero divisor divides by 1 (d + [d = 0]; `sign` is free now)
        out.div_(divisor.add_(torch.eq(divisor, 0.0, out=sign)))
    return out


CHUNK_ELEMENTS = 1 << 16
"""Entries per task in one chunk of the fused TIES sweep on CPU: T such chunks and their work buffers stay in L2,
so the sweep's dozen steps cost one pass over memory instead of a dozen (on CUDA the whole tensor is one chunk)."""


def _chunk_rows(shape: Sequence[int], device: torch.device) -> int:
    rows = shape[0]
    if device.type != "cpu":
        return rows
    per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return max(1, CHUNK_ELEMENTS // max(per_row, 1))


def _row_slice(value, a: int, b: int):
    """A weight for rows a:b of a tensor: a scalar as is, a row-block weight (one value per row) sliced."""
    return value[a:b] if isinstance(value, torch.Tensor) and value.dim() > 0 else value


def _per_task(numbers: Sequence[float], device: torch.device, chunk_dims: int) -> torch.Tensor:
    """One value per task as a column that broadcasts over a chunk (T × 1 × …)."""
    return torch.tensor([float(x) for x in numbers], device=device).reshape(-1, *([1] * chunk_dims))


def _just_below(thresholds: torch.Tensor | None) -> list[float | None] | None:
    """The largest float below each threshold (None: keep the whole task): a hardshrink there keeps |x| ≥ threshold."""
    if thresholds is None:
        return None
    lowest = torch.tensor(-float("inf"), device=thresholds.device)
    return [float(torch.nextafter(thr.float(), lowest)) if float(thr) > 0 else None for thr in thresholds]


def _weigh_and_trim(v: torch.Tensor, source: torch.Tensor, weights, below, scalar_weights, a: int, b: int) -> torch.Tensor:
    """``v[t] = w_t · trim_t(source[t])`` for rows a:b of a tensor (``trim_into``'s arithmetic on one chunk)."""
    if below is None and scalar_weights is not None:
        return torch.mul(source, scalar_weights, out=v)
    for t, w in enumerate(weights):
        w = _row_slice(w, a, b)
        if below is not None and below[t] is not None:
            torch.ops.aten.hardshrink.out(source[t], below[t], out=v[t])
            v[t].mul_(w)
        else:
            torch.mul(source[t], w, out=v[t])
    return v


def _chunk_layout(inputs: MergeInputs, key: str) -> tuple[torch.Tensor, int, int, tuple[int, ...]]:
    """``key``'s task vectors with at least one row dimension (T × rows × …), its rows, the rows per chunk and a
    chunk's shape: how both TIES sweeps walk a tensor."""
    deltas = inputs.deltas(key)
    deltas = deltas.reshape(-1, 1) if deltas.dim() == 1 else deltas  # a 0-d tensor: one row
    rows = deltas.shape[1]
    step = _chunk_rows(deltas.shape[1:], deltas.device)
    return deltas, rows, step, (min(step, rows), *deltas.shape[2:])


def elected_sign_sum(inputs: MergeInputs, key: str, weights: Sequence[float | torch.Tensor],
                     thresholds: torch.Tensor | None) -> float:
    """Σ over ``key``'s entries of sign(Σ_t w_t · trim_t(τ_t)): TIES' vote for the model-wide tie sign (official
    code), in one chunked sweep like ``ties_merge_into`` (one compiled loop with numba on the CPU)."""
    votes = elected_sign_sum_cpu(inputs.deltas(key), weights, _just_below(thresholds))
    if votes is not None:
        return float(votes)
    deltas, rows, step, shape = _chunk_layout(inputs, key)
    device = deltas.device
    values = inputs.scratch("ties.work", (deltas.shape[0], *shape), device=device)
    total = inputs.scratch("ties.tmp", shape, device=device)
    scalar_weights = None if any(isinstance(w, torch.Tensor) for w in weights) else _per_task(weights, device, len(shape))
    below, votes = _just_below(thresholds), 0.0
    for a in range(0, rows, step):
        b = min(a + step, rows)
        v = _weigh_and_trim(values[:, :b - a], deltas[:, a:b], weights, below, scalar_weights, a, b)
        elected = torch.sum(v, dim=0, out=total[:b - a])
        votes += float(torch.sign(elected, out=elected).sum())
    return votes


def ties_merge_into(inputs: MergeInputs, key: str, out: torch.Tensor, weights: Sequence[float | torch.Tensor], *,
                    thresholds: torch.Tensor | None = None, draws: torch.Tensor | None = None,
                    drop_rates: Sequence[float] = (), rescales: Sequence[float] = (), normalize: bool = True,
                    tie_sign: float | None = None, scale: float = 1.0) -> torch.Tensor:
    """``out = anchor + scale · disjoint_mean(elect(w_t · sparsify_t(τ_t)))``, the whole TIES merge of one tensor in
    one sweep over row chunks that fit in cache (TIES and DARE-ties; the same arithmetic, step for step, as
    ``trim_into`` then ``elect_and_merge``, so the results are bit-identical). On the CPU with numba installed the
    sweep is one compiled loop over rows (``_fused_cpu``), bit-identical too and ~3× faster.

    ``sparsify_t`` keeps ``|τ_t| ≥ thresholds[t]`` (TIES' trim; None keeps all) or, with ``draws``, the entries whose
    uniform draw is ``≥ drop_rates[t]``, rescaled by ``rescales[t]`` (DARE). ``tie_sign`` None is the tensor's own:
    the sign most entries elect, known only after the sweep, so chunks holding an exact cancellation (a zero sum of
    non-zero values) are swept with +1 and swept again if the tensor's sign turns out −1.
    """
    below = _just_below(thresholds)
    if ties_merge_cpu(inputs.deltas(key), inputs.anchor32(key), out, weights, below, draws, drop_rates, rescales,
                      normalize, tie_sign, scale):
        return out  # the same steps as one compiled loop (numba, CPU)
    deltas, rows, step, shape = _chunk_layout(inputs, key)
    anchor, out_rows = inputs.anchor32(key), out
    if anchor.dim() == 0:  # a 0-d tensor: one row
        anchor, out_rows = anchor.reshape(1), out.reshape(1)
        draws = draws.reshape(-1, 1) if draws is not None else None
    n_models, device = deltas.shape[0], deltas.device
    values = inputs.scratch("ties.work", (n_models, *shape), device=device)
    signs = inputs.scratch("ties.keep", (n_models, *shape), device=device)
    elected, total = inputs.scratch("ties.sign", shape, device=device), inputs.scratch("ties.tmp", shape, device=device)
    raw_signs = inputs.scratch("ties.raw", shape, device=device)
    drops, rescale = _per_task(drop_rates, device, len(shape)), _per_task(rescales, device, len(shape))
    scalar_weights = None if any(isinstance(w, torch.Tensor) for w in weights) else _per_task(weights, device, len(shape))

    def sweep(a: int, b: int, tie: float) -> tuple[torch.Tensor, torch.Tensor]:
        n = b - a
        v, m, s, e, raw, o = values[:, :n], signs[:, :n], elected[:n], total[:n], raw_signs[:n], out_rows[a:b]
        if draws is not None:
            torch.ge(draws[:, a:b], drops, out=m)
            torch.mul(m, deltas[:, a:b], out=v).mul_(rescale)
            source = v
        else:
            source = deltas[:, a:b]
        _weigh_and_trim(v, source, weights, below, scalar_weights, a, b)
        torch.sum(v, dim=0, out=o)
        torch.sign(o, out=raw)
        sign_sum = raw.sum() if tie_sign is None else None
        torch.sign(torch.add(raw, 0.5 * tie, out=s), out=s)  # sign(e) where e ≠ 0, the tie sign where e = 0
        v.mul_(s).clamp_(min=0.0)  # |value| where it agrees with the elected sign, else 0
        if normalize:
            torch.sign(v, out=m)
            e.zero_()
            for t, w in enumerate(weights):
                w = _row_slice(w, a, b)
                e.addcmul_(m[t], w) if isinstance(w, torch.Tensor) else e.add_(m[t], alpha=w)
        torch.sum(v, dim=0, out=o)
        cancelled = None
        if tie_sign is None:  # an exact cancellation: an agreeing sum > 0 where the sum of all values is 0
            cancelled = torch.dot(o.reshape(-1), raw.abs_().sub_(1.0).reshape(-1)) < 0
        o.mul_(s)
        if normalize:
            o.div_(e.add_(torch.eq(e, 0.0, out=s)))  # mergekit's guard: a zero divisor divides by 1
        o.mul_(scale).add_(anchor[a:b])
        return sign_sum, cancelled

    chunks = [(a, min(a + step, rows)) for a in range(0, rows, step)]
    swept = [sweep(a, b, 1.0 if tie_sign is None else tie_sign) for a, b in chunks]
    if tie_sign is None and float(sum(sign_sum for sign_sum, _ in swept)) <= 0:
        for (a, b), (_, cancelled) in zip(chunks, swept):
            if bool(cancelled):
                sweep(a, b, -1.0)
    return out


def combine_sparse(inputs: MergeInputs, key: str, work: torch.Tensor, weights: Sequence[float], combine: str,
                   normalize: bool, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``out = anchor + scale · merge(w_t · work[t])`` for sparsified task vectors ``work`` (overwritten):
    ``combine="ties"`` elects signs (disjoint mean when ``normalize``), ``"linear"`` adds (÷ Σ w when
    ``normalize``) — the last step DELLA and Breadcrumbs share with mergekit's generalized task arithmetic."""
    if combine == "ties":
        for t, w in enumerate(weights):
            work[t].mul_(w)
        elect_and_merge(inputs, work, weights, normalize, out)
        return out.mul_(scale).add_(inputs.anchor32(key))
    factor = scale / (safe_divisor(sum(weights)) if normalize else 1.0)
    return add_weighted(out, inputs.anchor32(key), work, [factor * w for w in weights])


def dare_seed(seed: int, key: str, task: int) -> int:
    """The generator seed of one (seed, tensor, task) triple: a key's random mask does not depend on which other
    keys are merged with it, nor in which order, so group plans and full merges draw the same masks."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode()), int(task)]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def uniforms(inputs: MergeInputs, key: str, seed: int) -> torch.Tensor:
    """Uniform [0, 1) draws of every task-vector entry of ``key`` for ``seed`` (T × shape); a random mask keeps the
    entries with ``u ≥ p``. Drawn on the CPU by a generator seeded from (seed, key, task), so the masks are the same
    on every device."""

    def make():
        shape = inputs.shape(key)
        draws = torch.empty((inputs.n_models, *shape), dtype=torch.float32)
        for t in range(inputs.n_models):
            generator = torch.Generator().manual_seed(dare_seed(seed, key, t))
            torch.rand(shape, generator=generator, out=draws[t])
        return draws.to(inputs.deltas(key).device)

    return inputs.remember(("uniforms", key, int(seed)), make)


def l1_rescale_(masked: torch.Tensor, original: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """mergekit's rescale of a masked task vector: multiply by ‖original‖₁ / ‖masked‖₁ (unchanged when either is
    below ``eps``), in place."""
    before, after = float(original.abs().sum()), float(masked.abs().sum())
    if before >= eps and after >= eps:
        masked.mul_(before / after)
    return masked


__all__ = ["CHUNK_ELEMENTS", "combine_sparse", "dare_seed", "elect_and_merge", "elected_sign_sum", "global_thresholds",
           "keep_count", "kth_smallest", "l1_rescale_", "magnitude_thresholds", "sorted_magnitudes", "ties_merge_into",
           "trim_into", "trim_thresholds", "uniforms"]
