"""How merge3's methods map to mergekit's, in both directions: a method declares a ``MergekitForm``, and YAML merges
read mergekit configs through it while ``merge3 export`` writes a search's plan as a mergekit config through it.

mergekit has one ``merge_method`` per config, so every group of a plan must use the same method and it must be one
mergekit has; per-group values become mergekit's conditional parameters ``[{filter: <tensor name>, value: v}, …]``
with one entry per tensor (exact names, longest first, because mergekit matches a filter as a substring and the
first match wins).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from merge3._errors import Merge3Error
from merge3.methods._params import has_row_blocks
from merge3.methods._registry import MergeMethod, get_method, registered


@dataclass(frozen=True)
class MergekitForm:
    """A method as mergekit knows it (mergekit's generalized task-arithmetic family: ``weight`` and ``density`` per
    model, ``lambda`` shared).

    - ``names``: each mergekit ``merge_method`` this method implements → the merge3 parameters that select it
      (DARE: ``{"dare_linear": {"combine": "linear"}, "dare_ties": {"combine": "ties"}}``);
    - ``density``: the merge3 parameter mergekit calls ``density``; ``complement``: mergekit's is 1 − it (DARE's
      drop rate). Different values per model go to the per-model parameter that overrides it (``densities``);
    - ``per_model_shared``: mergekit's other per-model parameters that merge3 takes once (gamma, epsilon);
    - ``shared``: parameters with the same name and meaning in both (normalize, rescale);
    - ``linear``: mergekit names whose strength may be written into the weights (a linear combination);
    - ``imported``: mergekit's defaults where they differ from merge3's (applied when reading a mergekit config);
      ``exported``: what merge3 means by an unset parameter, written out where mergekit's default differs;
    - ``merge3_only``: parameter → the only value mergekit can express (other values: no mergekit equivalent).
    """

    names: Mapping[str, Mapping[str, Any]]
    density: str | None = None
    complement: bool = False
    per_model_shared: tuple[str, ...] = ()
    shared: tuple[str, ...] = ("normalize",)
    linear: frozenset[str] = frozenset()
    imported: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    exported: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    merge3_only: Mapping[str, Any] = field(default_factory=dict)


def mergekit_methods() -> dict[str, tuple[str, Mapping[str, Any]]]:
    """Every mergekit ``merge_method`` merge3 implements → (merge3 method, the parameters that name fixes).

    >>> mergekit_methods()["dare_ties"]
    ('dare', {'combine': 'ties'})
    """
    out = {}
    for name, method in registered().items():
        for mergekit_name, fixed in (method.mergekit.names.items() if method.mergekit else ()):
            out[mergekit_name] = (name, dict(fixed))
    return out


def override_of(method: MergeMethod, shared: str) -> str | None:
    """The per-model parameter that replaces ``shared`` model by model (``ties``: density → densities)."""
    return next((p.name for p in method.params.values() if p.overrides == shared), None)


def complement(value: Any) -> Any:
    """1 − value for every number of a per-layer value (mergekit's DARE density is merge3's 1 − drop_rate)."""
    if isinstance(value, Mapping):
        return {k: 1.0 - float(v) for k, v in value.items()}
    if isinstance(value, list):
        return [1.0 - float(v) for v in value]
    return 1.0 - float(value)


# --- export: a search's per-group plan as a mergekit config ----------------------------------------------------------

def _group_form(choice: Mapping[str, Any], n_models: int) -> tuple[str, dict, list[dict]] | str:
    """One group as (mergekit name, shared parameters, per-model parameters), or why mergekit cannot express it."""
    method = get_method(choice["method"])
    form = method.mergekit
    if form is None:
        return f"{method.name} has no mergekit equivalent"
    raw = dict(choice["params"])
    params = method.validate(raw, n_models)
    name = next((n for n, fixed in form.names.items() if all(params.get(k) == v for k, v in fixed.items())), None)
    if name is None:
        return f"{method.name} with these options has no mergekit equivalent"
    if any(params.get(k) != v for k, v in form.merge3_only.items()):
        return f"group {choice['group']} uses merge3-only options of {method.name}"
    scale = float(params.get("scale", 1.0))
    # a linear combination takes its strength in the weights, unless normalize would divide it out again
    fold = name in form.linear and not params.get("normalize")
    shared: dict[str, Any] = {"lambda": scale} if "scale" in method.params and not fold else {}
    for key in form.shared:
        if key in raw:
            shared[key] = raw[key]
        elif key in form.exported.get(name, {}):
            shared[key] = form.exported[name][key]
    weights = params.get("weights") or [1.0] * n_models
    per_model: list[dict] = [{"weight": float(w) * (scale if fold else 1.0)} for w in weights]
    if form.density is not None:
        each = params.get(override_of(method, form.density) or "") or [params[form.density]] * n_models
        for entry, value in zip(per_model, each):
            entry["density"] = complement(value) if form.complement else float(value)
    for key in form.per_model_shared:
        for entry in per_model:
            entry[key] = float(params[key])
    return name, shared, per_model


def _per_tensor(values: Mapping[str, Any], groups: Mapping[str, Sequence[str]]) -> Any:
    """One value when every group agrees, else mergekit's filter list over every tensor name."""
    distinct = set(values.values())
    if len(distinct) == 1:
        return distinct.pop()
    keys = sorted(((key, values[group]) for group, keys in groups.items() for key in keys),
                  key=lambda kv: (-len(kv[0]), kv[0]))
    return [{"filter": key, "value": value} for key, value in keys] + [{"value": keys[-1][1]}]


def mergekit_config(plan: Sequence[Mapping[str, Any]], groups: Mapping[str, Sequence[str]], base: str,
                    endpoints: Sequence[str], dtype: str | None = None) -> tuple[dict | None, str]:
    """``(config, "")`` for mergekit-yaml, or ``(None, reason)`` when the plan has no mergekit equivalent.

    >>> plan = [{"group": "l.0", "method": "task_arithmetic", "params": {"weights": [0.5, 1.0]}},
    ...         {"group": "l.1", "method": "task_arithmetic", "params": {"weights": [0.5, 0.2]}}]
    >>> config, _ = mergekit_config(plan, {"l.0": ["l.0.w"], "l.1": ["l.1.w"]}, "base", ["a", "b"])
    >>> config["models"][0]["parameters"], config["models"][1]["parameters"]["weight"][0]
    ({'weight': 0.5}, {'filter': 'l.0.w', 'value': 1.0})
    """
    if any(has_row_blocks(c["params"]) for c in plan):
        return None, "row-block weights (one per block of output rows) have no mergekit equivalent"
    forms = {}
    for choice in plan:
        form = _group_form(choice, len(endpoints))
        if isinstance(form, str):
            return None, form
        forms[choice["group"]] = form
    names = {name for name, _, _ in forms.values()}
    if len(names) > 1:
        return None, f"the layer groups use different methods ({', '.join(sorted(names))}); mergekit takes one"
    forms = {g: f for g, f in forms.items() if g in groups}
    shared: dict[str, Any] = {}
    for key in sorted({k for _, s, _ in forms.values() for k in s}):
        values = {g: s.get(key) for g, (_, s, _) in forms.items()}
        if any(isinstance(v, bool) or v is None for v in values.values()):
            if len(set(values.values())) > 1:
                return None, f"the layer groups differ in '{key}'; mergekit takes one"
            shared[key] = next(iter(values.values()))
        else:
            shared[key] = _per_tensor(values, groups)
    models = []
    for i, path in enumerate(endpoints):
        keys = next(iter(forms.values()))[2][i].keys()
        parameters = {k: _per_tensor({g: f[2][i][k] for g, f in forms.items()}, groups) for k in keys}
        models.append({"model": path, "parameters": parameters})
    config: dict[str, Any] = {"merge_method": names.pop(), "base_model": base, "models": models}
    if shared:
        config["parameters"] = shared
    if dtype is not None:
        config["dtype"] = dtype
    return config, ""


# --- import: a mergekit config's parameters in merge3's terms -------------------------------------------------------

def _shared_value(values: list[Any], name: str, method: str) -> Any:
    if any(v != values[0] for v in values[1:]):
        raise Merge3Error(f"models[*].parameters.{name}: merge3's {method} takes one {name} for all models, "
                          f"got {values}")
    return values[0]


def per_model_params(method: MergeMethod, mergekit_name: str | None, per_model: Mapping[str, list[Any]],
                     params: dict[str, Any], n_models: int) -> dict[str, Any]:
    """Fold a config's per-model values (``models[i].parameters``, None where a model left one out) into merge3
    parameters: weights stay per model; a density that differs between models goes to the method's per-model
    override (one value each), one that agrees becomes the shared value; other per-model values must agree."""
    form = method.mergekit if mergekit_name is not None else None
    out = dict(params)
    for key, values in per_model.items():
        if key == "weight":
            default = out.pop("weights", 1.0)
            out["weights"] = [default if v is None else v for v in values]
            continue
        if key == "role":  # which part of an analogy each model plays
            if None in values:
                raise Merge3Error(f"field 'models.{values.index(None)}.parameters.role' is missing: {method.name} "
                                  "needs a role for every model")
            out["roles"] = [str(v) for v in values]
            continue
        target = form.density if form is not None and key == "density" else key
        flip = form is not None and key == "density" and form.complement
        if flip:
            for i, value in enumerate(values):
                check_complemented(method, target, value, f"models.{i}.parameters.density")
        values = [out.get(target) if v is None else (complement(v) if flip else v) for v in values]
        if None in values:
            raise Merge3Error(f"field 'models.{values.index(None)}.parameters.{key}' is missing")
        override = override_of(method, target)
        if override is not None and any(v != values[0] for v in values[1:]):
            out.pop(target, None)
            out[override] = values
        else:
            out[target] = _shared_value(values, key, method.name)
    if "weights" in out and not isinstance(out["weights"], list):
        out["weights"] = [out["weights"]] * n_models
    return out


def check_complemented(method: MergeMethod, target: str, value: Any, field: str) -> None:
    """mergekit's DARE ``density`` checked in its own terms (it becomes merge3's ``drop_rate`` = 1 − density, whose
    bounds would otherwise name a parameter the user never wrote)."""
    bounds = method.params[target].bounds
    low, high = 1.0 - bounds.high, 1.0 - bounds.low
    numbers = value.values() if isinstance(value, Mapping) else value if isinstance(value, list) else [value]
    for v in numbers:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not low - 1e-12 <= float(v) <= high + 1e-12:
            raise Merge3Error(f"field '{field}': {v} is out of range [{low:g}, {high:g}] ({method.name} keeps this "
                              "fraction of each task vector)")


def per_model_keys(method: MergeMethod, mergekit_name: str | None) -> set[str]:
    """The parameters a config may give per model for this method."""
    keys = {"weight"} if "weights" in method.params else set()
    if mergekit_name is not None:
        form = method.mergekit
        keys |= ({"density"} if form.density else set()) | set(form.per_model_shared)
    else:
        keys |= {p.overrides for p in method.params.values() if p.overrides}
        keys |= {"role"} if "roles" in method.params else set()
    return keys


__all__ = ["MergekitForm", "check_complemented", "complement", "mergekit_config", "mergekit_methods", "override_of", "per_model_keys",
           "per_model_params"]
