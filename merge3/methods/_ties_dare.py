"""TIES-Merging (Yadav et al., NeurIPS 2023) and DARE (Yu et al., ICML 2024).

TIES: trim each task vector to its largest entries, elect a sign per entry, average the entries that agree with it.
DARE: drop each task-vector entry with probability p and rescale the survivors by 1/(1−p), then combine linearly
or with TIES' sign election.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Literal, Optional

import torch

from merge3._errors import Merge3Error
from merge3.methods._arithmetic import Scale, Weights, add_weighted, safe_divisor
from merge3.methods._inputs import MergeInputs, keep_count
from merge3.methods._kernels import kernel, merge_state_dicts
from merge3.methods._params import LayerValue
from merge3.methods._registry import Bounds, StateDict, merge_method

Density = Annotated[LayerValue, Bounds(0.0, 1.0, search=(0.05, 1.0))]
DropRate = Annotated[LayerValue, Bounds(0.0, 0.99, search=(0.0, 0.9))]


def trim_into(work: torch.Tensor, deltas: torch.Tensor, thresholds: torch.Tensor | None,
              weights: Sequence[float]) -> torch.Tensor:
    """``work[t] = w_t · deltas[t] · (|deltas[t]| ≥ thr_t)``: trimmed, weighted task vectors, in place.

    ``thresholds`` None keeps everything. The trim is a hard shrink at the largest float below the threshold, which
    keeps exactly the entries with ``|x| ≥ thr`` in one pass (a bool mask times a float tensor takes ten).
    """
    for t, w in enumerate(weights):
        if thresholds is None or float(thresholds[t]) <= 0:
            torch.mul(deltas[t], w, out=work[t])
            continue
        below = float(torch.nextafter(thresholds[t].float(), torch.tensor(-float("inf"), device=thresholds.device)))
        torch.ops.aten.hardshrink.out(deltas[t], below, out=work[t])
        work[t].mul_(w)
    return work


def magnitude_thresholds(deltas: torch.Tensor, density: float) -> torch.Tensor | None:
    """Per-task threshold that keeps the top ``max(1, int(density·n))`` magnitudes of each row (computed directly;
    ``MergeInputs.trim_thresholds`` is the cached equivalent for the unmodified task vectors)."""
    n = deltas[0].numel()
    k = keep_count(density, n)
    if k is None:
        return None
    if k == 0:
        return torch.full((deltas.shape[0],), float("inf"), device=deltas.device)
    return torch.kthvalue(deltas.reshape(deltas.shape[0], -1).abs(), n - k + 1, dim=1).values


def elect_and_merge(inputs: MergeInputs, work: torch.Tensor, weights: Sequence[float], normalize: bool,
                    tie_sign: float | None, out: torch.Tensor) -> torch.Tensor:
    """TIES steps 2–3 on ``work``, the T × shape trimmed and weighted task vectors (overwritten), into ``out``.

    Weighted entries vote with their sum; each entry keeps only the values of the elected sign (zeros never count)
    and, with ``normalize``, divides by the sum of the weights that agreed (the disjoint mean). Entries whose sum is
    exactly 0 take ``tie_sign``; None: the sign most entries of this tensor elected (−1 on a draw, as the official
    code, whose fallback is the sign of the sum of the elected signs).
    """
    shape, device = work.shape[1:], work.device
    sign = inputs.scratch("ties.sign", shape, device=device)
    tmp = inputs.scratch("ties.tmp", shape, device=device)
    torch.sum(work, dim=0, out=out)
    torch.sign(out, out=sign)
    if tie_sign is None:
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


@merge_method
def ties(
    base: StateDict,
    models: Sequence[StateDict],
    density: Density,
    scale: Scale = 1.0,
    weights: Weights = None,
    trim: Literal["tensor", "model"] = "tensor",
    normalize: bool = True,
) -> StateDict:
    """TIES-Merging: θ = θ₀ + scale · disjoint_mean(elect(trim(w_m τ_m))).

    ``trim="tensor"`` (default, mergekit's semantics) keeps the top ``max(1, int(density·n))`` magnitudes of each
    tensor of each task vector; ``trim="model"`` is the official code's global trim over all tensors merged together
    (threshold ``kthvalue(|τ|, D − int(D·density))``, entries ``≥`` it kept; one density for all tensors). Entries
    tied with the threshold are all kept. ``normalize=False`` sums the agreeing entries instead of averaging them.

    >>> import torch
    >>> base = {"w": torch.zeros(3)}
    >>> a, b = {"w": torch.tensor([3., -1., 1.])}, {"w": torch.tensor([1., 2., -2.])}
    >>> ties(base, [a, b], density=1.0)["w"].tolist()
    [2.0, 2.0, -2.0]
    """
    return merge_state_dicts("ties", base, models, dict(density=density, scale=scale, weights=weights, trim=trim,
                                                        normalize=normalize))


def _trimmed(inputs: MergeInputs, key: str, thresholds: torch.Tensor | None, weights: Sequence[float]) -> torch.Tensor:
    deltas = inputs.deltas(key)
    work = inputs.scratch("ties.work", deltas.shape, device=deltas.device)
    return trim_into(work, deltas, thresholds, weights)


def _ties_prepare(inputs: MergeInputs, keys: Sequence[str], params_of: Callable[[str], dict], positions) -> tuple | None:
    """The global trim: one threshold per task over all keys, and the tie-break sign voted over all of them."""
    if not keys or params_of(keys[0])["trim"] != "model":
        return None
    densities = {params_of(k)["density"] for k in keys}
    if len(densities) > 1:
        raise Merge3Error(f"ties: trim='model' needs one density for all tensors, got per-layer values {sorted(densities)}")
    thresholds = inputs.global_thresholds(keys, densities.pop())
    votes = 0.0
    for key in keys:
        elected = _trimmed(inputs, key, thresholds, params_of(key)["weights"]).sum(dim=0)
        votes += float(torch.sign(elected).sum())
    return thresholds, (1.0 if votes > 0 else -1.0)


@kernel("ties", prepare=_ties_prepare)
def _ties_key(inputs: MergeInputs, key: str, p: dict, context: tuple | None, out: torch.Tensor) -> None:
    if p["trim"] == "model":
        thresholds, tie_sign = context
    else:
        thresholds, tie_sign = inputs.trim_thresholds(key, p["density"]), None
    work = _trimmed(inputs, key, thresholds, p["weights"])
    elect_and_merge(inputs, work, p["weights"], p["normalize"], tie_sign, out)
    out.mul_(p["scale"]).add_(inputs.anchor32(key))


@merge_method
def dare(
    base: StateDict,
    models: Sequence[StateDict],
    drop_rate: DropRate,
    seed: int = 0,
    scale: Scale = 1.0,
    weights: Weights = None,
    combine: Literal["linear", "ties"] = "linear",
    density: Density = 1.0,
    normalize: Optional[bool] = None,
    rescale: bool = True,
) -> StateDict:
    """DARE: drop each task-vector entry with probability ``drop_rate``, rescale survivors by 1/(1−p), then combine.

    ``combine="linear"``: θ₀ + scale·Σ w τ' (dare_linear). ``combine="ties"``: TIES on τ' with per-tensor trim at
    ``density`` (1 = no trim) and sign election (dare_ties); ``normalize`` defaults to the disjoint mean for "ties"
    and to a plain sum for "linear". The masks depend only on (seed, tensor name, model index): the same seed gives
    the same merge on any device and in any group plan. ``rescale=False`` keeps survivors unscaled.
    mergekit differs in two ways: its ``density`` is the keep rate 1−p, and it rescales by the L1 norm ratio.

    >>> import torch
    >>> base, ft = {"w": torch.zeros(10_000)}, {"w": torch.ones(10_000)}
    >>> merged = dare(base, [ft], drop_rate=0.9, seed=1)["w"]
    >>> round(float((merged == 0).float().mean()), 1), float(merged.max())
    (0.9, 10.0)
    """
    return merge_state_dicts("dare", base, models, dict(drop_rate=drop_rate, seed=seed, scale=scale, weights=weights,
                                                        combine=combine, density=density, normalize=normalize,
                                                        rescale=rescale))


@kernel("dare")
def _dare_key(inputs: MergeInputs, key: str, p: dict, context: None, out: torch.Tensor) -> None:
    deltas, drop, w = inputs.deltas(key), p["drop_rate"], p["weights"]
    rescale = 1.0 / (1.0 - drop) if p["rescale"] else 1.0
    keep = None
    if drop > 0:
        # keep = [u ≥ p] as floats (a float mask multiplies ten times faster than a bool one on CPU)
        keep = torch.ge(inputs.uniforms(key, p["seed"]), drop, out=inputs.scratch("dare.keep", deltas.shape,
                                                                                  device=deltas.device))
    if p["combine"] == "linear":
        factor = p["scale"] / (safe_divisor(sum(w)) if p["normalize"] else 1.0)
        if keep is None:
            add_weighted(out, inputs.anchor32(key), deltas, [factor * x for x in w])
            return
        out.copy_(inputs.anchor32(key))
        for t, x in enumerate(w):
            coefficient = factor * x * rescale
            if isinstance(coefficient, torch.Tensor):  # row-block weights
                out.addcmul_(deltas[t] * coefficient, keep[t])
            elif coefficient != 0.0:
                out.addcmul_(deltas[t], keep[t], value=coefficient)
        return
    if keep is not None:
        deltas = keep.mul_(deltas).mul_(rescale)  # the dropped, rescaled task vectors, in the mask's buffer
    work = inputs.scratch("ties.work", deltas.shape, device=deltas.device)
    trim_into(work, deltas, magnitude_thresholds(deltas, p["density"]), w)
    elect_and_merge(inputs, work, w, True if p["normalize"] is None else p["normalize"], None, out)
    out.mul_(p["scale"]).add_(inputs.anchor32(key))


__all__ = ["dare", "elect_and_merge", "magnitude_thresholds", "ties", "trim_into"]
