"""``runs/<id>/report.html``: one self-contained page (images inlined) on what a search found and what it cost, with
the same plots as PNGs in ``runs/<id>/report/`` for people who read in a terminal.

Plots: convergence (best so far and generation mean of the first objective, with the full-bank scores of verified
candidates), the Pareto front (multi-objective runs), the best genome per layer group (weights and method), the
estimator's error (estimated vs full-bank score of verified candidates, per task) and the cost (items evaluated vs
what scoring every candidate on the full bank would have taken).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from merge3.methods import has_row_blocks, mean_weight
from merge3.models import write_text_atomic
from merge3.runs._leaderboard import verified_scores
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


def convergence_plot(records: list[dict], verified: dict, objective: str) -> bytes:
    generations = sorted({r["generation"] for r in records})
    best, mean, so_far = [], [], -np.inf
    for g in generations:
        values = [r["objectives"][0] for r in records if r["generation"] == g]
        so_far = max(so_far, max(values))
        best.append(so_far)
        mean.append(float(np.mean(values)))
    fig, ax = _figure()
    ax.plot(generations, best, marker="o", label=f"best so far (estimated {objective})")
    ax.plot(generations, mean, marker=".", linestyle="--", label="generation mean (estimated)")
    if verified:
        v = sorted(verified.values(), key=lambda x: x["generation"])
        ax.scatter([x["generation"] for x in v], [x["estimated_mean"] for x in v], marker="x", color="C3",
                   label="verified candidates: estimate", zorder=3)
        ax.scatter([x["generation"] for x in v], [x["true_mean"] for x in v], marker="*", s=120, color="C2",
                   label="verified candidates: full bank", zorder=3)
    ax.set_xlabel("generation")
    ax.set_ylabel("mean accuracy" if objective == "mean" else objective)
    ax.set_title("convergence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def pareto_plot(records: list[dict], names: list[str]) -> bytes:
    from merge3.search import SearchResult

    values = np.array([r["objectives"][:2] for r in records], dtype=float)
    front = np.array([r["objectives"][:2] for r in SearchResult(records, names).pareto()], dtype=float)
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


def genome_plot(record: dict, endpoint_names: list[str]) -> bytes:
    plan = record["plan"]
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
    tasks = list(next(iter(verified.values()))["true"])
    for k, task in enumerate(tasks):
        ax.scatter([v["true"][task] for v in verified.values()], [v["estimated"][task] for v in verified.values()],
                   label=task, color=f"C{k}", s=20)
    ax.scatter([v["true_mean"] for v in verified.values()], [v["estimated_mean"] for v in verified.values()],
               marker="*", s=150, color="black", label="mean")
    low = min(min(v["true"].values()) for v in verified.values()) - 0.05
    high = max(max(v["true"].values()) for v in verified.values()) + 0.05
    ax.plot([low, high], [low, high], color="grey", linewidth=1)
    ax.set_xlabel("full-bank accuracy")
    ax.set_ylabel("estimated accuracy")
    ax.set_title("estimator error on verified candidates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def cost_plot(items: int, full: int) -> bytes:
    fig, ax = _figure(5.0, 3.0)
    ax.barh(["this search", "full-bank evolution"], [items, full], color=["C2", "C7"])
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
    records = [r for r in run.records() if r["error"] is None]
    verified = verified_scores(run)
    names = meta.get("objective_names") or config.get("objectives", ["mean"])  # 'per_task' expands to tasks
    endpoint_names = config["models"].get("names") or [Path(p).name for p in config["models"]["endpoints"]]
    plots: dict[str, tuple[str, bytes]] = {}
    notes = []
    if records:
        plots["convergence"] = ("Convergence", convergence_plot(records, verified, names[0]))
        if len(records[0]["objectives"]) > 1:
            plots["pareto"] = ("Pareto front", pareto_plot(records, names))
        best = max(records, key=lambda r: r["objectives"][0])
        plots["genome"] = ("Best genome per layer group", genome_plot(best, endpoint_names))
    else:
        notes.append("No candidate was evaluated successfully yet.")
    if verified:
        plots["estimator_error"] = ("Estimated vs full-bank accuracy", error_plot(verified))
    else:
        notes.append(f"No candidate verified on the full bank yet: run `merge3 verify {run.path}`.")
    items = sum(r["items_evaluated"] for r in run.records())
    full = meta.get("full_bank_equivalent") or 0
    if items and full:
        plots["cost"] = ("Cost", cost_plot(items, full))

    folder = run.path / "report"
    for name, (_, png) in plots.items():
        write_text_atomic(folder / f"{name}.png", png)
    summary = [
        ["run", run.path.name], ["status", meta.get("status", "?")], ["engine", meta.get("engine", "?")],
        ["objectives", ", ".join(names)], ["candidates", len(run.records())],
        ["items evaluated", f"{items:,}"], ["full-bank equivalent", f"{full:,}" if full else "—"],
        ["cost ratio", f"{full / items:.1f}×" if items and full else "—"],
        ["wall time", f"{meta['wall_seconds']:.1f} s" if "wall_seconds" in meta else "—"],
        ["bank", config["bank"]["path"]], ["estimator", f"{config['bank'].get('estimator')} on "
                                          f"{config['bank'].get('items_per_task')} items per task"],
    ]
    parts = [f"<h1>merge3 run {html.escape(run.path.name)}</h1>", _table(summary, ["", ""])]
    if records:
        top = sorted(records, key=lambda r: -r["objectives"][0])[:5]
        rows = []
        for r in top:
            v = verified.get(f"{r['generation']}/{r['index']}")
            rows.append([f"gen {r['generation']} #{r['index']}", ", ".join(f"{g['group']}={g['method']}" for g in r["plan"]),
                         *(f"{x:.4f}" for x in r["objectives"]), f"{v['true_mean']:.4f}" if v else "—",
                         r["items_evaluated"]])
        parts += ["<h2>Best candidates</h2>", _table(rows, ["candidate", "methods", *names, "full bank", "items"])]
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


__all__ = ["write_report"]
