"""The search loop and engines on a fast synthetic objective (no models involved)."""

import json
import numpy as np
import pytest

from merge3 import Merge3Error
from merge3.runs import Run
from merge3.runtime import CandidateResult
from merge3.search import Genome, Objectives, Search, make_engine, parse_space, rank_key

import _synthetic  # noqa: F401  (registers the synthetic methods)

TASKS = ["t0", "t1", "t2"]


TARGET = np.array([0.9, 0.3, 0.6])


def synthetic_scores(plan):
    """Task t likes weight t near TARGET[t] in every group; 'sharp' groups with density ≈ 0.5 earn a bonus."""
    scores = []
    for t in range(len(TASKS)):
        err = np.mean([(g["params"]["weights"][t] - TARGET[t]) ** 2 for g in plan])
        bonus = np.mean([0.1 * (1 - abs(g["params"].get("density", 0) - 0.5) * 2) if g["method"] == "_synthetic_sharp" else 0 for g in plan])
        scores.append(float(np.clip(1 - err + bonus, 0, 2)))
    return dict(zip(TASKS, scores))


class SyntheticExecutor:
    def __init__(self, fail_every=0):
        self.calls = 0
        self.fail_every = fail_every

    def submit(self, plans):
        order = list(range(len(plans)))[::-1]  # completion order differs from submission order
        for i in order:
            self.calls += 1
            if self.fail_every and self.calls % self.fail_every == 0:
                yield i, CandidateResult(error="ValueError: NaN in merged weights", items_evaluated=3)
            else:
                yield i, CandidateResult(scores=synthetic_scores(plans[i]), items_evaluated=3 * len(TASKS))

    def close(self):
        pass


def make_search(engine="pymoo", algorithm="auto", objectives=("mean",), seed=0, generations=6, population=12,
                executor=None, recorder=None, replay=None, max_items=None, storage=None):
    genome = Genome(["g0", "g1"], ["_synthetic_sharp", "_synthetic_soft"], n_models=3, weight_range=(0.0, 1.5))
    obj = Objectives(list(objectives), TASKS)
    eng = make_engine(engine, genome.variables, len(obj), population, generations, seed, algorithm, storage)
    return Search(genome, eng, executor or SyntheticExecutor(), obj, recorder=recorder, replay=replay,
                  max_items=max_items, bank_items=100)


def strip(records):
    return [{k: getattr(r, k) for k in ("generation", "index", "genome", "objectives")} for r in records]


@pytest.mark.parametrize("engine", ["pymoo", "optuna"])
def test_single_objective_search_improves_and_is_deterministic(engine):
    first = make_search(engine).run()
    again = make_search(engine).run()
    other = make_search(engine, seed=1).run()
    assert strip(first.records) == strip(again.records)
    assert strip(first.records) != strip(other.records)
    gen0 = max(r.objectives[0] for r in first.records if r.generation == 0)
    assert first.best().objectives[0] > gen0
    assert first.best().objectives[0] > 0.9
    assert first.items_evaluated == 9 * len(first.records)
    assert first.full_bank_equivalent == 100 * len(first.records)


@pytest.mark.parametrize("engine", ["pymoo", "optuna"])
def test_multi_objective_gives_a_non_dominated_front(engine):
    result = make_search(engine, objectives=("per_task",), generations=5).run()
    front = result.pareto()
    assert len(front) >= 2
    values = np.array([r.objectives for r in front])
    for v in values:
        assert not np.any(np.all(values >= v, axis=1) & np.any(values > v, axis=1))
    assert result.objective_names == TASKS


def test_failed_candidates_get_the_worst_fitness_and_the_search_goes_on():
    result = make_search(executor=SyntheticExecutor(fail_every=5)).run()
    failed = [r for r in result.records if r.error]
    assert failed and all(np.isnan(r.objectives[0]) for r in failed)
    assert result.best().error is None and result.best().objectives[0] > 0.8


def test_item_budget_stops_the_search():
    result = make_search(max_items=9 * 30).run()
    assert result.stopped_by == "max_items"
    assert 30 <= len(result.records) < 30 + 12


def test_custom_objective_as_callable_and_import_path(objective_module):
    def worst_task(r):
        return min(r.scores.values())

    by_fn = make_search(objectives=(worst_task,), generations=2).run()
    assert by_fn.objective_names == ["worst_task"]
    rec = by_fn.records[0]
    assert rec.objectives[0] == pytest.approx(min(rec.scores.values()))
    by_path = make_search(objectives=("my_objectives:best_task",), generations=1).run()
    rec = by_path.records[0]
    assert by_path.objective_names == ["my_objectives:best_task"]
    assert rec.objectives[0] == pytest.approx(max(rec.scores.values())), "the named function really is called"
    with pytest.raises(Merge3Error, match="cannot import 'no_such_module:f'"):
        Objectives(["no_such_module:f"], TASKS)
    with pytest.raises(Merge3Error, match="the standard library"):
        Objectives(["statistics:fmean"], TASKS)


def test_resume_by_replay_matches_an_uninterrupted_run(tmp_path):
    full = make_search().run()
    run = Run.create(tmp_path, "r", {"x": 1})
    partial = make_search(recorder=run, generations=6)
    # simulate a kill: only the first 20 evaluations (and half of the 21st line) made it to disk
    result = partial.run()
    run.close()
    lines = (run.path / "evaluations.jsonl").read_text().splitlines(keepends=True)
    (run.path / "evaluations.jsonl").write_text("".join(lines[:20]) + lines[20][:15])
    replay = Run.open(run.path).replay()
    assert len(replay) == 20
    executor = SyntheticExecutor()
    resumed = make_search(recorder=Run.open(run.path), replay=replay, executor=executor).run()
    assert strip(resumed.records) == strip(full.records) == strip(result.records)
    assert executor.calls == len(full.records) - 20
    on_disk = Run.open(run.path).records()
    assert sorted((r.generation, r.index) for r in on_disk) == sorted((r.generation, r.index) for r in full.records)


def test_resume_refuses_a_changed_config(tmp_path):
    run = Run.create(tmp_path, "r", {})
    make_search(recorder=run, generations=2).run()
    run.close()
    with pytest.raises(Merge3Error, match="differs from the recorded one"):
        make_search(replay=Run.open(run.path).replay(), seed=5, generations=2).run()


def test_run_folder_is_never_reused_and_reads_with_pandas(tmp_path):
    run = Run.create(tmp_path, "r", {"a": 1})
    with pytest.raises(Merge3Error, match="already exists"):
        Run.create(tmp_path, "r", {"a": 2})
    result = make_search(recorder=run, generations=2).run()
    run.finish(result, started=0)
    frame = run.evaluations()
    assert len(frame) == len(result.records) and {"genome", "scores", "objectives", "items_evaluated"} <= set(frame)
    best = json.loads((run.path / "best.json").read_text())
    assert best["objectives"] == result.best().objectives
    assert run.meta["status"] == "finished" and run.meta["cost_ratio"] == pytest.approx(100 / 9)
    assert (run.path / "checkpoint" / "gen-0001.json").exists()


def test_optuna_storage_is_a_journal_the_dashboard_can_read(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    make_search("optuna", generations=2, storage=tmp_path / "optuna.journal").run()
    study = optuna.load_study(study_name="merge3", storage=JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal"))))
    assert len(study.trials) == 24


def test_cmaes_refuses_a_space_with_a_method_choice():
    with pytest.raises(Merge3Error, match="cmaes"):
        make_search("optuna", algorithm="cmaes")


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"genome": {"weights": {"low": 1.0, "high": 0.5}}}, "field 'genome.weights': bounds reversed"),
        ({"bank": {"path": "b", "estimator": "magic"}}, "field 'bank.estimator'"),
        ({"objectives": ["best"]}, "field 'objectives'"),
        ({"engine": {"population": 1}}, "field 'engine.population'"),
        ({"surprise": 1}, "field 'surprise'"),
    ],
)
def test_bad_space_configs_name_the_field(patch, message):
    raw = {"name": "x", "models": {"base": "b", "endpoints": ["a"]}, "bank": {"path": "b"}, **patch}
    with pytest.raises(Merge3Error, match=message):
        parse_space(raw, "space.yaml")


def test_genome_rejects_unknown_methods_and_bad_ranges():
    with pytest.raises(Merge3Error, match="unknown merge method 'slerpy'"):
        Genome(["g"], ["slerpy"], n_models=2)
    with pytest.raises(Merge3Error, match="_synthetic_sharp.density"):
        Genome(["g"], ["_synthetic_sharp"], n_models=2, ranges={"_synthetic_sharp.density": (0.5, 1.5)})
    with pytest.raises(Merge3Error, match="not an evolvable parameter"):
        Genome(["g"], ["_synthetic_soft"], n_models=2, ranges={"_synthetic_soft.alpha": (0.1, 0.2)})


def test_recipes_seed_the_first_population():
    genome = Genome(["g0", "g1"], ["_synthetic_sharp", "_synthetic_soft"], n_models=3, weight_range=(0.0, 1.5))
    recipes = genome.recipes((0.5, 1.0, 2.0))  # 2.0 is outside the range: dropped
    assert len(recipes) == 4
    assert {r["g0|method"] for r in recipes} == {"_synthetic_sharp", "_synthetic_soft"}
    assert all(r["g1|w2"] in (0.5, 1.0) and r["g0|w0"] == r["g1|w2"] for r in recipes)
    for name in ("pymoo", "optuna"):
        engine = make_engine(name, genome.variables, 1, 6, 2, 0, initial=recipes)
        first = [genome.normalise(g) for g in engine.ask()]
        assert first[:4] == [genome.normalise(r) for r in recipes]
        assert len(first) == 6


def test_more_recipes_than_a_population_are_all_evaluated():
    """12 recipes, population 5: none is cut (cutting once dropped TSV-M's strongest recipes from a SmolLM search).
    pymoo and CMA-ES evaluate them all in generation 0; Optuna's queue carries the rest into generation 1."""
    scales = (0.2, 0.4, 0.6, 0.8, 1.0, 1.5)
    genome = Genome(["g0"], ["_synthetic_sharp", "_synthetic_soft"], n_models=2, weight_range=(0.0, 1.5))
    recipes = [genome.normalise(r) for r in genome.recipes(scales)]
    assert len(recipes) == 12
    one_method = Genome(["g0", "g1"], ["_synthetic_soft"], n_models=3, weight_range=(0.0, 1.5))
    for name, space in (("pymoo", genome), ("cmaes", one_method)):
        initial = [space.normalise(r) for r in space.recipes(scales)]
        engine = make_engine(name, space.variables, 1, 5, 3, 0, initial=initial)
        first = [space.normalise(g) for g in engine.ask()]
        for recipe in initial:
            assert any(all(g[k] == pytest.approx(v) for k, v in recipe.items()) for g in first), (name, recipe)
        engine.tell(first, np.arange(len(first), dtype=float)[:, None])
        assert len(engine.ask()) == 5  # later generations are a population again
    engine = make_engine("optuna", genome.variables, 1, 5, 3, 0, initial=recipes)
    asked = []
    for _ in range(3):
        batch = engine.ask()
        asked += [genome.normalise(g) for g in batch]
        engine.tell(batch, np.zeros((len(batch), 1)))
    assert asked[:12] == recipes


@pytest.mark.parametrize("recipes", [0, 3, 12])
@pytest.mark.parametrize("name", ["pymoo", "optuna", "cmaes"])
def test_planned_candidates_counts_what_the_run_asks_for(name, recipes):
    """The progress bar's total: a generation 0 larger than a population (more recipes) is counted."""
    space = Genome(["g0", "g1"], ["_synthetic_soft"], n_models=3, weight_range=(0.0, 1.5))
    initial = [space.normalise(r) for r in space.recipes(tuple(0.1 * k for k in range(1, 13)))][:recipes]
    initial += initial[:2]  # a repeated recipe is asked once
    engine = make_engine(name, space.variables, 1, 5, 3, 0, initial=initial)
    asked = 0
    while not engine.done:
        batch = engine.ask()
        asked += len(batch)
        engine.tell(batch, np.arange(len(batch), dtype=float)[:, None])
    assert asked == engine.planned_candidates


@pytest.mark.parametrize("engine", ["pymoo", "optuna"])
def test_search_matches_stored_results(engine):
    """Same seed, same engine, same results as recorded when this test was written (catches silent changes in
    the engines' randomness or our genome decoding); regenerate tests/data/synthetic_search_seed0.json on purpose."""
    from pathlib import Path

    stored = json.loads((Path(__file__).parent / "data" / "synthetic_search_seed0.json").read_text())[engine]
    result = make_search(engine, generations=3, population=6).run()
    got = [{k: getattr(r, k) for k in ("generation", "index", "genome", "objectives")} for r in result.records]
    assert len(got) == len(stored)
    for g, s in zip(got, stored):
        assert (g["generation"], g["index"]) == (s["generation"], s["index"])
        assert g["genome"].keys() == s["genome"].keys()
        for key, value in s["genome"].items():
            assert g["genome"][key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-9, abs=1e-12))
        assert g["objectives"] == pytest.approx(s["objectives"], rel=1e-9)


def test_row_block_genome_decodes_to_row_block_weights():
    genome = Genome(["g0", "g1"], ["task_arithmetic", "ties"], n_models=2, weight_range=(0.0, 2.0), row_blocks=3)
    weight_genes = sorted(v for v in genome.variables if "|w" in v)
    assert weight_genes[:3] == ["g0|w0.0", "g0|w0.1", "g0|w0.2"] and len(weight_genes) == 2 * 2 * 3
    values = {**genome.midpoint(), "g1|method": "ties", "g1|w1.2": 0.25}
    plan = genome.decode(values)
    assert plan[0].params["weights"] == [{"row_blocks": [1.0, 1.0, 1.0]}] * 2
    assert plan[1].params["weights"][1] == {"row_blocks": [1.0, 1.0, 0.25]}
    recipes = genome.recipes((0.5, 1.5))
    ta = [r for r in recipes if r["g0|method"] == "task_arithmetic"]
    assert [{r[g] for g in weight_genes} for r in ta] == [{0.5}, {1.5}]  # every block of every group at the scale
    with pytest.raises(Merge3Error, match="row_blocks"):
        Genome(["g"], ["task_arithmetic"], n_models=2, row_blocks=0)
    assert parse_space({"name": "x", "models": {"endpoints": ["a"]}, "bank": {"path": "b"},
                        "genome": {"row_blocks": 16}}, "s.yaml").genome.row_blocks == 16
    with pytest.raises(Merge3Error, match="genome.row_blocks"):
        parse_space({"name": "x", "models": {"endpoints": ["a"]}, "bank": {"path": "b"},
                     "genome": {"row_blocks": 0}}, "s.yaml")


def test_per_model_genome_evolves_one_density_per_endpoint_and_exports_them():
    from merge3.methods import mergekit_config

    genome = Genome(["l.0", "l.1"], ["ties", "breadcrumbs"], n_models=3, per_model=["ties.densities"])
    assert {"l.0|ties.densities.0", "l.0|ties.densities.2"} <= set(genome.variables)
    assert "l.0|ties.density" not in genome.variables and "l.0|breadcrumbs.density" in genome.variables
    assert (genome.variables["l.1|ties.densities.1"].low, genome.variables["l.1|ties.densities.1"].high) == (0.05, 1.0)
    values = {**genome.midpoint(), "l.0|method": "ties", "l.1|method": "ties",
              "l.0|ties.densities.0": 0.2, "l.0|ties.densities.1": 0.5, "l.0|ties.densities.2": 0.9}
    plan = [c.as_dict() for c in genome.decode(values)]
    assert plan[0]["params"]["densities"] == [0.2, 0.5, 0.9] and "density" not in plan[0]["params"]
    config, why_not = mergekit_config(plan, {"l.0": ["l.0.w"], "l.1": ["l.1.w"]}, "base", ["a", "b", "c"])
    assert why_not == ""
    assert [m["parameters"]["density"][0] for m in config["models"]] == [
        {"filter": "l.0.w", "value": v} for v in (0.2, 0.5, 0.9)]
    with pytest.raises(Merge3Error, match=r"genome.per_model: 'ties.density' is not a per-model parameter .*"
                                          r"options: ties.densities, breadcrumbs.densities"):
        Genome(["l.0"], ["ties", "breadcrumbs"], n_models=2, per_model=["ties.density"])
    with pytest.raises(Merge3Error, match="genome.per_model: 'dare.drop_rates'"):
        Genome(["l.0"], ["ties"], n_models=2, per_model=["dare.drop_rates"])
    assert parse_space({"name": "x", "models": {"endpoints": ["a"]}, "bank": {"path": "b"},
                        "genome": {"methods": ["dare"], "per_model": ["dare.drop_rates"]}},
                       "s.yaml").genome.per_model == ["dare.drop_rates"]


def test_mergekit_export_refuses_row_block_weights():
    from merge3.methods import mergekit_config

    plan = [{"group": "l.0", "method": "task_arithmetic", "params": {"weights": [{"row_blocks": [0.5, 1.0]}] * 2}}]
    config, reason = mergekit_config(plan, {"l.0": ["l.0.w"]}, "base", ["a", "b"])
    assert config is None and "row-block" in reason


def _quadratic_search(seed=0, generations=8, executor=None, recorder=None, replay=None):
    """One real method (no choice): the CMA-ES engine's kind of space."""
    genome = Genome(["g0", "g1"], ["_synthetic_soft"], n_models=3, weight_range=(0.0, 1.5))
    obj = Objectives(["mean"], TASKS)
    eng = make_engine("cmaes", genome.variables, 1, 8, generations, seed, initial=genome.recipes((0.3, 1.0)))
    return Search(genome, eng, executor or SyntheticExecutor(), obj, recorder=recorder, replay=replay, bank_items=100)


def test_cmaes_engine_starts_from_the_recipes_improves_and_is_deterministic():
    a, b = _quadratic_search().run(), _quadratic_search().run()
    assert strip(a.records) == strip(b.records)
    assert strip(a.records) != strip(_quadratic_search(seed=1).run().records)
    first = [r for r in a.records if r.generation == 0]
    assert len(first) == 3  # the centre of the box and the two recipes
    later = [r for r in a.records if r.generation == 1]
    assert len(later) == 8  # 7 samples + the mean
    best_first = max(r.objectives[0] for r in first)
    best = a.best().objectives[0]
    assert best > best_first + 0.05 and best > 0.97  # the optimum is 1.0 (every weight at TARGET)


def test_cmaes_engine_resumes_by_replay(tmp_path):
    full = _quadratic_search().run()
    partial = {(r.generation, r.index): r for r in full.records if r.generation < 3}
    executor = SyntheticExecutor()
    resumed = _quadratic_search(replay=partial, executor=executor).run()
    assert executor.calls == len(full.records) - len(partial)
    assert strip(resumed.records) == strip(full.records)


def test_cmaes_engine_refuses_choices_and_several_objectives():
    genome = Genome(["g"], ["_synthetic_sharp", "_synthetic_soft"], n_models=2)
    with pytest.raises(Merge3Error, match="'g\\|method' is a choice"):
        make_engine("cmaes", genome.variables, 1, 8, 2, 0)
    single = Genome(["g"], ["_synthetic_soft"], n_models=2)
    with pytest.raises(Merge3Error, match="one objective"):
        make_engine("cmaes", single.variables, 2, 8, 2, 0)
    with pytest.raises(Merge3Error, match="at least 4"):
        make_engine("cmaes", single.variables, 1, 3, 2, 0)
    with pytest.raises(Merge3Error, match="engine.algorithm: the 'cmaes' engine has no algorithm 'ga'"):
        make_engine("cmaes", single.variables, 1, 8, 2, 0, algorithm="ga")


@pytest.mark.parametrize("engine", ["pymoo", "optuna"])
def test_forget_objective_lowers_its_task_while_keep_constraints_hold(engine):
    """t0 is driven down (to its chance floor at best) while t1 and t2 must stay ≥ 0.9: the best record is feasible,
    forgets t0 far below what the addition merge gives it, and no infeasible record ranks above a feasible one."""
    search = make_search(engine, objectives=("forget:t0", "keep:t1>=0.9", "keep:t2>=0.9"), generations=8,
                         population=16)
    search.objectives = Objectives(["forget:t0", "keep:t1>=0.9", "keep:t2>=0.9"], TASKS, chance={"t0": 0.2})
    result = search.run()
    best = result.best()
    assert best.violation == 0 and best.scores["t1"] >= 0.9 and best.scores["t2"] >= 0.9
    added = synthetic_scores([{"method": "_synthetic_soft", "params": {"weights": list(TARGET)}}] * 2)
    assert best.scores["t0"] < added["t0"] - 0.4, "the forgotten task ends far below the best addition merge"
    assert best.objectives == [-max(best.scores["t0"], 0.2)]
    feasible = [r for r in result.records if r.ok and r.violation == 0]
    infeasible = [r for r in result.records if r.ok and r.violation > 0]
    assert feasible and infeasible, "both kinds were visited"
    told = [search._told(r)[0] for r in feasible], [search._told(r)[0] for r in infeasible]
    assert max(told[0]) < min(told[1]), "every infeasible candidate is told worse than every feasible one"
    ranked = sorted(result.records, key=rank_key)
    assert all(r.violation == 0 for r in ranked[:len(feasible)])


def test_forget_and_keep_refuse_bad_specs():
    with pytest.raises(Merge3Error, match=r"objectives: 'forget:t9' names task 't9', which the bank does not have"):
        Objectives(["forget:t9"], TASKS)
    with pytest.raises(Merge3Error, match=r"the threshold 1.5 is outside \[0, 1\]"):
        Objectives(["mean", "keep:t1>=1.5"], TASKS)
    with pytest.raises(Merge3Error, match=r"'keep:t1>0.5' is not keep:<task>>=<threshold>"):
        Objectives(["mean", "keep:t1>0.5"], TASKS)
    with pytest.raises(Merge3Error, match=r"the threshold 'high' is not a number"):
        Objectives(["mean", "keep:t1>=high"], TASKS)
    with pytest.raises(Merge3Error, match=r"keep:… entries are constraints; give at least one objective"):
        Objectives(["keep:t1>=0.5"], TASKS)
    with pytest.raises(Merge3Error, match=r"names task 'nope'"):
        Objectives(["mean", "keep:nope>=0.5"], TASKS)


def test_analogy_genome_evolves_one_coefficient_per_group_on_the_analogy_direction():
    genome = Genome(["l.0", "l.1"], ["analogy"], n_models=3, fixed={"analogy.roles": ["b", "a", "c"]})
    assert sorted(genome.variables) == ["l.0|analogy.scale", "l.1|analogy.scale"]
    plan = genome.decode({"l.0|analogy.scale": 0.5, "l.1|analogy.scale": 1.5})
    assert [c.params for c in plan] == [{"scale": 0.5, "roles": ["b", "a", "c"]}, {"scale": 1.5, "roles": ["b", "a", "c"]}]


def test_per_model_drop_rates_export_as_mergekit_keep_rates():
    from merge3.methods import mergekit_config

    plan = [{"group": "l.0", "method": "dare", "params": {"weights": [0.5, 1.0], "drop_rates": [0.2, 0.7]}}]
    config, why_not = mergekit_config(plan, {"l.0": ["l.0.w"]}, "base", ["a", "b"])
    assert why_not == "" and config["merge_method"] == "dare_linear"
    assert [m["parameters"]["density"] for m in config["models"]] == pytest.approx([0.8, 0.3])
    assert [m["parameters"]["weight"] for m in config["models"]] == [0.5, 1.0]


def test_tsv_compress_genome_evolves_the_rank_fraction_per_group():
    genome = Genome(["g0", "g1"], ["tsv_merge", "tsv_compress"], n_models=2, weight_range=(0.0, 2.0))
    assert "g1|tsv_compress.rank_fraction" in genome.variables
    plan = genome.decode({**genome.midpoint(), "g1|method": "tsv_compress", "g1|tsv_compress.rank_fraction": 0.1})
    assert plan[1].method == "tsv_compress" and plan[1].params["rank_fraction"] == 0.1
    assert "rank_fraction" not in plan[0].params


def test_the_progress_bar_shows_the_runs_best_not_an_infeasible_candidates_value():
    """The bar's "best" is the search's own best (feasible, last fidelity), not the highest objective it saw."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from merge3.search import RichProgress

    out = io.StringIO()
    bar = RichProgress(total=2, generations=1, console=Console(file=out, force_terminal=False, width=120))
    bar.advance(SimpleNamespace(ok=True, objectives=[-0.05], violation=0.4))  # infeasible: forgets best of all
    bar.advance(SimpleNamespace(ok=True, objectives=[-0.30], violation=0.0))
    bar.generation({"generation": 0, "best_so_far": -0.30})
    bar.close()
    assert bar.best == -0.30 and "best -0.3000" in bar._label() and "-0.0500" not in out.getvalue()
