"""The federated config: typed, frozen, validated at the edge with messages that name the field."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from merge3._config import MAX_CANDIDATES, Seed, StrictConfig
from merge3._errors import Merge3Error, validation_message
from merge3.methods import get_method, list_methods
from merge3.models import read_yaml_mapping
from merge3.search import weight_range_problem
from merge3.zoo import domain_transform

DIGITS_INPUTS, DIGITS_CLASSES = 64, 10


def _method(name: str):
    if name not in list_methods():
        raise ValueError(f"unknown merge method '{name}' (known: {', '.join(sorted(list_methods()))})")
    return get_method(name)


class ClientsConfig(StrictConfig):
    """Simulated clients: one per digits domain, each with its own disjoint shard of the training images."""

    kind: Literal["digits"] = "digits"
    clients: list[str] = Field(min_length=1, description="one client per input domain (non-IID by construction)")
    samples_per_client: int | None = Field(None, ge=10)

    @field_validator("clients")
    @classmethod
    def _known_domains(cls, clients: list[str]) -> list[str]:
        for name in clients:
            try:
                domain_transform(name, 0)
            except Merge3Error as e:
                raise ValueError(str(e)) from None
        if len(set(clients)) != len(clients):
            raise ValueError(f"clients repeat a domain: {clients}")
        return clients


MAX_PARAMETERS = 50_000_000


class ModelConfig(StrictConfig):
    """The global model: an MLP classifier over the 8×8 images. ``init``: ``shared`` (one seeded initialisation
    sent to every client), ``independent`` (each client starts from its own: round 1 must align them, so the
    aggregator is a same-task method such as ``c2m3``) or a merge3 MLP model folder to start from."""

    sizes: list[int] = Field(default_factory=lambda: [DIGITS_INPUTS, 256, 256, DIGITS_CLASSES], min_length=2)
    init: str = "shared"

    @field_validator("sizes")
    @classmethod
    def _digits_shape(cls, sizes: list[int]) -> list[int]:
        if sizes[0] != DIGITS_INPUTS or sizes[-1] != DIGITS_CLASSES or min(sizes) < 1:
            raise ValueError(f"digits clients need {DIGITS_INPUTS} inputs, {DIGITS_CLASSES} outputs and positive "
                             f"widths, got {sizes}")
        parameters = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
        if parameters > MAX_PARAMETERS:  # every client and the server hold copies: refuse before allocating
            raise ValueError(f"an MLP of widths {sizes} has {parameters:,} parameters; simulated clients are limited "
                             f"to {MAX_PARAMETERS:,}")
        return sizes


class LocalConfig(StrictConfig):
    """What each client does with the global model every round: ``steps`` optimiser steps on its own data."""

    steps: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"


class SearchAggregation(StrictConfig):
    """A short merge3 search on the server's own item bank (its search split) over the clients' deltas."""

    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic"], min_length=1)
    granularity: Literal["layer", "model"] = "layer"
    weights: tuple[float, float] = (0.0, 1.0)
    population: int = Field(8, ge=2, le=MAX_CANDIDATES)
    generations: int = Field(3, ge=1)
    engine: Literal["pymoo", "optuna", "cmaes"] = "pymoo"
    items_per_task: int | None = Field(None, gt=0, description="search items per task per candidate; null = all")

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: list[str]) -> list[str]:
        for m in methods:
            _method(m)
        return methods

    @field_validator("weights")
    @classmethod
    def _weights_fit_the_methods(cls, weights: tuple[float, float], info) -> tuple[float, float]:
        problem = weight_range_problem(info.data.get("methods") or [], *weights)
        if problem:
            raise ValueError(problem)
        return weights


class AggregationConfig(StrictConfig):
    """How the server combines the clients' models: one merge method (task arithmetic with the FedAvg shares is
    FedAvg), or ``search`` (a merge3 search per round)."""

    method: str = "task_arithmetic"
    params: dict[str, Any] = Field(default_factory=dict)
    shares: Literal["samples", "uniform"] = "samples"
    search: SearchAggregation | None = None

    @model_validator(mode="after")
    def _method_and_params(self):
        # a search chooses its methods itself: a method or params given too would be silently ignored (the defaults
        # are what a saved config holds, so they pass)
        default = type(self).model_fields["method"].default
        given = [k for k, v in (("method", self.method != default), ("params", bool(self.params))) if v]
        if self.search is not None and given:
            raise ValueError(f"give 'search' or '{given[0]}', not both (the search chooses the methods per round)")
        method = _method(self.method)
        if self.search is None:
            method.validate({k: v for k, v in self.params.items()})
        return self


class CompressionConfig(StrictConfig):
    """Each client sends every 2-D delta as its rank-``rank`` SVD truncation (or the fewest singular vectors that
    keep ``energy`` of its squared norm) — TSV-C on the wire; other tensors go dense."""

    rank: int | None = Field(None, ge=1)
    energy: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one(self):
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of rank and energy")
        return self


class ExecutorConfig(StrictConfig):
    kind: Literal["local", "ray"] = "local"
    actors: int = Field(2, ge=1)
    address: str | None = None


class FederatedConfig(StrictConfig):
    """A federated run: ``rounds`` rounds of local training on every client, then one server aggregation.

    >>> cfg = FederatedConfig.model_validate({"rounds": 2, "data": {"clients": ["upright", "rot90"]}})
    >>> cfg.aggregate.method, cfg.local.steps
    ('task_arithmetic', 20)
    """

    name: str = "federated"
    seed: Seed = 0
    rounds: int = Field(ge=1)
    data: ClientsConfig
    model: ModelConfig = ModelConfig()
    local: LocalConfig = LocalConfig()
    aggregate: AggregationConfig = AggregationConfig()
    compress: CompressionConfig | None = None
    executor: ExecutorConfig = ExecutorConfig()

    @model_validator(mode="after")
    def _independent_needs_alignment(self):
        same_task = _method(self.aggregate.method).same_task and self.aggregate.search is None
        if self.model.init == "independent" and not same_task:
            raise ValueError("model.init 'independent' starts every client from its own weights: the server must "
                             "align them, so aggregate.method must be a same-task method (c2m3)")
        if same_task and self.compress is not None:
            raise ValueError("compress sends deltas from the global model; a same-task aggregator (c2m3) receives "
                             "whole models")
        return self


def parse_federated(raw: dict, where: str = "federated config") -> FederatedConfig:
    try:
        config = FederatedConfig.model_validate(raw)
    except ValidationError as e:
        raise Merge3Error(validation_message(e, where)) from None
    except Merge3Error as e:  # a method's own parameter check
        raise Merge3Error(f"{where}: field 'aggregate.params': {e}") from None
    if config.aggregate.search is None:  # per-client values (weights, densities): one per client, before any run
        try:
            _method(config.aggregate.method).validate(config.aggregate.params, n_models=len(config.data.clients))
        except Merge3Error as e:
            raise Merge3Error(f"{where}: field 'aggregate.params': {e} (one per client in data.clients)") from None
    return config


def load_federated(path: str | os.PathLike) -> FederatedConfig:
    """Read and validate a federated YAML config (``merge3 federate CONFIG.yaml``)."""
    return parse_federated(read_yaml_mapping(path, "a federated config"), str(path))
