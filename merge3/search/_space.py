"""Search-space configs (``search_spaces/*.yaml``), validated at the edge with messages that name the field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merge3._errors import Merge3Error, validation_message

ESTIMATORS = ("full", "naive", "irt", "p-irt", "gp-irt", "mp-irt", "gmp-irt")
GRANULARITIES = ("layer", "block", "attn_mlp", "model")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelsConfig(_Strict):
    """``base`` (omit for same-task C2M3 spaces) and the endpoint models, as local paths."""

    base: str | None = None
    endpoints: list[str] = Field(min_length=1)
    names: list[str] | None = None

    @model_validator(mode="after")
    def _names_match(self):
        if self.names is not None and len(self.names) != len(self.endpoints):
            raise ValueError(f"names has {len(self.names)} entries for {len(self.endpoints)} endpoints")
        return self

    def endpoint_names(self) -> list[str]:
        return self.names or [Path(p).name for p in self.endpoints]


class BankConfig(_Strict):
    path: str
    items_per_task: int | None = Field(20, gt=0, description="items each candidate answers per task; null = all")
    subset: Literal["random", "anchor"] = "random"
    estimator: Literal[ESTIMATORS] = "gmp-irt"  # type: ignore[valid-type]


class Range(_Strict):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"bounds reversed or empty: low={self.low} must be below high={self.high}")
        return self


class GenomeConfig(_Strict):
    """What evolves: per layer group, a method choice and that method's continuous parameters."""

    granularity: Literal[GRANULARITIES] = "block"  # type: ignore[valid-type]
    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic", "ties", "tsv_merge"], min_length=1)
    weights: Range = Range(low=0.0, high=1.5)
    row_blocks: int = Field(1, ge=1, le=1024, description="weights per group and endpoint, one per block of rows")
    params: dict[str, Range] = Field(default_factory=dict, description="'method.param' → search range override")
    fixed: dict[str, Any] = Field(default_factory=dict, description="'method.param' → fixed value (e.g. dare.seed)")


class EngineConfig(_Strict):
    name: Literal["pymoo", "optuna", "cmaes"] = "pymoo"
    algorithm: Literal["auto", "ga", "nsga2", "tpe", "cmaes", "random"] = "auto"
    population: int = Field(16, ge=2)
    generations: int = Field(10, ge=1)
    max_items: int | None = Field(None, gt=0, description="stop once this many items were evaluated")
    seed_recipes: bool = Field(True, description="start from the uniform recipes (each method × a few scales)")


class ExecutorConfig(_Strict):
    kind: Literal["local", "ray"] = "local"
    actors: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    threads_per_actor: int = Field(1, ge=1)
    address: str | None = None
    max_retries: int = Field(2, ge=0)


class SearchSpace(_Strict):
    """A whole search: what to merge, how to score it, what evolves and how.

    >>> space = SearchSpace.model_validate({"name": "x", "models": {"endpoints": ["a"]}, "bank": {"path": "b"}})
    >>> space.engine.name, space.bank.items_per_task
    ('pymoo', 20)
    """

    name: str = "search"
    seed: int = 0
    device: str = "auto"
    models: ModelsConfig
    bank: BankConfig
    genome: GenomeConfig = GenomeConfig()
    objectives: list[str] = Field(default_factory=lambda: ["mean"], min_length=1)
    engine: EngineConfig = EngineConfig()
    executor: ExecutorConfig = ExecutorConfig()

    @field_validator("objectives")
    @classmethod
    def _objective_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in ("mean", "per_task") and ":" not in name:
                raise ValueError(f"objective '{name}' is neither 'mean', 'per_task' nor an import path 'module:function'")
        return value


def load_space(path: str | os.PathLike, overrides: dict | None = None) -> SearchSpace:
    """Read and validate a search-space YAML; ``overrides`` (e.g. from the CLI) replace top-level keys."""
    path = Path(path)
    if not path.exists():
        raise Merge3Error(f"search space '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise Merge3Error(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise Merge3Error(f"{path}: a search space is a mapping of keys, got {type(raw).__name__}")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_space(raw, str(path))


def parse_space(raw: dict, where: str = "search space") -> SearchSpace:
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as e:
        raise Merge3Error(validation_message(e, where)) from None
