"""``runs/<id>/report.html``: one self-contained page (images inlined) on what a search found and what it cost, with
the same plots as PNGs in ``runs/<id>/report/`` for people who read in a terminal.

Plots: convergence (best so far and generation mean of the first objective, the search-split and test scores of
verified candidates, and the best fixed recipe as a line), the Pareto front (multi-objective runs), the best genome
per layer group (weights and method), the estimator's error (estimated vs search-split score of verified
candidates, per task) and the cost (items evaluated vs what scoring every candidate on every search item would have
taken). Every number says which split it is on: estimates and "search" scores are on the items the search
optimised, "test" scores on items it never saw.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from merge3._errors import Merge3Error
from merge3.methods import has_row_blocks, mean_weight
from merge3.models import write_text_atomic
from merge3.search import Evaluation, rank_key
from merge3.runs._baselines import Baseline, best_recipe
from merge3.runs._baselines import baselines as cached_baselines
from merge3.runs._run import Run


def _figure(width: float = 6.4, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def convergence_plot(records: list[Evaluation], verified: dict, objective: str, recipe: Baseline | None = None) -> bytes:
    generations = sorted({r.generation for r in records})
    best, mean, so_far = [], [], -np.inf
    for g in generations:
        values = [r.objectives[0] for r in records if r.generation == g]
        so_far = max(so_far, max(values))
        best.append(so_far)
        mean.append(float(np.mean(values)))
    fig, ax = _figure()
    ax.plot(generations, best, marker="o", label=f"best so far (estimated {objective})")
    ax.plot(generations, mean, marker=".", linestyle="--", label="generation mean (estimated)")
    if verified:
        v = sorted(verified.values(), key=lambda x: x["generation"])
        ax.scatter([x["generation"] for x in v], [x["estimated_mean"] for x in v], marker="x", color="C3",
                   label="verified: estimate", zorder=3)
        ax.scatter([x["generation"] for x in v], [x["search_mean"] for x in v], marker="*", s=120, color="C2",
                   label="verified: every search item", zorder=3)
        tested = [x for x in v if x.get("test_mean") is not None]
        if tested:
            ax.scatter([x["generation"] for x in tested], [x["test_mean"] for x in tested], marker="D", s=50,
                       color="C4", label="verified: test split (unseen)", zorder=3)
    if recipe is not None and objective == "mean":
        ax.axhline(recipe.mean, color="C7", linestyle=":", label=f"best fixed recipe {recipe.name}: search split")
        if recipe.test_mean is not None:
            ax.axhline(recipe.test_mean, color="C4", linestyle=":", alpha=0.7,
                       label=f"best fixed recipe: test {recipe.test_mean:.3f}")
    ax.set_xlabel("generation")
    ax.set_ylabel("mean accuracy" if objective == "mean" else objective)
    ax.set_title("convergence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def pareto_plot(records: list[Evaluation], names: list[str]) -> bytes:
    from merge3.search import SearchResult

    values = np.array([r.objectives[:2] for r in records], dtype=float)
    front = np.array([r.objectives[:2] for r in SearchResult(records, names).pareto()], dtype=float)
    front = front[np.argsort(front[:, 0])]
    fig, ax = _figure()
    ax.scatter(values[:, 0], values[:, 1], s=10, alpha=0.4, label="all candidates")
    if len(names) == 2:
        ax.plot(front[:, 0], front[:, 1], marker="o", color="C3", label="Pareto front")
        ax.set_title("Pareto front (both maximised)")
    else:  # a front in more dimensions, seen along its first two
        ax.scatter(front[:, 0], front[:, 1], marker="o", color="C3", label=f"non-dominated in all {len(names)} objectives")
        ax.set_title(f"Pareto front, projected on the first 2 of {len(names)} objectives")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def genome_plot(record: Evaluation, endpoint_names: list[str]) -> bytes:
    plan = record.plan
    weights = np.array([[mean_weight(w) for w in g["params"].get("weights", [np.nan] * len(endpoint_names))]
                        for g in plan], dtype=float)
    row_blocks = any(has_row_blocks(g["params"]) for g in plan)
    fig, ax = _figure(max(5.0, 1.1 * len(endpoint_names) + 3), max(2.5, 0.45 * len(plan) + 1.5))
    image = ax.imshow(weights, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="endpoint weight" + (" (mean over row blocks)" if row_blocks else ""))
    ax.set_xticks(range(len(endpoint_names)), endpoint_names, rotation=30, ha="right")
    labels = []
    for g in plan:
        extra = " ".join(f"{k}={v:.2f}" for k, v in g["params"].items() if k != "weights" and isinstance(v, float))
        labels.append(f"{g['group']}: {g['method']}" + (f" ({extra})" if extra else ""))
    ax.set_yticks(range(len(plan)), labels, fontsize=8)
    for (i, j), w in np.ndenumerate(weights):
        if np.isfinite(w):
            ax.text(j, i, f"{w:.2f}", ha="center", va="center", color="white", fontsize=7)
    ax.set_title("best genome: method and weights per layer group")
    return _png(fig)


def error_plot(verified: dict) -> bytes:
    fig, ax = _figure(5.0, 5.0)
    tasks = list(next(iter(verified.values()))["search"])
    for k, task in enumerate(tasks):
        ax.scatter([v["search"][task] for v in verified.values()], [v["estimated"][task] for v in verified.values()],
                   label=task, color=f"C{k}", s=20)
    ax.scatter([v["search_mean"] for v in verified.values()], [v["estimated_mean"] for v in verified.values()],
               marker="*", s=150, color="black", label="mean")
    low = min(min(v["search"].values()) for v in verified.values()) - 0.05
    high = max(max(v["search"].values()) for v in verified.values()) + 0.05
    ax.plot([low, high], [low, high], color="grey", linewidth=1)
    ax.set_xlabel("accuracy on every search-split item")
    ax.set_ylabel("estimated accuracy")
    ax.set_title("estimator error on verified candidates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def cost_plot(items: int, full: int) -> bytes:
    fig, ax = _figure(5.0, 3.0)
    ax.barh(["this search", "every search item"], [items, full], color=["C2", "C7"])
    ax.set_xscale("log")
    ax.set_xlabel("items evaluated (log scale)")
    ax.set_title(f"cost: {full / max(items, 1):.0f}× fewer item evaluations")
    for y, value in enumerate([items, full]):
        ax.text(value, y, f" {value:,}", va="center", fontsize=8)
    return _png(fig)


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}.note{color:#666}"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` and ``report/*.png`` for a run (again after ``merge3 verify``); returns the HTML path.

    >>> write_report("runs/demo-s0-20260101-120000")  # doctest: +SKIP
    PosixPath('runs/demo-s0-20260101-120000/report.html')
    """
    run = Run.open(run_dir)
    config, meta = run.config, run.meta
    every = run.records()
    if not every and (run.path / "report.html").exists():  # e.g. a cut first line: keep the report that was made
        raise Merge3Error(f"run '{run.path}' has no readable evaluation in {run.path / 'evaluations.jsonl'}: "
                          "its report.html is kept as it is")
    records = [r for r in every if r.error is None]
    verified = run.verified()
    names = meta.get("objective_names") or config.get("objectives", ["mean"])  # 'per_task' expands to tasks
    endpoint_names = config["models"].get("names") or [Path(p).name for p in config["models"]["endpoints"]]
    recipe = _best_recipe(config)
    plots: dict[str, tuple[str, bytes]] = {}
    notes = []
    if records:
        plots["convergence"] = ("Convergence", convergence_plot(records, verified, names[0], recipe))
        if len(records[0].objectives) > 1:
            plots["pareto"] = ("Pareto front", pareto_plot(records, names))
        best = min(records, key=rank_key)
        plots["genome"] = ("Best genome per layer group", genome_plot(best, endpoint_names))
    else:
        notes.append("No candidate was evaluated successfully yet.")
    if verified:
        plots["estimator_error"] = ("Estimated vs search-split accuracy", error_plot(verified))
    else:
        notes.append(f"No candidate verified yet: run `merge3 verify {run.path}` to score the best on every search "
                     "item and on the test split.")
    if recipe is None:
        notes.append("The fixed-recipe baselines are not computed yet: `merge3 verify` or `merge3 leaderboard` "
                     "computes them (once per bank).")
    items = sum(r.items_evaluated for r in run.records())
    full = meta.get("full_bank_equivalent") or 0
    if items and full:
        plots["cost"] = ("Cost", cost_plot(items, full))

    folder = run.path / "report"
    for name, (_, png) in plots.items():
        write_text_atomic(folder / f"{name}.png", png)
    tested = [v for v in verified.values() if v.get("test_mean") is not None]
    split = "none — every score is on the search split only" if verified and not tested else "search / test"
    summary = [
        ["run", run.path.name], ["status", meta.get("status", "?")], ["engine", meta.get("engine", "?")],
        ["objectives", ", ".join(names)], ["candidates", len(run.records())],
        ["items evaluated", f"{items:,}"], ["every search item for every candidate", f"{full:,}" if full else "—"],
        ["cost ratio", f"{full / items:.1f}×" if items and full else "—"],
        ["wall time", f"{meta['wall_seconds']:.1f} s" if "wall_seconds" in meta else "—"],
        ["bank", config["bank"]["path"]], ["bank splits", split],
        ["fitness", f"{config['bank'].get('estimator')} on {config['bank'].get('items_per_task')} search items per task"],
    ]
    if tested:
        top = max(tested, key=lambda v: v["test_mean"])
        gaps = [v["test_mean"] - v["search_mean"] for v in tested]
        summary.append(["best verified merge, test split", f"{top['test_mean']:.4f} (gen {top['generation']} "
                                                           f"#{top['index']})"])
        summary.append(["generalisation gap (test − search), verified merges",
                        f"{np.mean(gaps):+.4f} (from {min(gaps):+.4f} to {max(gaps):+.4f})"])
        if recipe is not None and recipe.test_mean is not None:
            summary.append([f"margin over the best fixed recipe ({recipe.name}), test split",
                            f"{top['test_mean'] - recipe.test_mean:+.4f}"])
    parts = [f"<h1>merge3 run {html.escape(run.path.name)}</h1>", _table(summary, ["", ""])]
    if records:
        top_records = sorted(records, key=rank_key)[:5]
        rows = []
        for r in top_records:
            v = verified.get(f"{r.generation}/{r.index}") or {}
            rows.append([f"gen {r.generation} #{r.index}", ", ".join(f"{g['group']}={g['method']}" for g in r.plan),
                         *(f"{x:.4f}" for x in r.objectives), _fmt(v.get("search_mean")), _fmt(v.get("test_mean")),
                         r.items_evaluated])
        if recipe is not None:
            rows.append([f"best fixed recipe: {recipe.name}", recipe.method, *(["—"] * len(names)), _fmt(recipe.mean),
                         _fmt(recipe.test_mean), "every item"])
        parts += ["<h2>Best candidates</h2>", _table(rows, ["candidate", "methods", *(f"{n} (estimated)" for n in names),
                                                           "search split", "test split (unseen)", "items"])]
    for name, (title, png) in plots.items():
        data = base64.b64encode(png).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{name}' src='data:image/png;base64,{data}'>")
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts.append(f"<p class='note'>PNG copies: {html.escape(str(folder))}/. Every evaluation: evaluations.jsonl; "
                 f"config: config.yaml.</p>")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>merge3 {html.escape(run.path.name)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = run.path / "report.html"
    write_text_atomic(path, page)
    return path


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _best_recipe(config: dict) -> Baseline | None:
    """The best fixed recipe on the search split, if the bank's baselines are cached (a report never computes them)."""
    try:
        rows = cached_baselines(config, compute=False, log=lambda m: None)
    except Exception:  # noqa: BLE001  (a report is a view: a missing model file must not stop it)
        return None
    return best_recipe(rows) if rows else None


__all__ = ["write_report"]
