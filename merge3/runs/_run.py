"""A run folder: everything a search writes, appended as it happens, readable with pandas in one line.

::

    runs/<run-id>/
      config.yaml          the resolved search space (absolute paths)
      run.json             status, merge3 version, timings, cost accounting
      evaluations.jsonl    one line per evaluated candidate, flushed and fsynced after each
      checkpoint/gen-NNNN.json   engine population and objectives per generation (atomic)
      best.json, pareto.parquet  written when the search ends
      verified.json        search- and test-split scores of the candidates ``merge3 verify`` checked
      log.txt
      .lock                held (flock) by the one process writing the run; names it

``pd.read_json("runs/<id>/evaluations.jsonl", lines=True)`` reads every evaluation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from merge3 import __version__
from merge3._errors import Merge3Error
from merge3.models import check_folder_name, check_not_a_link, file_in_the_way, open_no_link, plain, safe_load_yaml, write_text_atomic
from merge3.runs._lock import RunLock
from merge3.search import Evaluation, latest

EVALUATIONS = "evaluations.jsonl"


def new_run_folder(runs_dir: str | os.PathLike, name: str, resume: str) -> tuple[Path, bool]:
    """Make ``runs_dir/name`` as a new, empty run folder (a name is never reused) and return it, with whether
    ``runs_dir`` itself was made too. ``resume``: the command that continues an existing run of that name."""
    check_folder_name(name, "run name")
    runs_dir = Path(runs_dir)
    blocking = file_in_the_way(runs_dir)
    if blocking is not None:
        raise Merge3Error(f"--runs-dir '{runs_dir}': '{blocking}' is a file, not a folder")
    made_runs_dir = not runs_dir.exists()
    path = runs_dir / name
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a dangling link or a link loop: exists() is False, yet mkdir finds something there
        hint = " (a broken symbolic link)" if runs_dir.is_symlink() else ""
        raise Merge3Error(f"--runs-dir '{runs_dir}' cannot be made or used as a folder{hint}: "
                          f"{e.strerror or e}") from None
    try:
        path.mkdir()
    except FileExistsError:
        raise Merge3Error(f"run '{path}' already exists: resume it with `{resume} {path}` "
                          "or choose another --name") from None
    except OSError as e:
        raise Merge3Error(f"--runs-dir '{runs_dir}': cannot make the run folder '{name}' there: "
                          f"{e.strerror or e}") from None
    return path, made_runs_dir


def dumps(obj) -> str:
    return json.dumps(plain(obj), allow_nan=True)


class Run:
    """A run folder. ``Run.create`` makes a new one (never reusing a name); ``Run.open`` an existing one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._evaluations = None
        self._lock: RunLock | None = None
        self._made_runs_dir = False  # Run.create made the runs folder too (discard() then removes it if empty)

    # ---- creation and opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, runs_dir: str | os.PathLike, name: str, config: dict) -> Run:
        path, made_runs_dir = new_run_folder(runs_dir, name, "merge3 resume")
        run = cls(path)
        run._made_runs_dir = made_runs_dir
        run.lock()
        (path / "checkpoint").mkdir()
        write_text_atomic(path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        run.write_meta(status="running", created=_now(), merge3_version=__version__, name=name)
        return run

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        path = Path(path)
        if not path.is_dir() or not (path / "config.yaml").is_file() or not (path / "run.json").is_file():
            raise Merge3Error(f"'{path}' is not a merge3 run folder (no config.yaml/run.json)")
        return cls(path)

    def lock(self) -> None:
        """Become the run's one writer (``search`` and ``resume`` hold it until they end); an error if another
        process is writing it. A lock left by a dead process is taken over."""
        if self._lock is None:
            self._lock = RunLock(self.path).acquire()
            try:  # the files it appends to: a link would make it write outside the run (a run someone handed over)
                check_not_a_link(self.path / EVALUATIONS, "the run's evaluations")
                check_not_a_link(self.path / "log.txt", "the run's log")
            except Merge3Error:
                self.unlock()
                raise
            if self._lock.took_over:
                gone = self._lock.took_over
                self.log(f"took over the lock of pid {gone.get('pid')} on {gone.get('host')} (no longer running)")

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def discard(self) -> None:
        """Remove a new run that recorded nothing (its name is free again), and the runs folder if it made it and
        nothing else is in it."""
        self.close()
        self.unlock()
        shutil.rmtree(self.path, ignore_errors=True)
        if self._made_runs_dir:
            try:
                self.path.parent.rmdir()  # only if empty: another run may have arrived meanwhile
            except OSError:
                pass

    @staticmethod
    def default_name(space_name: str, seed: int) -> str:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return f"{re.sub(r'[^A-Za-z0-9_.-]', '-', space_name)}-s{seed}-{stamp}"

    # ---- metadata ------------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        config = _read_mapping(self.path / "config.yaml", safe_load_yaml, "a merge3 run config")
        if "models" not in config or "bank" not in config:
            raise Merge3Error(f"{self.path / 'config.yaml'}: not a merge3 run config (no models/bank)")
        return config

    @property
    def meta(self) -> dict:
        return _read_mapping(self.path / "run.json", json.loads, "a merge3 run.json (a JSON object)")

    def write_meta(self, **updates) -> None:
        meta = self.meta if (self.path / "run.json").exists() else {}
        meta.update(updates)
        write_text_atomic(self.path / "run.json", json.dumps(plain(meta), indent=2) + "\n")

    # ---- the Recorder protocol ----------------------------------------------------------------------------
    def evaluation(self, record: Evaluation) -> None:
        if self._evaluations is None:
            self._evaluations = open_no_link(self.path / EVALUATIONS, what="the run's evaluations")
        self._evaluations.write(dumps(record.to_json()) + "\n")
        self._evaluations.flush()
        os.fsync(self._evaluations.fileno())

    def generation(self, generation: int, summary: dict) -> None:
        write_text_atomic(self.path / "checkpoint" / f"gen-{generation:04d}.json", dumps(summary) + "\n")
        self.log(
            f"generation {generation}: best so far {summary['best_so_far']:.4f}, generation mean "
            f"{summary['generation_mean']:.4f}, {summary['failed']} failed, {summary['items_evaluated']} items so far"
        )

    def log(self, message: str) -> None:
        with open_no_link(self.path / "log.txt", what="the run's log") as f:
            f.write(f"{_now()} {message}\n")

    def close(self) -> None:
        if self._evaluations is not None:
            self._evaluations.close()
            self._evaluations = None

    # ---- reading back ---------------------------------------------------------------------------------------
    def records(self, repair: bool = False, every_rung: bool = False) -> list[Evaluation]:
        """The latest record of every evaluated candidate (``every_rung``: every line, promotions included). A line
        cut short by a kill is dropped (and removed when ``repair``)."""
        file = self.path / EVALUATIONS
        if not file.exists():
            return []
        try:
            lines = file.read_text().splitlines(keepends=True)
        except (OSError, UnicodeDecodeError) as e:
            raise Merge3Error(f"{file}: unreadable ({type(e).__name__})") from None
        records, good = [], []
        for n, line in enumerate(lines):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                if n != len(lines) - 1:
                    raise Merge3Error(f"{file}: line {n + 1} is corrupt (not the last line, so not a cut write)")
                continue
            try:
                records.append(Evaluation.from_json(data))
            except Merge3Error:
                raise Merge3Error(f"{file}: line {n + 1} is not an evaluation record") from None
            if len(records[-1].objectives) != len(records[0].objectives):
                raise Merge3Error(f"{file}: line {n + 1} has {len(records[-1].objectives)} objectives where line 1 has "
                                  f"{len(records[0].objectives)} (the file was edited or mixes two runs)")
            good.append(line)
        text = "".join(good)
        if text and not text.endswith("\n"):
            text += "\n"  # a complete record whose newline was cut: the next append must start a new line
        if repair and text != "".join(lines):
            write_text_atomic(file, text)
        return records if every_rung else latest(records)

    def replay(self) -> dict[tuple[int, int, int], Evaluation]:
        return {r.key: r for r in self.records(repair=True, every_rung=True)}

    def verified(self) -> dict:
        """``verified.json``: "generation/index" → estimated, search-split and test-split scores (``merge3 verify``).

        Runs verified before banks had splits stored one full-bank score ("true"): it is read as a search-split
        score with no test score, which is what it was.
        """
        path = self.path / "verified.json"
        if not path.exists():
            return {}
        entries = _read_mapping(path, json.loads, "a merge3 verified.json")
        for key, entry in entries.items():
            if not isinstance(entry, dict):
                raise Merge3Error(f"{path}: entry '{key}' is not a verification record")
            if "search" not in entry and "true" in entry:
                entry.update(search=entry.pop("true"), search_mean=entry.pop("true_mean", None), test=None,
                             test_mean=None)
            _check_verified_scores(path, key, entry)
        return entries

    def write_verified(self, entries: dict) -> None:
        write_text_atomic(self.path / "verified.json", json.dumps(plain(entries), indent=2) + "\n")

    def evaluations(self) -> pd.DataFrame:
        return pd.read_json(self.path / EVALUATIONS, lines=True) if (self.path / EVALUATIONS).exists() else pd.DataFrame()

    def finish(self, result, started: float) -> None:
        """Write best.json, pareto.parquet and the cost accounting once a search ends."""
        self.close()
        best = result.best()
        pareto = result.pareto()
        write_text_atomic(self.path / "best.json", json.dumps(plain(best.to_json()), indent=2) + "\n")
        frame = pd.DataFrame([{
            "generation": r.generation, "index": r.index, "mean": r.mean,
            **{f"objective:{n}": v for n, v in zip(result.objective_names, r.objectives)},
            **{f"score:{t}": s for t, s in r.scores.items()},
            "genome": dumps(r.genome), "methods": dumps([g["method"] for g in r.plan]),
        } for r in pareto])  # fmt: skip
        write_text_atomic(self.path / "pareto.parquet", frame.to_parquet(index=False))
        self.write_meta(
            status="finished", finished=_now(), stopped_by=result.stopped_by, candidates=len(result.records),
            items_evaluated=result.items_evaluated, full_bank_equivalent=result.full_bank_equivalent,
            cost_ratio=(result.full_bank_equivalent / result.items_evaluated) if result.items_evaluated else None,
            wall_seconds=round(time.time() - started, 2), best_objectives=best.objectives,
            objective_names=result.objective_names,
        )
        self.log(f"finished: {len(result.records)} candidates, {result.items_evaluated} items evaluated "
                 f"(full-bank equivalent {result.full_bank_equivalent})")


def _read_mapping(file: Path, parse, what: str) -> dict:
    """A run file parsed (JSON or YAML) into a mapping, or one ``Merge3Error`` naming the file."""
    try:
        value = parse(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise Merge3Error(f"{file}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(value, dict):
        raise Merge3Error(f"{file}: not {what}")
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_verified_scores(path: Path, key: str, entry: dict) -> None:
    """Every score a verification stored is an accuracy in [0, 1] (or None: no such split): a hand-edited
    ``verified.json`` must not put 7.5 at the top of a leaderboard, nor NaN quietly switch it to search scores."""
    def accuracy(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0

    for split in ("search", "test"):
        scores = entry.get(split)
        if scores is not None and not (isinstance(scores, dict) and all(map(accuracy, scores.values()))):
            raise Merge3Error(f"{path}: entry '{key}' field '{split}' is not a mapping of task → accuracy in [0, 1]")
        mean = entry.get(f"{split}_mean")
        if mean is not None and not accuracy(mean):
            raise Merge3Error(f"{path}: entry '{key}' field '{split}_mean' is {json.dumps(mean)}, not an accuracy "
                              "in [0, 1]")
