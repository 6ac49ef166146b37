"""DELLA-Merging (Deep et al., 2024): drop task-vector entries at random with a probability that falls with their
magnitude (MagPrune), then merge with TIES' sign election (mergekit's ``della``) or add (``della_linear``).

mergekit's semantics: within each row of a tensor (a 1-D tensor is one row), entries are ranked by magnitude and
kept with probability ``density − ε + 2ε·rank/(n−1)``, so the largest are kept most often and the row keeps a
``density`` fraction on average; ``rescale`` restores each task vector's L1 norm (the paper divides each survivor by
its keep probability instead). The draws come from (seed, tensor, task) as DARE's, so a merge is the same on any
device and in any group plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, Optional

import torch

from merge3._errors import Merge3Error
from merge3.methods._arithmetic import Scale, Weights
from merge3.methods._inputs import MergeInputs
from merge3.methods._mergekit import MergekitForm
from merge3.methods._params import LayerValue
from merge3.methods._registry import Bounds, Kernel, PerModel, StateDict, merge_method
from merge3.methods._sparsify import combine_sparse, l1_rescale_, uniforms

Density = Annotated[LayerValue, Bounds(0.0, 1.0, search=(0.2, 0.9))]
Epsilon = Annotated[LayerValue, Bounds(0.0, 0.5, search=(0.01, 0.15))]
Densities = Annotated[Optional[Sequence[LayerValue]], PerModel(Bounds(0.0, 1.0, search=(0.2, 0.9)), overrides="density")]


def rank_fractions(inputs: MergeInputs, key: str) -> torch.Tensor:
    """Each entry's magnitude rank within its row, scaled to [0, 1] (T × shape; rows along dim 1 of each task's
    tensor, a 1-D tensor being one row), cached by the builder: the keep probabilities of any density are then one
    multiply-add."""

    def make():
        deltas = inputs.deltas(key)
        rows = deltas if deltas.dim() > 2 else deltas.unsqueeze(1)  # T × 1 × n for 1-D tensors
        ranks = rows.abs().argsort(dim=2).argsort(dim=2).float()
        width = rows.shape[2] - 1
        return (ranks / width if width > 0 else ranks).reshape(deltas.shape)

    return inputs.remember(("della_ranks", key), make)


def _della_key(inputs: MergeInputs, key: str, p: dict, context: None, out: torch.Tensor) -> None:
    deltas, w, eps = inputs.deltas(key), p["weights"], p["epsilon"]
    work = inputs.scratch("ties.work", deltas.shape, device=deltas.device)
    for t, density in enumerate(p["densities"]):
        if density >= 1:
            work[t].copy_(deltas[t])
        elif density <= 0:
            work[t].zero_()
        else:
            if not (0 < density - eps and density + eps < 1):
                raise Merge3Error(f"della: density ± epsilon must lie inside (0, 1), got density {density:g} and "
                                  f"epsilon {eps:g} in '{key}'")
            keep = work[t]  # keep probability, then the mask, then the kept entries
            torch.mul(rank_fractions(inputs, key)[t], 2 * eps, out=keep).add_(density - eps)
            torch.lt(uniforms(inputs, key, p["seed"])[t], keep, out=keep)
            keep.mul_(deltas[t])
            if p["rescale"]:
                l1_rescale_(keep, deltas[t])
    normalize = (p["combine"] == "ties") if p["normalize"] is None else p["normalize"]
    combine_sparse(inputs, key, work, w, p["combine"], normalize, p["scale"], out)


def _della_precompute(inputs: MergeInputs, key: str, seeds: Sequence[int]) -> None:
    rank_fractions(inputs, key)
    for seed in seeds:
        uniforms(inputs, key, seed)


@merge_method(
    kernel=Kernel(_della_key), precompute=_della_precompute, label="DELLA",
    recipes=[{"scale": s, "density": d} for d in (0.3, 0.5, 0.7) for s in (0.5, 0.7, 1.0, 1.5)],
    mergekit=MergekitForm({"della": {"combine": "ties"}, "della_linear": {"combine": "linear"}},
                          density="density", per_model_shared=("epsilon",), shared=("normalize", "rescale"),
                          imported={"della": {"density": 1.0}, "della_linear": {"density": 1.0}},
                          exported={"della": {"normalize": True}, "della_linear": {"normalize": False}}),
)
def della(
    base: StateDict,
    models: Sequence[StateDict],
    density: Density,
    epsilon: Epsilon = 0.15,
    seed: int = 0,
    scale: Scale = 1.0,
    weights: Weights = None,
    combine: Literal["ties", "linear"] = "ties",
    normalize: Optional[bool] = None,
    rescale: bool = True,
    densities: Densities = None,
) -> StateDict:
    """DELLA: θ = θ₀ + scale · merge(w_m · MagPrune(τ_m)), MagPrune keeping entry i of a row of n with probability
    ``density − ε + 2ε·rank_i/(n−1)`` (rank 0 = smallest magnitude).

    ``combine="ties"`` (mergekit's ``della``) elects signs and, by default, takes the disjoint mean;
    ``combine="linear"`` (``della_linear``) adds, by default without dividing by the weights. ``rescale`` restores
    each task vector's L1 norm; ``densities`` gives each model its own density; ``density ± epsilon`` must lie in
    (0, 1) where density < 1.

    >>> import torch
    >>> base, ft = {"w": torch.zeros(4, 1000)}, {"w": torch.ones(4, 1000)}
    >>> merged = della(base, [ft], density=0.4, epsilon=0.1, rescale=False)["w"]
    >>> round(float((merged != 0).float().mean()), 1)
    0.4
    """


__all__ = ["della", "rank_fractions"]
