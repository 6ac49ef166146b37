"""Input-adaptive routing over skill packs (after MASS, Crisostomi et al. 2025): per input, pick the task whose TSV
subspace best explains the input of one layer, and run the base with only that task's components added.

For the routing layer W (an ``nn.Linear``, by default the first one the packs change), task t's pack stores the
right singular vectors V_t (k × n) of its delta. An input's representation x at that layer (mean over tokens for
text) has residual ‖x − V_tᵀV_t x‖² / ‖x‖² on task t's subspace; the smallest residual chooses the task. The model
then computes θ₀ + U_t S_t V_tᵀ on every layer for that input (one task per input: MASS's top-1), or, with
``top_k`` > 1, θ₀ plus the task vectors of the k tasks with the smallest residuals.

Costs one extra forward of the base per batch (to read x) plus one forward per distinct task in the batch. It needs
an input whose representation is known before the output: classifiers and encoders, not generation with causal LMs
(each generated token would need its own route; merge3 does not route those).

A routed model is a folder::

    routing.json        format, tasks, routing layer, base path and weights sha256
    packs/<task>/       the skill packs it routes over (a copy: the folder is self-contained but for the base)
    config.json …       the base's config and tokenizer files
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from merge3._errors import Merge3Error

ROUTING_FILE = "routing.json"
FORMAT = "merge3-routed"


def is_routed(path: str | os.PathLike) -> bool:
    return (Path(path) / ROUTING_FILE).is_file()


class RoutedModel(nn.Module):
    """The base ``module`` with one weight set per task (θ₀ + that task's pack), routed per input.

    ``last_routes`` holds the task index chosen for each input of the latest forward (``tasks[i]``).
    """

    def __init__(self, module: nn.Module, tasks: Sequence[str], weights: Sequence[Mapping[str, torch.Tensor]],
                 subspaces: Sequence[torch.Tensor], route_module: str, top_k: int = 1):
        super().__init__()
        self.module, self.tasks, self.route_module = module, list(tasks), route_module
        self.top_k = check_top_k(top_k, len(self.tasks))
        self._weights = [dict(w) for w in weights]
        self._mixed: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}  # top-k > 1: θ₀ + Σ chosen τ, per set
        self._subspaces = [v.float() for v in subspaces]  # V_t: k × n, orthonormal rows
        self.last_routes: torch.Tensor | None = None
        modules = dict(module.named_modules())
        if route_module not in modules or not isinstance(modules[route_module], nn.Linear):
            raise Merge3Error(f"routing layer '{route_module}' is not a linear layer of the model")
        self._captured: list[torch.Tensor] = []
        self._capturing = False
        modules[route_module].register_forward_pre_hook(self._capture)

    def _capture(self, _module, inputs) -> None:
        if self._capturing:
            self._captured.append(inputs[0])

    def residuals(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, tasks] share of each input's representation outside each task's subspace (tokens averaged)."""
        x = x.float()
        if x.ndim == 2:
            x = x[:, None, :]
        norm = (x**2).sum(-1).clamp_min(1e-12)
        out = []
        for v in self._subspaces:
            v = v.to(x.device)
            inside = ((x @ v.T) ** 2).sum(-1)
            share = 1.0 - inside / norm
            if mask is not None and mask.shape == share.shape:
                share = (share * mask).sum(-1) / mask.sum(-1).clamp_min(1)
            else:
                share = share.mean(-1)
            out.append(share)
        return torch.stack(out, dim=-1)

    def route(self, *args, **kwargs) -> torch.Tensor:
        """The task index chosen for every input of the batch."""
        self._captured.clear()
        self._capturing = True
        try:
            with torch.no_grad():
                self.module(*args, **kwargs)
        finally:
            self._capturing = False
        x = self._captured[0]
        self._captured.clear()
        residuals = self.residuals(x, kwargs.get("attention_mask"))
        if self.top_k == 1:
            return residuals.argmin(-1)
        return residuals.topk(self.top_k, dim=-1, largest=False).indices.sort(dim=-1).values

    def weights_for(self, chosen: Sequence[int]) -> Mapping[str, torch.Tensor]:
        """The weights an input routed to the tasks ``chosen`` runs with: θ₀ + Σ_{t ∈ chosen} τ_t (each τ_t its
        pack's low-rank task vector); integer buffers keep the base's value."""
        chosen = tuple(sorted(int(t) for t in chosen))
        if len(chosen) == 1:
            return self._weights[chosen[0]]
        if chosen not in self._mixed:
            base = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
            mixed = {}
            for key, value in self._weights[chosen[0]].items():
                anchor = base[key].detach()
                if not value.is_floating_point():
                    mixed[key] = anchor
                    continue
                mixed[key] = anchor + sum(self._weights[t][key].to(anchor.dtype) - anchor for t in chosen)
            self._mixed[chosen] = mixed
        return self._mixed[chosen]

    def forward(self, *args, **kwargs):
        routes = self.route(*args, **kwargs)
        self.last_routes = routes
        sets = routes.reshape(len(routes), -1)
        out, plain = None, True
        for chosen in sets.unique(dim=0):
            rows = (sets == chosen).all(-1).nonzero().flatten()
            part = torch.func.functional_call(self.module, self.weights_for(chosen.tolist()), _rows(args, rows),
                                              _rows(kwargs, rows))
            plain = isinstance(part, torch.Tensor)
            hidden = _first_tensor(part)
            if out is None:
                out = hidden.new_zeros((len(routes), *hidden.shape[1:]))
            out[rows] = hidden
        if out is None:
            return self.module(*args, **kwargs)
        if plain:
            return out
        from transformers.modeling_outputs import BaseModelOutput  # an encoder's output, as the base gives it

        return BaseModelOutput(last_hidden_state=out)

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        self._weights = [{k: v.to(*args, **kwargs) for k, v in w.items()} for w in self._weights]
        self._mixed.clear()
        return self


def check_top_k(top_k: object, n_tasks: int) -> int:
    """How many tasks an input is routed to: 1 (MASS's top-1) up to every task."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_tasks:
        raise Merge3Error(f"route: top_k = {top_k!r} must be an integer from 1 to the number of tasks ({n_tasks})")
    return top_k


def _rows(value, rows: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)]
    if isinstance(value, tuple):
        return tuple(_rows(v, rows) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, rows) for k, v in value.items()}
    return value


def _first_tensor(output) -> torch.Tensor:
    """The model's main output (a tensor, or an HF output's ``last_hidden_state`` / first element)."""
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


def _first_routed_linear(module: nn.Module, keys) -> str:
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and f"{name}.weight" in keys:
            return name
    raise Merge3Error("the packs change no linear layer of the model: nothing to route on")


def build_routed(packs: Mapping[str, str | os.PathLike], out: str | os.PathLike, *, layer: str | None = None,
                 hf_class: str = "AutoModel", top_k: int = 1) -> Path:
    """Write a routed model over ``packs`` (task → skill-pack folder, all of one base) into ``out`` (atomically);
    each input runs with θ₀ plus the task vectors of the ``top_k`` tasks whose subspaces explain it best."""
    from merge3.models._arch import load_model
    from merge3.models._io import atomic_dir, check_folder_name, copy_model_files, open_lazy
    from merge3.models._packs import FACTORS, _read_manifest, pack_base

    if len(packs) < 2:
        raise Merge3Error("route: give at least two skill packs (one per task)")
    for task in packs:
        check_folder_name(task, "route: task name")
    check_top_k(top_k, len(packs))
    manifests = {t: _read_manifest(Path(p)) for t, p in packs.items()}
    bases = {m["base"].get("sha256") for m in manifests.values()}
    if len(bases) != 1:
        raise Merge3Error("route: the skill packs were made from different bases (weights sha256 differ)")
    base = pack_base(next(iter(packs.values())))
    module = load_model(base, hf_class=hf_class)  # the base exists and loads; each pack is checked when read
    factors = open_lazy(Path(next(iter(packs.values()))) / FACTORS)
    layer = layer or _first_routed_linear(module, {k.split("::")[0] for k in factors if k.endswith("::Vh")})
    if f"{layer}.weight::Vh" not in factors:
        raise Merge3Error(f"--layer '{layer}': the packs hold no factors for '{layer}.weight' (a 2-D linear layer)")
    for p in packs.values():
        open_lazy(p)  # a pack of another base, a changed base, a missing layer: refused here
    with atomic_dir(out) as tmp:
        for t, p in packs.items():
            shutil.copytree(p, tmp / "packs" / t)
        copy_model_files(base, tmp)
        routing = {"format": FORMAT, "tasks": list(packs), "layer": layer, "hf_class": hf_class, "top_k": top_k,
                   "base": {"path": str(Path(base).resolve()), "sha256": next(iter(bases))}}
        (tmp / ROUTING_FILE).write_text(json.dumps(routing, indent=2) + "\n")
    return Path(out)


def load_routed(path: str | os.PathLike, hf_class: str | None = None, device: str | torch.device = "cpu"
                ) -> RoutedModel:
    """A routed model folder as a ``RoutedModel`` (in eval mode)."""
    from merge3.models._arch import load_model
    from merge3.models._io import check_folder_name, open_lazy
    from merge3.models._packs import FACTORS

    path = Path(path)
    try:
        routing = json.loads((path / ROUTING_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Merge3Error(f"routed model '{path}': {ROUTING_FILE} cannot be read ({e})") from None
    if not isinstance(routing, dict) or routing.get("format") != FORMAT or not routing.get("tasks"):
        raise Merge3Error(f"routed model '{path}': {ROUTING_FILE} is not a merge3 routing manifest")
    hf_class = hf_class or routing.get("hf_class", "AutoModel")
    if "CausalLM" in hf_class:
        raise Merge3Error(f"routed model '{path}': routing applies to classifiers and encoders, not to generation "
                          "with causal LMs (every generated token would need its own route)")
    module = load_model(routing["base"]["path"], hf_class=hf_class)
    names = dict(module.named_parameters()) | dict(module.named_buffers())
    weights, subspaces = [], []
    for task in routing["tasks"]:
        pack = path / "packs" / check_folder_name(task, f"routed model '{path}': {ROUTING_FILE} task")
        if not pack.is_dir():
            raise Merge3Error(f"routed model '{path}': the pack of task '{task}' is missing ({pack})")
        state = open_lazy(pack)
        weights.append({k: state[k] for k in state if k in names})
        subspaces.append(open_lazy(pack / FACTORS)[f"{routing['layer']}.weight::Vh"])
    try:
        routed = RoutedModel(module, routing["tasks"], weights, subspaces, routing["layer"], routing.get("top_k", 1))
    except Merge3Error as e:
        raise Merge3Error(f"routed model '{path}': {e}") from None
    return routed.to(device).eval()
