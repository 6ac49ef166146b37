"""The Python API that ties the stages together: ``merge3.search`` and ``merge3.resume``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge3._errors import Merge3Error
from merge3.itembank import ItemBank
from merge3.runs import Run
from merge3.runtime import CandidateResult, EvalRequest, LocalExecutor, MergeWorkloadFactory, make_executor
from merge3.search import (
    Evaluation,
    Genome,
    Objectives,
    QuietProgress,
    RichProgress,
    Search,
    SearchResult,
    SearchSpace,
    load_space,
    make_engine,
    make_fitness,
    parse_space,
    rank_key,
)

ObjectiveSpec = str | Callable[[CandidateResult], float]


@dataclass
class SearchOutcome:
    """What ``merge3.search`` returns: the run folder and the search result."""

    run: Run
    result: SearchResult

    @property
    def best(self) -> Evaluation:
        return self.result.best()


def _as_space(space: SearchSpace | dict | str | os.PathLike) -> SearchSpace:
    if isinstance(space, SearchSpace):
        return space
    if isinstance(space, dict):
        return parse_space(space)
    return load_space(space)


def _absolute(space: SearchSpace) -> SearchSpace:
    """Paths resolved against the working directory, checked before any work starts."""
    data = space.model_dump(mode="json")
    models = data["models"]
    if models["base"] is not None:
        models["base"] = _existing(models["base"], "models.base")
    models["endpoints"] = [_existing(p, f"models.endpoints[{i}]") for i, p in enumerate(models["endpoints"])]
    data["bank"]["path"] = _existing(data["bank"]["path"], "bank.path")
    return SearchSpace.model_validate(data)


def _existing(path: str, field: str) -> str:
    p = Path(path).expanduser()
    if not p.exists():
        raise Merge3Error(f"search space: field '{field}': '{path}' does not exist")
    return str(p.resolve())


def _objective_names(objectives: Sequence[ObjectiveSpec]) -> list[str]:
    return [o if isinstance(o, str) else f"<api:{getattr(o, '__name__', 'custom')}>" for o in objectives]


@dataclass
class _Plan:
    factory: Any
    objectives: Objectives
    genome: Genome
    fitness: Any = None


def validate(space: SearchSpace, objectives: Sequence[ObjectiveSpec], factory=None) -> _Plan:
    """Build what the search needs from the space, failing on bad input before any run folder or worker exists:
    models (compatible, finite), bank (items, heads, tokenizer), device, fitness and objectives."""
    custom = factory is not None
    factory = factory or MergeWorkloadFactory.from_space(space)
    fitness, chance = None, None
    if not custom:  # a custom factory answers plans its own way
        factory.check_inputs()
        bank = ItemBank.load(factory.bank)
        fitness = make_fitness(space.bank, bank, space.seed, generations=space.engine.generations)
        chance = bank.chance_accuracy()
    obj = Objectives(objectives, factory.tasks, chance=chance)
    if getattr(fitness, "rank_soft", 0.0) and "mean" not in obj.names and not obj.forgotten:
        raise Merge3Error(f"bank.fitness.soft adds a soft score to the 'mean' or a 'forget:<task>' objective; this "
                          f"search's objectives are {obj.names}")
    genome = Genome(
        factory.groups, space.genome.methods, factory.n_models,
        weight_range=(space.genome.weights.low, space.genome.weights.high),
        ranges={k: (v.low, v.high) for k, v in space.genome.params.items()},
        fixed=space.genome.fixed,
        row_blocks=space.genome.row_blocks,
        per_model=space.genome.per_model,
    )
    return _Plan(factory, obj, genome, fitness)


def _engine_and_executor(space: SearchSpace, plan: _Plan, run: Run, executor=None):
    storage = run.path / "optuna.journal" if space.engine.name == "optuna" else None
    if storage is not None and storage.exists():
        storage.unlink()  # derived from evaluations.jsonl, rebuilt by replay
    initial = plan.genome.recipes() if space.engine.seed_recipes else []
    engine = make_engine(space.engine.name, plan.genome.variables, len(plan.objectives), space.engine.population,
                         space.engine.generations, space.seed, space.engine.algorithm, storage, initial)
    if executor is None:
        ex = space.executor
        executor = make_executor(ex.kind, plan.factory, actors=ex.actors, num_gpus=ex.num_gpus,
                                 threads=ex.threads_per_actor, address=ex.address, temp_dir=run.path / "ray",
                                 max_retries=ex.max_retries, log=run.log)
    return engine, executor


def _progress(progress, space: SearchSpace, engine):
    if progress is True:
        return RichProgress(engine.planned_candidates, space.engine.generations)
    if progress is False or progress is None:
        return QuietProgress()
    return progress


def _drive(run: Run, space: SearchSpace, plan: _Plan, replay, executor, progress, created: bool) -> SearchResult:
    """Run the search in its (locked) run folder. If it fails before recording any evaluation, a new run's folder is
    removed (nothing is lost and a retry may take the name); otherwise the run records why it stopped and can be
    resumed."""
    started = time.time()
    try:
        return _search_in_run(run, space, plan, replay, executor, progress, started)
    except BaseException as e:  # the run records why it stopped, then the error goes on to the caller
        if created and not run.records():
            run.discard()
        else:
            run.write_meta(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=str(e)[:500])
        raise
    finally:
        run.unlock()


def _search_in_run(run: Run, space: SearchSpace, plan: _Plan, replay, executor, progress, started: float) -> SearchResult:
    engine, executor = _engine_and_executor(space, plan, run, executor)
    if plan.fitness is not None:  # refits of the item model live in the run, so a resume reloads them exactly
        plan.fitness.state_dir, plan.fitness.log = run.path / "fitness", run.log
        run.log(f"fitness: {plan.fitness.name}")
    bar = _progress(progress, space, engine)
    run.write_meta(workers=getattr(executor, "workers", lambda: [])(), engine=engine.name)
    try:
        search = Search(plan.genome, engine, executor, plan.objectives, recorder=run, replay=replay,
                        max_items=space.engine.max_items, bank_items=plan.factory.bank_items, progress=bar,
                        fitness=plan.fitness)
        result = search.run()
    finally:
        bar.close()
        executor.close()
        run.close()
    run.finish(result, started)
    _write_report(run)
    return result


def _write_report(run: Run) -> None:
    """The report is a view of the run: if drawing it fails, say so in the log, never fail the search."""
    from merge3.runs import write_report

    try:
        write_report(run.path)
    except Exception as e:  # noqa: BLE001
        run.log(f"report.html not written: {type(e).__name__}: {e}")


def search(space: SearchSpace | dict | str | os.PathLike, *, objectives: Sequence[ObjectiveSpec] | None = None,
           runs_dir: str | os.PathLike = "runs", name: str | None = None, seed: int | None = None,
           executor=None, factory=None, progress: bool | Any = True) -> SearchOutcome:
    """Run an evolutionary merge search and record it in ``runs_dir/<name>``.

    ``objectives`` (maximised) may mix 'mean', 'per_task', import paths and Python callables taking a
    ``CandidateResult``; by default the space's own objectives.

    >>> outcome = merge3.search("search_spaces/demo.yaml", objectives=["mean"])  # doctest: +SKIP
    >>> outcome.best.scores  # doctest: +SKIP
    """
    space = _as_space(space)
    if seed is not None:
        space = space.model_copy(update={"seed": seed})
    space = _absolute(space)
    objectives = list(objectives) if objectives is not None else list(space.objectives)
    plan = validate(space, objectives, factory)
    config = space.model_dump(mode="json")
    config["objectives"] = _objective_names(objectives)
    run = Run.create(runs_dir, name or Run.default_name(space.name, space.seed), config)
    run.log(f"search started: {space.name}, seed {space.seed}, engine {space.engine.name}, executor {space.executor.kind}")
    return SearchOutcome(run, _drive(run, space, plan, None, executor, progress, created=True))


def resume(run_dir: str | os.PathLike, *, objectives: Sequence[ObjectiveSpec] | None = None, executor=None,
           factory=None, progress: bool | Any = True) -> SearchOutcome:
    """Continue a run where it stopped: recorded evaluations are replayed, not recomputed."""
    run = Run.open(run_dir)
    config = run.config
    names = list(config.get("objectives") or ["mean"])
    if objectives is None:
        api = [n for n in names if n.startswith("<api:")]
        if api:
            raise Merge3Error(f"run '{run.path}' used objective {api[0]} passed through the API: "
                              "resume it with merge3.resume(run, objectives=[...])")
        objectives = names
    elif _objective_names(objectives) != names:
        raise Merge3Error(f"objectives {_objective_names(objectives)} differ from the run's {names}")
    space = parse_space({**config, "objectives": ["mean"]}, str(run.path / "config.yaml"))
    run.lock()  # before anything is read for replay: a second writer stops here
    try:
        if run.meta.get("status") == "finished":
            raise Merge3Error(f"run '{run.path}' has already finished")
        plan = validate(space, objectives, factory)
        replay = run.replay()
    except BaseException:
        run.unlock()
        raise
    run.log(f"resuming with {len(replay)} recorded evaluations")
    run.write_meta(status="running", resumed=run.meta.get("resumed", 0) + 1)
    return SearchOutcome(run, _drive(run, space, plan, replay, executor, progress, created=False))


def top_records(run: Run, top: int) -> list[Evaluation]:
    """The ``top`` distinct successful candidates by first objective (best first; candidates that reached the last
    promotion rung before the others)."""
    seen, out = set(), []
    ok = (r for r in run.records() if r.error is None)
    for record in sorted(ok, key=rank_key):
        key = json.dumps(record.genome, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(record)
        if len(out) == top:
            break
    return out


def verify(run_dir: str | os.PathLike, *, top: int = 3, log=print, baselines: bool = False) -> list[dict]:
    """Score the run's ``top`` candidates on every item of the bank's **search** split and of its **test** split
    (which the search never saw), and store both in ``verified.json``.

    ``test_mean − search_mean`` of a merge is its generalisation gap: how much the search fitted its own items.
    ``baselines``: also score the fixed recipes (once per bank, cached), so the report can draw the best of them —
    a few seconds on the digits zoo, many full-bank evaluations on a language model.
    """
    run = Run.open(run_dir)
    space = parse_space({**run.config, "objectives": ["mean"]}, str(run.path / "config.yaml"))
    records = top_records(run, top)
    if not records:
        raise Merge3Error(f"run '{run.path}' has no successful candidate to verify")
    factory = MergeWorkloadFactory.from_space(space)
    bank = ItemBank.load(factory.bank)
    every_item = tuple(range(len(bank)))
    executor = LocalExecutor(factory)
    try:
        results = dict(executor.submit([EvalRequest(r.plan, items=every_item) for r in records]))
    finally:
        executor.close()
    verified = run.verified()
    for i, record in enumerate(records):
        result = results[i]
        if not result.ok:
            raise Merge3Error(f"verifying gen {record.generation} #{record.index} failed: {result.error}")
        splits = bank.per_split_accuracy(*result.answered()[::-1])
        entry = {
            "generation": record.generation, "index": record.index, "estimated": record.scores,
            "estimated_mean": record.mean, "search": splits["search"], "search_mean": _mean(splits["search"]),
            "test": splits["test"], "test_mean": _mean(splits["test"]),
            "items": {"search": len(bank.search_indices), "test": len(bank.test_indices)},
        }
        verified[f"{record.generation}/{record.index}"] = entry
        test = "no test split" if entry["test_mean"] is None else (
            f"test {entry['test_mean']:.4f} (gap {entry['test_mean'] - entry['search_mean']:+.4f})")
        log(f"verified gen {record.generation} #{record.index}: estimated {record.mean:.4f}, "
            f"search split {entry['search_mean']:.4f}, {test}")
    run.write_verified(verified)
    if baselines:
        _score_baselines(run, log)
    _write_report(run)
    return [verified[f"{r.generation}/{r.index}"] for r in records]


def _score_baselines(run: Run, log) -> None:
    """The fixed recipes of the run's bank (cached there), so the report can say how far the search got past them."""
    from merge3.runs import baselines

    try:
        baselines(run.config, log=log)
    except Merge3Error as e:
        log(f"warning: no fixed-recipe baselines for this run: {e}")


def _mean(scores: dict | None) -> float | None:
    return None if not scores else sum(scores.values()) / len(scores)


def reported_score(entry: dict | None, estimate: float) -> float:
    """What a merge is ranked by: its test score when verified on a split bank, else its search-split score, else
    the search's estimate."""
    if entry:
        for key in ("test_mean", "search_mean"):
            if entry.get(key) is not None:
                return entry[key]
    return estimate


def _score_sentence(record: Evaluation, entry: dict) -> str:
    text = f"Estimated mean accuracy during the search {record.mean:.4f} (cheap fitness on the search split)"
    if entry.get("search_mean") is None:
        return text + "; not verified."
    text += f"; every search-split item {entry['search_mean']:.4f}"
    if entry.get("test_mean") is None:
        return text + " (the bank has no test split: search split only)."
    return (text + f"; **test split {entry['test_mean']:.4f}** (items the search never saw; generalisation gap "
            f"{entry['test_mean'] - entry['search_mean']:+.4f}).")


def export(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, rank: int = 1) -> Path:
    """Write the run's rank-``rank`` merge (verified score first, else estimate) as a loadable model folder.

    The folder holds sharded safetensors + index, the base's config/tokenizer files, a model card and
    ``merge3-manifest.json`` (genome, plan, scores, the run, sha256 of every input file) and, when every layer
    group uses the same method and mergekit has it, ``mergekit.yaml`` that reproduces the merge with mergekit.
    """
    from merge3 import __version__
    import yaml

    from merge3.methods import get_method, layer_groups, merge_groups, mergekit_config, plans_from_choices
    from merge3.models import check_finite, file_sha256, load_state_dict, save_state_dict, weight_files

    run = Run.open(run_dir)
    if rank < 1:
        raise Merge3Error(f"--rank {rank} is out of range: ranks start at 1 (the best merge)")
    verified = run.verified()
    candidates = top_records(run, rank + len(verified))
    ranked = sorted(candidates, key=lambda r: -reported_score(verified.get(f"{r.generation}/{r.index}"),
                                                              r.objectives[0]))
    if not 1 <= rank <= len(ranked):
        raise Merge3Error(f"--rank {rank} is out of range: run '{run.path}' has {len(ranked)} candidate(s) to export")
    record = ranked[rank - 1]
    models = run.config["models"]
    if models.get("base") is None:
        raise Merge3Error("export of same-task (C2M3) runs is not supported yet: it needs the alignment")
    base = load_state_dict(models["base"])
    endpoints = [load_state_dict(p) for p in models["endpoints"]]
    for path, state in zip([models["base"], *models["endpoints"]], [base, *endpoints]):
        check_finite(state, path)  # the models may have changed on disk since the search
    groups = layer_groups(base, run.config["genome"]["granularity"])
    merged = merge_groups(base, endpoints, plans_from_choices(groups, record.plan))
    check_finite(merged, f"the merge of gen {record.generation} #{record.index}")
    entry = verified.get(f"{record.generation}/{record.index}", {})
    manifest = {
        "merge3_version": __version__, "run": str(run.path), "generation": record.generation,
        "index": record.index, "genome": record.genome, "plan": record.plan,
        "estimated_scores": record.scores, "search_scores": entry.get("search"), "test_scores": entry.get("test"),
        "splits": {"estimated_scores": "search split, cheap fitness during the search",
                   "search_scores": "every search-split item (the items the search optimised)",
                   "test_scores": "every test-split item (never seen by calibration or the search)"},
        "inputs": {p: {f.name: file_sha256(f) for f in weight_files(p)} for p in [models["base"], *models["endpoints"]]},
    }
    dtype = next(str(t.dtype).removeprefix("torch.") for t in base.values() if t.is_floating_point())
    mergekit, why_not = mergekit_config(record.plan, groups, models["base"], models["endpoints"], dtype)
    manifest["mergekit_yaml"] = "mergekit.yaml" if mergekit else f"none: {why_not}"
    extra = {}
    if mergekit:
        random = any("seed" in get_method(choice["method"]).params for choice in record.plan)
        note = ("# mergekit draws random masks from its own RNG: same distribution, different masks.\n"
                if random else "")
        extra["mergekit.yaml"] = (f"# This merge as a mergekit config: mergekit-yaml mergekit.yaml OUT (or merge3 merge "
                                  f"mergekit.yaml --out OUT).\n{note}" + yaml.safe_dump(mergekit, sort_keys=False))
    methods = ", ".join(f"{g['group']}: {g['method']}" for g in record.plan)
    card = (f"# merge3 merge (rank {rank} of run {run.path.name})\n\n"
            f"Base: `{models['base']}`; endpoints: {', '.join(f'`{p}`' for p in models['endpoints'])}.\n\n"
            f"Methods per layer group: {methods}.\n\n{_score_sentence(record, entry)}\n\n"
            "The genome and every parameter are in `merge3-manifest.json`"
            + ("; `mergekit.yaml` reproduces it with mergekit.\n" if mergekit else ".\n"))
    return save_state_dict(merged, out_dir, copy_from=models["base"],
                           extra_files={"README.md": card, "merge3-manifest.json": json.dumps(manifest, indent=2) + "\n",
                                        **extra})
