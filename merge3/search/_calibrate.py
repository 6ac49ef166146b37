"""Calibrating an item bank for cheap fitness: the response matrix of the subjects the search will resemble.

Subjects are the base, every endpoint, the uniform recipes (each method at a few scales: where the search starts and
where good merges are), and random merges drawn from the genome the search explores (random method and coefficients
per layer group, with a random overall strength so that mild and heavy merges both appear), each answering every
item of the bank's **search split** (test items are never read). The IRT model, subsets, λ*/δ and endpoint
abilities fitted on that matrix are stored in ``<bank>/calibration/`` with the subjects and settings needed to
reproduce them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from merge3._errors import Merge3Error
from merge3.itembank import Estimator, IRTFit, ItemBank
from merge3.methods import MERGES_REVISION, get_method
from merge3.models import atomic_dir, file_sha256, weight_files
from merge3._config import MAX_CANDIDATES
from merge3.runtime import EvalRequest
from merge3.runtime import MergeWorkloadFactory
from merge3.search._genome import Genome

CALIBRATION_DIR = "calibration"


@dataclass
class CalibrationSettings:
    random_merges: int = 150
    methods: list[str] = field(default_factory=lambda: ["task_arithmetic", "ties", "dare", "tsv_merge"])
    granularity: str = "layer"
    weight_range: tuple[float, float] = (0.0, 2.5)
    recipe_scales: list[float] = field(default_factory=lambda: [0.3, 0.6, 1.0, 1.5, 2.0])
    ns: list[int] = field(default_factory=lambda: [5, 10, 20, 50, 100])
    subset_methods: list[str] = field(default_factory=lambda: ["random", "anchor-irt"])
    kind: str = "mirt"
    dims: int | str = "auto"
    seed: int = 0
    backend: str = "torch"  # or "py-irt" (its own environment: `make test-pyirt`)


def _fingerprint(base: str, endpoints: list[str]) -> dict:
    """The models' contents, not their paths: the same models named by relative or absolute paths hit the cache."""
    return {"base": [file_sha256(f) for f in weight_files(base)],
            "endpoints": [[file_sha256(f) for f in weight_files(p)] for p in endpoints]}


def calibration_path(bank_path: str | Path) -> Path:
    return Path(bank_path) / CALIBRATION_DIR


def calibrate_bank(bank_path: str | Path, base: str, endpoints: list[str], settings: CalibrationSettings | None = None,
                   *, names: list[str] | None = None, device: str = "cpu", force: bool = False, log=print,
                   fit_threads: int | None = None) -> Estimator:
    """Build the response matrix, fit the estimators, store them in ``<bank>/calibration`` (cached by inputs).

    ``fit_threads``: torch threads for the IRT fit alone (nothing else runs then, so all cores help: 80 → 51 s for
    the digits bank on 2 cores).
    """
    settings = settings or CalibrationSettings()
    if settings.backend == "py-irt":
        import importlib.util

        if importlib.util.find_spec("py_irt") is None:
            raise Merge3Error("--backend py-irt needs py-irt, which cannot share merge3's main environment "
                              "(it pins Python < 3.12, pandas < 3, rich < 14): use the `make test-pyirt` venv")
    elif settings.backend != "torch":
        raise Merge3Error(f"unknown IRT backend '{settings.backend}' (torch or py-irt)")
    if not 0 <= settings.random_merges <= MAX_CANDIDATES:
        raise Merge3Error(f"--random-merges {settings.random_merges}: expected 0..{MAX_CANDIDATES:,} calibration "
                          "subjects")
    bank = ItemBank.load(bank_path)
    names = names or [Path(p).name for p in endpoints]
    fingerprint = _fingerprint(base, endpoints)
    folder = calibration_path(bank_path)
    wanted = {"settings": _jsonable_settings(settings), "inputs": fingerprint, "merges_revision": MERGES_REVISION,
              "search_items": bank.fingerprint("search")}
    if not force and (folder / "calibration.json").exists():
        stored = json.loads((folder / "calibration.json").read_text())
        if {k: stored.get(k) for k in wanted} == wanted:
            log(f"calibration: cached at {folder}")
            return Estimator.load(folder)
    started = time.perf_counter()
    responses, subjects = response_matrix_for(bank, base, endpoints, names, settings, device, log)
    log(f"calibration: {responses.shape[0]} subjects × {responses.shape[1]} search items in "
        f"{time.perf_counter() - started:.1f} s" + ("" if bank.has_test_split else " (the bank has no test split)")
        + "; fitting IRT …")
    search = bank.search_indices
    fit_started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(fit_threads or threads)
    try:
        estimator = Estimator.calibrate(
            responses.astype(float), bank.task_of[search], item_ids=[bank.item_ids[i] for i in search],
            subject_ids=[s["id"] for s in subjects],
            task_names=bank.tasks, endpoints=names, ns=settings.ns, subset_methods=settings.subset_methods,
            fit=IRTFit(kind=settings.kind, dims=settings.dims, backend=settings.backend), seed=settings.seed,
        )
    finally:
        torch.set_num_threads(threads)
    fit_seconds = time.perf_counter() - fit_started
    with atomic_dir(folder, overwrite=True) as tmp:
        estimator.save(tmp)
        np.savez_compressed(tmp / "responses.npz", responses=responses.astype(np.uint8))
        (tmp / "subjects.jsonl").write_text("".join(json.dumps(s) + "\n" for s in subjects))
        (tmp / "calibration.json").write_text(json.dumps({
            **wanted, "bank": bank.name, "endpoint_names": names, "subjects": len(subjects),
            "items": int(responses.shape[1]), "response_seconds": round(fit_started - started, 2),
            "fit_seconds": round(fit_seconds, 2),
        }, indent=2) + "\n")
    log(f"calibration: IRT fitted in {fit_seconds:.1f} s, stored in {folder}")
    return Estimator.load(folder)


def _jsonable_settings(settings: CalibrationSettings) -> dict:
    return json.loads(json.dumps(asdict(settings)))


def response_matrix_for(bank: ItemBank, base: str, endpoints: list[str], names: list[str],
                        settings: CalibrationSettings, device: str = "cpu", log=print) -> tuple[np.ndarray, list[dict]]:
    """(subjects × search items) correctness of base, endpoints, recipes and random merges, plus who they are.

    Each subject is built into the resident model and answers through the same workload as a search candidate.
    """
    factory = MergeWorkloadFactory(base=base, endpoints=list(endpoints), bank=str(bank.path),
                                   methods=list(settings.methods), granularity=settings.granularity,
                                   seed=settings.seed, device=device)
    factory._derive()
    groups = list(factory.groups)
    n_models = len(endpoints)
    genome = Genome(groups, settings.methods, n_models, weight_range=settings.weight_range,
                    fixed={f"{m}.seed": settings.seed for m in settings.methods if "seed" in get_method(m).params})
    workload = factory.build(factory.load_inputs())
    rng = np.random.default_rng(settings.seed)
    recipes = genome.recipes(settings.recipe_scales)

    def subject_plan(kind: str, i: int) -> list[dict]:
        if kind == "recipe":
            return [c.as_dict() for c in genome.decode(recipes[i])]
        if kind == "base":
            weights = [0.0] * n_models
        elif kind == "endpoint":
            weights = [1.0 if j == i else 0.0 for j in range(n_models)]
        else:
            genome_values = genome.sample(rng)
            strength = rng.uniform(0.15, 1.0)  # mild and heavy merges both appear
            plan = [c.as_dict() for c in genome.decode(genome_values)]
            for group in plan:
                if "weights" in group["params"]:
                    group["params"]["weights"] = [w * strength for w in group["params"]["weights"]]
            return plan
        return [{"group": g, "method": "task_arithmetic", "params": {"weights": weights}} for g in groups]

    who = [("base", 0, "base")] + [("endpoint", i, n) for i, n in enumerate(names)]
    # the uniform recipes are where good merges live (and where the search starts): without them the item
    # parameters only know random merges, and the estimators underestimate good candidates badly
    who += [("recipe", k, f"recipe-{k:03d}") for k in range(len(recipes))]
    who += [("random", k, f"random-{k:04d}") for k in range(settings.random_merges)]
    rows, subjects = [], []
    with torch.no_grad():
        for n, (kind, i, name) in enumerate(who):
            plan = subject_plan(kind, i)
            result = workload.evaluate(EvalRequest(plan))  # every search item
            rows.append(result.answered()[1])
            subjects.append({"id": name, "kind": kind, "plan": plan, "accuracy": result.scores})
            if (n + 1) % 25 == 0:
                log(f"  {n + 1}/{len(who)} subjects answered the bank")
    return np.stack(rows), subjects
