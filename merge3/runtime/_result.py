"""What a worker is asked (an ``EvalRequest``) and what evaluating one candidate returns (a ``CandidateResult``),
whichever executor ran it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EvalRequest:
    """One candidate for a worker: build ``plan`` into the resident model, then answer ``items`` (bank row
    positions; None = every search item), or, with ``adaptive``, choose its items itself (adaptive testing).
    ``soft``: also record each answer's soft score (the probability the model gives the right answer).

    >>> EvalRequest([{"group": "all", "method": "task_arithmetic", "params": {"weights": [0.5]}}], items=(0, 3)).items
    (0, 3)
    """

    plan: list[dict]
    items: tuple[int, ...] | None = None
    adaptive: Any = None
    soft: bool = False


@dataclass
class CandidateResult:
    """Per-task accuracy (estimated, or exact on the items answered) of one candidate merge and what it cost.

    ``answers`` holds the bank rows the candidate answered and whether each was right (``{"items": [...],
    "correct": [0/1 ...]}``, and ``"soft"``: the probability of the right answer, when asked), so every estimate can
    be recomputed later. A worker fills ``scores`` with the mean of
    its answers per task; the search's fitness replaces them with its estimate and ``se`` with its standard error.
    ``items_evaluated`` counts the items answered; ``error`` is set, and ``scores`` empty, when the evaluation failed.
    """

    scores: dict[str, float] = field(default_factory=dict)
    items_evaluated: int = 0
    build_seconds: float = 0.0
    eval_seconds: float = 0.0
    worker: str = "local"
    error: str | None = None
    details: dict = field(default_factory=dict)
    answers: dict = field(default_factory=dict)
    se: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.scores.values()))) if self.scores else float("nan")

    def answered(self) -> tuple[np.ndarray, np.ndarray]:
        """(bank rows, 0/1 correctness) of every item this candidate answered."""
        return (np.asarray(self.answers.get("items", []), dtype=np.int64),
                np.asarray(self.answers.get("correct", []), dtype=np.int8))

    def soft_answers(self) -> np.ndarray | None:
        """The soft score of every answer (aligned with :meth:`answered`), or None when they were not asked for."""
        soft = self.answers.get("soft")
        return None if soft is None else np.asarray(soft, dtype=np.float64)

    def as_dict(self) -> dict:
        return {**asdict(self), "mean": None if not self.scores else self.mean}

    @classmethod
    def from_dict(cls, data: dict) -> CandidateResult:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**fields)
