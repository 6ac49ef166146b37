"""The engine-agnostic search loop: ask a batch → executor evaluates → (promote the best to more items) →
objectives → tell.

Resumption is replay: engines are deterministic for a seed, and so is every item choice of the fitness, so a resumed
run re-asks the same candidates (and promotions) and takes every result already recorded instead of evaluating it
again (checking that the genome matches). A kill at any moment therefore loses only the evaluations in flight.

Each evaluation is one record; a promoted candidate gets one more record per rung (same generation and index,
``rung`` 1, 2, …, every answer so far, the new estimate). The latest record of each candidate is what counts.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from merge3._errors import Merge3Error
from merge3.runtime import CandidateResult
from merge3.search._engines import Engine
from merge3.search._genome import Genome
from merge3.search._record import Evaluation

WORST = 1e9  # minimised objective value of a failed candidate: worse than any accuracy
INFEASIBLE = 1e6  # … and of an infeasible one (plus its violation): worse than any feasible, better than a failure


class Executor(Protocol):
    """Evaluates requests (merge plans, or ``EvalRequest``s naming their items); yields ``(position, result)`` as
    each finishes (any order)."""

    def submit(self, requests: Sequence[Any]) -> Iterator[tuple[int, CandidateResult]]: ...

    def close(self) -> None: ...


class Recorder(Protocol):
    def evaluation(self, record: Evaluation) -> None: ...

    def generation(self, generation: int, summary: dict) -> None: ...

    def log(self, message: str) -> None: ...


ObjectiveFn = Callable[[CandidateResult], float]


def import_objective(path: str) -> ObjectiveFn:
    """``"package.module:function"`` → the function: only ever what the user named in their config, and only from
    the user's own modules — never the standard library (``os:system``, ``subprocess:run``, …) or merge3 itself.
    Importing runs the module's top-level code, so the current folder is not searched implicitly (``python -m
    merge3`` drops it from ``sys.path``): install your module, or put its folder on ``PYTHONPATH``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in [*module_name.split("."), attr]):
        raise Merge3Error(f"objectives: '{path}' is not an import path 'package.module:function'")
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names or top in ("merge3", "__main__"):
        raise Merge3Error(f"objectives: '{path}' names the module '{top}' ({'merge3 itself' if top == 'merge3' else 'the standard library'}); "
                          "an objective must come from your own module (installed, or on PYTHONPATH)")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise Merge3Error(f"objectives: cannot import '{path}': {e}") from None
    except (Exception, SystemExit) as e:  # the module's own top-level code failed
        raise Merge3Error(f"objectives: importing '{module_name}' failed: {type(e).__name__}: {e}") from None
    return _checked_objective(path, fn)


def _checked_objective(name: str, fn) -> ObjectiveFn:
    if not callable(fn):
        raise Merge3Error(f"objectives: '{name}' is not callable")
    try:
        inspect.signature(fn).bind(None)
    except TypeError:
        raise Merge3Error(f"objectives: '{name}' must take one argument (the candidate's CandidateResult)") from None
    except ValueError:  # builtins without a signature: checked when called
        pass
    return fn


class Objectives:
    """Turns a candidate result into objective values (maximised) and constraint violations.

    Objectives: ``mean``, ``per_task``, ``forget:<task>`` (that task's accuracy driven down, no reward below
    ``chance[task]``: the value is −max(accuracy, chance)), an import path ``module:function`` or a callable.
    Constraints: ``keep:<task>>=<threshold>``: a candidate below the threshold is infeasible; its violation (how far
    below, summed over constraints) ranks it after every feasible candidate, in every engine.

    >>> obj = Objectives(["forget:a", "keep:b>=0.9"], ["a", "b"], chance={"a": 0.1})
    >>> r = CandidateResult(scores={"a": 0.05, "b": 0.8})
    >>> obj.names, obj(r), round(obj.violation(r), 3)
    (['forget:a'], [-0.1], 0.1)
    """

    def __init__(self, specs: Sequence[str | ObjectiveFn], tasks: Sequence[str],
                 chance: Mapping[str, float] | None = None):
        self.tasks = list(tasks)
        self.names: list[str] = []
        self._fns: list[ObjectiveFn] = []
        self._se_keys: list[str | None] = []  # which standard error of a result belongs to each objective
        self.constraints: list[tuple[str, float]] = []  # (task, lowest accuracy allowed)
        self.forgotten: dict[str, tuple[str, float]] = {}  # 'forget:<task>' → (task, chance floor)
        chance = dict(chance or {})
        for spec in specs:
            if spec == "mean":
                self._add("mean", lambda r: r.mean, "mean")
            elif spec == "per_task":
                for task in self.tasks:
                    self._add(task, lambda r, t=task: r.scores[t], task)
            elif isinstance(spec, str) and spec.startswith("forget:"):
                task = self._task(spec, spec.removeprefix("forget:"))
                floor = float(chance.get(task, 0.0))
                self._add(spec, lambda r, t=task, f=floor: -max(r.scores[t], f), task)
                self.forgotten[spec] = (task, floor)
            elif isinstance(spec, str) and spec.startswith("keep:"):
                self.constraints.append(self._keep(spec))
            elif isinstance(spec, str):
                self._add(spec, import_objective(spec))
            elif callable(spec):
                name = getattr(spec, "__name__", "custom")
                self._add(name, _checked_objective(name, spec))
            else:
                raise Merge3Error(f"objectives: {spec!r} is neither a name, an import path nor a callable")

        if not self._fns:
            raise Merge3Error("objectives: keep:… entries are constraints; give at least one objective to maximise "
                              "(e.g. mean or forget:<task>)")

    def _task(self, spec: str, task: str) -> str:
        if task not in self.tasks:
            raise Merge3Error(f"objectives: '{spec}' names task '{task}', which the bank does not have "
                              f"(tasks: {', '.join(self.tasks)})")
        return task

    def _keep(self, spec: str) -> tuple[str, float]:
        task, sep, threshold = spec.removeprefix("keep:").partition(">=")
        if not sep:
            raise Merge3Error(f"objectives: '{spec}' is not keep:<task>>=<threshold>")
        try:
            value = float(threshold)
        except ValueError:
            raise Merge3Error(f"objectives: '{spec}': the threshold '{threshold}' is not a number") from None
        if not 0.0 <= value <= 1.0:
            raise Merge3Error(f"objectives: '{spec}': the threshold {value:g} is outside [0, 1] (an accuracy)")
        return self._task(spec, task.strip()), value

    def violation(self, result: CandidateResult) -> float:
        """How far ``result`` falls below the ``keep:`` thresholds, summed (0: feasible)."""
        if not result.ok:
            return 0.0
        return float(sum(max(0.0, threshold - result.scores[task]) for task, threshold in self.constraints))

    def _add(self, name: str, fn: ObjectiveFn, se_key: str | None = None) -> None:
        self.names.append(name)
        self._fns.append(fn)
        self._se_keys.append(se_key)

    def __len__(self) -> int:
        return len(self._fns)

    def __call__(self, result: CandidateResult) -> list[float]:
        if not result.ok:
            return [float("nan")] * len(self)
        values = []
        for name, fn, se_key in zip(self.names, self._fns, self._se_keys):
            try:
                values.append(float(fn(result)))
            except (Exception, SystemExit) as e:  # user code: one clear line, whatever it raised (even sys.exit)
                raise Merge3Error(f"objective '{name}' failed: {type(e).__name__}: {e}") from None
            if se_key is None and not math.isfinite(values[-1]):  # a custom objective's NaN would rank as garbage
                raise Merge3Error(f"objective '{name}' returned {values[-1]}: an objective must be a finite number")
        return values

    def standard_errors(self, result: CandidateResult) -> list[float]:
        """The estimate's standard error of each objective (NaN for custom objectives and exact scores)."""
        return [float(result.se.get(k, float("nan"))) if k else float("nan") for k in self._se_keys]


def rank_key(record: Evaluation) -> tuple:
    """Sort key, best first: eligible before not (see ``SearchResult.best``), feasible before infeasible (least
    violation first), then by the first objective."""
    return not record.eligible, record.violation, -record.objectives[0]


def best_record(records: Sequence[Evaluation]) -> Evaluation:
    """The best successful record: eligible, feasible (or least infeasible), highest first objective."""
    ok = [r for r in records if r.ok]
    if not ok:
        raise Merge3Error("no candidate was evaluated successfully")
    return min(ok, key=rank_key)


def latest(records: Sequence[Evaluation]) -> list[Evaluation]:
    """The latest record (highest rung) of each candidate, by generation and index."""
    out: dict[tuple[int, int], Evaluation] = {}
    for r in records:
        if r.candidate not in out or r.rung >= out[r.candidate].rung:
            out[r.candidate] = r
    return [out[k] for k in sorted(out)]


@dataclass
class SearchResult:
    records: list[Evaluation]
    objective_names: list[str]
    bank_items: int = 0
    stopped_by: str = "generations"
    extra: dict = field(default_factory=dict)

    @property
    def items_evaluated(self) -> int:
        return sum(r.items_evaluated for r in self.records)

    @property
    def full_bank_equivalent(self) -> int:
        return len(self.records) * self.bank_items

    def best(self) -> Evaluation:
        """The record with the highest first objective among successful candidates that may be the run's best
        (with promotion: those that reached the last rung, never a first-fidelity estimate)."""
        return best_record(self.records)

    def pareto(self) -> list[Evaluation]:
        """Non-dominated successful records (all objectives maximised), among the feasible ones when there are."""
        ok = [r for r in self.records if r.ok]
        ok = [r for r in ok if r.violation == 0] or ok
        values = np.array([r.objectives for r in ok], dtype=float)
        keep = [
            i for i in range(len(ok))
            if not np.any(np.all(values >= values[i], axis=1) & np.any(values > values[i], axis=1))
        ]
        return [ok[i] for i in keep]


class Search:
    """One search: ``run()`` drives ``engine`` until it is done or the item budget is spent.

    >>> from merge3.runtime import LocalExecutor, SyntheticFactory
    >>> from merge3.search import make_engine
    >>> genome = Genome(["all"], ["task_arithmetic"], n_models=2, weight_range=(0.0, 1.5))
    >>> engine = make_engine("pymoo", genome.variables, 1, 8, 3, 0)   # 1 objective, population 8, 3 generations
    >>> executor = LocalExecutor(SyntheticFactory(["a", "b"], [0.8, 0.4]))
    >>> result = Search(genome, engine, executor, Objectives(["mean"], ["a", "b"])).run()
    >>> len(result.records), result.best().objectives[0] > 0.9
    (24, True)
    """

    def __init__(self, genome: Genome, engine: Engine, executor: Executor, objectives: Objectives,
                 recorder: Recorder | None = None, replay: Mapping[tuple[int, ...], Evaluation] | None = None,
                 max_items: int | None = None, bank_items: int = 0, progress: Any = None, fitness: Any = None):
        self.genome, self.engine, self.executor, self.objectives = genome, engine, executor, objectives
        self.recorder = recorder
        # (generation, index, rung) → recorded evaluation; a (generation, index) key means rung 0
        self.replay = {(k if len(k) == 3 else (*k, 0)): v for k, v in (replay or {}).items()}
        self.max_items, self.bank_items, self.progress = max_items, bank_items, progress
        self.fitness = fitness  # None: the executor's scores are final (plans go out as they are)

    def run(self) -> SearchResult:
        lines: list[Evaluation] = []  # every record, every rung
        generation, stopped_by = 0, "generations"
        while not self.engine.done:
            if self.max_items is not None and sum(r.items_evaluated for r in latest(lines)) >= self.max_items:
                stopped_by = "max_items"
                break
            genomes = [self.genome.normalise(g) for g in self.engine.ask()]
            batch = self._evaluate(generation, genomes, lines)
            batch = self._promote(generation, batch, lines)
            F = np.array([self._told(r) for r in batch], dtype=float)
            self.engine.tell(genomes, F)
            self._end_generation(generation, batch, latest(lines))
            generation += 1
        unused = set(self.replay) - {r.key for r in lines}
        if unused:
            raise Merge3Error(f"resume: {len(unused)} recorded evaluation(s) were never asked for again; "
                              "the run's config or merge3 version changed")
        return SearchResult(latest(lines), self.objectives.names, self.bank_items, stopped_by)

    def _told(self, record: Evaluation) -> list[float]:
        """What the engine minimises: −objective (or −(objective − z·SE) when ranking by a lower bound), at the
        latest fidelity or, when the fitness says so, the first."""
        z = getattr(self.fitness, "rank_z", 0.0)
        first = getattr(self.fitness, "engine_sees_first", False) and record.first_objectives is not None
        objectives = record.first_objectives if first else record.objectives
        errors = (record.first_objective_se if first else record.objective_se) or [float("nan")] * len(objectives)
        if record.violation > 0:  # infeasible: behind every feasible candidate, the least violation first
            return [INFEASIBLE + record.violation if np.isfinite(v) else WORST for v in objectives]
        soft = self._soft_bonus(record, first)
        values = []
        for k, (v, se) in enumerate(zip(objectives, errors)):
            penalty = z * se if z and se is not None and np.isfinite(se) else 0.0
            values.append(-(v - penalty + soft[k]) if np.isfinite(v) else WORST)
        return values

    def _soft_bonus(self, record: Evaluation, first: bool) -> list[float]:
        """``bank.fitness.soft``: added to what the engine ranks by (at the fidelity it sees): w × the soft score for
        'mean', −w × max(the task's soft score, its chance floor) for ``forget:<task>``; nothing for other
        objectives or without soft scores."""
        weight = getattr(self.fitness, "rank_soft", 0.0)
        details = record.details or {}
        soft = details.get("soft_first" if first else "soft")
        per_task = details.get("soft_tasks_first" if first else "soft_tasks") or {}
        bonus = [0.0] * len(self.objectives.names)
        if not weight or soft is None:
            return bonus
        for k, name in enumerate(self.objectives.names):
            if name == "mean":
                bonus[k] = weight * float(soft)
            elif name in self.objectives.forgotten:
                task, floor = self.objectives.forgotten[name]
                if task in per_task:  # records from before per-task soft scores have none
                    bonus[k] = -weight * max(float(per_task[task]), floor)
        return bonus

    def _evaluate(self, generation: int, genomes: list[dict], lines: list[Evaluation]) -> list[Evaluation]:
        batch: list[Evaluation | None] = [None] * len(genomes)
        todo = []
        for i, genome in enumerate(genomes):
            old = self.replay.get((generation, i, 0))
            if old is None:
                todo.append(i)
            elif old.genome != genome:
                raise Merge3Error(f"resume: candidate {i} of generation {generation} differs from the recorded one; "
                                  "the run's config, seed or merge3 version changed")
            else:
                batch[i] = old
                self._keep(old, lines, replayed=True)
        plans = [[c.as_dict() for c in self.genome.decode(genomes[i])] for i in todo]
        payloads = plans if self.fitness is None else self.fitness.requests(generation, plans)
        for position, result in self.executor.submit(payloads):
            i = todo[position]
            if self.fitness is not None:
                result = self.fitness.score(generation, i, result)
            batch[i] = self._keep(self._record(generation, i, genomes[i], plans[position], result, 0), lines)
        return batch  # type: ignore[return-value]

    def _promote(self, generation: int, batch: list[Evaluation], lines: list[Evaluation]) -> list[Evaluation]:
        """Successive halving: the fitness's best candidates answer more items, rung by rung, before the tell."""
        promotions = getattr(self.fitness, "promotions", None)
        if promotions is None:
            return batch
        for rung in range(1, self.fitness.final_rung + 1):
            asked = promotions(generation, rung, batch)
            todo = []
            for index, request in asked:
                old = self.replay.get((generation, index, rung))
                if old is None:
                    todo.append((index, request))
                else:
                    batch[index] = self._keep(old, lines, replayed=True)
            for position, result in self.executor.submit([request for _, request in todo]):
                index = todo[position][0]
                previous = batch[index]
                result = self.fitness.score(generation, index, result, previous=previous)
                record = self._record(generation, index, previous.genome, previous.plan, result, rung)
                batch[index] = self._keep(record.promoted_from(previous), lines)
            if not asked:
                break
        return batch

    def _keep(self, record: Evaluation, lines: list[Evaluation], replayed: bool = False) -> Evaluation:
        lines.append(record)
        if not replayed and self.recorder is not None:
            self.recorder.evaluation(record)
        if hasattr(self.fitness, "observe"):
            self.fitness.observe(record)
        if self.progress is not None and record.rung == 0:
            self.progress.advance(record)
        return record

    def _record(self, generation: int, index: int, genome: dict, plan: list[dict], result: CandidateResult,
                rung: int) -> Evaluation:
        final = getattr(self.fitness, "final_rung", 0)
        return Evaluation.of(generation, index, genome, plan, result, self.objectives(result),
                             self.objectives.standard_errors(result), rung=rung, eligible=rung == final,
                             violation=self.objectives.violation(result), time=time.time())

    def _end_generation(self, generation: int, batch: list[Evaluation], records: list[Evaluation]) -> None:
        refit = self.fitness.end_generation(generation) if hasattr(self.fitness, "end_generation") else None
        self._generation_done(generation, batch, records, refit)

    def _generation_done(self, generation: int, batch: list[Evaluation], records: list[Evaluation],
                         refit: dict | None) -> None:
        ok = [r for r in records if r.ok]
        best = best_record(ok).objectives[0] if ok else float("nan")
        gen_ok = [r.objectives[0] for r in batch if r.ok]
        summary = {
            "generation": generation,
            "candidates": len(batch),
            "failed": sum(not r.ok for r in batch),
            "best_so_far": best,
            "generation_best": max(gen_ok, default=float("nan")),
            "generation_mean": float(np.mean(gen_ok)) if gen_ok else float("nan"),
            "items_evaluated": sum(r.items_evaluated for r in records),
            "promoted": sum(r.rung > 0 for r in batch),
            "recalibration": refit,
            "population": [{"genome": r.genome, "objectives": r.objectives} for r in batch],
        }
        if self.recorder is not None:
            self.recorder.generation(generation, summary)
        if self.progress is not None:
            self.progress.generation(summary)
