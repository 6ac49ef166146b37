"""Search-space configs (``search_spaces/*.yaml``), validated at the edge with messages that name the field."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from merge3._config import MAX_CANDIDATES, NoRepeats, Seed, StrictConfig, first_repeat
from merge3._errors import Merge3Error, validation_message
from merge3.itembank import ONLINE_ESTIMATORS
from merge3.models import read_yaml_mapping
from merge3.search._genome import weight_range_problem

ESTIMATORS = ("full", *ONLINE_ESTIMATORS)  # "full": every search item, no estimator
GRANULARITIES = ("layer", "block", "attn_mlp", "model")




class ModelsConfig(StrictConfig):
    """``base`` (omit for same-task C2M3 spaces) and the endpoint models, as local paths."""

    base: str | None = None
    endpoints: list[str] = Field(min_length=1)
    names: list[str] | None = None

    @model_validator(mode="after")
    def _names_match(self):
        if self.names is not None and len(self.names) != len(self.endpoints):
            raise ValueError(f"names has {len(self.names)} entries for {len(self.endpoints)} endpoints")
        twice = first_repeat(self.names or [])
        if twice is not None:
            raise ValueError(f"names gives '{twice}' twice: one distinct name per endpoint")
        paths = [os.path.normpath(p) for p in self.endpoints]
        again = first_repeat(paths)
        if again is not None:  # its task vector would count twice under two genes: surely a slip
            raise ValueError(f"endpoint '{again}' is listed twice")
        if self.base is not None and os.path.normpath(self.base) in paths:
            raise ValueError(f"the base '{self.base}' is also an endpoint (its task vector is zero)")
        return self

    def endpoint_names(self) -> list[str]:
        return self.names or [Path(p).name for p in self.endpoints]


class AdaptiveConfig(StrictConfig):
    """Adaptive testing: ``start`` random items per task, then ``batch`` per task chosen where they cut the
    variance of the task's estimate most, until its standard error ≤ ``target_se`` or ``n_max`` items per task."""

    start: int = Field(5, gt=0)
    batch: int = Field(5, gt=0)
    n_max: int = Field(20, gt=0)
    target_se: float = Field(0.03, gt=0)
    randomesque: int = Field(3, ge=1, description="pick at random among the best k·batch items (no shared items)")

    @model_validator(mode="after")
    def _start_fits(self):
        if self.n_max < self.start:
            raise ValueError(f"n_max ({self.n_max}) is below the start size ({self.start})")
        return self


class PromotionConfig(StrictConfig):
    """Successive halving on items: after each generation the best ``top_k`` candidates answer ``factor``× more
    search items per task (rung 1), the best ``top_k/factor`` of those ``factor``² (rung 2), … ``rungs`` times.
    With ``ucb``, a candidate whose estimate + ucb·SE reaches the run's incumbent is promoted too (at most top_k).
    Only candidates at the last rung may become the run's best."""

    top_k: int = Field(3, ge=1)
    factor: float = Field(3.0, gt=1)
    rungs: int = Field(1, ge=1, le=6)
    ucb: float | None = Field(None, gt=0)
    engine_sees: Literal["latest", "first"] = Field(
        "latest", description="what the engine ranks a promoted candidate by: its latest estimate, or (first) its "
                              "first-fidelity one, so all of a generation compare at one fidelity")


class RecalibrationConfig(StrictConfig):
    """Online recalibration: every ``every`` generations the IRT item parameters are refitted on the calibration
    answers plus every answer the search's candidates gave, warm-started (``em_rounds`` EM rounds)."""

    every: int = Field(2, ge=1)
    em_rounds: int = Field(4, ge=1, le=30)


class FitnessConfig(StrictConfig):
    """Which items a candidate answers and how the answers become an estimate (see ``merge3.search._fitness``)."""

    items: Literal["fixed", "fresh", "adaptive"] = Field(
        "fixed", description="one fixed subset, a fresh stratified random subset per generation, or adaptive testing")
    sampling: Literal["uniform", "uncertainty"] = Field(
        "uniform", description="fresh items drawn uniformly, or where the population's answers are uncertain "
                               "(weighted; needs cv-irt, which undoes the weights)")
    grow: float = Field(1.0, ge=1, le=100, description=(
        "fresh items per task grow geometrically from items_per_task to grow × items_per_task at the last "
        "generation: late candidates are alike, and telling them apart takes more items"))
    adaptive: AdaptiveConfig = AdaptiveConfig()
    promotion: PromotionConfig | None = None
    recalibrate: RecalibrationConfig | None = None
    select_by: Literal["estimate", "lower_bound"] = Field(
        "estimate", description="what the engine ranks: the estimate, or estimate − z·SE")
    z: float = Field(1.0, gt=0)
    soft: float | None = Field(None, gt=0, le=100, description=(
        "the engine ranks by the 'mean' estimate + soft × the mean probability the candidate gives the right "
        "answers on its items (a soft score: less noisy on few items than 0/1), and a forget:<task> objective by "
        "its value − soft × that task's soft score (floored at chance); estimates, promotion and the run's best "
        "stay on 0/1 answers"))


class BankConfig(StrictConfig):
    path: str
    items_per_task: int | None = Field(20, gt=0, description="items each candidate answers per task; null = all")
    subset: Literal["random", "anchor"] = "random"
    estimator: Literal[ESTIMATORS] = "gmp-irt"  # type: ignore[valid-type]
    fitness: FitnessConfig = FitnessConfig()

    @model_validator(mode="after")
    def _consistent(self):
        if self.fitness.items == "fresh" and self.subset != "random":
            raise ValueError("fitness.items 'fresh' draws random items each generation: use subset: random")
        if self.fitness.grow > 1 and self.fitness.items != "fresh":
            raise ValueError("fitness.grow applies to fresh items (items: fresh)")
        if self.fitness.sampling == "uncertainty" and (self.fitness.items != "fresh" or self.estimator != "cv-irt"):
            raise ValueError("fitness.sampling 'uncertainty' draws fresh items by weight: it needs items: fresh and "
                             "estimator: cv-irt (which weighs each answer by its chance of being drawn)")
        if self.fitness.soft is not None and self.fitness.items == "adaptive":
            raise ValueError("fitness.soft ranks candidates that answered the same items: use items fixed or fresh")
        if self.fitness.items == "adaptive" and self.estimator in ("naive", "full"):
            raise ValueError(f"fitness.items 'adaptive' needs an IRT estimator, not '{self.estimator}' (the naive mean "
                             "of adaptively chosen items is biased)")
        if self.estimator == "full" or self.items_per_task is None:
            if self.fitness.model_copy(update={"soft": None}) != FitnessConfig():
                raise ValueError("fitness options other than soft apply to cheap estimators; estimator 'full' "
                                 "answers every item")
        return self


class Range(StrictConfig):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"bounds reversed or empty: low={self.low} must be below high={self.high}")
        return self


class GenomeConfig(StrictConfig):
    """What evolves: per layer group, a method choice and that method's continuous parameters."""

    granularity: Literal[GRANULARITIES] = "block"  # type: ignore[valid-type]
    methods: Annotated[list[str], NoRepeats] = Field(default_factory=lambda: ["task_arithmetic", "ties", "tsv_merge"],
                                                    min_length=1)
    weights: Range = Range(low=0.0, high=1.5)
    row_blocks: int = Field(1, ge=1, le=1024, description="weights per group and endpoint, one per block of rows")
    params: dict[str, Range] = Field(default_factory=dict, description="'method.param' → search range override")
    fixed: dict[str, Any] = Field(default_factory=dict, description="'method.param' → fixed value (e.g. dare.seed)")
    per_model: list[str] = Field(default_factory=list,
                                 description="'method.param' per-model parameters with one gene per endpoint "
                                             "(e.g. ties.densities)")

    @field_validator("weights")
    @classmethod
    def _weights_fit_the_methods(cls, weights: Range, info: ValidationInfo) -> Range:
        from merge3.methods import list_methods

        known = set(list_methods())  # an unknown method is refused, with the list, where the genome is built
        methods = [m for m in info.data.get("methods") or [] if m in known]
        problem = weight_range_problem(methods, weights.low, weights.high)
        if problem:
            raise ValueError(problem)
        return weights

    @field_validator("fixed")
    @classmethod
    def _finite(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, v in value.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"'{key}' must be a finite number, got {v}")
        return value

    @field_validator("fixed")
    @classmethod
    def _fixed_fit_the_methods(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """A fixed value is one of a searched method's parameters, valid for it: a typo or an out-of-range value
        must not quietly change (or not change) every candidate."""
        from merge3.methods import get_method

        methods = info.data.get("methods") or []
        for key, v in value.items():
            method, _, param = key.partition(".")
            if method not in methods or not param:
                raise ValueError(f"'{key}' is not 'method.parameter' of one of genome.methods ({', '.join(methods)})")
            spec = get_method(method).params.get(param)
            if spec is None:
                raise ValueError(f"'{key}': {method} has no parameter '{param}' "
                                 f"(accepted: {', '.join(get_method(method).params)})")
            get_method(method).check_param(param, v)
        return value


class EngineConfig(StrictConfig):
    name: Literal["pymoo", "optuna", "cmaes"] = "pymoo"
    algorithm: Literal["auto", "ga", "nsga2", "tpe", "cmaes", "random"] = "auto"
    population: int = Field(16, ge=2, le=MAX_CANDIDATES)
    generations: int = Field(10, ge=1)
    max_items: int | None = Field(None, gt=0, description="stop once this many items were evaluated")
    seed_recipes: bool = Field(True, description="start from the uniform recipes (each method × a few scales), "
                                "all of them: a first generation larger than a population when they outnumber it")


class ExecutorConfig(StrictConfig):
    kind: Literal["local", "ray"] = "local"
    actors: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    threads_per_actor: int = Field(1, ge=1)
    address: str | None = None
    max_retries: int = Field(2, ge=0)


class SearchSpace(StrictConfig):
    """A whole search: what to merge, how to score it, what evolves and how.

    >>> space = SearchSpace.model_validate({"name": "x", "models": {"endpoints": ["a"]}, "bank": {"path": "b"}})
    >>> space.engine.name, space.bank.items_per_task
    ('pymoo', 20)
    """

    name: str = "search"
    seed: Seed = 0
    device: str = "auto"
    models: ModelsConfig
    bank: BankConfig
    genome: GenomeConfig = GenomeConfig()
    objectives: list[str] = Field(default_factory=lambda: ["mean"], min_length=1)
    engine: EngineConfig = EngineConfig()
    executor: ExecutorConfig = ExecutorConfig()

    @model_validator(mode="after")
    def _promotion_fits_the_population(self):
        promotion = self.bank.fitness.promotion
        if promotion is not None and promotion.top_k > self.engine.population:
            raise ValueError(f"bank.fitness.promotion.top_k ({promotion.top_k}) is larger than the population "
                             f"({self.engine.population})")
        return self

    @field_validator("objectives")
    @classmethod
    def _objective_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in ("mean", "per_task") and ":" not in name:
                raise ValueError(f"objective '{name}' is neither 'mean', 'per_task', forget:<task>, "
                                 "keep:<task>>=<threshold> nor an import path 'module:function'")
        return value


def load_space(path: str | os.PathLike, overrides: dict | None = None) -> SearchSpace:
    """Read and validate a search-space YAML; ``overrides`` (e.g. from the CLI) replace top-level keys."""
    path = Path(path)
    raw = read_yaml_mapping(path, "search space", empty_ok=True)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_space(raw, str(path))


def parse_space(raw: dict, where: str = "search space") -> SearchSpace:
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as e:
        raise Merge3Error(validation_message(e, where)) from None
