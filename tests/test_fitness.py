"""Fitness strategies that keep up with the search: fresh items, adaptive testing, promotion, recalibration."""

import json
import signal
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

import merge3
from merge3 import Merge3Error
from merge3.itembank import AdaptiveTest, Estimator, IRTFit, ItemBank, estimate_answered, refit_irt, scaled_weight
from merge3.itembank._synthetic_irt import simulate_bank
from merge3.runs import Run

from _runs import cli as _cli
from _runs import strip, wait_for_lines


# ---- estimators on any answered set -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    truth = simulate_bank(n_subjects=150, items_per_task=150, tasks=("x", "y"), dims=1, seed=3)
    est = Estimator.calibrate(truth.responses, truth.tasks, ns=(10, 20), subset_methods=("random",),
                              fit=IRTFit(kind="2pl"), seed=0)
    return truth, est


def test_answered_estimates_track_the_truth_and_their_standard_errors_are_honest(synthetic):
    truth, est = synthetic
    rng = np.random.default_rng(5)
    theta = rng.normal(size=(200, 1))
    answers, accuracy = truth.sample(theta, 11), truth.true_accuracy(theta).mean(1)
    for method in ("naive", "p-irt", "gp-irt"):
        z = []
        for k in range(200):
            items = np.sort(rng.choice(300, 40, replace=False))
            e = estimate_answered(est, items, answers[k, items], method)
            z.append((e.mean - accuracy[k]) / e.se_mean)
        z = np.asarray(z)
        assert abs(z.mean()) < 0.35, f"{method}: unbiased"
        assert 0.6 < z.std() < 1.6, f"{method}: its SE is the size of its error (z spread {z.std():.2f})"


def test_more_items_shrink_the_error_and_lambda_scales_with_n(synthetic):
    truth, est = synthetic
    rng = np.random.default_rng(6)
    theta = rng.normal(size=(100, 1))
    answers, accuracy = truth.sample(theta, 12), truth.true_accuracy(theta).mean(1)
    mae = {}
    for n in (10, 80):
        errors = []
        for k in range(100):
            items = np.sort(rng.choice(300, 2 * n, replace=False))
            errors.append(abs(estimate_answered(est, items, answers[k, items], "gp-irt").mean - accuracy[k]))
        mae[n] = float(np.mean(errors))
    assert mae[80] < mae[10]
    assert scaled_weight(0.3, 20, 20) == pytest.approx(0.3) and scaled_weight(0.3, 20, 200) > 0.8


def test_recalibration_recovers_items_a_low_ability_calibration_never_saw_answered_well():
    """The first calibration saw only weak subjects; the search then visits strong ones. Refitting on their (sparse)
    answers, warm-started, makes the estimates of new strong subjects accurate again."""
    rng = np.random.default_rng(0)
    truth = simulate_bank(n_subjects=10, items_per_task=150, tasks=("x", "y"), dims=1, seed=3)
    weak = truth.sample(rng.normal(-1.5, 0.4, size=(120, 1)), 1)
    est = Estimator.calibrate(weak, truth.tasks, ns=(10,), subset_methods=("random",),
                              fit=IRTFit(kind="2pl"), seed=0)
    strong = truth.sample(rng.normal(1.5, 0.4, size=(300, 1)), 2)
    seen = np.where(rng.random(strong.shape) < 0.15, strong, np.nan)  # each answered ~45 items
    refitted = replace(est, model=refit_irt(est.model, np.concatenate([weak, seen])))
    test = rng.normal(1.5, 0.4, size=(100, 1))
    answers, accuracy = truth.sample(test, 9), truth.true_accuracy(test).mean(1)

    def mae(estimator):
        errors = []
        for k in range(100):
            items = np.sort(np.random.default_rng(k).choice(300, 30, replace=False))
            errors.append(abs(estimate_answered(estimator, items, answers[k, items], "p-irt").mean - accuracy[k]))
        return float(np.mean(errors))

    before, after = mae(est), mae(refitted)
    assert before > 0.1 and after < 0.06 and after < before / 3
    assert refitted.model.subject_ids[:120] == est.model.subject_ids and len(refitted.model.subject_ids) == 420


def test_refit_is_deterministic_and_refuses_other_items(synthetic):
    truth, est = synthetic
    more = np.where(np.random.default_rng(1).random((20, 300)) < 0.2, truth.sample(np.ones((20, 1)), 3), np.nan)
    Y = np.concatenate([truth.responses, more])
    one, two = refit_irt(est.model, Y), refit_irt(est.model, Y)
    assert np.array_equal(one.a, two.a) and np.array_equal(one.b, two.b)
    with pytest.raises(Merge3Error, match="refit: responses have 299 items"):
        refit_irt(est.model, Y[:, :299])


def test_an_adaptive_test_asks_informative_items_and_records_what_it_asked(synthetic):
    truth, est = synthetic
    model = est.model
    asked = []

    def answer(rows):
        asked.extend(rows.tolist())
        return truth.sample(np.array([[1.0]]), int(rows.sum()))[0, rows - 1000]

    test = AdaptiveTest(rows=np.arange(1000, 1300), tasks=model.tasks, a=model.a, b=model.b,
                        prior_mean=model.theta_mean, prior_cov=model.theta_cov, start=4, batch=3, n_max=16,
                        target_se=0.0, seed=(0, 0, 0), randomesque=1)
    rows, correct = test.run(answer)
    assert rows.tolist() == asked, "the record holds exactly the items answered, in order"
    assert len(rows) == 2 * 16 and len(set(rows.tolist())) == 32
    # after the random start, chosen items sit near the candidate's ability (p ≈ 0.5), not at the extremes
    theta = model.fit_ability(correct.astype(float), items=rows - 1000)
    p = model.predict(theta, rows[8:] - 1000)
    p_all = model.predict(theta)
    assert np.mean(np.abs(p - 0.5)) < np.mean(np.abs(p_all - 0.5))
    again = replace(test).run(lambda r: truth.sample(np.array([[1.0]]), int(r.sum()))[0, r - 1000])
    assert again[0].tolist() == rows.tolist(), "seeded: the same answers give the same test"
    with pytest.raises(Merge3Error, match="n_max .* must be at least the start size"):
        replace(test, n_max=2)


# ---- on the real digits zoo -------------------------------------------------------------------------------------


def space(zoo, fitness, **engine):
    return {"name": "fit", "seed": 0,
            "models": {"base": str(zoo.base), "endpoints": [str(p) for p in zoo.finetuned.values()]},
            "bank": {"path": str(zoo.bank), "estimator": "gp-irt", "items_per_task": 20, "subset": "random",
                     "fitness": fitness},
            "genome": {"granularity": "layer", "methods": ["task_arithmetic", "tsv_merge"]},
            "engine": {"population": 6, "generations": 3, **engine}, "executor": {"kind": "local"}}


def test_fresh_items_change_every_generation_and_are_shared_within_one(calibrated_zoo, tmp_path):
    outcome = merge3.search(space(calibrated_zoo, {"items": "fresh"}), runs_dir=tmp_path, name="fresh", progress=False)
    by_generation = {}
    for r in outcome.run.records():
        by_generation.setdefault(r.generation, set()).add(tuple(r.answers["items"]))
    assert all(len(s) == 1 for s in by_generation.values()), "one subset per generation"
    subsets = [next(iter(s)) for s in by_generation.values()]
    assert len(set(subsets)) == 3 and all(len(s) == 100 for s in subsets)
    assert all(r.se["mean"] > 0 for r in outcome.run.records())


def test_soft_scores_are_recorded_per_answer_and_only_change_what_the_engine_ranks_by(calibrated_zoo, tmp_path):
    fitness = {"items": "fresh", "promotion": {"top_k": 2, "factor": 3, "engine_sees": "first"}}
    soft = merge3.search(space(calibrated_zoo, {**fitness, "soft": 2.0}), runs_dir=tmp_path, name="soft",
                         progress=False)
    plain = merge3.search(space(calibrated_zoo, fitness), runs_dir=tmp_path, name="plain", progress=False)
    lines = soft.run.records(every_rung=True)
    for r in lines:
        rows, correct = r.answered()
        p = np.asarray(r.answers["soft"])
        assert p.shape == rows.shape and ((0 <= p) & (p <= 1)).all(), "one soft score per answer, a probability"
        assert (p[correct == 1] >= 0.1 - 1e-9).all() and (p[correct == 0] <= 0.5 + 1e-9).all(), \
            "a right answer is the most likely of 10 classes, a wrong one is not"
        assert r.details["soft"] == pytest.approx(np.mean([p[calibrated_zoo_tasks(r, soft) == t].mean()
                                                           for t in np.unique(calibrated_zoo_tasks(r, soft))]))
    first = {r.candidate: r.details["soft"] for r in lines if r.rung == 0}
    promoted = [r for r in lines if r.rung == 1]
    assert promoted and all(r.details["soft_first"] == first[r.candidate] for r in promoted), \
        "the engine sees the first items' soft score"
    gen0 = lambda run: [(r.index, r.scores) for r in run.run.records() if r.generation == 0 and r.rung == 0]  # noqa: E731
    assert gen0(soft) == gen0(plain), "estimates stay on 0/1 answers: generation 0 (same genomes) is unchanged"
    # what the engine is told: −(mean + 2 × soft score), at the fidelity it sees; other objectives get nothing
    from merge3.search._loop import Objectives

    tasks = list(calibrated_zoo.finetuned)
    loop = told_by(rank_soft=2.0, engine_sees_first=True, objectives=Objectives(["mean"], tasks))
    rung0 = next(r for r in lines if r.rung == 0)
    assert loop._told(rung0) == pytest.approx([-(rung0.objectives[0] + 2.0 * rung0.details["soft"])])
    top = promoted[0]
    assert loop._told(top) == pytest.approx([-(top.first_objectives[0] + 2.0 * top.details["soft_first"])])
    loop.objectives = Objectives(["per_task"], tasks)
    assert loop._told(rung0) == pytest.approx([-v for v in rung0.objectives]), "no soft bonus on per-task scores"
    # forget:<task>: the task's own soft score pushed down (−w × it), floored at chance like the objective
    forgotten = tasks[0]
    assert set(rung0.details["soft_tasks"]) == set(tasks)
    assert rung0.details["soft"] == pytest.approx(np.mean(list(rung0.details["soft_tasks"].values())))
    assert all(r.details["soft_tasks_first"] == next(x for x in lines if x.candidate == r.candidate
                                                     and x.rung == 0).details["soft_tasks"] for r in promoted)
    forget = replace(rung0, objectives=[-rung0.scores[forgotten]], objective_se=None, violation=0.0)
    p = rung0.details["soft_tasks"][forgotten]
    loop.objectives = Objectives([f"forget:{forgotten}"], tasks, chance={forgotten: 0.0})
    loop.fitness.engine_sees_first = False
    assert loop._told(forget) == pytest.approx([rung0.scores[forgotten] + 2.0 * p])
    loop.objectives = Objectives([f"forget:{forgotten}"], tasks, chance={forgotten: p + 0.2})
    assert loop._told(forget) == pytest.approx([rung0.scores[forgotten] + 2.0 * (p + 0.2)]), "no reward below chance"


def test_full_fitness_with_soft_ranks_a_forget_objective_by_the_tasks_soft_score(calibrated_zoo, tmp_path):
    """Exact fitness takes one option, soft: every search item is answered with its soft score, the estimates stay
    the exact 0/1 means, and a forget:<task> objective is told to the engine minus w × that task's soft score."""
    tasks = list(calibrated_zoo.finetuned)
    config = space(calibrated_zoo, {"soft": 3.0}, population=4, generations=2)
    config["bank"].update(estimator="full", items_per_task=None)
    config["genome"].update(methods=["tsv_merge"], weights={"low": -1.0, "high": 1.5})
    outcome = merge3.search(config, objectives=[f"forget:{tasks[0]}", f"keep:{tasks[1]}>=0.0"], runs_dir=tmp_path,
                            name="full-soft", progress=False)
    bank = ItemBank.load(config["bank"]["path"])
    records = outcome.run.records()
    assert records and all(r.error is None for r in records)
    for r in records:
        rows, correct = r.answered()
        assert sorted(rows.tolist()) == sorted(bank.search_indices.tolist()), "every search item"
        assert r.scores == pytest.approx(bank.per_task_accuracy(correct, rows)), "estimates stay exact 0/1 means"
        p = np.asarray(r.answers["soft"])
        assert r.details["soft_tasks"] == pytest.approx(bank.per_task_accuracy(p, rows))
        assert r.details["soft_tasks_first"] == r.details["soft_tasks"]
    from merge3.search._loop import Objectives

    loop = told_by(rank_soft=3.0, engine_sees_first=False,
                   objectives=Objectives([f"forget:{tasks[0]}"], tasks, chance=bank.chance_accuracy()))
    r = records[0]
    floor = bank.chance_accuracy()[tasks[0]]
    assert loop._told(r) == pytest.approx([max(r.scores[tasks[0]], floor)
                                           + 3.0 * max(r.details["soft_tasks"][tasks[0]], floor)])


def told_by(rank_soft: float, engine_sees_first: bool, objectives):
    """A search loop with only what ``_told`` reads: what the engine would be told of a record."""
    from merge3.search._loop import Search

    loop = Search.__new__(Search)
    loop.fitness = SimpleNamespace(rank_soft=rank_soft, rank_z=0.0, engine_sees_first=engine_sees_first)
    loop.objectives = objectives
    return loop


def calibrated_zoo_tasks(record, outcome) -> np.ndarray:
    bank = ItemBank.load(outcome.run.config["bank"]["path"])
    return bank.task_of[record.answered()[0]]


def test_promotion_never_lets_a_first_fidelity_estimate_become_the_best(calibrated_zoo, tmp_path):
    fitness = {"items": "fresh", "promotion": {"top_k": 2, "factor": 3, "rungs": 2}}
    outcome = merge3.search(space(calibrated_zoo, fitness), runs_dir=tmp_path, name="promo", progress=False)
    lines = outcome.run.records(every_rung=True)
    rungs = {}
    for r in lines:
        rungs.setdefault(r.generation, []).append(r.rung)
    assert all(g.count(1) == 2 and g.count(2) == 1 for g in rungs.values()), "top 2 to rung 1, top 1 to rung 2"
    best = outcome.best
    assert best.rung == 2 and best.eligible and best.items_evaluated == 5 * 180
    first = [r for r in outcome.result.records if r.rung == 0]
    assert max(r.objectives[0] for r in first) <= best.objectives[0] or not first[0].eligible
    assert not any(r.eligible for r in first)
    # the estimate uses every item the candidate answered, and the cost counts every one of them
    top = max(lines, key=lambda r: (r.rung, r.objectives[0]))
    assert len(top.answers["items"]) == len(set(top.answers["items"])) == top.items_evaluated
    assert outcome.run.meta["items_evaluated"] == sum(r.items_evaluated for r in outcome.result.records)


def test_adaptive_records_hold_the_items_each_candidate_answered(calibrated_zoo, tmp_path):
    fitness = {"items": "adaptive", "adaptive": {"start": 4, "batch": 4, "n_max": 16, "target_se": 0.02}}
    outcome = merge3.search(space(calibrated_zoo, fitness), runs_dir=tmp_path, name="cat", progress=False)
    bank = ItemBank.load(calibrated_zoo.bank)
    test = set(bank.test_indices.tolist())
    items = [tuple(r.answers["items"]) for r in outcome.run.records()]
    assert len(set(items)) > 1, "candidates meet different items"
    for r in outcome.run.records():
        per_task = np.bincount([bank.tasks.index(bank.task_of[i]) for i in r.answers["items"]], minlength=5)
        assert per_task.min() >= 4 and per_task.max() <= 16 and r.items_evaluated == per_task.sum()
        assert not set(r.answers["items"]) & test


def test_online_recalibration_refits_and_is_saved_in_the_run(calibrated_zoo, tmp_path):
    fitness = {"items": "fresh", "recalibrate": {"every": 1, "em_rounds": 2}}
    outcome = merge3.search(space(calibrated_zoo, fitness, generations=2), runs_dir=tmp_path, name="re", progress=False)
    saved = sorted(p.name for p in (outcome.run.path / "fitness").iterdir())
    assert saved == ["irt-gen-0000", "irt-gen-0001"]
    checkpoint = json.loads((outcome.run.path / "checkpoint" / "gen-0001.json").read_text())
    assert checkpoint["recalibration"]["how"] == "refitted" and checkpoint["recalibration"]["subjects"] > 12
    assert "recalibration after generation 0" in (outcome.run.path / "log.txt").read_text()


@pytest.mark.parametrize("fitness, message", [
    ({"items": "sometimes"}, "field 'bank.fitness.items'"),
    ({"items": "adaptive", "adaptive": {"start": 10, "n_max": 5}}, "n_max \\(5\\) is below the start size \\(10\\)"),
    ({"items": "adaptive", "adaptive": {"target_se": 0}}, "field 'bank.fitness.adaptive.target_se'"),
    ({"promotion": {"top_k": 7}}, "promotion.top_k \\(7\\) is larger than the population \\(6\\)"),
    ({"items": "fresh"}, None),
])
def test_bad_fitness_options_fail_before_any_run_exists(digits_zoo, tmp_path, fitness, message):
    uncalibrated = tmp_path / "bank"
    import shutil

    shutil.copytree(digits_zoo.bank, uncalibrated, ignore=shutil.ignore_patterns("calibration", "baselines"))
    config = space(digits_zoo, fitness)
    config["bank"]["path"] = str(uncalibrated)
    with pytest.raises(Merge3Error, match=message or "gp-irt' needs a calibrated bank"):
        merge3.search(config, runs_dir=tmp_path, name="bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_sigkill_then_resume_replays_fresh_promoted_and_recalibrated_items_exactly(calibrated_zoo, tmp_path):
    fitness = {"items": "fresh", "promotion": {"top_k": 2, "rungs": 1}, "recalibrate": {"every": 1, "em_rounds": 2},
               "soft": 1.0}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space(calibrated_zoo, fitness, generations=4)))
    whole = _cli("search", path, "--runs-dir", tmp_path, "--name", "whole", "--quiet")
    assert whole.returncode == 0, whole.stderr
    proc = _cli("search", path, "--runs-dir", tmp_path, "--name", "killed", "--quiet", wait=False)
    log = tmp_path / "killed" / "evaluations.jsonl"
    wait_for_lines(log, 12, proc, timeout=180)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 12 <= log.read_text().count("\n") < 32, "the kill should land mid-run"
    resumed = _cli("resume", tmp_path / "killed", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    killed, reference = (Run.open(tmp_path / name).records(every_rung=True) for name in ("killed", "whole"))
    key = lambda r: (r.generation, r.index, r.rung)  # noqa: E731
    assert [key(r) for r in sorted(killed, key=key)] == [key(r) for r in sorted(reference, key=key)]
    assert strip(killed) == strip(reference)
    answers = lambda rs: {key(r): r.answers["items"] for r in rs}  # noqa: E731
    assert answers(killed) == answers(reference), "every item replayed exactly"
