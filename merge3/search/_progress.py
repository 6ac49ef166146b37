"""Progress display for the search loop: a rich bar with best-so-far and ETA, or plain lines for batch logs."""

from __future__ import annotations

import math
import sys


class RichProgress:
    """A bar over all candidates of the run; its label shows the generation and the best objective so far."""

    def __init__(self, total: int, generations: int, console=None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.generations, self.generation_no, self.best = generations, 0, float("nan")
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                            transient=False)
        self.task = self.bar.add_task(self._label(), total=total)
        self.bar.start()

    def _label(self) -> str:
        best = "—" if math.isnan(self.best) else f"{self.best:.4f}"
        if self.generation_no >= self.generations:
            return f"{self.generations} generations done  best {best}"
        return f"generation {self.generation_no + 1}/{self.generations}  best {best}"

    def advance(self, record) -> None:
        self.bar.update(self.task, advance=1, description=self._label())

    def generation(self, summary: dict) -> None:
        # the run's best as the search ranks it (feasible, at the last fidelity), not the highest value seen: an
        # infeasible or first-fidelity candidate is never shown as the best
        self.generation_no = summary["generation"] + 1
        self.best = summary["best_so_far"]
        self.bar.update(self.task, description=self._label())

    def close(self) -> None:
        self.bar.stop()


class QuietProgress:
    """One line per generation, for batch logs."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def advance(self, record) -> None:
        pass

    def generation(self, summary: dict) -> None:
        print(f"generation {summary['generation']}: best {summary['best_so_far']:.4f} "
              f"(generation mean {summary['generation_mean']:.4f}, {summary['failed']} failed, "
              f"{summary['items_evaluated']} items so far)", file=self.stream, flush=True)

    def close(self) -> None:
        pass
