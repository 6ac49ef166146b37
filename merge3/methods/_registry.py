"""The merge-method registry: a decorator that reads a function's signature.

A merge method is a pure function over state dicts. Its inputs are the leading ``base`` and/or ``models``
arguments; every other argument is a parameter whose type annotation tells the registry (and so the YAML configs and
the search genome) what it accepts::

    @merge_method
    def ties(
        base: StateDict,
        models: Sequence[StateDict],
        density: Annotated[LayerValue, Bounds(0.0, 1.0, search=(0.05, 1.0))],
        scale: Annotated[LayerValue, Bounds(-10, 10, search=(0.0, 2.0))] = 1.0,
        weights: Annotated[Optional[Sequence[LayerValue]], PerModel(Bounds(-10, 10, search=(0, 1.5)))] = None,
        trim: Literal["tensor", "model"] = "tensor",
    ) -> StateDict: ...

- ``Annotated[LayerValue, Bounds(lo, hi, search=...)]``: a float that may be given per layer (see ``_params``);
  ``Bounds`` are hard validity limits, ``search`` the range the genome explores by default.
- ``Annotated[Optional[Sequence[LayerValue]], PerModel(Bounds(...))]``: one value per input model.
- ``Literal[...]``: a choice; ``int``/``bool``/``str``: plain values (e.g. a seed).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from merge3._errors import Merge3Error
from merge3.methods._params import is_layer_value, is_row_blocks, scalars_in
from merge3.models import StateDict

_INPUTS = ("base", "models")

# Bump when a merge method's output changes for the same inputs, so that scores cached from merges (baselines,
# IRT calibration) are recomputed instead of silently describing the old merges.
# 2: TSV's orthogonalisation keeps only the numerical range (unique when task blocks are dependent).
MERGES_REVISION = 2


@dataclass(frozen=True)
class Bounds:
    """Closed validity interval of a float parameter, and the sub-range a search explores by default."""

    low: float
    high: float
    search: tuple[float, float] | None = None

    @property
    def search_range(self) -> tuple[float, float]:
        return self.search if self.search is not None else (self.low, self.high)


@dataclass(frozen=True)
class PerModel:
    """Marks a parameter that takes one (per-layer) value per input model, each within ``bounds``."""

    bounds: Bounds


@dataclass(frozen=True)
class MethodParam:
    name: str
    kind: str  # "float" | "per_model" | "choice" | "int" | "bool" | "str" | "other"
    default: Any = inspect.Parameter.empty
    bounds: Bounds | None = None
    choices: tuple = ()

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function, which inputs it takes and what parameters it accepts."""

    name: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...]
    params: Mapping[str, MethodParam] = field(default_factory=dict)
    doc: str = ""

    @property
    def needs_base(self) -> bool:
        return "base" in self.inputs

    def validate(self, params: Mapping[str, Any], n_models: int | None = None) -> dict[str, Any]:
        """Check ``params`` against the signature; return them with defaults filled in.

        Raises ``Merge3Error`` naming the method and the offending field.
        """
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise Merge3Error(
                f"{self.name}: unknown parameter '{unknown[0]}' (accepted: {', '.join(self.params) or 'none'})"
            )
        out: dict[str, Any] = {}
        for name, spec in self.params.items():
            if name not in params:
                if spec.required:
                    raise Merge3Error(f"{self.name}: missing required parameter '{name}'")
                out[name] = spec.default
                continue
            out[name] = _check_value(self.name, spec, params[name], n_models)
        return out

    def check_param(self, name: str, value: Any, n_models: int | None = None) -> Any:
        """One parameter's value checked as a config's would be (a ``Merge3Error`` names method and parameter).

        >>> from merge3.methods import get_method
        >>> get_method("ties").check_param("density", 0.3)
        0.3
        """
        spec = self.params.get(name)
        if spec is None:
            raise Merge3Error(f"{self.name}: unknown parameter '{name}' (accepted: {', '.join(self.params) or 'none'})")
        return _check_value(self.name, spec, value, n_models)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the method with its parameters checked first, so a direct call fails as clearly as a config."""
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        inputs = {k: v for k, v in bound.arguments.items() if k in _INPUTS}
        params = {k: v for k, v in bound.arguments.items() if k not in _INPUTS}
        models = inputs.get("models")
        n_models = len(models) if isinstance(models, Sequence) else None
        return self.fn(**inputs, **self.validate(params, n_models))


def _check_range(method: str, name: str, bounds: Bounds | None, value: Any) -> None:
    if bounds is None:
        return
    for v in scalars_in(value):
        if not (bounds.low <= v <= bounds.high):
            raise Merge3Error(f"{method}: parameter '{name}' = {v} is out of range [{bounds.low}, {bounds.high}]")


def _check_value(method: str, spec: MethodParam, value: Any, n_models: int | None) -> Any:
    name = spec.name
    if value is None and spec.default is None:
        return None  # an optional parameter left unset (a seed, per-model weights)
    if spec.kind == "float":
        if not is_layer_value(value):
            raise Merge3Error(
                f"{method}: parameter '{name}' must be a number, a list of numbers (per layer) or a mapping "
                f"pattern → number, got {value!r}"
            )
        _check_range(method, name, spec.bounds, value)
    elif spec.kind == "per_model":
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(is_layer_value(v) or is_row_blocks(v) for v in value):
            raise Merge3Error(f"{method}: parameter '{name}' must be a list with one value per model, got {value!r}")
        if n_models is not None and len(value) != n_models:
            raise Merge3Error(f"{method}: parameter '{name}' has {len(value)} values for {n_models} models")
        for v in value:
            _check_range(method, name, spec.bounds, v)
    elif spec.kind == "choice":
        if value not in spec.choices:
            raise Merge3Error(f"{method}: parameter '{name}' = {value!r} is not one of {list(spec.choices)}")
    elif spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise Merge3Error(f"{method}: parameter '{name}' must be an integer, got {value!r}")
        _check_range(method, name, spec.bounds, value)
    elif spec.kind == "bool":
        if not isinstance(value, bool):
            raise Merge3Error(f"{method}: parameter '{name}' must be true or false, got {value!r}")
    return value


def _param_from_signature(p: inspect.Parameter, hint: Any) -> MethodParam:
    bounds, per_model = None, False
    if typing.get_origin(hint) is typing.Annotated:
        hint, *extras = typing.get_args(hint)
        for extra in extras:
            if isinstance(extra, Bounds):
                bounds = extra
            elif isinstance(extra, PerModel):
                bounds, per_model = extra.bounds, True
    if per_model:
        return MethodParam(p.name, "per_model", p.default, bounds)
    if typing.get_origin(hint) is typing.Literal:
        return MethodParam(p.name, "choice", p.default, choices=typing.get_args(hint))
    if bounds is not None:
        return MethodParam(p.name, "float", p.default, bounds)
    kind = {bool: "bool", int: "int", str: "str", float: "float"}.get(hint, "other")
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = set(typing.get_args(hint)) - {type(None)}
        if options == {int}:
            kind = "int"  # Optional[int], e.g. a seed that may be None
        elif options == {bool}:
            kind = "bool"  # Optional[bool]: None means "the method's own default"
    return MethodParam(p.name, kind, p.default)


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Register a merge function under its name (or ``name``), reading its parameters from its signature.

    >>> from merge3.methods import get_method
    >>> sorted(get_method("ties").params)[:3]
    ['density', 'normalize', 'scale']
    """

    def register(f: Callable[..., Any]) -> MergeMethod:
        hints = typing.get_type_hints(f, include_extras=True)
        sig = inspect.signature(f)
        inputs = tuple(p for p in sig.parameters if p in _INPUTS)
        params = {
            p.name: _param_from_signature(p, hints.get(p.name, Any))
            for p in sig.parameters.values()
            if p.name not in _INPUTS
        }
        method = MergeMethod(name or f.__name__, f, inputs, params, inspect.getdoc(f) or "")
        if method.name in _REGISTRY:
            raise RuntimeError(f"merge method '{method.name}' registered twice")
        _REGISTRY[method.name] = method
        return method

    return register(fn) if fn is not None else register


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; a ``Merge3Error`` listing the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise Merge3Error(f"unknown merge method '{name}' (available: {', '.join(sorted(_REGISTRY))})") from None


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def registered() -> Mapping[str, MergeMethod]:
    return dict(_REGISTRY)


def check_models(models: Sequence[StateDict], minimum: int = 1) -> None:
    if len(models) < minimum:
        raise Merge3Error(f"need at least {minimum} model(s) to merge, got {len(models)}")
