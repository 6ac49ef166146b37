"""Search engines behind one ask/tell interface.

An engine hands out a batch of genomes (``ask``), receives their objective values to **minimise** (``tell``), and
is deterministic for a seed: the same sequence of tells gives the same sequence of asks. That property is what makes
runs resumable by replay (see ``_loop``), so engines keep their random state to themselves: pymoo draws from
NumPy's global generator, which ``_IsolatedRandomState`` saves and restores around every engine call.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from merge3._errors import Merge3Error
from merge3.search._genome import Choice, Real, sample_variables


class Engine(Protocol):
    def ask(self) -> list[dict[str, Any]]: ...

    def tell(self, genomes: Sequence[Mapping[str, Any]], F: np.ndarray) -> None: ...

    @property
    def done(self) -> bool: ...

    @property
    def planned_candidates(self) -> int:
        """How many candidates the whole run asks for (a progress bar's total)."""
        ...


class _IsolatedRandomState:
    """Gives an engine its own NumPy-global and ``random`` state, so nothing outside can perturb it."""

    def __init__(self, seed: int):
        outer_np, outer_py = np.random.get_state(), random.getstate()
        np.random.seed(seed)
        random.seed(seed)
        self._np, self._py = np.random.get_state(), random.getstate()
        np.random.set_state(outer_np)
        random.setstate(outer_py)

    def __enter__(self):
        self._outer = (np.random.get_state(), random.getstate())
        np.random.set_state(self._np)
        random.setstate(self._py)

    def __exit__(self, *exc):
        self._np, self._py = np.random.get_state(), random.getstate()
        np.random.set_state(self._outer[0])
        random.setstate(self._outer[1])


class PymooEngine:
    """pymoo through ask/tell: mixed-variable GA for one objective, NSGA-II (mixed variables) for several."""

    def __init__(self, variables: Mapping[str, Real | Choice], n_obj: int, population: int, generations: int,
                 seed: int, algorithm: str = "auto", initial: Sequence[Mapping[str, Any]] = ()):
        from pymoo.core.mixed import (
            MixedVariableDuplicateElimination,
            MixedVariableGA,
            MixedVariableMating,
            MixedVariableSampling,
        )
        from pymoo.core.problem import Problem
        from pymoo.core.variable import Choice as PChoice
        from pymoo.core.variable import Real as PReal

        if algorithm == "auto":
            algorithm = "ga" if n_obj == 1 else "nsga2"
        if algorithm not in ("ga", "nsga2"):
            raise Merge3Error(f"engine.algorithm: pymoo supports 'ga' and 'nsga2', not '{algorithm}'")
        if algorithm == "ga" and n_obj > 1:
            raise Merge3Error(f"engine.algorithm: 'ga' optimises one objective, the space has {n_obj}: use 'nsga2'")
        pvars = {
            k: PReal(bounds=(v.low, v.high)) if isinstance(v, Real) else PChoice(options=list(v.options))
            for k, v in variables.items()
        }
        self._random = _IsolatedRandomState(seed)
        self.variables = dict(variables)
        self.problem = Problem(vars=pvars, n_obj=n_obj)
        dedup = MixedVariableDuplicateElimination()
        initial = list({tuple(sorted(dict(g).items())): dict(g) for g in initial}.values())  # pymoo drops repeats
        sampling = self._first_population(initial, population, seed) if initial else MixedVariableSampling()
        self.planned_candidates = max(population, len(initial)) + (generations - 1) * population
        if algorithm == "ga":
            self.algorithm = MixedVariableGA(pop_size=population, sampling=sampling, eliminate_duplicates=dedup)
        else:
            from pymoo.algorithms.moo.nsga2 import NSGA2, RankAndCrowding

            self.algorithm = NSGA2(
                pop_size=population, sampling=sampling, survival=RankAndCrowding(),
                mating=MixedVariableMating(eliminate_duplicates=dedup), eliminate_duplicates=dedup,
            )
        self.name = f"pymoo-{algorithm}"
        with self._random:
            self.algorithm.setup(self.problem, termination=("n_gen", generations), seed=seed, verbose=False)
        self._pending = None

    def _first_population(self, initial, population: int, seed: int):
        """Every given genome, topped up with uniform random ones to a population. When there are more recipes than a
        population, the first generation is larger rather than cut: cutting dropped the last method's strongest
        recipes (TSV-M at 1.0 and 1.5 in a 10-candidate SmolLM search), exactly the ones a search should start from."""
        from pymoo.core.population import Population

        rng = np.random.default_rng(seed)
        genomes = [dict(g) for g in initial]
        while len(genomes) < population:
            genomes.append(sample_variables(self.variables, rng))
        return Population.new("X", np.array(genomes, dtype=object))

    @property
    def done(self) -> bool:
        return not self.algorithm.has_next()

    def ask(self) -> list[dict[str, Any]]:
        with self._random:
            self._pending = self.algorithm.ask()
        return [dict(x) for x in self._pending.get("X")]

    def tell(self, genomes: Sequence[Mapping[str, Any]], F: np.ndarray) -> None:
        from pymoo.core.evaluator import Evaluator
        from pymoo.problems.static import StaticProblem

        if self._pending is None or len(genomes) != len(self._pending):
            raise RuntimeError("tell() must answer the last ask() in full")
        with self._random:
            Evaluator().eval(StaticProblem(self.problem, F=np.asarray(F, dtype=float)), self._pending)
            self.algorithm.tell(infills=self._pending)
        self._pending = None


class OptunaEngine:
    """Optuna with batch ask/tell: TPE (default), NSGA-II for several objectives, CMA-ES when nothing is a choice.

    Trials go to ``storage`` (a journal file) when given, so ``optuna-dashboard <run>/optuna.journal`` shows a run.
    """

    def __init__(self, variables: Mapping[str, Real | Choice], n_obj: int, population: int, generations: int,
                 seed: int, algorithm: str = "auto", storage: str | Path | None = None, study_name: str = "merge3",
                 initial: Sequence[Mapping[str, Any]] = ()):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if algorithm == "auto":
            algorithm = "tpe" if n_obj == 1 else "nsga2"
        has_choice = any(isinstance(v, Choice) for v in variables.values())
        if algorithm == "cmaes" and (has_choice or n_obj > 1):
            raise Merge3Error("engine.algorithm: 'cmaes' needs one objective and no method choice (use tpe or nsga2)")
        samplers = {
            "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=population),
            "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=population),
            # the first population is the recipes plus independent draws (no trial is complete yet): say so once,
            # in the docs, not in a warning per parameter and trial
            "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=0,
                                                          warn_independent_sampling=False),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        }
        if algorithm not in samplers:
            raise Merge3Error(f"engine.algorithm: optuna supports {', '.join(samplers)}, not '{algorithm}'")
        self.name = f"optuna-{algorithm}"
        self.variables, self.population, self.generations = dict(variables), population, generations
        self.distributions = {
            k: optuna.distributions.FloatDistribution(v.low, v.high)
            if isinstance(v, Real)
            else optuna.distributions.CategoricalDistribution(list(v.options))
            for k, v in variables.items()
        }
        store = None
        if storage is not None:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            store = JournalStorage(JournalFileBackend(str(storage)))
        self.study = optuna.create_study(
            study_name=study_name, storage=store, sampler=samplers[algorithm](),
            directions=["minimize"] * n_obj, load_if_exists=False,
        )
        for genome in initial:
            self.study.enqueue_trial(dict(genome))
        self.planned_candidates = generations * population  # the queued recipes are the first trials asked
        self._asked = 0
        self._pending: list = []

    @property
    def done(self) -> bool:
        return self._asked >= self.generations

    def ask(self) -> list[dict[str, Any]]:
        self._pending = [self.study.ask(self.distributions) for _ in range(self.population)]
        self._asked += 1
        return [dict(t.params) for t in self._pending]

    def tell(self, genomes: Sequence[Mapping[str, Any]], F: np.ndarray) -> None:
        if len(genomes) != len(self._pending):
            raise RuntimeError("tell() must answer the last ask() in full")
        for trial, values in zip(self._pending, np.asarray(F, dtype=float)):
            self.study.tell(trial, [float(v) for v in values])
        self._pending = []


class CmaEngine:
    """CMA-ES (the ``cmaes`` library) on a genome of real variables, through ask/tell.

    Generation 0 evaluates the initial genomes (the uniform recipes) and the centre of the box; CMA-ES then starts
    from the best of them, with σ = 1/6 of every range (it works in the unit cube, so ranges of different widths
    move alike). Each later generation is ``population − 1`` samples plus the distribution's current **mean**, which
    the samples never hit but which is where CMA-ES believes the optimum is — late in a run it is often the best
    candidate there is. Only the samples are told back to CMA-ES.
    """

    name = "cmaes"

    def __init__(self, variables: Mapping[str, Real | Choice], n_obj: int, population: int, generations: int,
                 seed: int, initial: Sequence[Mapping[str, Any]] = ()):
        if n_obj > 1:
            raise Merge3Error(f"engine.name: 'cmaes' optimises one objective, the space has {n_obj} (use pymoo nsga2)")
        choices = [k for k, v in variables.items() if isinstance(v, Choice)]
        if choices:
            raise Merge3Error(f"engine.name: 'cmaes' needs real variables only, '{choices[0]}' is a choice "
                              "(allow one method, or use pymoo)")
        if population < 4:
            raise Merge3Error(f"engine.population: 'cmaes' needs at least 4 candidates per generation, got {population}")
        self.names = list(variables)
        self.low = np.array([variables[k].low for k in self.names])
        self.high = np.array([variables[k].high for k in self.names])
        self.population, self.generations, self.seed = population, generations, seed
        start = [np.full(len(self.names), 0.5)] + [self._unit(g) for g in initial]
        self._first = list({tuple(np.round(z, 12)): z for z in start}.values())  # without duplicates
        self.planned_candidates = len(self._first) + (generations - 1) * population
        self._cma = None
        self._generation = 0
        self._pending: list[np.ndarray] = []

    def _unit(self, genome: Mapping[str, Any]) -> np.ndarray:
        return np.clip((np.array([float(genome[k]) for k in self.names]) - self.low) / (self.high - self.low), 0, 1)

    def _genome(self, z: np.ndarray) -> dict[str, float]:
        return {k: float(v) for k, v in zip(self.names, self.low + np.clip(z, 0, 1) * (self.high - self.low))}

    @property
    def done(self) -> bool:
        return self._generation >= self.generations

    def ask(self) -> list[dict[str, Any]]:
        if self._cma is None:
            self._pending = list(self._first)
        else:
            self._pending = [self._cma.ask() for _ in range(self._cma.population_size)] + [self._cma.mean.copy()]
        return [self._genome(z) for z in self._pending]

    def tell(self, genomes: Sequence[Mapping[str, Any]], F: np.ndarray) -> None:
        import cmaes

        F = np.asarray(F, dtype=float).reshape(len(genomes), -1)[:, 0]
        if len(genomes) != len(self._pending):
            raise RuntimeError("tell() must answer the last ask() in full")
        if self._cma is None:
            best = self._pending[int(np.argmin(F))]
            self._cma = cmaes.CMA(mean=best, sigma=1 / 6, bounds=np.array([[0.0, 1.0]] * len(self.names)),
                                  seed=self.seed, population_size=self.population - 1)
        else:
            self._cma.tell([(z, float(f)) for z, f in zip(self._pending[:-1], F[:-1])])  # failures come as WORST
        self._generation += 1
        self._pending = []


def make_engine(name: str, variables, n_obj: int, population: int, generations: int, seed: int,
                algorithm: str = "auto", storage: str | Path | None = None,
                initial: Sequence[Mapping[str, Any]] = ()) -> Engine:
    """An engine by name; ``initial`` genomes (e.g. the fixed recipes) go into the first population."""
    if name == "pymoo":
        return PymooEngine(variables, n_obj, population, generations, seed, algorithm, initial)
    if name == "optuna":
        return OptunaEngine(variables, n_obj, population, generations, seed, algorithm, storage, initial=initial)
    if name == "cmaes":
        if algorithm not in ("auto", "cmaes"):
            raise Merge3Error(f"engine.algorithm: the 'cmaes' engine has no algorithm '{algorithm}' (leave it 'auto')")
        return CmaEngine(variables, n_obj, population, generations, seed, initial)
    raise Merge3Error(f"engine.name: unknown engine '{name}' (pymoo, optuna or cmaes)")
