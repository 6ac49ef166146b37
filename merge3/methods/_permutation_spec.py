"""Permutation specs: which hidden-unit permutation acts on which axis of which tensor.

Permuting the hidden units of a layer leaves a network's function unchanged as long as the same permutation is
applied to every tensor axis that indexes those units: the rows of the layer's weight and bias (and of the
normalisation that follows it) and the columns of the next layer's weight. A spec names each such permutation (a
*group*) and lists, for every tensor, which group acts on each of its axes (``None``: that axis is not permuted)::

    spec = PermutationSpec({
        "layers.0.weight": ("P0", None),   # rows = hidden units of layer 0, columns = inputs
        "layers.0.bias": ("P0",),
        "layers.2.weight": (None, "P0"),   # the output layer reads layer 0's units
        "layers.2.bias": (None,),
    })

Permutations are index tensors ``p`` (``torch.long``): applying ``p`` to an axis takes ``new[i] = old[p[i]]`` along
it (``Tensor.index_select``). Tensors that a spec does not name are never permuted (e.g. integer buffers such as
BatchNorm's ``num_batches_tracked``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from merge3._errors import Merge3Error
from merge3.methods._registry import StateDict

Perms = dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class PermutationSpec:
    """Which permutation group acts on which axis of which tensor.

    >>> spec = mlp_spec(["layers.0", "layers.2"])
    >>> spec.axes_to_perm["layers.2.weight"]
    (None, 'P_layers.0')
    >>> spec.perm_to_axes["P_layers.0"]
    [('layers.0.weight', 0), ('layers.0.bias', 0), ('layers.2.weight', 1)]
    """

    axes_to_perm: Mapping[str, tuple[str | None, ...]]
    perm_to_axes: dict[str, list[tuple[str, int]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        axes = {key: tuple(groups) for key, groups in self.axes_to_perm.items()}
        by_group: dict[str, list[tuple[str, int]]] = {}
        for key, groups in axes.items():
            for axis, group in enumerate(groups):
                if group is not None:
                    by_group.setdefault(group, []).append((key, axis))
        object.__setattr__(self, "axes_to_perm", axes)
        object.__setattr__(self, "perm_to_axes", by_group)

    @property
    def groups(self) -> list[str]:
        """The permutation group names, in order of first appearance."""
        return list(self.perm_to_axes)

    def sizes(self, state_dict: Mapping[str, torch.Tensor], who: str = "the state dict") -> dict[str, int]:
        """Number of units each group permutes in ``state_dict``; a ``Merge3Error`` if the spec does not fit it."""
        sizes: dict[str, int] = {}
        for key, groups in self.axes_to_perm.items():
            if key not in state_dict:
                raise Merge3Error(f"permutation spec names tensor '{key}', which is not in {who}")
            shape = tuple(state_dict[key].shape)
            if len(groups) != len(shape):
                raise Merge3Error(
                    f"permutation spec gives {len(groups)} axes for tensor '{key}', which has shape {shape}"
                )
            for axis, group in enumerate(groups):
                if group is None:
                    continue
                if sizes.setdefault(group, shape[axis]) != shape[axis]:
                    first_key, first_axis = self.perm_to_axes[group][0]
                    raise Merge3Error(
                        f"permutation '{group}' acts on axis {axis} of '{key}' (size {shape[axis]}) and on axis "
                        f"{first_axis} of '{first_key}' (size {sizes[group]}): sizes must agree"
                    )
        return sizes


def check_spec_fits(
    models: Sequence[Mapping[str, torch.Tensor]], spec: PermutationSpec, method: str
) -> dict[str, int]:
    """Same tensors and shapes in every model (``merge3.models.check_compatible``) and a ``spec`` that fits them;
    return the group sizes. Errors start with ``method``."""
    from merge3.models import check_compatible

    if not models:
        raise Merge3Error(f"{method}: need at least one model")
    try:
        check_compatible(models[0], models[1:], [f"model {m}" for m in range(1, len(models))],
                         reference_name="model 0", check_dtypes=False)
        return spec.sizes(models[0], who="the models")
    except Merge3Error as err:
        raise Merge3Error(f"{method}: {err}") from None


def apply_permutations(state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Perms) -> StateDict:
    """Permute every axis the spec names with its group's index tensor; a new dict (unpermuted tensors are shared).

    >>> import torch
    >>> spec = mlp_spec(["0", "1"])
    >>> sd = {"0.weight": torch.eye(3), "0.bias": torch.arange(3.0),
    ...       "1.weight": torch.ones(2, 3), "1.bias": torch.zeros(2)}
    >>> apply_permutations(sd, spec, {"P_0": torch.tensor([2, 0, 1])})["0.bias"]
    tensor([2., 0., 1.])
    """
    missing = [g for g in spec.groups if g not in perms]
    if missing:
        raise Merge3Error(f"no permutation given for group '{missing[0]}'")
    out = dict(state_dict)
    for key, groups in spec.axes_to_perm.items():
        tensor = state_dict[key]
        for axis, group in enumerate(groups):
            if group is not None:
                tensor = tensor.index_select(axis, perms[group].to(tensor.device))
        out[key] = tensor
    return out


def mlp_spec(layers: Sequence[str], bias: bool = True) -> PermutationSpec:
    """Spec of a plain MLP whose linear layers have the key prefixes ``layers`` (input to output).

    Each hidden layer's outputs form the group ``P_<prefix>``; the inputs of the first layer and the outputs of the last
    are not permuted. ``bias=False`` for layers without ``<prefix>.bias``.

    >>> mlp_spec(["net.0", "net.2", "net.4"]).groups
    ['P_net.0', 'P_net.2']
    """
    axes: dict[str, tuple[str | None, ...]] = {}
    previous = None
    for i, prefix in enumerate(layers):
        group = f"P_{prefix}" if i < len(layers) - 1 else None
        axes[f"{prefix}.weight"] = (group, previous)
        if bias:
            axes[f"{prefix}.bias"] = (group,)
        previous = group
    return PermutationSpec(axes)


def conv_bn_spec(blocks: Sequence[tuple[str, str | None]], head: str, bias: bool = True) -> PermutationSpec:
    """Spec of a plain CNN: ``blocks`` of (conv prefix, BatchNorm prefix or None), then global pooling and a linear
    ``head`` (its input features = the last conv's channels).

    Each conv's output channels form the group ``P_<conv prefix>``, shared by its bias, the BatchNorm's weight, bias
    and running statistics, and the next conv's input channels. ``bias`` says whether the convs have biases.

    >>> spec = conv_bn_spec([("0", "1"), ("3", "4")], head="8")
    >>> spec.axes_to_perm["3.weight"], spec.axes_to_perm["4.running_var"], spec.axes_to_perm["8.weight"]
    (('P_3', 'P_0', None, None), ('P_3',), (None, 'P_3'))
    """
    axes: dict[str, tuple[str | None, ...]] = {}
    previous = None
    for conv, norm in blocks:
        group = f"P_{conv}"
        axes[f"{conv}.weight"] = (group, previous, None, None)
        if bias:
            axes[f"{conv}.bias"] = (group,)
        if norm is not None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                axes[f"{norm}.{name}"] = (group,)
        previous = group
    axes[f"{head}.weight"] = (None, previous)
    axes[f"{head}.bias"] = (None,)
    return PermutationSpec(axes)


_WEIGHT = re.compile(r"^(.*)\.weight$")


def infer_mlp_spec(state_dict: Mapping[str, torch.Tensor]) -> PermutationSpec:
    """Build an MLP spec from a state dict of linear layers (``<prefix>.weight`` 2-D, optional ``<prefix>.bias``),
    each layer's input size equal to the previous layer's output size. Layers go in the order their names first
    appear, or in natural order of their names (``layers.2`` before ``layers.10``) when that is what chains: files
    store keys sorted, a bias before its weight and ``10`` before ``2``.

    Anything else (a conv, a norm, a buffer, a shape that breaks the chain) raises ``Merge3Error``: a wrong guess
    would silently break the merged function, so such models need an explicit spec.

    >>> import torch
    >>> sd = {"l.0.weight": torch.zeros(5, 3), "l.0.bias": torch.zeros(5), "l.2.weight": torch.zeros(2, 5)}
    >>> infer_mlp_spec(sd).axes_to_perm
    {'l.0.weight': ('P_l.0', None), 'l.0.bias': ('P_l.0',), 'l.2.weight': (None, 'P_l.0')}
    >>> infer_mlp_spec(dict(sorted(sd.items()))).axes_to_perm == infer_mlp_spec(sd).axes_to_perm
    True
    """
    weights = {m.group(1): t for k, t in state_dict.items() if (m := _WEIGHT.match(k)) and t.dim() == 2}
    biases = {k[: -len(".bias")]: t for k, t in state_dict.items() if k.endswith(".bias")}
    for key, tensor in state_dict.items():
        prefix = key[: -len(".bias")] if key.endswith(".bias") else None
        if key.endswith(".weight") and key[: -len(".weight")] in weights:
            continue
        if prefix in weights and tensor.dim() == 1:
            if tensor.shape[0] != weights[prefix].shape[0]:
                raise Merge3Error(f"cannot infer an MLP permutation spec: bias '{key}' has the wrong size")
            continue
        raise Merge3Error(
            f"cannot infer an MLP permutation spec: tensor '{key}' (shape {tuple(tensor.shape)}) is not a linear "
            "layer's weight or bias; pass a PermutationSpec"
        )
    if not weights:
        raise Merge3Error("cannot infer an MLP permutation spec: the state dict has no 2-D weights")
    first_seen = list(dict.fromkeys(k[: -len(".bias")] if k.endswith(".bias") else k[: -len(".weight")]
                                    for k in state_dict))
    natural = sorted(weights, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])
    orders = [first_seen, natural] if natural != first_seen else [first_seen]
    broken = [_chain_break(order, weights) for order in orders]
    if all(broken):
        raise Merge3Error(f"cannot infer an MLP permutation spec: {broken[0]}; pass a PermutationSpec")
    layers = orders[broken.index(None)]
    axes: dict[str, tuple[str | None, ...]] = {}
    previous = None
    for i, prefix in enumerate(layers):
        group = f"P_{prefix}" if i < len(layers) - 1 else None
        axes[f"{prefix}.weight"] = (group, previous)
        if prefix in biases:
            axes[f"{prefix}.bias"] = (group,)
        previous = group
    return PermutationSpec(axes)


def _chain_break(order: list[str], weights: Mapping[str, torch.Tensor]) -> str | None:
    """Where the layers in ``order`` stop feeding each other (a layer's inputs ≠ the previous outputs), or None."""
    for before, after in zip(order, order[1:]):
        if weights[after].shape[1] != weights[before].shape[0]:
            return (f"'{after}.weight' takes {weights[after].shape[1]} inputs but the previous layer '{before}' has "
                    f"{weights[before].shape[0]} outputs")
    return None
