"""Building many candidate merges of the same models fast, in place.

A search builds hundreds of merges that differ only in their coefficients. ``CandidateBuilder`` computes once what
does not depend on them and writes each candidate straight into preallocated tensors (a state dict, or the
parameters of a live ``nn.Module``), so a build costs a few memory-bound passes over the task vectors and no
allocation of a whole model, no disk and no reload.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from merge3._errors import Merge3Error
from merge3.methods._groups import GroupPlan, assign_keys, validated_plans
from merge3.methods._inputs import MergeInputs
from merge3.methods._kernels import Sink, check_inputs, run_method
from merge3.methods._params import layer_positions
from merge3.methods._registry import StateDict, get_method


class _IntoDestination(Sink):
    """Kernels write float32 results straight into float32 destinations; others go through one work buffer."""

    def __init__(self, inputs: MergeInputs, out: Mapping[str, torch.Tensor]):
        self.inputs, self.out = inputs, out

    def buffer(self, key: str, inputs: MergeInputs) -> torch.Tensor:
        dest, anchor = self.out[key], inputs.anchor32(key)
        if tuple(dest.shape) != inputs.shape(key):
            raise Merge3Error(f"destination '{key}' has shape {tuple(dest.shape)}, expected {inputs.shape(key)}")
        direct = (dest.dtype == torch.float32 and dest.is_contiguous() and dest.device == anchor.device
                  and dest.data_ptr() != anchor.data_ptr())  # never overwrite the base while reading it
        return dest if direct else inputs.scratch("out", dest.shape, device=anchor.device)

    def write(self, key: str, value: torch.Tensor | None) -> None:
        dest = self.out[key]
        if value is None:
            dest.copy_(self.inputs.raw_anchor(key))
        elif value is not dest:
            dest.copy_(value)


class CandidateBuilder:
    """Precomputes task vectors (and, per method, sorted magnitudes, DARE draws, TSV components) once, then builds
    merges from per-group plans into destination tensors. ``build`` gives what ``merge_groups`` gives.

    ``device`` is where the cache lives and the merge is computed (default: where the base's tensors are).
    Memory: T float32 copies of the model for the task vectors, plus T per cached extra (sorted magnitudes for TIES,
    draws per DARE seed, components for TSV); ``cache_bytes()`` reports it and ``forget()`` frees a kind.

    >>> import torch
    >>> base = {"w": torch.zeros(3)}
    >>> ft = [{"w": torch.tensor([1., 2., 3.])}, {"w": torch.tensor([3., -2., 1.])}]
    >>> builder = CandidateBuilder(base, ft)
    >>> out = builder.allocate()
    >>> _ = builder.build([GroupPlan("all", ["*"], "task_arithmetic", {"weights": [0.5, 0.5]})], out)
    >>> out["w"].tolist()
    [2.0, 0.0, 2.0]
    >>> builder.build([GroupPlan("all", ["*"], "ties", {"density": 1.0})], out)["w"].tolist()
    [2.0, 2.0, 2.0]
    """

    def __init__(self, base: Mapping[str, torch.Tensor] | None, models: Sequence[Mapping[str, torch.Tensor]], *,
                 device: str | torch.device | None = None):
        check_inputs(base, models)
        self.inputs = MergeInputs(base, models, device=device, cache=True)
        self.keys = self.inputs.keys()
        self.positions = layer_positions(self.keys)
        self.float_keys = [k for k in self.keys if self.inputs.is_float(k)]
        self._assignments: dict[tuple, list[list[str]]] = {}

    @property
    def n_models(self) -> int:
        return self.inputs.n_models

    def allocate(self) -> StateDict:
        """Destination tensors shaped and typed like the base (on the builder's device), for ``build(out=...)``."""
        return {k: torch.empty_like(self.inputs.raw_anchor(k)) for k in self.keys}

    def precompute(self, methods: Iterable[str], seeds: Iterable[int] = (0,)) -> "CandidateBuilder":
        """Fill the caches the given methods use (each method's ``precompute``), so that the first ``build`` is as
        fast as the others."""
        hooks = [m.precompute for m in map(get_method, dict.fromkeys(methods)) if m.precompute is not None]
        seeds = list(seeds)
        for key in self.float_keys:
            self.inputs.deltas(key)
            for hook in hooks:
                hook(self.inputs, key, seeds)
        return self

    def build(self, plans: Sequence[GroupPlan], out: Mapping[str, torch.Tensor] | None = None) -> Mapping[str, torch.Tensor]:
        """Merge by ``plans`` into ``out`` (default: newly allocated) and return it.

        ``out`` may be any mapping of tensors with the base's keys and shapes, e.g. ``module.state_dict()``, whose
        tensors share storage with the module's parameters: the module then holds the candidate, with no copy.
        """
        params = validated_plans(plans, self.n_models, self.inputs.base is not None)
        out = self.allocate() if out is None else out
        missing = [k for k in self.keys if k not in out]
        if missing:
            raise Merge3Error(f"destination has no tensor '{missing[0]}' (+{len(missing) - 1} more)")
        sink = _IntoDestination(self.inputs, out)
        with torch.no_grad():
            assigned = self._assign(plans)
            for plan, plan_params, keys in zip(plans, params, assigned):
                run_method(self.inputs, plan.method, plan_params, keys, self.positions, sink)
            covered = {k for keys in assigned for k in keys}
            for key in self.keys:
                if key not in covered:
                    sink.write(key, None)
        return out

    def _assign(self, plans: Sequence[GroupPlan]) -> list[list[str]]:
        signature = tuple(tuple(p.keys) for p in plans)
        if signature not in self._assignments:
            self._assignments[signature] = assign_keys(plans, self.keys, self.float_keys)
        return self._assignments[signature]

    def cache_bytes(self) -> dict[str, int]:
        """Bytes held per cached kind (deltas, sorted, uniforms, tsv_components, …)."""
        sizes: dict[str, int] = {}
        for name, value in (self.inputs._cache or {}).items():
            tensors = [value] if isinstance(value, torch.Tensor) else [v for v in vars(value).values()
                                                                       if isinstance(v, torch.Tensor)]
            sizes[name[0]] = sizes.get(name[0], 0) + sum(t.numel() * t.element_size() for t in tensors)
        return sizes

    def forget(self, kind: str) -> None:
        """Free one cached kind; it is recomputed when next needed."""
        self.inputs.forget(kind)


__all__ = ["CandidateBuilder"]
