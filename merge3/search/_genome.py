"""The genome: what the search evolves, and how a genome becomes a merge plan.

For every layer group g there is
- ``g|method``: the merge method of that group (a choice among the allowed methods; omitted when only one);
- ``g|w<i>``: the weight of endpoint i in that group (used by every method: task-vector scale, soup weight, …);
  with ``row_blocks = K > 1``, K weights ``g|w<i>.<j>``, one per contiguous block of each tensor's rows (output
  neurons), which gives the search coefficients finer than a layer;
- ``g|<method>.<param>``: each continuous parameter of each allowed method (density, drop_rate, alpha, …), within the
  registry's search range unless the space overrides it;
- ``g|<method>.<param>.<i>``: with ``per_model=["ties.densities"]``, one gene per endpoint for a per-model parameter
  (each endpoint its own density, as Sakana-style and MERGE³ genomes tune it) instead of the shared one it overrides.

A genome is a flat ``dict[str, float | str]``, which is what pymoo's mixed-variable algorithms and Optuna both speak.
Variables of methods a group did not choose are carried but ignored, so crossover can switch a method back on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from merge3._errors import Merge3Error
from merge3.methods import ROW_BLOCKS, get_method

SEP = "|"


@dataclass(frozen=True)
class Real:
    low: float
    high: float


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]


def weight_range_problem(methods: Sequence[str], low: float, high: float) -> str | None:
    """Why the per-endpoint weight genes [low, high] do not fit ``methods`` (each method's ``weights`` bounds), or
    None: a range beyond them would make every candidate outside fail, one by one, after the run began.

    >>> weight_range_problem(["ties", "tsv_merge"], 0.0, 20.0)
    "high=20.0 is outside ties's weight bounds [-10.0, 10.0]"
    >>> weight_range_problem(["ties"], 0.0, 1.5) is None
    True
    """
    if not low < high:
        return f"bounds reversed or empty: low={low} must be below high={high}"
    for method in methods:
        spec = get_method(method).params.get("weights")
        bounds = spec.bounds if spec is not None else None
        if bounds is None:
            continue
        for name, value in (("low", low), ("high", high)):
            if not bounds.low <= value <= bounds.high:
                return f"{name}={value} is outside {method}'s weight bounds [{bounds.low}, {bounds.high}]"
    return None


def sample_variables(variables: Mapping[str, Real | Choice], rng) -> dict[str, Any]:
    """A uniformly random value for every variable (``rng``: a ``numpy.random.Generator``), in the mapping's order."""
    return {
        name: str(rng.choice(v.options)) if isinstance(v, Choice) else float(rng.uniform(v.low, v.high))
        for name, v in variables.items()
    }


@dataclass(frozen=True)
class GroupChoice:
    """What one layer group of a candidate uses: a method, its parameters, and one weight per endpoint."""

    group: str
    method: str
    params: dict[str, Any]

    def as_dict(self) -> dict:
        return {"group": self.group, "method": self.method, "params": self.params}


class Genome:
    """Variables of a search space and the decoding of a genome into per-group merge choices.

    >>> g = Genome(["layers.0", "layers.1"], ["ties", "task_arithmetic"], n_models=2)
    >>> sorted(g.variables)[:4]
    ['layers.0|method', 'layers.0|ties.density', 'layers.0|ties.scale', 'layers.0|w0']
    >>> plan = g.decode({**g.midpoint(), "layers.0|method": "ties"})
    >>> plan[0].method, sorted(plan[0].params)
    ('ties', ['density', 'scale', 'weights'])
    """

    def __init__(
        self,
        groups: Sequence[str],
        methods: Sequence[str],
        n_models: int,
        weight_range: tuple[float, float] = (0.0, 1.5),
        ranges: Mapping[str, tuple[float, float]] | None = None,
        fixed: Mapping[str, Any] | None = None,
        row_blocks: int = 1,
        per_model: Sequence[str] = (),
    ):
        if not groups:
            raise Merge3Error("genome: no layer groups (does the base model have floating-point weights?)")
        if row_blocks < 1:
            raise Merge3Error(f"genome.row_blocks: must be at least 1, got {row_blocks}")
        self.groups, self.methods, self.n_models, self.row_blocks = list(groups), list(methods), n_models, row_blocks
        self.fixed = dict(fixed or {})
        self._per_model = self._per_model_params(self.methods, per_model)
        self._evolved = {m: self._evolved_params(m, dict(ranges or {}), self._per_model.get(m, {}))
                         for m in self.methods}
        self._weighted = {m for m in self.methods if "weights" in get_method(m).params}
        problem = weight_range_problem(sorted(self._weighted), *weight_range) if self._weighted else None
        if problem:
            raise Merge3Error(f"genome.weights: {problem}")
        unknown = sorted(set(ranges or {}) - {f"{m}.{p}" for m, ps in self._evolved.items() for p in ps})
        if unknown:
            raise Merge3Error(f"genome.params: '{unknown[0]}' is not an evolvable parameter of the chosen methods")
        self.variables: dict[str, Real | Choice] = {}
        for g in self.groups:
            if len(self.methods) > 1:
                self.variables[f"{g}{SEP}method"] = Choice(tuple(self.methods))
            for i in range(n_models) if self._weighted else ():  # no gene a decoded plan would not use
                for name in self._weight_genes(g, i):
                    self.variables[name] = Real(*weight_range)
            for m, params in self._evolved.items():
                for p, (low, high) in params.items():
                    for i in range(n_models) if p in self._per_model.get(m, {}) else [None]:
                        self.variables[f"{g}{SEP}{m}.{p}" + ("" if i is None else f".{i}")] = Real(low, high)

    @staticmethod
    def _per_model_params(methods: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, str]]:
        """method → {per-model parameter: the shared one it replaces}, for each 'method.param' of ``per_model``."""
        out: dict[str, dict[str, str]] = {}
        for name in names:
            method, _, param = name.partition(".")
            spec = get_method(method).params.get(param) if method in methods else None
            if spec is None or spec.kind != "per_model" or spec.overrides is None:
                options = [f"{m}.{p.name}" for m in methods for p in get_method(m).params.values() if p.overrides]
                raise Merge3Error(f"genome.per_model: '{name}' is not a per-model parameter of genome.methods "
                                  f"(options: {', '.join(options) or 'none'})")
            out.setdefault(method, {})[param] = spec.overrides
        return out

    @staticmethod
    def _evolved_params(method: str, ranges: dict[str, tuple[float, float]],
                        per_model: Mapping[str, str]) -> dict[str, tuple[float, float]]:
        spec = get_method(method)
        out = {}
        for name, param in spec.params.items():
            if name in per_model:
                param = spec.params[per_model[name]]  # evolved within the shared parameter's range
            elif name in per_model.values():
                continue  # replaced by one gene per endpoint
            # parameters the per-endpoint weights already express (a method's `redundant`) would only add redundancy
            if param.kind != "float" or param.bounds is None or name in spec.redundant:
                continue
            key = f"{method}.{name}"
            low, high = ranges.get(key, param.bounds.search_range)
            if not (param.bounds.low <= low < high <= param.bounds.high):
                raise Merge3Error(
                    f"genome.params.{key}: range [{low}, {high}] must be increasing and inside the method's "
                    f"bounds [{param.bounds.low}, {param.bounds.high}]"
                )
            out[name] = (float(low), float(high))
        return out

    def decode(self, genome: Mapping[str, Any]) -> list[GroupChoice]:
        plan = []
        for g in self.groups:
            method = str(genome[f"{g}{SEP}method"]) if len(self.methods) > 1 else self.methods[0]
            per_model = self._per_model.get(method, {})
            params: dict[str, Any] = {
                p: [float(genome[f"{g}{SEP}{method}.{p}.{i}"]) for i in range(self.n_models)] if p in per_model
                else float(genome[f"{g}{SEP}{method}.{p}"]) for p in self._evolved[method]}
            if method in self._weighted:
                params["weights"] = [self._weight(genome, g, i) for i in range(self.n_models)]
            params.update({k.split(".", 1)[1]: v for k, v in self.fixed.items() if k.startswith(f"{method}.")})
            plan.append(GroupChoice(g, method, params))
        return plan

    def _weight_genes(self, group: str, model: int) -> list[str]:
        if self.row_blocks == 1:
            return [f"{group}{SEP}w{model}"]
        return [f"{group}{SEP}w{model}.{j}" for j in range(self.row_blocks)]

    def _weight(self, genome: Mapping[str, Any], group: str, model: int) -> float | dict[str, list[float]]:
        values = [float(genome[name]) for name in self._weight_genes(group, model)]
        return values[0] if self.row_blocks == 1 else {ROW_BLOCKS: values}

    def midpoint(self) -> dict[str, Any]:
        """A valid genome in the middle of every range (first option of every choice): handy for tests and seeds."""
        return {
            name: v.options[0] if isinstance(v, Choice) else (v.low + v.high) / 2 for name, v in self.variables.items()
        }

    def recipes(self, scales: Sequence[float] = (0.3, 0.6, 1.0, 1.5)) -> list[dict[str, Any]]:
        """The fixed recipes as genomes: every group uses method m at strength s with equal endpoint weights (other
        parameters mid-range), for each allowed method and scale inside the range. The strength is the weights
        themselves, or the method's own ``scale`` gene when it has one (TIES). Seeding a population with them means
        the search starts from the best uniform merge instead of having to rediscover it."""
        out = []
        for method in self.methods:
            own_scale = f"{method}.scale"
            for scale in scales:
                genome, weight = self.midpoint(), 1.0 if get_method(method).own_strength else scale
                for name, variable in self.variables.items():
                    if name.endswith(f"{SEP}method"):
                        genome[name] = method
                    elif isinstance(variable, Real) and (name.endswith(SEP + own_scale) or _is_weight(name)):
                        value = scale if name.endswith(SEP + own_scale) else weight
                        if not variable.low <= value <= variable.high:
                            break
                        genome[name] = float(value)
                else:
                    out.append(genome)
        return out

    def sample(self, rng) -> dict[str, Any]:
        """A uniformly random genome (``rng``: a ``numpy.random.Generator``)."""
        return sample_variables(self.variables, rng)

    def normalise(self, genome: Mapping[str, Any]) -> dict[str, Any]:
        """Plain Python floats/strings (engines hand out numpy scalars); what goes into evaluations.jsonl."""
        return {k: (str(genome[k]) if isinstance(v, Choice) else float(genome[k])) for k, v in self.variables.items()}


def _is_weight(name: str) -> bool:
    return re.fullmatch(r"w\d+(\.\d+)?", name.rsplit(SEP, 1)[1]) is not None
