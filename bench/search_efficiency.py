"""Cheap-fitness search vs full-fitness search vs fixed recipes, side by side on one machine.

For a workload (the digits zoo, or the MiniLM text zoo with ``--workload minilm``):
- baselines: base, each endpoint, uniform TA / TIES / DARE / TSV-M with λ (and density/drop) grid-searched on the
  full bank (merge3.runs.baselines);
- full-fitness evolution: every candidate scored on the whole bank, budget B = population × generations;
- reduced-fitness evolution: n anchor items per task (n = 20 and 10; naive uses a random subset), one run per
  estimator (naive, p-IRT, gp-IRT, mp-IRT, gmp-IRT) and n, the same B candidates;
each for several seeds. The number reported for a search is the **full-bank** score of its final best merge: the top
candidate by the search's own fitness ("top-1"), and the best of its top 3 after verifying them on the full bank
("top-3 verified", what `merge3 demo` does; 3 more full-bank evaluations).

    python bench/search_efficiency.py [--workload digits|minilm] [--genome layer|rows] [--seeds 0 1 2] [--quick]

``--genome rows`` searches the finer space instead: one TSV weight per task and block of 64 output neurons
(``row_blocks: 16``, 160 coefficients on the digits encoder) with merge3's CMA-ES, instead of one weight per task
and layer plus a method choice with the GA.

Writes bench/results/search_efficiency[_minilm|_digits_rows][_g<N>].json and .png (quality vs items evaluated) and prints a table.
Target: ≥ 98 % of full-evolution quality at ≥ 50× fewer items.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from merge3.models import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / ".cache" / "search_efficiency"
ESTIMATORS = ["naive", "p-irt", "gp-irt", "mp-irt", "gmp-irt"]


def digits_workload(args) -> dict:
    from merge3.search._calibrate import CalibrationSettings, calibrate_bank
    from merge3.zoo import build_digits_zoo

    zoo = build_digits_zoo(ROOT / "zoo" / "digits", ROOT / "item_banks", log=lambda *a: None)
    names = list(zoo.finetuned)
    endpoints = [str(p) for p in zoo.finetuned.values()]
    calibrate_bank(zoo.bank, str(zoo.base), endpoints, CalibrationSettings(), names=names, log=print,
                   fit_threads=os.cpu_count())
    return {"name": "digits", "base": str(zoo.base), "endpoints": endpoints, "names": names, "bank": str(zoo.bank),
            "methods": ["task_arithmetic", "ties", "tsv_merge"], "weights": {"low": 0.0, "high": 2.5},
            "population": 10 if args.quick else 20, "generations": 5 if args.quick else 15, "items_per_task": 20}


def minilm_workload(args) -> dict:
    from merge3.search._calibrate import CalibrationSettings, calibrate_bank
    from merge3.zoo import build_minilm_zoo

    zoo = build_minilm_zoo(ROOT / "zoo" / "minilm", ROOT / "item_banks", log=print)
    names = list(zoo.finetuned)
    endpoints = [str(p) for p in zoo.finetuned.values()]
    # Every calibration subject answers the whole bank (~12 s each on one core): a small calibration set.
    settings = CalibrationSettings(random_merges=args.minilm_random_merges, recipe_scales=[0.5, 1.0, 1.5],
                                   methods=["task_arithmetic", "ties", "tsv_merge"], ns=[20], dims=1)
    calibrate_bank(zoo.bank, str(zoo.base), endpoints, settings, names=names, log=print, fit_threads=os.cpu_count())
    return {"name": "minilm", "base": str(zoo.base), "endpoints": endpoints, "names": names, "bank": str(zoo.bank),
            "methods": ["task_arithmetic", "ties", "tsv_merge"], "weights": {"low": 0.0, "high": 2.0},
            "population": 6 if args.quick else 8, "generations": 3 if args.quick else 6, "items_per_task": 20}


def space(work: dict, estimator: str, seed: int, n: int | None = None) -> dict:
    full = estimator == "full"
    return {
        "name": f"{work['name']}-{estimator}", "seed": seed,
        "models": {"base": work["base"], "endpoints": work["endpoints"], "names": work["names"]},
        "bank": {"path": work["bank"], "estimator": estimator, "items_per_task": None if full else n or work["items_per_task"],
                 "subset": "random" if estimator == "naive" else "anchor"},
        "genome": {"granularity": "layer", "methods": work["methods"], "weights": work["weights"],
                   "row_blocks": work.get("row_blocks", 1)},
        "objectives": ["mean"],
        "engine": {**work.get("engine", {"name": "pymoo"}), "population": work["population"],
                   "generations": work["generations"]},
        "executor": {"kind": "local"},
    }


def run_search(work: dict, estimator: str, seed: int, runs_dir: Path, n: int | None) -> dict:
    import merge3
    from merge3._api import verify

    started = time.perf_counter()
    label = estimator if n is None else f"{estimator} n={n}"
    outcome = merge3.search(space(work, estimator, seed, n), runs_dir=runs_dir,
                            name=f"{estimator}-s{seed}" + ("" if n is None else f"-n{n}"), progress=False)
    search_s = time.perf_counter() - started
    verified = verify(outcome.run.path, top=3, log=lambda *a: None)
    top1 = verified[0]  # verify returns the top candidates in the search's own order
    return {"estimator": label, "n_per_task": n, "seed": seed, "candidates": len(outcome.result.records),
            "items": outcome.result.items_evaluated, "search_seconds": round(search_s, 1),
            "estimated": top1["estimated_mean"], "top1": top1["true_mean"],
            "top3_verified": max(v["true_mean"] for v in verified), "verify_items": sum(v["items"] for v in verified)}


def summarise(rows: list[dict], full_key: str = "full") -> list[dict]:
    out = []
    full = [r for r in rows if r["estimator"] == full_key]
    for estimator in dict.fromkeys(r["estimator"] for r in rows):
        mine = [r for r in rows if r["estimator"] == estimator]
        entry = {"estimator": estimator, "seeds": len(mine), "items": float(np.mean([r["items"] for r in mine])),
                 "search_seconds": float(np.mean([r["search_seconds"] for r in mine]))}
        for key in ("top1", "top3_verified"):
            values = [r[key] for r in mine]
            entry[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
            if full:
                entry[f"{key}_quality_ratio"] = float(np.mean(values) / np.mean([r[key] for r in full]))
        if full:
            # top-3 verified pays for its 3 full-bank evaluations too (the full search needs none: it already knows)
            entry["cost_ratio"] = float(np.mean([r["items"] for r in full]) / entry["items"])
            verify_items = float(np.mean([r["verify_items"] for r in mine])) if estimator != full_key else 0.0
            entry["cost_ratio_with_verify"] = float(np.mean([r["items"] for r in full]) / (entry["items"] + verify_items))
        out.append(entry)
    return out


def plot(summary: list[dict], baselines: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    colours = {name: f"C{k}" for k, name in enumerate(["full", *ESTIMATORS])}
    for s in summary:
        name, _, n = s["estimator"].partition(" n=")
        marker = "*" if name == "full" else {"20": "o", "10": "s"}.get(n, "^")
        jitter = 1.0 + 0.04 * (list(colours).index(name) - 3)  # side by side at equal cost
        ax.errorbar(s["items"] * jitter, s["top3_verified"]["mean"], yerr=s["top3_verified"]["std"], fmt=marker,
                    capsize=3, color=colours.get(name, "k"), markersize=9 if name == "full" else 6,
                    label=f"{s['estimator']}")
    for b, style in zip(baselines, ("--", ":", "-.", (0, (1, 3)))):
        ax.axhline(b["mean"], linestyle=style, color="grey", linewidth=1)
        ax.text(min(s["items"] for s in summary), b["mean"], f" {b['name']}", va="bottom", fontsize=7, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("items evaluated by the search (log scale)")
    ax.set_ylabel("full-bank mean accuracy of the final merge")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2, title="fitness (○ n=20, □ n=10 items/task)", title_fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_text_atomic(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["digits", "minilm"], default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--estimators", nargs="+", default=ESTIMATORS)
    parser.add_argument("--ns", type=int, nargs="+", default=[20, 10], help="items per task for the cheap searches")
    parser.add_argument("--minilm-random-merges", type=int, default=30)
    parser.add_argument("--genome", choices=["layer", "rows"], default="layer",
                        help="rows: 16 row blocks per layer, TSV only, CMA-ES (digits)")
    parser.add_argument("--generations", type=int, default=None,
                        help="override the workload's generations (results get a _g<N> suffix)")
    parser.add_argument("--quick", action="store_true", help="a smaller budget, for a smoke run")
    parser.add_argument("--extend", action="store_true", help="add these seeds to the stored results instead of "
                                                                "replacing them (same workload and budget)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from rich.console import Console
    from rich.table import Table

    from merge3.runs import baselines, best_per_method

    started = time.perf_counter()
    work = digits_workload(args) if args.workload == "digits" else minilm_workload(args)
    if args.genome == "rows":
        work.update(name=f"{work['name']}_rows", methods=["tsv_merge"], weights={"low": 0.0, "high": 3.0},
                    row_blocks=16, engine={"name": "cmaes"})
    if args.generations:
        work.update(name=f"{work['name']}_g{args.generations}", generations=args.generations)
    runs_dir = WORK / work["name"]
    if not args.extend:
        shutil.rmtree(runs_dir, ignore_errors=True)  # bench scratch, not user runs
    suffix = ("" if work["name"] == "digits" else f"_{work['name']}") + ("_quick" if args.quick else "")
    path = RESULTS / f"search_efficiency{suffix}.json"
    rows = []
    if args.extend and path.exists():  # keep the stored seeds' runs (same workload and budget), add these seeds
        stored = json.loads(path.read_text())
        rows = [r for r in stored["runs"] if r["seed"] not in args.seeds]
    for seed in args.seeds:
        for estimator, n in [("full", None), *((e, n) for n in args.ns for e in args.estimators)]:
            row = run_search(work, estimator, seed, runs_dir, n)
            print(f"{row['estimator']:14s} seed {seed}: top-1 {row['top1']:.4f}, top-3 verified {row['top3_verified']:.4f}, "
                  f"{row['items']:,} items, {row['search_seconds']} s", flush=True)
            rows.append(row)
    recipes = baselines(space(work, "full", 0), log=print)
    best = [{"name": b.name, "method": b.method, "mean": b.mean, "scores": b.scores} for b in best_per_method(recipes)]
    summary = summarise(rows)
    seeds = sorted({r["seed"] for r in rows})
    budget = max(r["candidates"] for r in rows)  # population × generations, less for CMA-ES's small first generation
    result = {
        "workload": work["name"], "budget_candidates": budget, "items_per_task": args.ns,
        "seeds": seeds, "quick": args.quick, "baselines": best, "runs": rows, "summary": summary,
        "target": ">= 98% of full-evolution quality at >= 50x fewer items",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    top_recipes = sorted([b for b in best if b["name"] != "base" and not b["name"].startswith("endpoint")],
                         key=lambda b: -b["mean"])
    plot(summary, top_recipes[:2], path.with_suffix(".png"),
         f"{work['name']}: {budget} candidates per search, {len(seeds)} seed(s)")

    table = Table(title=f"search efficiency — {work['name']} ({budget} candidates per search, seeds {seeds})")
    for column in ("fitness", "items / search", "top-1 (full bank)", "top-3 verified", "quality vs full (top-1 / top-3)",
                   "fewer items (top-1 / top-3)", "search s"):
        table.add_column(column, justify="right")
    for s in summary:
        table.add_row(s["estimator"], f"{s['items']:,.0f}", f"{s['top1']['mean']:.4f} ± {s['top1']['std']:.4f}",
                      f"{s['top3_verified']['mean']:.4f} ± {s['top3_verified']['std']:.4f}",
                      f"{s.get('top1_quality_ratio', float('nan')):.1%} / {s.get('top3_verified_quality_ratio', float('nan')):.1%}",
                      f"{s.get('cost_ratio', 1):.0f}× / {s.get('cost_ratio_with_verify', 1):.0f}×",
                      f"{s['search_seconds']:.0f}")
    for b in best:
        table.add_row(f"[dim]{b['name']}[/dim]", "—", "—", f"[dim]{b['mean']:.4f}[/dim]", "", "", "")
    Console(width=140).print(table)
    print(f"results: {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
