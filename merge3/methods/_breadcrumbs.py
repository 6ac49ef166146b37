"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop each task vector's outliers and its smallest entries.

Per tensor and task, the ``gamma`` fraction of largest magnitudes is removed (outliers that one task pushed far) and
then the smallest, so that a ``density`` fraction remains; the sparse task vectors are then added (mergekit's
``breadcrumbs``) or merged with TIES' sign election (``breadcrumbs_ties``). mergekit's semantics throughout: at
density ≥ 1 nothing is dropped (not even outliers), ``int(density·n)`` entries are kept, fewer outliers are dropped
when that many would not remain, and ``rescale`` restores each task vector's L1 norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, Optional

import torch

from merge3.methods._arithmetic import Scale, Weights
from merge3.methods._inputs import MergeInputs
from merge3.methods._mergekit import MergekitForm
from merge3.methods._params import LayerValue
from merge3.methods._registry import Bounds, Kernel, PerModel, StateDict, merge_method
from merge3.methods._sparsify import combine_sparse, kth_smallest, l1_rescale_, sorted_magnitudes

Density = Annotated[LayerValue, Bounds(0.0, 1.0, search=(0.5, 1.0))]
Gamma = Annotated[LayerValue, Bounds(0.0, 0.5, search=(0.0, 0.1))]
Densities = Annotated[Optional[Sequence[LayerValue]], PerModel(Bounds(0.0, 1.0, search=(0.5, 1.0)), overrides="density")]


def band(n: int, density: float, gamma: float) -> tuple[int, int] | None:
    """The ranks (0-based, ascending magnitude) ``[low, low + kept)`` one task vector of n entries keeps, or None for
    all of them (density ≥ 1)."""
    if density >= 1:
        return None
    kept = int(density * n)
    low = max(0, n - kept - int(gamma * n))
    return low, kept


def breadcrumbs_mask_(inputs: MergeInputs, key: str, densities: Sequence[float], gamma: float,
                      out: torch.Tensor) -> torch.Tensor:
    """``out[t] = τ_t · [kept_t]``, each task's band of magnitudes kept (ties with a band edge all kept), in place."""
    deltas = inputs.deltas(key)
    n = deltas[0].numel()
    bands = [band(n, float(d), gamma) for d in densities]
    partial = [t for t, b in enumerate(bands) if b is not None and b[1] > 0]
    edges = {}
    if partial:
        lows = kth_smallest(inputs, key, [bands[t][0] + 1 for t in partial])
        highs = kth_smallest(inputs, key, [bands[t][0] + bands[t][1] for t in partial])
        edges = {t: (float(lo), float(hi)) for t, lo, hi in zip(partial, lows, highs)}
    magnitude = inputs.scratch("breadcrumbs.abs", deltas.shape[1:], device=deltas.device)
    for t, b in enumerate(bands):
        if b is None:
            out[t].copy_(deltas[t])
        elif b[1] == 0:
            out[t].zero_()
        else:
            low, high = edges[t]
            torch.abs(deltas[t], out=magnitude)
            out[t].copy_(deltas[t]).mul_((magnitude >= low) & (magnitude <= high))
    return out


def _breadcrumbs_key(inputs: MergeInputs, key: str, p: dict, context: None, out: torch.Tensor) -> None:
    deltas, w = inputs.deltas(key), p["weights"]
    work = breadcrumbs_mask_(inputs, key, p["densities"], p["gamma"],
                             inputs.scratch("ties.work", deltas.shape, device=deltas.device))
    if p["rescale"]:
        for t in range(len(w)):
            l1_rescale_(work[t], deltas[t])
    combine_sparse(inputs, key, work, w, p["combine"], p["normalize"], p["scale"], out)


def _sort_magnitudes(inputs: MergeInputs, key: str, seeds: Sequence[int]) -> None:
    sorted_magnitudes(inputs, key)  # a band at any density is then two indices


@merge_method(
    kernel=Kernel(_breadcrumbs_key), precompute=_sort_magnitudes, label="Breadcrumbs", redundant=["scale"],
    recipes=[{"scale": s, "density": d} for d in (0.5, 0.8, 0.9) for s in (0.2, 0.4, 0.6, 0.8, 1.0)],
    mergekit=MergekitForm({"breadcrumbs": {"combine": "linear"}, "breadcrumbs_ties": {"combine": "ties"}},
                          density="density", per_model_shared=("gamma",), shared=("normalize", "rescale"),
                          linear=frozenset({"breadcrumbs"}), imported={"breadcrumbs": {"density": 1.0},
                                                                       "breadcrumbs_ties": {"density": 1.0}}),
)
def breadcrumbs(
    base: StateDict,
    models: Sequence[StateDict],
    density: Density,
    gamma: Gamma = 0.01,
    scale: Scale = 1.0,
    weights: Weights = None,
    combine: Literal["linear", "ties"] = "linear",
    normalize: bool = False,
    rescale: bool = False,
    densities: Densities = None,
) -> StateDict:
    """Model Breadcrumbs: θ = θ₀ + scale · Σ w_m · band(τ_m), where band keeps, per tensor, the entries ranked
    between the smallest dropped and the ``gamma`` largest dropped so that ``int(density·n)`` remain.

    ``combine="ties"`` merges the sparse task vectors with TIES' sign election (mergekit's ``breadcrumbs_ties``);
    ``normalize`` divides by the (agreeing) weights' sum; ``rescale`` restores each task vector's L1 norm;
    ``densities`` gives each model its own density.

    >>> import torch
    >>> base, ft = {"w": torch.zeros(10)}, {"w": torch.arange(1., 11.)}
    >>> breadcrumbs(base, [ft], density=0.5, gamma=0.2)["w"].tolist()
    [0.0, 0.0, 0.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.0, 0.0]
    """


__all__ = ["band", "breadcrumbs"]
