"""The typed record of one evaluation (like Optuna's ``FrozenTrial``): what the search loop makes of each candidate
(one record per rung when it is promoted), what ``evaluations.jsonl`` holds one per line, and what replay, ranking,
verify, export, the leaderboard and the report read back.

It lives with the search, which makes it; ``merge3.runs`` stores and reads it through ``to_json`` / ``from_json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from merge3._errors import Merge3Error
from merge3.runtime import CandidateResult

_REQUIRED = ("generation", "index", "genome", "plan", "scores", "objectives", "error", "items_evaluated")


@dataclass(frozen=True)
class Evaluation:
    """One evaluated candidate at one fidelity.

    - ``generation``, ``index``: which candidate; ``rung``: its promotion step (0: the first evaluation); only
      ``eligible`` records (the last rung) may be the run's best;
    - ``genome`` and the ``plan`` it decodes to (per layer group: method and parameters);
    - ``scores``: per-task estimates (the fitness's, on the search split) with their standard errors ``se``;
      ``objectives`` (maximised) and ``objective_se``; with promotion, ``first_objectives`` at rung 0;
    - ``answers``: the bank rows answered and whether each was right, so every estimate can be recomputed;
    - ``violation``: how far it falls below the ``keep:`` constraints (0: feasible);
    - cost: ``items_evaluated``, ``build_seconds``, ``eval_seconds``, ``worker``; ``error`` when it failed.

    >>> record = Evaluation(generation=0, index=3, genome={"all|w0": 0.5}, plan=[], scores={"a": 0.8, "b": 0.6},
    ...                     objectives=[0.7], items_evaluated=40)
    >>> record.ok, record.candidate, Evaluation.from_json(record.to_json()) == record
    (True, (0, 3), True)
    """

    generation: int
    index: int
    genome: dict[str, Any]
    plan: list[dict]
    scores: dict[str, float]
    objectives: list[float]
    rung: int = 0
    eligible: bool = True
    items_evaluated: int = 0
    build_seconds: float = 0.0
    eval_seconds: float = 0.0
    worker: str = "local"
    error: str | None = None
    details: dict = field(default_factory=dict)
    answers: dict = field(default_factory=dict)
    se: dict[str, float] = field(default_factory=dict)
    mean: float | None = None
    objective_se: list[float] | None = None
    violation: float = 0.0
    time: float = 0.0
    first_objectives: list[float] | None = None
    first_objective_se: list[float] | None = None

    @classmethod
    def of(cls, generation: int, index: int, genome: dict, plan: list[dict], result: CandidateResult,
           objectives: list[float], objective_se: list[float], *, rung: int = 0, eligible: bool = True,
           violation: float = 0.0, time: float = 0.0) -> Evaluation:
        """The record of ``result``, the evaluation of ``genome`` (decoded to ``plan``)."""
        return cls(generation=generation, index=index, rung=rung, eligible=eligible, genome=genome, plan=plan,
                   **{k: v for k, v in result.as_dict().items()}, objectives=objectives, objective_se=objective_se,
                   violation=violation, time=time)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def candidate(self) -> tuple[int, int]:
        """(generation, index): the candidate, whatever its rung."""
        return self.generation, self.index

    @property
    def key(self) -> tuple[int, int, int]:
        """(generation, index, rung): this record."""
        return self.generation, self.index, self.rung

    @property
    def result(self) -> CandidateResult:
        """The evaluation as an executor returned it (what objectives take)."""
        return CandidateResult.from_dict(self.to_json())

    def answered(self) -> tuple[np.ndarray, np.ndarray]:
        """(bank rows, 0/1 correctness) of every item this candidate has answered."""
        return (np.asarray(self.answers.get("items", []), dtype=np.int64),
                np.asarray(self.answers.get("correct", []), dtype=np.int8))

    def promoted_from(self, previous: Evaluation) -> Evaluation:
        """This record, remembering the objectives ``previous`` (the rung below) had at the first fidelity."""
        first = previous.first_objectives if previous.first_objectives is not None else previous.objectives
        first_se = previous.first_objective_se if previous.first_objectives is not None else previous.objective_se
        return replace(self, first_objectives=first, first_objective_se=first_se)

    def to_json(self) -> dict:
        """The line of ``evaluations.jsonl`` (plain Python; the promotion-only keys only when set)."""
        data = asdict(self)
        for name in ("first_objectives", "first_objective_se"):
            if data[name] is None:
                del data[name]
        first = ("generation", "index", "rung", "eligible", "genome", "plan")  # who it is, then what it scored
        return {**{k: data.pop(k) for k in first}, **data}

    @classmethod
    def from_json(cls, data: Any) -> Evaluation:
        """A record read back; ``Merge3Error`` when ``data`` is not one (missing keys, wrong types)."""
        if not isinstance(data, dict) or not set(_REQUIRED) <= set(data):
            missing = sorted(set(_REQUIRED) - set(data)) if isinstance(data, dict) else ["(not a mapping)"]
            raise Merge3Error(f"not an evaluation record (missing {', '.join(missing)})")
        if not all(type(data[k]) is int for k in ("generation", "index")) or not isinstance(data["genome"], dict) \
                or not isinstance(data["plan"], list) or not isinstance(data["scores"], dict) \
                or not isinstance(data["objectives"], list) or not data["objectives"] \
                or not all(_is_number(v) for v in data["objectives"]) \
                or not all(isinstance(k, str) and (v is None or _is_number(v)) for k, v in data["scores"].items()):
            raise Merge3Error("not an evaluation record (a field has the wrong type)")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["Evaluation"]
