"""The merge-method registry: a method is declared once, by a decorator on a function that carries its signature.

A merge method is a pure function over state dicts. Its inputs are the leading ``base`` and/or ``models``
arguments; every other argument is a parameter whose type annotation tells the registry (and so the YAML configs and
the search genome) what it accepts. Everything else the rest of merge3 needs to know about the method is given in the
same declaration, so the builder, the genome, the baselines, the YAML merges and the mergekit export ask the method
instead of testing its name::

    @merge_method(kernel=Kernel(_ties_key, prepare=_ties_prepare), precompute=_sort_magnitudes, label="TIES",
                  recipes=[{"scale": s, "density": d} for d in (0.2, 0.5, 0.8) for s in (0.3, 0.5, 1.0)],
                  mergekit=MergekitForm({"ties": {}}, ...))
    def ties(
        base: StateDict,
        models: Sequence[StateDict],
        density: Annotated[LayerValue, Bounds(0.0, 1.0, search=(0.05, 1.0))],
        scale: Annotated[LayerValue, Bounds(-10, 10, search=(0.0, 2.0))] = 1.0,
        weights: Annotated[Optional[Sequence[LayerValue]], PerModel(Bounds(-10, 10, search=(0, 1.5)))] = None,
        trim: Literal["tensor", "model"] = "tensor",
    ) -> StateDict:
        ...  # only a docstring: calling the method runs its kernel over every key

A method with a ``kernel`` merges one tensor at a time (its function body is never run: calling the method runs the
kernel over every key); one without merges whole models in its function (C2M3, Re-Basin).

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
from typing import TYPE_CHECKING, Any

from merge3._config import MAX_SEED
from merge3._errors import Merge3Error
from merge3.methods._params import is_layer_value, is_row_blocks, scalars_in
from merge3.models import StateDict

if TYPE_CHECKING:
    from merge3.methods._mergekit import MergekitForm

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
    """Marks a parameter that takes one (per-layer) value per input model, each within ``bounds``.

    ``overrides`` names a shared parameter that this one replaces model by model (``densities`` overrides
    ``density``): left unset, every model takes the shared value; a genome that evolves it drops the shared gene.
    """

    bounds: Bounds
    overrides: str | None = None


@dataclass(frozen=True)
class Kernel:
    """``merge_key(inputs, key, params, context, out)`` writes the merged float32 tensor of ``key`` into ``out``;
    ``prepare(inputs, keys, params_of, positions)`` computes what spans several keys (TIES' global trim) and
    returns the ``context``."""

    merge_key: Callable[..., None]
    prepare: Callable[..., Any] | None = None


@dataclass(frozen=True)
class MethodParam:
    name: str
    kind: str  # "float" | "per_model" | "choice" | "int" | "bool" | "str" | "object" | "other"
    default: Any = inspect.Parameter.empty
    bounds: Bounds | None = None
    choices: tuple = ()
    overrides: str | None = None  # per-model parameters only: the shared parameter it replaces model by model
    classes: tuple = ()  # "object" parameters only: what the value must be an instance of (e.g. a PermutationSpec)

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function, inputs and parameters, and what the rest of merge3 needs to know.

    - ``kernel``: the per-tensor kernel (None: ``fn`` merges whole models);
    - ``precompute(inputs, key, seeds)``: fills what a ``CandidateBuilder`` caches for one key (sorted magnitudes,
      DARE draws, TSV components), so that every build after the first costs only the merge itself;
    - ``redundant``: parameters the per-endpoint weights already express (a genome does not evolve them);
    - ``recipes``: the fixed-recipe grid the baselines score, each a setting whose ``scale`` is the uniform strength
      (see ``uniform_recipe``); ``label``: the method's short name in tables;
    - ``mergekit``: how it reads and writes mergekit configs (None: mergekit has no equivalent);
    - ``same_task``: it merges same-task models from different seeds (C2M3): ``align(endpoints, seed)`` maps them
      once into a shared space, after which a candidate is the ``candidate_method`` (a weighted average) of them;
    - ``check(params, n_models)``: what the signature cannot say (analogy: three models, roles a, b, c), checked
      with the parameters, before anything is merged.
    """

    name: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...]
    params: Mapping[str, MethodParam] = field(default_factory=dict)
    doc: str = ""
    kernel: Kernel | None = None
    precompute: Callable[..., None] | None = None
    redundant: frozenset[str] = frozenset()
    recipes: tuple[Mapping[str, Any], ...] = ()
    label: str = ""
    mergekit: "MergekitForm | None" = None
    same_task: bool = False
    align: Callable[..., Any] | None = None
    candidate_method: str | None = None
    check: Callable[[dict, int], None] | None = None

    @property
    def needs_base(self) -> bool:
        return "base" in self.inputs

    @property
    def own_strength(self) -> bool:
        """Whether the method's strength is its own ``scale`` rather than the endpoint weights: TIES' disjoint mean
        divides by the weights' sum, so there the weights set only the tasks' balance."""
        return "scale" in self.params and "scale" not in self.redundant

    def uniform_recipe(self, setting: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """The parameters of a fixed recipe: every endpoint weighted alike at strength ``setting["scale"]``.

        >>> from merge3.methods import get_method
        >>> get_method("task_arithmetic").uniform_recipe({"scale": 0.5}, 2)
        {'weights': [0.5, 0.5]}
        >>> get_method("ties").uniform_recipe({"scale": 0.5, "density": 0.2}, 2)
        {'density': 0.2, 'weights': [1.0, 1.0], 'scale': 0.5}
        """
        own = {k: v for k, v in setting.items() if k != "scale"}
        strength = setting.get("scale", 1.0)
        if self.own_strength:
            return {**own, "weights": [1.0] * n_models, "scale": strength}
        return {**own, "weights": [strength] * n_models}

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
        overridden = {p.overrides for p in self.params.values() if p.overrides and params.get(p.name) is not None}
        for name, spec in self.params.items():
            if name not in params:
                if spec.required and name in overridden:
                    out[name] = None  # every model has its own value
                    continue
                if spec.required:
                    raise Merge3Error(f"{self.name}: missing required parameter '{name}'")
                out[name] = spec.default
                continue
            out[name] = _check_value(self.name, spec, params[name], n_models)
        if self.check is not None and n_models is not None:
            self.check(out, n_models)
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
        bound = inspect.signature(self.fn).bind_partial(*args, **kwargs)  # a required value may come per model
        inputs = {k: v for k, v in bound.arguments.items() if k in _INPUTS}
        params = {k: v for k, v in bound.arguments.items() if k not in _INPUTS}
        models = inputs.get("models")
        n_models = len(models) if isinstance(models, Sequence) else None
        params = self.validate(params, n_models)
        if self.kernel is not None:
            from merge3.methods._kernels import merge_state_dicts  # the kernel loop needs this registry

            return merge_state_dicts(self.name, inputs.get("base"), models, params)
        return self.fn(**inputs, **params)


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
        if spec.overrides is not None and any(is_row_blocks(v) for v in value):
            raise Merge3Error(f"{method}: parameter '{name}' cannot be given per row block (only weights can)")
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
        if name == "seed" and not 0 <= value <= MAX_SEED:  # generators take 32 bits: a larger seed would wrap silently
            raise Merge3Error(f"{method}: parameter 'seed' = {value} is out of range [0, {MAX_SEED}]")
        _check_range(method, name, spec.bounds, value)
    elif spec.kind == "bool":
        if not isinstance(value, bool):
            raise Merge3Error(f"{method}: parameter '{name}' must be true or false, got {value!r}")
    elif spec.kind == "object" and not isinstance(value, spec.classes):
        wanted = " or ".join(c.__name__ for c in spec.classes)
        raise Merge3Error(f"{method}: parameter '{name}' must be a {wanted} (a Python object, given through the API, "
                          f"not a config value), got {value!r}")
    return value


def _param_from_signature(p: inspect.Parameter, hint: Any) -> MethodParam:
    bounds, per_model = None, None
    if typing.get_origin(hint) is typing.Annotated:
        hint, *extras = typing.get_args(hint)
        for extra in extras:
            if isinstance(extra, Bounds):
                bounds = extra
            elif isinstance(extra, PerModel):
                bounds, per_model = extra.bounds, extra
    if per_model is not None:
        return MethodParam(p.name, "per_model", p.default, bounds, overrides=per_model.overrides)
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
        elif options and all(isinstance(o, type) and o not in (int, bool, str, float) for o in options):
            return MethodParam(p.name, "object", p.default, classes=tuple(options))  # Optional[PermutationSpec]
    return MethodParam(p.name, kind, p.default)


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(fn: Callable[..., Any] | None = None, *, name: str | None = None, kernel: Kernel | None = None,
                 precompute: Callable[..., None] | None = None, redundant: Sequence[str] = (),
                 recipes: Sequence[Mapping[str, Any]] = (), label: str | None = None,
                 mergekit: "MergekitForm | None" = None, same_task: bool = False,
                 align: Callable[..., Any] | None = None, candidate_method: str | None = None,
                 check: Callable[[dict, int], None] | None = None) -> Any:
    """Declare a merge method: its name (default: the function's), its parameters (read from the signature) and what
    ``MergeMethod`` lists (kernel, builder precompute, redundant genes, baseline recipes, mergekit form, …).

    >>> from merge3.methods import get_method
    >>> sorted(get_method("ties").params)[:3]
    ['densities', 'density', 'normalize']
    >>> get_method("ties").label, get_method("tsv_merge").redundant
    ('TIES', frozenset({'alpha'}))
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
        method_name = name or f.__name__
        unknown = sorted(set(redundant) - set(params))
        if unknown:
            raise RuntimeError(f"merge method '{method_name}': redundant parameter '{unknown[0]}' is not a parameter")
        for p in params.values():
            if p.overrides is not None and p.overrides not in params:
                raise RuntimeError(f"merge method '{method_name}': '{p.name}' overrides unknown '{p.overrides}'")
        if same_task and (align is None or candidate_method is None):
            raise RuntimeError(f"merge method '{method_name}': a same-task method needs align and candidate_method")
        method = MergeMethod(method_name, f, inputs, params, inspect.getdoc(f) or "", kernel=kernel,
                             precompute=precompute, redundant=frozenset(redundant), recipes=tuple(recipes),
                             label=label or method_name, mergekit=mergekit, same_task=same_task, align=align,
                             candidate_method=candidate_method, check=check)
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
