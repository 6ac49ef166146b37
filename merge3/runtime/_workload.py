"""The real workload: a resident model that becomes each candidate merge in place and answers the items it is asked.

The factory is a small, picklable description (paths and settings). ``load_inputs`` reads the base and endpoint
weights once on the driver (for Ray they then travel through the object store once); ``build`` makes, on a worker:
the resident module on its device, a ``CandidateBuilder`` with everything precomputed, and the bank's evaluator.
``evaluate(request)`` then writes the candidate's weights straight into the module's parameters and answers the
request's items (or runs its adaptive test, which picks the items one batch at a time). It returns the answers; the
search's fitness turns them into estimates on the driver, where all answers of the run are known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from merge3._errors import Merge3Error
from merge3.itembank import ItemBank, load_model_for, make_evaluator
from merge3.methods import CandidateBuilder, get_method, layer_groups, plans_from_choices, registered
from merge3.models import (
    check_compatible,
    check_finite,
    check_pack_base,
    check_same_architecture,
    check_same_tokenizer,
    load_state_dict,
    open_lazy,
    read_config,
)
from merge3.runtime._result import CandidateResult, EvalRequest


def resolve_device(name: str) -> str:
    """``auto`` → cuda when present, else cpu; any other name must be a device this machine has."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise Merge3Error(f"device '{name}' is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise Merge3Error(f"device '{name}': CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise Merge3Error(f"device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise Merge3Error(f"device '{name}': MPS (Apple GPU) is not available on this machine")
    elif device.type != "cpu":
        raise Merge3Error(f"device '{name}' is not supported (use auto, cpu, cuda or cuda:N)")
    elif device.index not in (None, 0):
        raise Merge3Error(f"device '{name}': there is one CPU device, write cpu")
    return "cpu" if device.type == "cpu" else name  # 'cpu:0' is cpu; safetensors refuses the spelling


@dataclass
class MergeWorkloadFactory:
    """Everything a worker needs to evaluate candidates of one search space (picklable, small)."""

    base: str | None
    endpoints: list[str]
    bank: str
    methods: list[str]
    granularity: str = "layer"
    seed: int = 0
    device: str = "auto"
    # derived on the driver, so every worker agrees
    groups: dict[str, list[str]] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    bank_items: int = 0  # search items: what "the full bank" means to a search

    @classmethod
    def from_space(cls, space) -> MergeWorkloadFactory:
        factory = cls(
            base=space.models.base, endpoints=list(space.models.endpoints), bank=space.bank.path,
            methods=list(space.genome.methods), granularity=space.genome.granularity, seed=space.seed,
            device=space.device,
        )
        factory._derive()
        return factory

    @property
    def same_task(self):
        """The same-task method (C2M3) this search uses, or None for task-vector methods."""
        return next((m for m in map(get_method, self.methods) if m.same_task), None)

    def _derive(self) -> None:
        same_task = self.same_task
        if same_task and len(self.methods) > 1:
            raise Merge3Error(f"genome.methods: '{same_task.name}' aligns same-task models and cannot be mixed with "
                              "other methods")
        if self.base is None and not same_task:
            same = ", ".join(sorted(n for n, m in registered().items() if m.same_task))
            raise Merge3Error(f"models.base is required for task-vector methods (omit it only for {same})")
        check_pack_base(self.base, self.endpoints, "models.endpoints")
        reference = open_lazy(self.base or self.endpoints[0])
        others = [open_lazy(p) for p in self.endpoints]
        check_compatible(reference, others, names=self.endpoints, reference_name=self.base or self.endpoints[0])
        check_same_tokenizer(self.base or self.endpoints[0], self.endpoints)
        check_same_architecture(self.base or self.endpoints[0], self.endpoints)
        float_keys = [k for k in reference if reference.dtype(k).is_floating_point]
        self.groups = layer_groups(float_keys, self.granularity)
        bank = ItemBank.load(self.bank)
        self.tasks, self.bank_items = bank.tasks, len(bank.search_indices)

    def check_inputs(self) -> None:
        """What a worker will need, checked on the driver before any run exists: the device, finite weights in every
        input, a runnable model folder, and the bank's evaluator (heads, tokenizer; for classifier banks the base
        answers one item per task, so a head or an input that does not fit the model fails here)."""
        resolve_device(self.device)
        for path in [self.base, *self.endpoints]:
            if path is not None:
                check_finite(open_lazy(path), path)
        template = self.base or self.endpoints[0]
        if read_config(template) is None:
            raise Merge3Error(f"'{template}' has no config.json: the search needs a runnable model folder")
        bank = ItemBank.load(self.bank, warn=False)
        evaluator = make_evaluator(bank, device="cpu", tokenizer_from=template)
        if bank.spec.evaluator.kind in ("classifier", "text_classifier"):  # small models: one item per task, for real
            first = np.array([rows[0] for rows in bank.task_indices.values()])
            evaluator(load_model_for(bank, template), first)

    @property
    def n_models(self) -> int:
        return len(self.endpoints)

    def load_inputs(self) -> dict[str, Any]:
        base = load_state_dict(self.base) if self.base else None
        endpoints = [load_state_dict(p) for p in self.endpoints]
        for path, sd in zip([self.base, *self.endpoints], [base, *endpoints]):
            if sd is not None:
                check_finite(sd, path)
        same_task = self.same_task
        if same_task is not None:
            # align once into the shared space; candidates are then weighted averages of the aligned models
            endpoints = same_task.align(endpoints, seed=self.seed)
        return {"base": base, "endpoints": endpoints}

    def build(self, inputs: dict[str, Any]) -> MergeWorkload:
        return MergeWorkload(self, inputs)


class MergeWorkload:
    def __init__(self, factory: MergeWorkloadFactory, inputs: dict[str, Any]):
        self.factory = factory
        self.device = resolve_device(factory.device)
        template = factory.base or factory.endpoints[0]
        self.bank = ItemBank.load(factory.bank, warn=False)
        self.module = load_model_for(self.bank, template, device=self.device) if read_config(template) else None
        if self.module is None:
            raise Merge3Error(f"'{template}' has no config.json: the search needs a runnable model folder")
        self.builder = CandidateBuilder(inputs["base"], inputs["endpoints"], device=self.device)
        same_task = factory.same_task
        # a same-task method's inputs are aligned: a candidate is its candidate_method (an average) of them
        self._method_alias = {same_task.name: same_task.candidate_method} if same_task else {}
        self.builder.precompute([self._method_alias.get(m, m) for m in factory.methods], seeds=[0])
        self.destination = _destination(self.module, self.builder.keys)
        self.model_bytes = sum(t.numel() * t.element_size() for t in self.destination.values())
        self.evaluator = make_evaluator(self.bank, device=self.device, tokenizer_from=template)
        self.search_items = self.bank.search_indices

    def evaluate(self, request: EvalRequest | list[dict]) -> CandidateResult:
        """Build the candidate in place, answer its items; ``scores`` = the plain mean per task of those answers."""
        if not isinstance(request, EvalRequest):
            request = EvalRequest(list(request))
        started = time.perf_counter()
        choices = [{**c, "method": self._method_alias.get(c["method"], c["method"])} for c in request.plan]
        self.builder.build(plans_from_choices(self.factory.groups, choices), out=self.destination)
        _check_finite_merge(self.destination)
        built = time.perf_counter()
        answer = lambda rows: np.asarray(self.evaluator(self.module, rows), dtype=np.int8)  # noqa: E731
        soft = None
        if request.adaptive is not None:
            items, correct = request.adaptive.run(answer)
        else:
            items = self.search_items if request.items is None else np.asarray(request.items, dtype=np.int64)
            if request.soft:
                correct, soft = self._confidence(items)
            else:
                correct = answer(items)
        items, correct = np.asarray(items, dtype=np.int64), np.asarray(correct, dtype=np.int8)
        answers = {"items": items.tolist(), "correct": correct.tolist()}
        if soft is not None:
            answers["soft"] = [round(float(p), 6) for p in soft]  # 6 digits: the record stays small
        return CandidateResult(
            scores=self.bank.per_task_accuracy(correct, items), items_evaluated=int(items.size),
            build_seconds=built - started, eval_seconds=time.perf_counter() - built, answers=answers,
        )

    def _confidence(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(correct, soft score) per item; an evaluator with no soft score (pure generation) scores 0/1."""
        confidence = getattr(self.evaluator, "confidence", None)
        if confidence is None:
            correct = np.asarray(self.evaluator(self.module, items), dtype=bool)
            return correct, correct.astype(np.float64)
        return confidence(self.module, items)


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
