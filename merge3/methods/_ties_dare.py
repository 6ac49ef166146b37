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
from merge3.methods._inputs import MergeInputs
from merge3.methods._mergekit import MergekitForm
from merge3.methods._params import LayerValue
from merge3.methods._registry import Bounds, Kernel, PerModel, StateDict, merge_method
from merge3.methods._sparsify import (elect_and_merge, elected_sign_sum, global_thresholds, keep_count,
                                      magnitude_thresholds, sorted_magnitudes, ties_merge_into, trim_into,
                                      trim_thresholds, uniforms)

Density = Annotated[LayerValue, Bounds(0.0, 1.0, search=(0.05, 1.0))]
DropRate = Annotated[LayerValue, Bounds(0.0, 0.99, search=(0.0, 0.9))]
Densities = Annotated[Optional[Sequence[LayerValue]], PerModel(Bounds(0.0, 1.0, search=(0.05, 1.0)), overrides="density")]
DropRates = Annotated[Optional[Sequence[LayerValue]], PerModel(Bounds(0.0, 0.99, search=(0.0, 0.9)), overrides="drop_rate")]


def _ties_prepare(inputs: MergeInputs, keys: Sequence[str], params_of: Callable[[str], dict], positions) -> tuple | None:
    """The global trim: one threshold per task over all keys, and the tie-break sign voted over all of them."""
    if not keys or params_of(keys[0])["trim"] != "model":
        return None
    densities = {tuple(params_of(k)["densities"]) for k in keys}
    if len(densities) > 1:
        values = sorted({d for each in densities for d in each})
        raise Merge3Error(f"ties: trim='model' needs one density for all tensors, got per-layer values {values}")
    thresholds = global_thresholds(inputs, keys, densities.pop())
    votes = sum(elected_sign_sum(inputs, key, params_of(key)["weights"], thresholds) for key in keys)
    return thresholds, (1.0 if votes > 0 else -1.0)


def _ties_key(inputs: MergeInputs, key: str, p: dict, context: tuple | None, out: torch.Tensor) -> None:
    if p["trim"] == "model":
        thresholds, tie_sign = context
    else:
        thresholds, tie_sign = trim_thresholds(inputs, key, p["densities"]), None
    ties_merge_into(inputs, key, out, p["weights"], thresholds=thresholds, normalize=p["normalize"], tie_sign=tie_sign,
                    scale=p["scale"])


def _sort_magnitudes(inputs: MergeInputs, key: str, seeds: Sequence[int]) -> None:
    sorted_magnitudes(inputs, key)  # a trim at any density is then an index


@merge_method(
    kernel=Kernel(_ties_key, prepare=_ties_prepare), precompute=_sort_magnitudes, label="TIES",
    recipes=[{"scale": s, "density": d} for d in (0.2, 0.5, 0.8) for s in (0.3, 0.5, 0.7, 1.0, 1.5)],
    mergekit=MergekitForm({"ties": {}}, density="density", imported={"ties": {"density": 1.0}},  # mergekit's default
                          merge3_only={"trim": "tensor"}),
)
def ties(
    base: StateDict,
    models: Sequence[StateDict],
    density: Density,
    scale: Scale = 1.0,
    weights: Weights = None,
    trim: Literal["tensor", "model"] = "tensor",
    normalize: bool = True,
    densities: Densities = None,
) -> StateDict:
    """TIES-Merging: θ = θ₀ + scale · disjoint_mean(elect(trim(w_m τ_m))).

    ``trim="tensor"`` (default, mergekit's semantics) keeps the top ``max(1, int(density·n))`` magnitudes of each
    tensor of each task vector; ``trim="model"`` is the official code's global trim over all tensors merged together
    (threshold ``kthvalue(|τ|, D − int(D·density))``, entries ``≥`` it kept; one density for all tensors). Entries
    tied with the threshold are all kept. ``normalize=False`` sums the agreeing entries instead of averaging them.
    ``densities`` gives each model its own density (mergekit's per-model ``density``), overriding ``density``.

    >>> import torch
    >>> base = {"w": torch.zeros(3)}
    >>> a, b = {"w": torch.tensor([3., -1., 1.])}, {"w": torch.tensor([1., 2., -2.])}
    >>> ties(base, [a, b], density=1.0)["w"].tolist()
    [2.0, 2.0, -2.0]
    """


def _dare_key(inputs: MergeInputs, key: str, p: dict, context: None, out: torch.Tensor) -> None:
    deltas, drops, w = inputs.deltas(key), p["drop_rates"], p["weights"]
    rescale = [1.0 / (1.0 - d) if p["rescale"] else 1.0 for d in drops]
    normalize = True if p["normalize"] is None else p["normalize"]
    if p["combine"] == "ties" and keep_count(p["density"], deltas[0].numel()) is None:  # no trim after the drop
        draws = uniforms(inputs, key, p["seed"]) if any(d > 0 for d in drops) else None
        ties_merge_into(inputs, key, out, w, draws=draws, drop_rates=drops, rescales=rescale, normalize=normalize,
                        scale=p["scale"])
        return
    keep = None
    if any(d > 0 for d in drops):
        # keep = [u ≥ p_t] as floats (a float mask multiplies ten times faster than a bool one on CPU)
        draws = uniforms(inputs, key, p["seed"])
        keep = inputs.scratch("dare.keep", deltas.shape, device=deltas.device)
        for t, d in enumerate(drops):
            torch.ge(draws[t], d, out=keep[t])
    if p["combine"] == "linear":
        factor = p["scale"] / (safe_divisor(sum(w)) if p["normalize"] else 1.0)
        if keep is None:
            add_weighted(out, inputs.anchor32(key), deltas, [factor * x for x in w])
            return
        out.copy_(inputs.anchor32(key))
        for t, x in enumerate(w):
            coefficient = factor * x * rescale[t]
            if isinstance(coefficient, torch.Tensor):  # row-block weights
                out.addcmul_(deltas[t] * coefficient, keep[t])
            elif coefficient != 0.0:
                out.addcmul_(deltas[t], keep[t], value=coefficient)
        return
    if keep is not None:
        deltas = keep.mul_(deltas)  # the dropped, rescaled task vectors, in the mask's buffer
        for t, r in enumerate(rescale):
            deltas[t].mul_(r)
    work = inputs.scratch("ties.work", deltas.shape, device=deltas.device)
    trim_into(work, deltas, magnitude_thresholds(deltas, p["density"]), w)
    elect_and_merge(inputs, work, w, normalize, out)
    out.mul_(p["scale"]).add_(inputs.anchor32(key))


def _draw_uniforms(inputs: MergeInputs, key: str, seeds: Sequence[int]) -> None:
    for seed in seeds:
        uniforms(inputs, key, seed)  # a mask at any drop rate is then a comparison


@merge_method(
    kernel=Kernel(_dare_key), precompute=_draw_uniforms, label="DARE", redundant=["scale"],
    recipes=[{"scale": s, "drop_rate": p} for p in (0.5, 0.9) for s in (0.2, 0.3, 0.4, 0.6, 0.8)],
    mergekit=MergekitForm({"dare_linear": {"combine": "linear"}, "dare_ties": {"combine": "ties"}},
                          density="drop_rate", complement=True, linear=frozenset({"dare_linear"}),
                          imported={"dare_ties": {"normalize": False}}, exported={"dare_ties": {"normalize": True}},
                          merge3_only={"density": 1.0, "rescale": True}),
)
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
    drop_rates: DropRates = None,
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


__all__ = ["dare", "ties"]
