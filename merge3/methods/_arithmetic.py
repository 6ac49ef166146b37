"""Task arithmetic (Ilharco et al., ICLR 2023), its analogy helper, and the linear model soup."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Optional

import torch

from merge3._errors import Merge3Error
from merge3.methods._inputs import MergeInputs
from merge3.methods._mergekit import MergekitForm
from merge3.methods._params import LayerValue
from merge3.methods._registry import Bounds, Kernel, PerModel, StateDict, merge_method

Weights = Annotated[Optional[Sequence[LayerValue]], PerModel(Bounds(-10.0, 10.0, search=(0.0, 1.5)))]
Scale = Annotated[LayerValue, Bounds(-10.0, 10.0, search=(0.0, 2.0))]


def add_weighted(out: torch.Tensor, anchor: torch.Tensor, deltas: torch.Tensor, coeffs: Sequence[float | torch.Tensor],
                 anchor_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``out = anchor_scale·anchor + Σ_t coeffs[t]·deltas[t]`` in place: T + 1 memory-bound passes, no allocation.
    A coefficient may be a per-row tensor (row-block weights) that broadcasts against the deltas."""
    if isinstance(anchor_scale, torch.Tensor) or anchor_scale != 1.0:
        torch.mul(anchor, anchor_scale, out=out)
    else:
        out.copy_(anchor)
    for delta, c in zip(deltas, coeffs):
        if isinstance(c, torch.Tensor):
            out.addcmul_(delta, c)
        elif c != 0.0:
            out.add_(delta, alpha=c)
    return out


def safe_divisor(total: float | torch.Tensor) -> float | torch.Tensor:
    """mergekit's guard: a (near) zero sum of weights divides by 1 instead (per row for row-block weights)."""
    if isinstance(total, torch.Tensor):
        return torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
    return 1.0 if abs(total) < 1e-8 else total


def _task_arithmetic_key(inputs: MergeInputs, key: str, p: dict, context: None, out: torch.Tensor) -> None:
    factor = p["scale"] / (safe_divisor(sum(p["weights"])) if p["normalize"] else 1.0)
    add_weighted(out, inputs.anchor32(key), inputs.deltas(key), [factor * w for w in p["weights"]])


@merge_method(
    kernel=Kernel(_task_arithmetic_key), label="TA", redundant=["scale"],
    recipes=[{"scale": s} for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)],
    mergekit=MergekitForm({"task_arithmetic": {}}, linear=frozenset({"task_arithmetic"})),
)
def task_arithmetic(
    base: StateDict,
    models: Sequence[StateDict],
    scale: Scale = 1.0,
    weights: Weights = None,
    normalize: bool = False,
) -> StateDict:
    """θ = θ₀ + scale · Σ_m w_m τ_m, with τ_m = θ_m − θ₀ (``normalize`` divides by Σ w, as mergekit's option).

    Negation (forgetting a task) is a negative weight; ``scale`` and every weight may be given per layer.

    >>> import torch
    >>> base, a, b = {"w": torch.zeros(2)}, {"w": torch.tensor([1., 0.])}, {"w": torch.tensor([0., 2.])}
    >>> task_arithmetic(base, [a, b], scale=0.5)["w"].tolist()
    [0.5, 1.0]
    >>> task_arithmetic(base, [a, b], weights=[1.0, -1.0])["w"].tolist()
    [1.0, -2.0]
    """


ROLES = ("a", "b", "c")
_ROLE_SIGN = {"a": -1.0, "b": 1.0, "c": 1.0}


def _check_analogy(params: dict, n_models: int) -> None:
    if n_models != 3:
        raise Merge3Error(f"analogy: needs exactly three models (roles a, b, c), got {n_models}")
    roles = params.get("roles") or ROLES
    if not isinstance(roles, (list, tuple)) or sorted(map(str, roles)) != sorted(ROLES):
        raise Merge3Error(f"analogy: roles must name a, b and c once each, got {list(roles) if isinstance(roles, (list, tuple)) else roles!r}")


def _analogy_key(inputs: MergeInputs, key: str, p: dict, context: None, out: torch.Tensor) -> None:
    signs = [_ROLE_SIGN[r] for r in (p["roles"] or ROLES)]
    add_weighted(out, inputs.anchor32(key), inputs.deltas(key), [p["scale"] * x for x in signs])


@merge_method(kernel=Kernel(_analogy_key), check=_check_analogy, label="analogy")
def analogy(
    base: StateDict,
    models: Sequence[StateDict],
    scale: Scale = 1.0,
    roles: Optional[Sequence[str]] = None,
) -> StateDict:
    """"A is to B as C is to D": θ_D ≈ θ₀ + scale · (τ_c + τ_b − τ_a), for three models in the order a, b, c (or in any
    order, with ``roles`` naming each one's role). ``scale`` may be given per layer, which is what a genome over
    ``analogy`` evolves (one coefficient on the analogy direction per layer group).

    >>> import torch
    >>> z = {"w": torch.zeros(1)}
    >>> a, b, c = {"w": torch.ones(1)}, {"w": torch.full((1,), 3.)}, {"w": torch.full((1,), 5.)}
    >>> analogy(z, [a, b, c])["w"].tolist(), analogy(z, [c, a, b], roles=["c", "a", "b"])["w"].tolist()
    ([7.0], [7.0])
    """


def _linear_key(inputs: MergeInputs, key: str, p: dict, context: None, out: torch.Tensor) -> None:
    # written around the anchor (the base in a group plan, else model 0) so the builder can reuse its task vectors:
    # Σ w θ_m = (Σ w) θ_anchor + Σ w (θ_m − θ_anchor)
    w, total = p["weights"], sum(p["weights"])
    if p["normalize"]:
        add_weighted(out, inputs.anchor32(key), inputs.deltas(key), [x / safe_divisor(total) for x in w])
    else:
        add_weighted(out, inputs.anchor32(key), inputs.deltas(key), w, anchor_scale=total)


@merge_method(kernel=Kernel(_linear_key),
              mergekit=MergekitForm({"linear": {}}, linear=frozenset({"linear"})))
def linear(
    models: Sequence[StateDict],
    weights: Annotated[Optional[Sequence[LayerValue]], PerModel(Bounds(-10.0, 10.0, search=(0.0, 1.0)))] = None,
    normalize: bool = True,
) -> StateDict:
    """Model soup: Σ_m w_m θ_m / Σ_m w_m (uniform weights by default; ``normalize=False`` skips the division).

    >>> import torch
    >>> linear([{"w": torch.zeros(2)}, {"w": torch.ones(2)}], weights=[1.0, 3.0])["w"].tolist()
    [0.75, 0.75]
    """


__all__ = ["analogy", "linear", "task_arithmetic"]
