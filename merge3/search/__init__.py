"""Evolutionary search over merge plans: genome, engines (pymoo, Optuna) and the engine-agnostic loop."""

from merge3.search._calibrate import CalibrationSettings, calibrate_bank, calibration_path
from merge3.search._engines import Engine, OptunaEngine, PymooEngine, make_engine
from merge3.search._fitness import CheapFitness, Fitness, SearchSplitFitness, load_calibration, make_fitness
from merge3.search._genome import Choice, Genome, GroupChoice, Real, weight_range_problem
from merge3.search._loop import Executor, Objectives, Recorder, Search, SearchResult, best_record, import_objective, latest, rank_key
from merge3.search._record import Evaluation
from merge3.search._progress import QuietProgress, RichProgress
from merge3.search._space import SearchSpace, load_space, parse_space

__all__ = [
    "CalibrationSettings",
    "calibrate_bank",
    "calibration_path",
    "Choice",
    "Engine",
    "Evaluation",
    "Executor",
    "CheapFitness",
    "Fitness",
    "Genome",
    "GroupChoice",
    "Objectives",
    "QuietProgress",
    "RichProgress",
    "OptunaEngine",
    "PymooEngine",
    "Real",
    "Recorder",
    "Search",
    "SearchResult",
    "SearchSpace",
    "SearchSplitFitness",
    "best_record",
    "import_objective",
    "latest",
    "rank_key",
    "load_calibration",
    "load_space",
    "make_engine",
    "make_fitness",
    "parse_space",
    "weight_range_problem",
]
