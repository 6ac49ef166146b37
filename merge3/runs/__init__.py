"""Run folders (what a search writes), the fixed-recipe baselines and the leaderboard across runs."""

from merge3.runs._baselines import Baseline, baselines, best_per_method, best_recipe
from merge3.runs._lock import RunLock
from merge3.runs._leaderboard import FORMATS, find_runs, format_leaderboard, leaderboard, print_leaderboard
from merge3.runs._report import write_report
from merge3.runs._run import Run, new_run_folder

__all__ = ["FORMATS", "Baseline", "Run", "RunLock", "baselines", "best_per_method", "best_recipe", "find_runs", "format_leaderboard",
           "leaderboard", "new_run_folder", "print_leaderboard", "write_report"]
