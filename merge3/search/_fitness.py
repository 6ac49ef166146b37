"""Fitness strategies: which items each candidate answers, and how its answers become an accuracy estimate.

A strategy is a small object the search loop asks, like an Optuna sampler:

- ``requests(generation, plans)`` → one :class:`~merge3.runtime.EvalRequest` per candidate (its items, or an
  adaptive test);
- ``score(generation, index, result, previous)`` → the result with ``scores`` (estimated accuracy on the whole
  search split, per task) and ``se`` (standard errors; ``se["mean"]`` for the mean) from **every** answer the
  candidate has given (``previous``: its record before a promotion);
- ``promotions(generation, rung, records)`` → more items for the best candidates (successive halving);
- ``observe(record)`` / ``end_generation(generation)`` → every answer joins the response matrix, and the item model
  is refitted on it every few generations (online recalibration).

Workers only build and answer; every estimate is made here, on the driver, where all answers of the run are known.
Only search-split items are ever asked: the test split is for final reports (``merge3 verify``). Every choice of
items derives from (run seed, generation, candidate, rung), so a resumed run asks exactly the same items.

Strategies (``bank.fitness`` in a search space, combinable):

- ``items: fixed`` — one seeded subset for the whole run (calibrated anchors or random items): cheap, but a long
  search overfits it (its best merges are those that happen to answer *those* items well).
- ``items: fresh`` — a new stratified random subset of the search split every generation (all candidates of a
  generation share it, so they are compared on the same items); nothing fixed to overfit.
- ``items: adaptive`` — per candidate an adaptive test (:class:`~merge3.itembank.AdaptiveTest`).
- ``promotion`` — the best candidates of each generation answer more items before they may become the run's best.
- ``recalibrate`` — the IRT model is refitted on all answers every G generations, warm-started.
- ``select_by: lower_bound`` — the engine ranks by estimate − z·SE.
- ``soft: w`` — every answer also records the probability the model gives the right answer; the engine ranks by
  the ``mean`` estimate + w × that probability averaged over the candidate's first items (candidates of a
  generation answer the same items, and a soft score tells near-identical candidates apart on fewer items than
  0/1 answers do: ``bench/soft_ranking.py``), and a ``forget:<task>`` objective by its value − w × max(the
  task's soft score, its chance floor) — the right answer's probability pushed down, not just the argmax.
  Estimates, standard errors, promotion and the run's best stay 0/1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np

from merge3._errors import Merge3Error
from merge3.itembank import (
    ESTIMATORS,
    AdaptiveTest,
    Estimator,
    IRTModel,
    ItemBank,
    estimate_answered,
    naive_estimate,
    refit_irt,
    sigmoid,
)
from merge3.itembank import select_subset
from merge3.models import atomic_dir
from merge3.runtime import CandidateResult, EvalRequest
from merge3.search._record import Evaluation

CALIBRATION_DIR = "calibration"
SUBSET_NAMES = {"random": "random", "anchor": "anchor-irt"}  # search-space names → calibration names


class Fitness(Protocol):
    name: str
    final_rung: int

    def requests(self, generation: int, plans: Sequence[list[dict]]) -> list[EvalRequest]: ...

    def score(self, generation: int, index: int, result: CandidateResult, previous: Evaluation | None = None
              ) -> CandidateResult: ...


class SearchSplitFitness:
    """Every search item, exact accuracy: the expensive reference the cheap strategies are measured against."""

    name = "full"
    final_rung = 0
    rank_z = 0.0

    def __init__(self, bank: ItemBank, soft: float | None = None):
        self.bank = bank
        self.rank_soft = float(soft or 0.0)  # bank.fitness.soft: the one option exact fitness takes

    def requests(self, generation: int, plans: Sequence[list[dict]]) -> list[EvalRequest]:
        return [EvalRequest(plan, soft=bool(self.rank_soft)) for plan in plans]  # items=None: every search item

    def score(self, generation, index, result, previous=None) -> CandidateResult:
        soft = result.soft_answers() if result.ok else None
        if soft is not None:
            record_soft(result, self.bank.per_task_accuracy(soft, result.answered()[0]))
        return result  # the worker's per-task means over every search item are exact


class CheapFitness:
    """A few search items per candidate, scored by a calibrated estimator (or the plain mean): the strategies of
    ``bank.fitness`` (fixed / fresh / adaptive items, promotion, recalibration)."""

    def __init__(self, bank: ItemBank, config, seed: int, estimator: Estimator | None, state_dir: Path | None = None,
                 log=lambda message: None, generations: int = 1):
        fitness = config.fitness
        self.bank, self.config, self.fitness, self.seed, self.estimator = bank, config, fitness, seed, estimator
        self.n, self.method, self.items_mode = config.items_per_task, config.estimator, fitness.items
        self.state_dir, self.log, self.generations = state_dir, log, max(1, generations)
        self.search = bank.search_indices  # local index k ↔ bank row search[k]
        self.local_of = {int(row): k for k, row in enumerate(self.search)}
        self.tasks = bank.task_of[self.search]
        self.task_sizes = {t: int((self.tasks == t).sum()) for t in bank.tasks}
        self.promotion = fitness.promotion
        self.final_rung = 0 if self.promotion is None else self.promotion.rungs
        self.rank_z = fitness.z if fitness.select_by == "lower_bound" else 0.0  # engines rank estimate − z·SE
        self.engine_sees_first = self.promotion is not None and self.promotion.engine_sees == "first"
        self.rank_soft = float(fitness.soft or 0.0)  # the engine ranks 'mean' + rank_soft × the first items' soft score
        self.answers: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.incumbent = -math.inf
        self.refits: list[dict] = []
        self._fixed_local = self._fixed_subset() if self.items_mode == "fixed" else None
        self.weighted = fitness.sampling == "uncertainty"
        self._designs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._thetas: dict[int, list[np.ndarray]] = {}
        extras = [f"{self.items_mode} items" + (" (uncertainty-weighted)" if self.weighted else "")]
        if self.promotion is not None:
            extras.append(f"promotion top {self.promotion.top_k} ×{self.promotion.factor:g}, {self.final_rung} rung(s)")
        if fitness.grow > 1:
            extras.append(f"growing to {fitness.grow:g}× items by the last generation")
        if fitness.recalibrate is not None:
            extras.append(f"recalibrated every {fitness.recalibrate.every} generation(s)")
        if self.rank_soft:
            extras.append(f"ranked with {self.rank_soft:g} × the soft score")
        self.name = f"{self.method}, {self.n} items per task, " + ", ".join(extras)

    # ---- which items ------------------------------------------------------------------------------------------
    def _fixed_subset(self) -> np.ndarray:
        if self.estimator is None:
            return select_subset(self.tasks, self.n, method="random", seed=self.seed).indices.astype(np.int64)
        return self.estimator.subset(self.n, SUBSET_NAMES[self.config.subset]).indices.astype(np.int64)

    def _random_unanswered(self, key: tuple[int, ...], per_task: dict[str, int], exclude: np.ndarray) -> np.ndarray:
        """``per_task[t]`` random search items of each task not in ``exclude`` (local indices), seeded by ``key``."""
        rng = np.random.default_rng([int(self.seed), *key])
        taken = np.zeros(len(self.search), dtype=bool)
        taken[exclude] = True
        chosen = []
        for t in self.bank.tasks:
            pool = np.flatnonzero((self.tasks == t) & ~taken)
            chosen.append(np.sort(rng.choice(pool, size=min(per_task.get(t, 0), pool.size), replace=False)))
        return np.concatenate(chosen).astype(np.int64)

    def requests(self, generation: int, plans: Sequence[list[dict]]) -> list[EvalRequest]:
        if self.items_mode == "adaptive":
            return [EvalRequest(plan, adaptive=self._adaptive_test(generation, i)) for i, plan in enumerate(plans)]
        if self.items_mode == "fresh" and self.weighted:
            local = self._design(generation)[0]
        elif self.items_mode == "fresh":  # one fresh subset per generation, shared by its candidates
            local = self._random_unanswered((generation, 0x5EED), dict.fromkeys(self.bank.tasks, self.items_at(generation)),
                                            np.array([], dtype=np.int64))
        else:
            local = self._fixed_local
        items = tuple(int(r) for r in self.search[local])
        return [EvalRequest(plan, items=items, soft=bool(self.rank_soft)) for plan in plans]

    def items_at(self, generation: int) -> int:
        """Fresh items per task in ``generation``: items_per_task, grown geometrically to grow× by the last one."""
        if self.fitness.grow == 1:
            return self.n
        x = min(generation, self.generations - 1) / max(self.generations - 1, 1)
        return int(round(self.n * self.fitness.grow**x))

    def _design(self, generation: int) -> tuple[np.ndarray, np.ndarray]:
        """``sampling: uncertainty``: this generation's items (local indices) and every search item's probability of
        being drawn. Items are drawn per task with probability ∝ √(P̄(1 − P̄)) (+10 % of the mean, so no item is
        out of reach), P̄ the current item model's mean prediction over the previous generation's candidates: items
        every candidate answers alike tell nothing about which is better and are drawn rarely; items the
        population splits on are drawn often (Neyman allocation). cv-irt weighs each answer by 1/probability, so the
        estimate stays unbiased."""
        if generation in self._designs:
            return self._designs[generation]
        model = self.estimator.model
        thetas = self._thetas.get(generation - 1)
        theta = np.stack(thetas) if thetas else model.theta_mean[None, :]
        P = sigmoid(theta @ model.a.T - model.b).mean(0)
        spread = np.sqrt(P * (1 - P))
        rng = np.random.default_rng([int(self.seed), generation, 0x5EED, 1])
        chosen, inclusion = [], np.zeros(len(self.search))
        for t in self.bank.tasks:
            pool = np.flatnonzero(self.tasks == t)
            q = spread[pool] + 0.1 * spread[pool].mean() + 1e-9
            q /= q.sum()
            n = min(self.items_at(generation), pool.size)
            chosen.append(np.sort(rng.choice(pool, size=n, replace=False, p=q)))
            inclusion[pool] = 1.0 - (1.0 - q) ** n  # probability of being among n draws (without replacement, approx.)
        self._designs[generation] = (np.concatenate(chosen).astype(np.int64), inclusion)
        return self._designs[generation]

    def _adaptive_test(self, generation: int, index: int) -> AdaptiveTest:
        model, cfg = self.estimator.model, self.fitness.adaptive
        return AdaptiveTest(rows=self.search, tasks=self.tasks, a=model.a, b=model.b, prior_mean=model.theta_mean,
                            prior_cov=model.theta_cov, start=cfg.start, batch=cfg.batch, n_max=cfg.n_max,
                            target_se=cfg.target_se, seed=(self.seed, generation, index), randomesque=cfg.randomesque)

    # ---- estimates --------------------------------------------------------------------------------------------
    def _local(self, rows: np.ndarray) -> np.ndarray:
        try:
            return np.array([self.local_of[int(r)] for r in rows], dtype=np.int64)
        except KeyError as e:
            raise Merge3Error(f"fitness: a worker answered bank row {e.args[0]}, which is not a search item") from None

    def score(self, generation: int, index: int, result: CandidateResult, previous: Evaluation | None = None
              ) -> CandidateResult:
        if not result.ok:
            return result
        rows, correct = result.answered()
        soft = result.soft_answers()
        if previous is not None:  # a promotion: the estimate uses every item the candidate has answered
            before_rows, before_correct = previous.answered()
            rows, correct = np.concatenate([before_rows, rows]), np.concatenate([before_correct, correct])
            result.answers = {"items": rows.tolist(), "correct": correct.tolist()}
            before_soft = previous.answers.get("soft")
            if soft is not None and before_soft is not None:
                soft = np.concatenate([np.asarray(before_soft, dtype=np.float64), soft])
                result.answers["soft"] = soft.tolist()
            result.items_evaluated = int(rows.size)
            result.build_seconds += previous.build_seconds
            result.eval_seconds += previous.eval_seconds
        local = self._local(rows)
        inclusion = None
        if self.weighted:  # every item answered: its probability of being drawn in any phase of this candidate
            drawn, first = self._design(generation)
            inclusion = first.copy()
            if previous is not None:
                for t in self.bank.tasks:  # later phases draw uniformly from the task's unanswered items
                    in_t = self.tasks[local] == t
                    n0 = int(np.isin(local[in_t], drawn).sum())
                    extra = int(in_t.sum()) - n0
                    pool = self.tasks == t
                    uniform = extra / max(int(pool.sum()) - n0, 1)
                    inclusion[pool] = first[pool] + (1 - first[pool]) * uniform
            inclusion = inclusion[local]
        estimate = self._estimate(local, correct, inclusion)
        if soft is not None:  # averaged as accuracy is
            record_soft(result, naive_estimate(self.tasks[local], soft, self.task_sizes).per_task, previous)
        result.scores = estimate.per_task
        result.se = {**estimate.se, "mean": estimate.se_mean}
        if estimate.theta is not None:
            result.details["theta"] = [float(v) for v in estimate.theta]
        return result

    def _estimate(self, local: np.ndarray, correct: np.ndarray, inclusion: np.ndarray | None = None):
        if self.estimator is None:  # an uncalibrated bank: the plain mean
            return naive_estimate(self.tasks[local], correct, self.task_sizes)
        if inclusion is not None:
            return estimate_answered(self.estimator, local, correct, self.method, inclusion=inclusion)
        if self.items_mode == "fixed" and self.method in ESTIMATORS and np.array_equal(local, self._fixed_local):
            # the calibrated subset itself: its own weights (anchors) and λ*/δ
            per_task = self.estimator.estimate_matrix(correct[None, :].astype(float), self.method, n=self.n,
                                                      subset=SUBSET_NAMES[self.config.subset], subset_only=True)[0]
            online = estimate_answered(self.estimator, local, correct, self.method)  # for its standard errors
            names = self.estimator.task_names
            return replace(online, per_task={t: float(v) for t, v in zip(names, per_task)},
                           mean=float(np.mean(per_task)))
        return estimate_answered(self.estimator, local, correct, self.method, adaptive=self.items_mode == "adaptive")

    # ---- promotion (successive halving on items) -------------------------------------------------------------
    def promotions(self, generation: int, rung: int, records: Sequence[Evaluation]) -> list[tuple[int, EvalRequest]]:
        """Rung ``rung`` (1, 2, …): more items for this generation's best candidates that reached rung − 1."""
        if self.promotion is None or rung > self.final_rung:
            return []
        ok = [r for r in records if r.ok and r.rung == rung - 1]
        keep = max(1, math.ceil(self.promotion.top_k / self.promotion.factor ** (rung - 1)))
        value = lambda r: r.objectives[0]  # noqa: E731
        if self.promotion.ucb is not None and math.isfinite(self.incumbent):
            z = self.promotion.ucb
            reach = [r for r in ok if value(r) + z * _objective_se(r) >= self.incumbent]
            chosen = sorted(reach, key=lambda r: -(value(r) + z * _objective_se(r)))[:keep]
        else:
            chosen = sorted(ok, key=lambda r: (-value(r), r.index))[:keep]
        out = []
        target = int(round(self.items_at(generation) * self.promotion.factor**rung))
        for record in chosen:
            local = self._local(record.answered()[0])
            have = {t: int((self.tasks[local] == t).sum()) for t in self.bank.tasks}
            more = self._random_unanswered((generation, record.index, rung),
                                           {t: max(0, target - have[t]) for t in self.bank.tasks}, local)
            if more.size:
                out.append((record.index, EvalRequest(record.plan, items=tuple(int(r) for r in self.search[more]),
                                                      soft=bool(self.rank_soft))))
        return out

    # ---- every answer joins the response matrix; refits ----------------------------------------------------
    def observe(self, record: Evaluation) -> None:
        if not record.ok or not record.answers:
            return
        rows, correct = record.answered()
        self.answers[record.candidate] = (self._local(rows), correct)
        if record.eligible and record.objectives and math.isfinite(record.objectives[0]):
            self.incumbent = max(self.incumbent, record.objectives[0])
        theta = (record.details or {}).get("theta")
        if theta is not None and record.rung == 0:  # the population the next weighted design aims at
            self._thetas.setdefault(record.generation, []).append(np.asarray(theta, dtype=float))

    def end_generation(self, generation: int) -> dict | None:
        """Refit the item model every ``recalibrate.every`` generations (loaded from the run when resuming)."""
        cfg = self.fitness.recalibrate
        if cfg is None or self.estimator is None or (generation + 1) % cfg.every:
            return None
        folder = None if self.state_dir is None else self.state_dir / f"irt-gen-{generation:04d}"
        started = time.perf_counter()
        if folder is not None and (folder / "irt.json").exists():
            model, how = IRTModel.load(folder), "loaded"
        else:
            model, how = self._refit(cfg.em_rounds), "refitted"
            if folder is not None:
                with atomic_dir(folder, overwrite=True) as tmp:
                    model.save(tmp)
        self.estimator = self.estimator.with_model(model)
        info = {"generation": generation, "subjects": len(model.subject_ids or []), "how": how,
                "seconds": round(time.perf_counter() - started, 2)}
        self.refits.append(info)
        self.log(f"recalibration after generation {generation}: IRT {how} on {info['subjects']} subjects "
                 f"({len(self.answers)} candidates) in {info['seconds']:.1f} s")
        return info

    def _refit(self, em_rounds: int) -> IRTModel:
        model = self.estimator.model
        calibration = np.load(self.bank.path / CALIBRATION_DIR / "responses.npz")["responses"].astype(float)
        known = list(model.subject_ids or [])
        n_calibration = calibration.shape[0]
        if len(known) < n_calibration:
            raise Merge3Error("recalibration needs a calibration refitted on all its subjects (refit=True)")
        keys = {f"cand-{g}-{i}": (g, i) for g, i in self.answers}
        order = known[n_calibration:] + sorted(set(keys) - set(known), key=lambda k: keys[k])
        Y = np.full((n_calibration + len(order), len(self.search)), np.nan)
        Y[:n_calibration] = calibration
        for row, key in enumerate(order, n_calibration):
            if key in keys:  # a candidate seen in an earlier refit keeps its row; its answers may have grown
                local, correct = self.answers[keys[key]]
                Y[row, local] = correct
        return refit_irt(model, Y, subject_ids=known[:n_calibration] + order, em_rounds=em_rounds)


def _objective_se(record: Evaluation) -> float:
    se = record.objective_se or [0.0]
    return float(se[0]) if se[0] is not None and math.isfinite(se[0]) else 0.0


def load_calibration(bank: ItemBank) -> Estimator | None:
    """The bank's calibrated estimator, or None when it has none; an error if it was made for other items."""
    folder = bank.path / CALIBRATION_DIR
    if not (folder / "estimator.json").exists():
        return None
    estimator = Estimator.load(folder)
    search_ids = [bank.item_ids[i] for i in bank.search_indices]
    if estimator.model.item_ids != search_ids:
        raise Merge3Error(f"the calibration of '{bank.path}' was made for other items than its search split: "
                          f"recalibrate with `merge3 calibrate {bank.path} --base … --models … --force`")
    return estimator


def record_soft(result: CandidateResult, per_task: Mapping[str, float], previous: Evaluation | None = None) -> None:
    """What the engine ranks by with ``soft``: the soft score (mean over tasks) and each task's (for ``forget:``), at
    this fidelity and — kept from rung 0 through promotions — at the first."""
    before = (previous.details or {}) if previous is not None else {}
    per_task = {t: float(v) for t, v in per_task.items()}
    result.details["soft"] = float(np.mean(list(per_task.values())))
    result.details["soft_tasks"] = per_task
    result.details["soft_first"] = before.get("soft_first", result.details["soft"])
    result.details["soft_tasks_first"] = before.get("soft_tasks_first", per_task)


def make_fitness(bank_config, bank: ItemBank, seed: int, state_dir: Path | None = None, log=lambda m: None,
                 generations: int = 1) -> Fitness:
    """The fitness a search space's ``bank`` section asks for; an error now (before any run exists) if the bank
    cannot give it."""
    if bank_config.estimator == "full" or bank_config.items_per_task is None:
        return SearchSplitFitness(bank, bank_config.fitness.soft)
    n, subset, method, fitness = bank_config.items_per_task, bank_config.subset, bank_config.estimator, bank_config.fitness
    estimator = load_calibration(bank)
    search_tasks = bank.task_of[bank.search_indices]
    smallest = min(int((search_tasks == t).sum()) for t in bank.tasks)
    if estimator is None:
        needs_irt = method != "naive" or subset != "random" or fitness.recalibrate is not None
        if needs_irt:
            what = f"bank.estimator '{method}'" if method != "naive" else (
                "bank.fitness.recalibrate" if fitness.recalibrate is not None else f"bank.subset '{subset}'")
            raise Merge3Error(f"{what} needs a calibrated bank, and '{bank.path}' is not calibrated: "
                              f"run `merge3 calibrate {bank.path} --base … --models …`")
        return CheapFitness(bank, bank_config, seed, None, state_dir, log, generations)
    if fitness.items == "fixed" and (SUBSET_NAMES[subset], n) not in estimator.subsets:
        have = ", ".join(f"{m}/{k}" for m, k in sorted(estimator.subsets))
        raise Merge3Error(f"bank.items_per_task: the calibration of '{bank.path}' has no {SUBSET_NAMES[subset]} "
                          f"subset with n={n} per task (calibrated: {have})")
    if method in ("mp-irt", "gmp-irt") and estimator.endpoint_theta is None:
        raise Merge3Error(f"bank.estimator '{method}' needs endpoint abilities: recalibrate with the endpoints")
    if fitness.items == "adaptive" and fitness.adaptive.n_max > smallest:
        raise Merge3Error(f"bank.fitness.adaptive.n_max ({fitness.adaptive.n_max}) exceeds the items of the "
                          f"smallest task ({smallest})")
    return CheapFitness(bank, bank_config, seed, estimator, state_dir, log, generations)


__all__ = ["CheapFitness", "Fitness", "SearchSplitFitness", "load_calibration", "make_fitness"]
