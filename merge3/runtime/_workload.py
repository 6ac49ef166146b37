"""The real workload: a resident model that becomes each candidate merge in place and answers its item subset.

The factory is a small, picklable description (paths and settings). ``load_inputs`` reads the base and endpoint
weights once on the driver (for Ray they then travel through the object store once); ``build`` makes, on a worker:
the resident module on its device, a ``CandidateBuilder`` with everything precomputed, the bank's evaluator, and the
fitness estimator with its fixed item subset. ``evaluate(plan)`` then writes the candidate's weights straight into
the module's parameters, runs the subset, and turns the answers into per-task accuracy estimates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merge3._errors import Merge3Error
from merge3.itembank import ItemBank, load_model_for, make_evaluator
from merge3.methods import CandidateBuilder, align_to_universe, c2m3, layer_groups, mlp_spec, plans_from_choices
from merge3.methods._params import layer_index
from merge3.models import check_compatible, check_finite, load_state_dict, open_lazy, read_config
from merge3.runtime._result import CandidateResult


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@dataclass
class MergeWorkloadFactory:
    """Everything a worker needs to evaluate candidates of one search space (picklable, small)."""

    base: str | None
    endpoints: list[str]
    bank: str
    methods: list[str]
    granularity: str = "layer"
    items_per_task: int | None = 20
    subset: str = "random"
    estimator: str = "gmp-irt"
    seed: int = 0
    device: str = "auto"
    # derived on the driver, so every worker agrees
    groups: dict[str, list[str]] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    bank_items: int = 0

    @classmethod
    def from_space(cls, space) -> MergeWorkloadFactory:
        factory = cls(
            base=space.models.base, endpoints=list(space.models.endpoints), bank=space.bank.path,
            methods=list(space.genome.methods), granularity=space.genome.granularity,
            items_per_task=space.bank.items_per_task, subset=space.bank.subset, estimator=space.bank.estimator,
            seed=space.seed, device=space.device,
        )
        factory._derive()
        return factory

    def _derive(self) -> None:
        same_task = "c2m3" in self.methods
        if same_task and len(self.methods) > 1:
            raise Merge3Error("genome.methods: 'c2m3' aligns same-task models and cannot be mixed with other methods")
        if self.base is None and not same_task:
            raise Merge3Error("models.base is required for task-vector methods (omit it only for c2m3)")
        reference = open_lazy(self.base or self.endpoints[0])
        others = [open_lazy(p) for p in self.endpoints]
        check_compatible(reference, others, names=self.endpoints, reference_name=self.base or self.endpoints[0])
        float_keys = [k for k in reference if reference.dtype(k).is_floating_point]
        self.groups = layer_groups(float_keys, self.granularity)
        bank = ItemBank.load(self.bank)
        self.tasks, self.bank_items = bank.tasks, len(bank)
        make_fitness_estimator(bank, self)  # fail now, not on a worker, if the bank is not calibrated for it

    @property
    def n_models(self) -> int:
        return len(self.endpoints)

    def load_inputs(self) -> dict[str, Any]:
        base = load_state_dict(self.base) if self.base else None
        endpoints = [load_state_dict(p) for p in self.endpoints]
        for path, sd in zip(self.endpoints, endpoints):
            check_finite(sd, path)
        if "c2m3" in self.methods:
            # align once into the shared universe; candidates are then weighted averages of the aligned models
            spec = _mlp_spec_of(endpoints[0])
            result = c2m3(endpoints, spec, seed=self.seed)
            endpoints = align_to_universe(endpoints, spec, result.permutations)
        return {"base": base, "endpoints": endpoints}

    def build(self, inputs: dict[str, Any]) -> MergeWorkload:
        return MergeWorkload(self, inputs)


def _mlp_spec_of(state_dict: dict[str, torch.Tensor]):
    """The permutation spec of an MLP saved in any key order (safetensors sorts names: bias before weight)."""
    layers = sorted((k[: -len(".weight")] for k, t in state_dict.items() if k.endswith(".weight") and t.dim() == 2),
                    key=lambda prefix: layer_index(prefix + ".") or 0)
    if not layers:
        raise Merge3Error("c2m3: the models have no linear layers to align")
    return mlp_spec(layers, bias=all(f"{p}.bias" in state_dict for p in layers))


class MergeWorkload:
    def __init__(self, factory: MergeWorkloadFactory, inputs: dict[str, Any]):
        self.factory = factory
        self.device = resolve_device(factory.device)
        template = factory.base or factory.endpoints[0]
        bank = ItemBank.load(factory.bank)
        self.module = load_model_for(bank, template, device=self.device) if read_config(template) else None
        if self.module is None:
            raise Merge3Error(f"'{template}' has no config.json: the search needs a runnable model folder")
        self.builder = CandidateBuilder(inputs["base"], inputs["endpoints"], device=self.device)
        self.builder.precompute(factory.methods, seeds=[0])
        self.destination = _destination(self.module, self.builder.keys)
        self.model_bytes = sum(t.numel() * t.element_size() for t in self.destination.values())
        self.evaluator = make_evaluator(bank, device=self.device, tokenizer_from=template)
        self.fitness = make_fitness_estimator(bank, factory)
        self._method_alias = {"c2m3": "linear"}  # c2m3 inputs are already aligned: a candidate is their average

    def evaluate(self, plan: list[dict]) -> CandidateResult:
        started = time.perf_counter()
        choices = [{**c, "method": self._method_alias.get(c["method"], c["method"])} for c in plan]
        self.builder.build(plans_from_choices(self.factory.groups, choices), out=self.destination)
        _check_finite_merge(self.destination)
        built = time.perf_counter()
        correct = self.evaluator(self.module, self.fitness.indices)
        scores = self.fitness.estimate(correct)
        return CandidateResult(
            scores=scores, items_evaluated=len(self.fitness.indices), build_seconds=built - started,
            eval_seconds=time.perf_counter() - built,
            details={"subset_correct": int(np.sum(correct))},
        )


def _destination(module: torch.nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """The module's own tensors (sharing storage), so a build writes the candidate into the live model."""
    state = module.state_dict(keep_vars=False)
    missing = [k for k in keys if k not in state]
    if missing:
        raise Merge3Error(f"the model has no tensor '{missing[0]}' that the merge inputs have")
    return {k: state[k] for k in keys}


def _check_finite_merge(tensors: dict[str, torch.Tensor]) -> None:
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise FloatingPointError(f"the merged weights have NaN/Inf in '{bad}'")


class FullBankFitness:
    """Every item, exact accuracy: the expensive reference the cheap estimators are measured against."""

    def __init__(self, bank: ItemBank):
        self.bank = bank
        self.indices = np.arange(len(bank))

    def estimate(self, correct: np.ndarray) -> dict[str, float]:
        return self.bank.per_task_accuracy(correct, self.indices)


class NaiveFitness:
    """A seeded random subset, stratified per task, scored by its plain mean: needs no calibration."""

    def __init__(self, bank: ItemBank, n: int, seed: int):
        from merge3.itembank import select_subset

        self.bank = bank
        self.subset = select_subset(bank.task_of, n, method="random", seed=seed)
        self.indices = self.subset.indices.astype(np.int64)

    def estimate(self, correct: np.ndarray) -> dict[str, float]:
        correct = np.asarray(correct, dtype=float)
        return {t: float(np.sum(correct[self.subset.tasks == t] * self.subset.weights[self.subset.tasks == t]))
                for t in self.bank.tasks}


class IRTFitness:
    """The calibrated subset of a bank and one of the cheap estimators (naive, IRT, p/gp/mp/gmp-IRT)."""

    def __init__(self, bank: ItemBank, estimator, method: str, subset: str, n: int):
        self.bank, self.estimator, self.method, self.subset, self.n = bank, estimator, method, subset, n
        self.indices = np.asarray(estimator.items(n, subset, as_indices=True), dtype=np.int64)
        if estimator.model.item_ids != bank.item_ids:
            raise Merge3Error(f"the calibration of '{bank.path}' was made for other items: recalibrate the bank")

    def estimate(self, correct: np.ndarray) -> dict[str, float]:
        per_task = self.estimator.estimate_matrix(np.asarray(correct, dtype=float)[None, :], self.method, n=self.n,
                                                  subset=self.subset, subset_only=True)[0]
        return {t: float(v) for t, v in zip(self.estimator.task_names, per_task)}


SUBSET_NAMES = {"random": "random", "anchor": "anchor-irt"}  # search-space names → calibration names


def make_fitness_estimator(bank: ItemBank, factory: MergeWorkloadFactory):
    """Full-bank accuracy, or the calibrated estimator the space asks for (an error if the bank lacks it)."""
    if factory.estimator == "full" or factory.items_per_task is None:
        return FullBankFitness(bank)
    from merge3.itembank._estimators import Estimator

    folder = bank.path / "calibration"
    if factory.estimator == "naive" and factory.subset == "random" and not (folder / "estimator.json").exists():
        return NaiveFitness(bank, factory.items_per_task, factory.seed)
    if not (folder / "estimator.json").exists():
        raise Merge3Error(f"bank.estimator '{factory.estimator}' needs a calibrated bank, and '{bank.path}' is not "
                          f"calibrated: run `merge3 calibrate {bank.path} --base … --models …`")
    estimator = Estimator.load(folder)
    subset, n = SUBSET_NAMES[factory.subset], factory.items_per_task
    if (subset, n) not in estimator.subsets:
        have = ", ".join(f"{m}/{k}" for m, k in sorted(estimator.subsets))
        raise Merge3Error(f"bank.items_per_task: the calibration of '{bank.path}' has no {subset} subset with "
                          f"n={n} per task (calibrated: {have})")
    return IRTFitness(bank, estimator, factory.estimator, subset, n)
