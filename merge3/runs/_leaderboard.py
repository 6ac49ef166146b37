"""The leaderboard: the merges worth keeping across runs, beside the fixed recipes they have to beat.

One row per merge: the top candidates of each single-objective run (and every verified one), the Pareto front of
each multi-objective run, and per bank the base, the endpoints and the best grid point of TA/TIES/DARE/TSV-M (chosen
on the search split, cached). Three scores per merge: ``estimated_mean`` (the search's cheap fitness),
``search_mean`` (every search-split item: what the search optimised) and ``test_mean`` (every test-split item: never
seen by the search, the calibration or the recipe grid). ``score`` is the test score when there is one, else the
search-split score, else the estimate, and ``score_on`` says which; rows rank by that order, then by score.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from merge3._errors import Merge3Error
from merge3.itembank import ItemBank
from merge3.methods import ROW_BLOCKS, is_row_blocks, mean_weight, registered
from merge3.runs._baselines import baselines as score_baselines
from merge3.runs._baselines import best_per_method, same_task_method
from merge3.runs._run import Run

FORMATS = ("table", "csv", "markdown", "json", "html")


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Run]:
    """Run folders among ``paths``: each path is a run folder or a folder of run folders."""
    runs = []
    for path in map(Path, paths):
        if not path.exists():
            raise Merge3Error(f"'{path}' does not exist")
        if (path / "run.json").exists():
            runs.append(Run.open(path))
        elif path.is_dir():
            runs += [Run.open(p) for p in sorted(path.iterdir())
                     if p.is_dir() and (p / "run.json").is_file() and (p / "config.yaml").is_file()]
        else:
            raise Merge3Error(f"'{path}' is neither a run folder nor a folder of runs")
    seen: set[Path] = set()  # a run named twice (itself and its folder, or two spellings) is one run on the board
    return [r for r in runs if not (r.path.resolve() in seen or seen.add(r.path.resolve()))]


def _methods(plan: list[dict]) -> str:
    methods = [g["method"] for g in plan]
    if len(set(methods)) == 1:
        return f"{methods[0]} (all {len(methods)} groups)" if len(methods) > 1 else methods[0]
    return ", ".join(f"{g['group']}={g['method']}" for g in plan)


def _params(plan: list[dict]) -> str:
    def one(x):  # a row-block weight shows as its mean and its number of blocks
        return f"{mean_weight(x):.2f}" + (f"/{len(x[ROW_BLOCKS])}rows" if is_row_blocks(x) else "")

    def value(v):
        return "[" + ",".join(map(one, v)) + "]" if isinstance(v, list) else f"{v:.3g}" if isinstance(v, float) else str(v)

    return "; ".join(f"{g['group']}: " + " ".join(f"{k}={value(v)}" for k, v in g["params"].items()) for g in plan)


def _kept_records(run: Run, per_run: int, verified: dict) -> list:
    from merge3.search import SearchResult, rank_key

    records = [r for r in run.records() if r.error is None]
    if not records:
        return []
    names = run.meta.get("objective_names") or run.config.get("objectives", ["mean"])
    if len(records[0].objectives) > 1:
        kept = SearchResult(records, names).pareto()
    else:
        kept = sorted(records, key=rank_key)
    out, seen = [], set()
    for record in kept:
        key = json.dumps(record.genome, sort_keys=True)
        if key not in seen and (len(out) < per_run or len(record.objectives) > 1):
            seen.add(key)
            out.append(record)
    by_key = {f"{r.generation}/{r.index}": r for r in records}
    out += [by_key[k] for k in verified if k in by_key and by_key[k] not in out]
    return out


def _mean(scores: dict | None) -> float | None:
    return None if not scores else sum(scores.values()) / len(scores)


def _merge_rows(run: Run, per_run: int) -> list[dict]:
    meta, config = run.meta, run.config
    verified = run.verified()
    rows = []
    for record in _kept_records(run, per_run, verified):
        entry = verified.get(f"{record.generation}/{record.index}", {})
        search, test = entry.get("search"), entry.get("test")
        row = {
            "bank": Path(config["bank"]["path"]).name, "kind": "merge", "run": run.path.name,
            "candidate": f"gen {record.generation} #{record.index}", "methods": _methods(record.plan),
            "params": _params(record.plan), "verified": search is not None,
            "estimated_mean": record.mean, "search_mean": _mean(search), "test_mean": _mean(test),
            "items": record.items_evaluated, "run_items": meta.get("items_evaluated"),
            "run_full_bank_equivalent": meta.get("full_bank_equivalent"),
            "objectives": dict(zip(meta.get("objective_names") or config.get("objectives", []), record.objectives)),
            "genome": record.genome, "plan": record.plan,
        }
        row.update({f"est:{t}": v for t, v in record.scores.items()})
        row.update({f"search:{t}": v for t, v in (search or {}).items()})
        row.update({f"test:{t}": v for t, v in (test or {}).items()})
        rows.append(row)
    return rows


def _baseline_rows(runs: Sequence[Run], log: Callable[[str], None]) -> list[dict]:
    rows, done = [], set()
    for run in runs:
        config = run.config
        models = config["models"]
        same_task = same_task_method(config)
        group = (config["bank"]["path"], models.get("base"), tuple(models["endpoints"]), same_task)
        if group in done:
            continue
        done.add(group)
        try:
            recipes = best_per_method(score_baselines(config, log=log))
        except (Merge3Error, OSError) as e:
            log(f"warning: no baselines for run {run.path.name}: {e}")
            continue
        bank_items = len(ItemBank.load(config["bank"]["path"], warn=False))
        for recipe in recipes:
            merged = recipe.name != "base" and not recipe.name.startswith("endpoint")
            row = {"bank": Path(config["bank"]["path"]).name, "kind": "baseline", "run": "",
                   "candidate": recipe.name, "methods": recipe.method if merged else "",
                   "params": json.dumps(recipe.setting), "verified": True, "estimated_mean": None,
                   "search_mean": recipe.mean, "test_mean": recipe.test_mean, "items": bank_items}
            row.update({f"search:{t}": v for t, v in recipe.scores.items()})
            row.update({f"test:{t}": v for t, v in (recipe.test_scores or {}).items()})
            rows.append(row)
    return rows


def leaderboard(runs: str | os.PathLike | Iterable[str | os.PathLike] = "runs", *, task: str | None = None,
                top: int | None = None, verified_only: bool = False, baselines: bool = True, per_run: int = 5,
                log: Callable[[str], None] = lambda message: None) -> pd.DataFrame:
    """The best merges across runs as a DataFrame, sorted by bank and score (best first).

    ``runs``: run folders or folders of runs. ``task``: score by that task alone. ``top``: keep the best ``top``
    merges per bank (baselines always stay). ``verified_only``: only merges verified on both splits (``merge3
    verify``). ``baselines``: add the base, endpoints and best uniform recipes (computed once, cached in the bank).
    Columns: bank, kind, run, candidate, methods, score, score_on (test, search or estimate), verified,
    estimated_mean, search_mean, test_mean, gap (test − search: how much the search fitted its items), error
    (estimated − search), items (evaluated for that candidate), ``est:<task>``/``search:<task>``/``test:<task>``, …

    >>> import merge3
    >>> merge3.leaderboard("runs").head()  # doctest: +SKIP
    """
    paths = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    found, rows = [], []
    for run in find_runs(paths):
        try:  # one corrupt run must not cost the whole board
            rows += _merge_rows(run, per_run)
            found.append(run)
        except (Merge3Error, KeyError, TypeError, ValueError) as e:  # a record or file not as merge3 writes it
            log(f"warning: skipping run {run.path.name}: {e if isinstance(e, Merge3Error) else 'corrupt: ' + repr(e)}")
    if baselines:
        rows += _baseline_rows(found, log)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    if task is not None:
        columns = [c for c in frame.columns if c.startswith(_SCORE_PREFIXES)]
        known = sorted({c.split(":", 1)[1] for c in columns})
        if task not in known:
            raise Merge3Error(f"--task '{task}' is not a task of these runs (tasks: {', '.join(known)})")
    for column in ("estimated_mean", "search_mean", "test_mean"):
        frame[column] = frame[column].astype(float)
    est, search, test = (_column(frame, f"{prefix}:{task}") if task else frame[f"{name}_mean"]
                         for prefix, name in (("est", "estimated"), ("search", "search"), ("test", "test")))
    frame["score_on"] = np.where(test.notna(), "test", np.where(search.notna(), "search", "estimate"))
    frame["score"] = test.where(test.notna(), search.where(search.notna(), est)).astype(float)
    frame["gap"] = frame["test_mean"] - frame["search_mean"]
    frame["error"] = frame["estimated_mean"] - frame["search_mean"]
    if verified_only:
        frame = frame[frame["verified"]]
    frame["_tier"] = frame["score_on"].map({"test": 0, "search": 1, "estimate": 2})
    frame = frame.sort_values(["bank", "_tier", "score"], ascending=[True, True, False], kind="stable").drop(columns="_tier")
    if top is not None:
        is_merge = frame["kind"] == "merge"
        rank = frame[is_merge].groupby("bank").cumcount()
        frame = frame[~is_merge | frame.index.isin(rank[rank < top].index)]
    first = ["bank", "kind", "run", "candidate", "methods", "score", "score_on", "verified", "estimated_mean",
             "search_mean", "test_mean", "gap", "error", "items"]
    rest = [c for c in frame.columns if c not in first]
    return frame[first + sorted(c for c in rest if ":" in c) + [c for c in rest if ":" not in c]].reset_index(drop=True)


_SCORE_PREFIXES = ("est:", "search:", "test:")


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name].astype(float) if name in frame else pd.Series(np.nan, index=frame.index)


# ---- output -----------------------------------------------------------------------------------------------------
_STRUCTURED = ("objectives", "genome", "plan")


def _flat(frame: pd.DataFrame) -> pd.DataFrame:
    """Nested columns as JSON text, for the flat formats."""
    out = frame.copy()
    for column in _STRUCTURED:
        if column in out:
            out[column] = out[column].map(lambda v: json.dumps(v) if isinstance(v, (dict, list)) else "")
    return out


def _summary_columns(frame: pd.DataFrame, task: str | None) -> list[str]:
    tasks = [c for c in frame.columns if c.startswith(_SCORE_PREFIXES)]
    shown = ["bank", "kind", "run", "candidate", "methods", "score", "score_on", "verified", "estimated_mean",
             "search_mean", "test_mean", "gap", "error", "items"]
    if task is None:
        names = list(dict.fromkeys(c.split(":", 1)[1] for c in tasks))
        shown += [f"test:{t}" for t in names if f"test:{t}" in frame]
    return [c for c in shown if c in frame]


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(column, v):
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return ""
        if column == "items":
            return str(int(v))
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(frame.columns, row)) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def format_leaderboard(frame: pd.DataFrame, fmt: str, task: str | None = None) -> str:
    """The leaderboard as csv, markdown (the summary columns), json (every column, records) or html text."""
    if fmt == "csv":
        return _flat(frame).to_csv(index=False)
    if fmt == "json":
        return "[]\n" if frame.empty else frame.to_json(orient="records", indent=2, force_ascii=False) + "\n"
    if fmt == "markdown":
        return markdown_table(frame[_summary_columns(frame, task)])
    if fmt == "html":
        buffer = io.StringIO()
        _flat(frame).to_html(buffer, index=False, na_rep="", float_format=lambda v: f"{v:.4f}")
        return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>merge3 leaderboard</title></head><body>\n"
                + buffer.getvalue() + "\n</body></html>\n")
    raise Merge3Error(f"unknown format '{fmt}' (choose from {', '.join(FORMATS)})")


def print_leaderboard(frame: pd.DataFrame, console, task: str | None = None) -> None:
    """A rich table per bank: rank, merge, methods, estimate, search-split score, test score, gap (test − search),
    items evaluated; per-task test scores too when the terminal is wide enough."""
    from rich.table import Table

    if frame.empty:
        console.print("no runs with successful candidates found")
        return
    for bank, rows in frame.groupby("bank", sort=False):
        tasks = [c for c in rows.columns if c.startswith("test:") and rows[c].notna().any()] if task is None else []
        if console.width < 100 + 8 * len(tasks):
            tasks = []
        split_note = "" if rows["test_mean"].notna().any() else " (no test split: search split only)"
        table = Table(title=f"leaderboard — bank {bank}" + (f", task {task}" if task else "") + split_note,
                      caption="est. = cheap fitness; search = every search item (what the search optimised); "
                              "test = items no search saw; gap = test − search")
        numbers = [("est.", "estimated_mean"), ("search", "search_mean"), ("test", "test_mean"), ("items", "items")]
        if console.width >= 100:  # a narrow terminal keeps the three scores
            numbers[3:3] = [("gap", "gap")]
        numbers += [(c.split(":", 1)[1], c) for c in tasks]
        table.add_column("#", justify="right", no_wrap=True)
        table.add_column("merge", no_wrap=True, overflow="ellipsis", max_width=30)
        table.add_column("methods", overflow="fold", min_width=8, max_width=34)
        for name, _ in numbers:
            table.add_column(name, justify="right", no_wrap=True, min_width=5)
        several_runs = rows["run"].replace("", np.nan).nunique() > 1
        for rank, r in enumerate(rows.to_dict("records"), 1):
            merge = r["candidate"] if r["kind"] == "baseline" or not several_runs else f"{r['run']} {r['candidate']}"
            table.add_row(str(rank), merge, _short_methods(r["methods"]), *(_cell(name, r[key]) for name, key in numbers),
                          style="dim" if r["kind"] == "baseline" else None)
        console.print(table)


def _short_methods(methods: str) -> str:
    labels = {name: m.label for name, m in registered().items()}
    for name, label in sorted(labels.items(), key=lambda kv: -len(kv[0])):
        methods = methods.replace(name, label)
    return re.sub(r" \(all (\d+) groups\)", r" ×\1", methods)


def _cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if column == "items":
        return f"{int(value):,}"
    if column in ("error", "gap"):
        return f"{value:+.3f}"
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}"
    return str(value)


__all__ = ["FORMATS", "find_runs", "format_leaderboard", "leaderboard", "markdown_table", "print_leaderboard"]
