"""How well each fitness strategy estimates merges the calibration never saw — above all the merges a search visits.

The bank's stored calibration (base, endpoints, uniform recipes, random per-layer merges; search split only) is the
item model. Unseen merges, each answering every item of both splits once (answers are deterministic, so a
strategy's items are looked up, not re-run):

- ``random-layer``: random per-layer merges like the calibration's (another seed);
- ``mixed-layer``: per-layer mixed-method merges at full strength (weights 0–2.5, no overall shrink);
- ``random-rows``: TSV-M with one weight per task and block of 64 neurons, uniform in [0.8, 2.6];
- ``visited-rows`` / ``visited-layer``: distinct candidates of a row-block CMA-ES search and a per-layer GA search
  (full fitness, run here on the search split) — where a search selects.

Strategies (what a candidate answers and how it is scored): the fixed subsets of a calibration, fresh random items
(a new draw per candidate), adaptive testing (CAT), and each of those after **online recalibration**: the item model
refitted on the sparse answers the *other* half of the unseen merges gave (2-fold, as a search's own candidates would
give them). Per strategy and group: MAE against the merge's accuracy on every search item (the estimate's target)
and on the test split, the bias and Spearman of the best quarter (by true accuracy: where a search selects), and
the items answered per candidate (share of the search split).

    python bench/estimator_fidelity.py [--bank item_banks/digits] [--zoo zoo/digits] [--quick]

Writes bench/results/estimator_fidelity.json and .png and prints a table. Targets (issue "fitness that keeps up"):
MAE ≤ 0.015, |bias| of the top quarter ≤ 0.01, top-quarter Spearman ≥ 0.7, at ≤ 2.5 % of the search split per
candidate on average.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time

from pathlib import Path

import numpy as np
import torch

from merge3.models import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "estimator_fidelity.json"
WORK = ROOT / "bench" / ".cache" / "estimator_fidelity"
TARGET = {"mae": 0.015, "top_bias": 0.01, "top_spearman": 0.7, "share": 0.025}


def unseen_plans(groups: list[str], n_models: int, seed: int, sizes: dict[str, int]) -> list[tuple[str, list[dict]]]:
    from merge3.search import Genome

    rng = np.random.default_rng(seed)
    plans = []
    random_genome = Genome(groups, ["task_arithmetic", "ties", "dare", "tsv_merge"], n_models, weight_range=(0.0, 2.5),
                           fixed={"dare.seed": 0})
    for _ in range(sizes["random-layer"]):
        plan = [c.as_dict() for c in random_genome.decode(random_genome.sample(rng))]
        strength = rng.uniform(0.15, 1.0)  # as the calibration's random merges
        for group in plan:
            group["params"]["weights"] = [w * strength for w in group["params"].get("weights", [])]
        plans.append(("random-layer", plan))
    mixed = Genome(groups, ["task_arithmetic", "ties", "tsv_merge"], n_models, weight_range=(0.0, 2.5))
    plans += [("mixed-layer", [c.as_dict() for c in mixed.decode(mixed.sample(rng))]) for _ in range(sizes["mixed-layer"])]
    for _ in range(sizes["random-rows"]):
        plans.append(("random-rows", [{"group": g, "method": "tsv_merge", "params": {
            "weights": [{"row_blocks": rng.uniform(0.8, 2.6, 16).tolist()} for _ in range(n_models)]}} for g in groups]))
    return plans


def visited_plans(work: dict, genome: str, budget: tuple[int, int], seed: int, limit: int) -> list[tuple[str, list[dict]]]:
    """Distinct candidates of a full-fitness search (row blocks + CMA-ES, or per layer + GA)."""
    import merge3

    runs = WORK / "runs"
    shutil.rmtree(runs / genome, ignore_errors=True)
    rows = genome == "rows"
    space = {"name": f"visited-{genome}", "seed": seed,
             "models": {"base": work["base"], "endpoints": work["endpoints"], "names": work["names"]},
             "bank": {"path": work["bank"], "estimator": "full", "items_per_task": None},
             "genome": {"granularity": "layer", "methods": ["tsv_merge"] if rows else ["task_arithmetic", "ties", "tsv_merge"],
                        "weights": {"low": 0.0, "high": 3.0 if rows else 2.5}, "row_blocks": 16 if rows else 1},
             "engine": {"name": "cmaes" if rows else "pymoo", "population": budget[0], "generations": budget[1]},
             "executor": {"kind": "local"}}
    outcome = merge3.search(space, runs_dir=runs, name=genome, progress=False)
    seen, out = set(), []
    records = sorted(outcome.result.records, key=lambda r: -r.generation)  # late candidates: where it converged
    for r in records:
        key = json.dumps(r.genome, sort_keys=True)
        if r.error is None and key not in seen:
            seen.add(key)
            out.append((f"visited-{genome}", r.plan))
    return out[:limit]


def answer_all(work: dict, plans: list[tuple[str, list[dict]]]) -> np.ndarray:
    """Every unseen merge's 0/1 answer to every bank item (both splits), through the search's own workload."""
    from merge3.runtime import EvalRequest, LocalExecutor, MergeWorkloadFactory

    factory = MergeWorkloadFactory(base=work["base"], endpoints=work["endpoints"], bank=work["bank"],
                                   methods=["task_arithmetic", "ties", "dare", "tsv_merge"], granularity="layer")
    factory._derive()
    every = tuple(range(work["bank_items"]))
    executor = LocalExecutor(factory)
    out = np.zeros((len(plans), len(every)), dtype=np.int8)
    for i, result in executor.submit([EvalRequest(plan, items=every) for _, plan in plans]):
        if not result.ok:
            raise RuntimeError(result.error)
        out[i] = result.answered()[1]
    return out


class Strategies:
    """Each strategy: (answers of one merge on the search split, merge number, estimator) → (items, estimate)."""

    def __init__(self, estimator, tasks: np.ndarray, seed: int, n_fresh: int, cat: dict):
        self.estimator, self.tasks, self.seed, self.n_fresh, self.cat = estimator, tasks, seed, n_fresh, cat

    def fresh_items(self, k: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, k, n, 0xF5])
        return np.concatenate([np.sort(rng.choice(np.flatnonzero(self.tasks == t), n, replace=False))
                               for t in dict.fromkeys(self.tasks.tolist())])

    def run(self, name: str, y: np.ndarray, k: int, estimator=None) -> tuple[int, float, float]:
        from merge3.itembank import AdaptiveTest, estimate_answered

        est = estimator or self.estimator
        kind, _, detail = name.partition(":")
        if kind == "fixed":
            method, subset, n = detail.split("/")
            sub = est.subset(int(n), subset)
            per_task = est.estimate_matrix(y[sub.indices][None].astype(float), method, n=int(n), subset=subset,
                                           subset_only=True)[0]
            return sub.n_items, float(np.mean(per_task)), float("nan")
        if kind == "fresh":
            method, n = detail.split("/")
            items = self.fresh_items(k, int(n))
            e = estimate_answered(est, items, y[items], method)
            return items.size, e.mean, e.se_mean
        if kind == "adaptive":
            model, c = est.model, self.cat
            test = AdaptiveTest(rows=np.arange(len(y)), tasks=model.tasks, a=model.a, b=model.b,
                                prior_mean=model.theta_mean, prior_cov=model.theta_cov, seed=(self.seed, k, 0), **c)
            items, correct = test.run(lambda rows: y[rows])
            e = estimate_answered(est, items, correct, detail, adaptive=True)
            return items.size, e.mean, e.se_mean
        raise ValueError(name)


def refitted(estimator, calibration: np.ndarray, answers: np.ndarray, strategies: Strategies, members: np.ndarray):
    """The item model refitted on the calibration + the sparse answers of ``members`` (fresh items each)."""
    from merge3.itembank import refit_irt

    Y = np.full((calibration.shape[0] + members.size, calibration.shape[1]), np.nan)
    Y[: calibration.shape[0]] = calibration
    for row, k in enumerate(members, calibration.shape[0]):
        items = strategies.fresh_items(int(k) + 10_000, strategies.n_fresh)
        Y[row, items] = answers[k, items]
    ids = list(estimator.model.subject_ids) + [f"unseen-{k}" for k in members]
    return estimator.with_model(refit_irt(estimator.model, Y, subject_ids=ids))


def metrics(estimate: np.ndarray, truth: np.ndarray, test: np.ndarray, items: np.ndarray, split_size: int) -> dict:
    from scipy.stats import spearmanr

    top = truth >= np.quantile(truth, 0.75)
    rho = lambda a, b: float(spearmanr(a, b).statistic) if len(a) > 2 and np.std(b) > 0 else None  # noqa: E731
    return {"n": int(truth.size), "mae": float(np.abs(estimate - truth).mean()),
            "mae_vs_test": float(np.abs(estimate - test).mean()), "bias": float((estimate - truth).mean()),
            "top_bias": float((estimate[top] - truth[top]).mean()), "spearman": rho(estimate, truth),
            "top_spearman": rho(estimate[top], truth[top]), "items": float(items.mean()),
            "share": float(items.mean() / split_size)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["group"] == "all"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=100)
    for ax, key, target, label in ((axes[0], "mae", TARGET["mae"], "MAE (search split)"),
                                   (axes[1], "top_bias", TARGET["top_bias"], "bias of the best quarter"),
                                   (axes[2], "top_spearman", TARGET["top_spearman"], "Spearman, best quarter")):
        names = [r["strategy"] for r in rows]
        ax.barh(names, [r[key] if r[key] is not None else 0 for r in rows], color=["C0" if "recal" not in n else "C2" for n in names])
        for sign in ((-1, 1) if key == "top_bias" else (1,)):
            ax.axvline(sign * target, color="grey", linestyle="--", linewidth=1)
        ax.set_title(label)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="x")
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(f"fitness strategies on {rows[0]['n']} unseen merges (dashed: targets; green: recalibrated)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_text_atomic(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", default=str(ROOT / "item_banks" / "digits"))
    parser.add_argument("--zoo", default=str(ROOT / "zoo" / "digits"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--n", type=int, default=15, help="fresh items per task (15 × 5 tasks = 2.5 %% of 2,995)")
    parser.add_argument("--quick", action="store_true", help="fewer merges and a smaller visiting search")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="reuse the answers cached by an earlier run of the same merges")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(RESULTS.read_text()), RESULTS.with_suffix(".png"))
        return
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from rich.console import Console
    from rich.table import Table

    from merge3.itembank import Estimator, ItemBank
    from merge3.search import CalibrationSettings, calibrate_bank
    from merge3.zoo import build_digits_zoo

    started = time.perf_counter()
    zoo = build_digits_zoo(args.zoo, Path(args.bank).parent, log=lambda *a: None)
    names = list(zoo.finetuned)
    work = {"base": str(zoo.base), "endpoints": [str(p) for p in zoo.finetuned.values()], "names": names,
            "bank": str(zoo.bank)}
    calibrate_bank(zoo.bank, work["base"], work["endpoints"], CalibrationSettings(), names=names, log=print,
                   fit_threads=os.cpu_count())
    bank = ItemBank.load(zoo.bank)
    work["bank_items"] = len(bank)
    folder = Path(zoo.bank) / "calibration"
    estimator = Estimator.load(folder)
    calibration = np.load(folder / "responses.npz")["responses"].astype(float)
    sizes = {"random-layer": 30 if args.quick else 60, "mixed-layer": 15 if args.quick else 30,
             "random-rows": 15 if args.quick else 30}
    from merge3.methods import layer_groups
    from merge3.models import open_lazy

    t0 = time.perf_counter()
    cache = WORK / f"answers-{args.seed}-{'quick' if args.quick else 'full'}.npz"
    if args.reuse and cache.exists():  # the merges and answers of an earlier run (answers are deterministic)
        stored = np.load(cache)
        plans, answers = [tuple(p) for p in json.loads(str(stored["plans"]))], stored["answers"]
    else:
        groups = list(layer_groups([k for k in open_lazy(work["base"])], "layer"))
        plans = unseen_plans(groups, len(names), args.seed, sizes)
        budget = (8, 4) if args.quick else (20, 8)
        plans += visited_plans(work, "rows", budget, args.seed, 20 if args.quick else 60)
        plans += visited_plans(work, "layer", budget, args.seed, 20 if args.quick else 60)
        answers = answer_all(work, plans)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, answers=answers, plans=np.array(json.dumps(plans)))
    answer_s = time.perf_counter() - t0
    search, test = bank.search_indices, bank.test_indices
    y_search = answers[:, search]
    truth = np.array([np.mean(list(bank.per_task_accuracy(a[search], search).values())) for a in answers])
    truth_test = np.array([np.mean(list(bank.per_task_accuracy(a[test], test).values())) for a in answers])
    groups_of = np.array([g for g, _ in plans])

    tasks = estimator.model.tasks
    cat = {"start": 4, "batch": 3, "n_max": args.n, "target_se": 0.02}
    strategies = Strategies(estimator, tasks, args.seed, args.n, cat)
    names_ = ["fixed:gp-irt/anchor-irt/20", "fixed:naive/random/20", f"fresh:naive/{args.n}", f"fresh:p-irt/{args.n}",
              f"fresh:gp-irt/{args.n}", f"fresh:cv-irt/{args.n}", "adaptive:p-irt", f"fresh:gp-irt/{3 * args.n}",
              f"fresh:cv-irt/{3 * args.n}"]
    estimates = {n: np.zeros(len(plans)) for n in names_}
    items = {n: np.zeros(len(plans)) for n in names_}
    for k in range(len(plans)):
        for n in names_:
            items[n][k], estimates[n][k], _ = strategies.run(n, y_search[k], k)
    # online recalibration, 2-fold: refit on one half's sparse answers, estimate the other half
    half = np.random.default_rng(args.seed).permutation(len(plans)) % 2
    refit_s = []
    recal = [f"fresh:p-irt/{args.n}", f"fresh:gp-irt/{args.n}", f"fresh:cv-irt/{args.n}", "adaptive:p-irt"]
    for n in recal:
        estimates[f"{n} +recal"], items[f"{n} +recal"] = np.zeros(len(plans)), np.zeros(len(plans))
    for fold in (0, 1):
        t0 = time.perf_counter()
        refit = refitted(estimator, calibration, y_search, strategies, np.flatnonzero(half != fold))
        refit_s.append(time.perf_counter() - t0)
        for k in np.flatnonzero(half == fold):
            for n in recal:
                items[f"{n} +recal"][k], estimates[f"{n} +recal"][k], _ = strategies.run(n, y_search[k], int(k), refit)
    rows = []
    for n in estimates:
        for group in ["all", *dict.fromkeys(groups_of.tolist())]:
            mask = np.ones(len(plans), bool) if group == "all" else groups_of == group
            rows.append({"strategy": n, "group": group, **metrics(estimates[n][mask], truth[mask], truth_test[mask],
                                                                    items[n][mask], len(search))})
    meets = [r["strategy"] for r in rows if r["group"] == "all" and r["mae"] <= TARGET["mae"]
             and abs(r["top_bias"]) <= TARGET["top_bias"] and (r["top_spearman"] or 0) >= TARGET["top_spearman"]
             and r["share"] <= TARGET["share"]]
    result = {
        "bank": bank.name, "search_items": int(len(search)), "test_items": int(len(test)),
        "calibration_subjects": int(calibration.shape[0]), "unseen": {g: int((groups_of == g).sum()) for g in dict.fromkeys(groups_of.tolist())},
        "true_search_accuracy_range": [float(truth.min()), float(truth.max())],
        "target": TARGET, "meets_target": meets, "seed": args.seed, "quick": args.quick,
        "seconds": {"answering": round(answer_s, 1), "refit_each": [round(s, 1) for s in refit_s],
                    "total": round(time.perf_counter() - started, 1)},
        "load_average": list(os.getloadavg()), "rows": rows,
    }
    path = RESULTS if not args.quick else RESULTS.with_name("estimator_fidelity_quick.json")
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    plot(result, path.with_suffix(".png"))
    table = Table(title=f"fitness strategies on {len(plans)} unseen merges ({bank.name}; truth = every search item)")
    for column in ("strategy", "group", "items (share)", "MAE", "MAE vs test", "top-¼ bias", "top-¼ ρ", "ρ"):
        table.add_column(column, justify="right")
    for r in rows:
        if r["group"] != "all" and not r["group"].startswith(("visited", "random-rows")):
            continue
        fmt = lambda v, f="{:.3f}": "—" if v is None else f.format(v)  # noqa: E731
        table.add_row(r["strategy"], r["group"], f"{r['items']:.0f} ({r['share']:.1%})", fmt(r["mae"], "{:.4f}"),
                      fmt(r["mae_vs_test"], "{:.4f}"), fmt(r["top_bias"], "{:+.4f}"), fmt(r["top_spearman"]),
                      fmt(r["spearman"]))
    Console(width=150).print(table)
    print(f"meets every target: {meets or 'none'}; refit {refit_s[0]:.1f} s; results {path}")


if __name__ == "__main__":
    main()
