"""The fixed recipes a search has to beat: the base, each endpoint, and each method's declared recipe grid (by
default task arithmetic, TIES, DARE and TSV-Merge, strength and density grid-searched) at uniform endpoint weights.

Every recipe is scored on every item; the grid point of each method is **chosen on the search split** (as a search
would choose it) and **reported on the test split**, so no recipe gets an advantage on the items that judge merges.
Scores are cached in ``<bank>/baselines/<key>.json``, keyed by the bank, the model files (path, size, mtime) and the
grid, so the leaderboard and the benchmarks pay for them once per zoo.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from merge3._errors import Merge3Error
from merge3.methods import MERGES_REVISION, get_method, registered
from merge3.models import weight_files, write_text_atomic

DEFAULT_METHODS = ("task_arithmetic", "ties", "dare", "tsv_merge")  # the recipes a task-vector run is compared with


def grid(method: str) -> list[dict]:
    """A method's fixed-recipe settings (its declared ``recipes``); a ``Merge3Error`` when it declares none."""
    recipes = get_method(method).recipes
    if not recipes:
        with_grid = [m for m, spec in registered().items() if spec.recipes]
        raise Merge3Error(f"no baseline grid for method(s) ['{method}'] (known: {', '.join(sorted(with_grid))})")
    return [dict(r) for r in recipes]


@dataclass(frozen=True)
class Baseline:
    """One fixed recipe, its search-split scores (``scores``: what chooses its grid point) and its test-split
    scores (``test_scores``: what it is reported with; None when the bank has no test split)."""

    name: str
    method: str
    setting: dict
    scores: dict[str, float]
    test_scores: dict[str, float] | None = None

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores)

    @property
    def test_mean(self) -> float | None:
        return None if not self.test_scores else sum(self.test_scores.values()) / len(self.test_scores)


def full_bank_factory(config: dict, methods: list[str] | None = None):
    """A workload factory for the candidates of a run's (or space's) config."""
    from merge3.runtime import MergeWorkloadFactory

    models, genome = config["models"], config["genome"]
    factory = MergeWorkloadFactory(
        base=models.get("base"), endpoints=list(models["endpoints"]), bank=config["bank"]["path"],
        methods=list(methods or genome["methods"]), granularity=genome.get("granularity", "layer"),
        seed=config.get("seed", 0), device=config.get("device", "auto"),
    )
    factory._derive()
    return factory


def _recipes(methods: list[str], names: list[str], same_task: str | None) -> list[tuple[str, str, dict, dict]]:
    """(name, method, setting, params) of every recipe to score."""
    n_models = len(names)
    if same_task is not None:  # same-task candidates are weighted averages of the aligned endpoints
        label = get_method(same_task).label
        one_hot = [(f"endpoint {name}", same_task, {"endpoint": i},
                    {"weights": [float(j == i) for j in range(n_models)]}) for i, name in enumerate(names)]
        return one_hot + [(f"{label} (uniform average)", same_task, {}, {"weights": [1.0] * n_models})]
    recipes = [("base", "task_arithmetic", {}, {"weights": [0.0] * n_models})]
    recipes += [(f"endpoint {name}", "task_arithmetic", {"endpoint": i},
                 {"weights": [float(j == i) for j in range(n_models)]}) for i, name in enumerate(names)]
    for method in methods:
        spec = get_method(method)
        for setting in grid(method):
            recipes.append((f"{spec.label} {_describe(setting)}", method, setting, spec.uniform_recipe(setting, n_models)))
    return recipes


def same_task_method(config: dict) -> str | None:
    """The run's same-task method (C2M3), or None for a task-vector run."""
    return next((m for m in config["genome"]["methods"] if get_method(m).same_task), None)


def _describe(setting: dict) -> str:
    short = {"scale": "λ", "density": "density", "drop_rate": "drop"}
    return ", ".join(f"{short.get(k, k)}={v:g}" for k, v in setting.items())


def _cache_key(config: dict, methods: list[str]) -> str:
    models = config["models"]
    files = []
    for path in [models.get("base"), *models["endpoints"]]:
        if path is not None:
            files += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in weight_files(path)]
    bank = Path(config["bank"]["path"])
    stamp = [(str(f), f.stat().st_mtime_ns) for f in sorted(bank.glob("*")) if f.is_file()]
    names = models.get("names") or [Path(p).name for p in models["endpoints"]]  # the rows are labelled with them
    grids = {m: [dict(r) for r in get_method(m).recipes] or None for m in methods}
    payload = json.dumps({"files": files, "bank": stamp, "grid": grids, "names": names,
                          "methods": methods, "merges_revision": MERGES_REVISION, "format": 2}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def baselines(config: dict, *, methods: list[str] | None = None, log: Callable[[str], None] = print,
              cache: bool = True, compute: bool = True) -> list[Baseline] | None:
    """Every fixed recipe of ``config``'s models scored on both splits of its bank (cached in the bank folder).

    ``config`` is a run's ``config.yaml`` (or a search space as a dict). For task-vector runs: the base, each
    endpoint and every grid point of TA/TIES/DARE/TSV-M; for same-task (c2m3) runs: each aligned endpoint and their
    uniform average. ``best_per_method`` keeps the best grid point of each method (on the search split).
    ``compute=False`` returns the cached scores, or None when there are none yet (for views that must stay cheap).
    """
    from merge3.itembank import ItemBank
    from merge3.runtime import EvalRequest, LocalExecutor

    same_task = same_task_method(config)
    methods = [same_task] if same_task else list(methods or DEFAULT_METHODS)
    if not same_task:
        for method in methods:
            grid(method)  # every method has a recipe grid
    key = _cache_key(config, methods)
    path = Path(config["bank"]["path"]) / "baselines" / f"{key}.json"
    if cache and path.exists():
        return [Baseline(**row) for row in json.loads(path.read_text())["baselines"]]
    if not compute:
        return None
    factory = full_bank_factory(config, methods)
    bank = ItemBank.load(factory.bank, warn=False)
    names = config["models"].get("names") or [Path(p).name for p in config["models"]["endpoints"]]
    recipes = _recipes([] if same_task else methods, names, same_task)
    log(f"scoring {len(recipes)} baseline recipes on every item ({len(bank.search_indices)} search, "
        f"{len(bank.test_indices)} test)")
    every_item = tuple(range(len(bank)))
    executor = LocalExecutor(factory)
    try:
        results = dict(executor.submit([EvalRequest([{"group": g, "method": method, "params": params}
                                                     for g in factory.groups], items=every_item)
                                        for _, method, _, params in recipes]))
    finally:
        executor.close()
    failed = [(recipes[i][0], r.error) for i, r in results.items() if not r.ok]
    if failed:
        raise Merge3Error(f"baseline '{failed[0][0]}' failed: {failed[0][1]}")
    out = []
    for i, (name, method, setting, _) in enumerate(recipes):
        splits = bank.per_split_accuracy(*results[i].answered()[::-1])
        out.append(Baseline(name, method, setting, splits["search"], splits["test"]))
    if cache:
        path.parent.mkdir(exist_ok=True)
        rows = [{"name": b.name, "method": b.method, "setting": b.setting, "scores": b.scores,
                 "test_scores": b.test_scores} for b in out]
        write_text_atomic(path, json.dumps({"models": config["models"], "baselines": rows}, indent=2) + "\n")
    return out


def best_per_method(rows: list[Baseline]) -> list[Baseline]:
    """The base and endpoints as they are, and the best grid point of each merge method on the **search** split."""
    kept, best = [], {}
    for row in rows:
        if row.name == "base" or row.name.startswith("endpoint"):
            kept.append(row)
        elif row.method not in best or row.mean > best[row.method].mean:
            best[row.method] = row
    return kept + list(best.values())


def best_recipe(rows: list[Baseline]) -> Baseline | None:
    """The fixed recipe a search has to beat: the best merge recipe on the search split (base and endpoints aside)."""
    merges = [r for r in best_per_method(rows) if r.name != "base" and not r.name.startswith("endpoint")]
    return max(merges, key=lambda r: r.mean, default=None)


__all__ = ["DEFAULT_METHODS", "Baseline", "baselines", "best_per_method", "best_recipe", "full_bank_factory", "grid",
           "same_task_method"]
