"""The loop that runs one method's per-tensor kernel over a set of keys, and the sinks the results go to.

A kernel turns one key's inputs (``MergeInputs``) and that key's resolved parameters into the merged float32
tensor. The pure functions, ``merge_groups``, ``CandidateBuilder`` and the streaming YAML merge all run the same
kernels, so they agree by construction; they differ only in where tensors come from and where results go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from merge3._errors import Merge3Error
from merge3.methods._inputs import MergeInputs
from merge3.methods._params import has_row_blocks, is_row_blocks, resolve, row_weights
from merge3.methods._registry import MergeMethod, StateDict, get_method


class Sink:
    """Where merged tensors go. ``buffer(key)`` is the float32 tensor a kernel writes the result of ``key`` into
    (the destination itself when it can be); ``write(key, value)`` stores it (None: keep the anchor's tensor)."""

    def buffer(self, key: str, inputs: MergeInputs) -> torch.Tensor:
        return torch.empty(inputs.shape(key), dtype=torch.float32, device=inputs.anchor32(key).device)

    def write(self, key: str, value: torch.Tensor | None) -> None:
        raise NotImplementedError


def key_params(method: MergeMethod, params: Mapping[str, Any], key: str, position: float, n_models: int,
               device: torch.device, shape: Sequence[int] = ()) -> dict[str, Any]:
    """The scalars one key gets: per-layer values resolved, per-model values as a list of floats (default ones), or
    of per-row tensors for row-block weights (which is why the key's ``shape`` is needed)."""
    out: dict[str, Any] = {}
    for name, spec in method.params.items():
        value = params.get(name, spec.default)
        if spec.kind == "float" and value is not None:
            value = resolve(value, key, position)
        elif spec.kind == "per_model" and value is not None:
            value = [row_weights(v, shape, device) if is_row_blocks(v) else resolve(v, key, position) for v in value]
        out[name] = value
    for name, spec in method.params.items():
        if spec.kind == "per_model" and out[name] is None:
            # unset: every model takes the shared value it overrides (weights: 1)
            out[name] = [1.0 if spec.overrides is None else out[spec.overrides]] * n_models
    return out


def check_inputs(base: Mapping[str, torch.Tensor] | None, models: Sequence[Mapping[str, torch.Tensor]],
                 method: str = "merge") -> None:
    """Same keys and shapes everywhere, a base where the method needs one: else one ``Merge3Error``."""
    from merge3.models import check_compatible

    if not models:
        raise Merge3Error(f"{method}: need at least one model to merge, got none")
    if method != "merge" and get_method(method).needs_base and base is None:
        raise Merge3Error(f"{method}: needs a base model (task vectors are differences from it)")
    if base is not None:
        check_compatible(base, models, [f"model {i}" for i in range(len(models))], check_dtypes=False)
    else:
        check_compatible(models[0], models[1:], [f"model {i}" for i in range(1, len(models))],
                         reference_name="model 0", check_dtypes=False)


def run_method(inputs: MergeInputs, method: str, params: Mapping[str, Any], keys: Sequence[str],
               positions: Mapping[str, float], sink: Sink) -> None:
    """Merge ``keys`` with ``method`` (already validated ``params``) into ``sink``."""
    spec = get_method(method)
    if spec.needs_base and inputs.base is None:
        raise Merge3Error(f"{method}: needs a base model (task vectors are differences from it)")
    kern = spec.kernel
    if kern is None:
        if has_row_blocks(params):
            raise Merge3Error(f"{method}: merges whole models, so its weights cannot be given per row block")
        _run_whole_model(inputs, spec, params, keys, sink)
        return
    float_keys = [k for k in keys if inputs.is_float(k)]
    device = _device_of(inputs, float_keys)

    def params_of(key: str) -> dict[str, Any]:
        return key_params(spec, params, key, positions.get(key, 0.0), inputs.n_models, device, inputs.shape(key))

    context = kern.prepare(inputs, float_keys, params_of, positions) if kern.prepare else None
    for key in keys:
        if inputs.is_float(key):
            out = sink.buffer(key, inputs)
            kern.merge_key(inputs, key, params_of(key), context, out)
            sink.write(key, out)
        else:
            sink.write(key, None)


def _device_of(inputs: MergeInputs, float_keys: Sequence[str]) -> torch.device:
    if inputs.device is not None:
        return inputs.device
    return inputs.anchor[float_keys[0]].device if float_keys else torch.device("cpu")


def _run_whole_model(inputs: MergeInputs, spec: MergeMethod, params: Mapping[str, Any], keys: Sequence[str],
                     sink: Sink) -> None:
    """Methods without a per-key kernel (C2M3, Re-Basin) merge whole models; a group takes its keys from that."""
    inputs_of = {"base": inputs.base, "models": inputs.models}
    merged = spec.fn(**{name: inputs_of[name] for name in spec.inputs}, **params)
    for key in keys:
        value = merged[key]
        sink.write(key, value.float() if value.is_floating_point() else None)


class Collect(Sink):
    """Stores results in a new state dict, cast back to the anchor's dtype (integer buffers copied)."""

    def __init__(self, inputs: MergeInputs):
        self.inputs = inputs
        self.out: StateDict = {}

    def write(self, key: str, value: torch.Tensor | None) -> None:
        anchor = self.inputs.raw_anchor(key)
        self.out[key] = anchor.clone() if value is None else value.to(anchor.dtype)


def merge_state_dicts(method: str, base: Mapping[str, torch.Tensor] | None,
                      models: Sequence[Mapping[str, torch.Tensor]], params: Mapping[str, Any]) -> StateDict:
    """What every pure merge function does: check inputs, run the kernel over all keys, return a new state dict."""
    from merge3.methods._params import layer_positions

    check_inputs(base, models, method)
    inputs = MergeInputs(base, models)
    keys = inputs.keys()
    sink = Collect(inputs)
    run_method(inputs, method, params, keys, layer_positions(keys), sink)
    return sink.out
