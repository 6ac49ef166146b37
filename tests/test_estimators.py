"""Reduced subsets and the cheap accuracy estimators on synthetic banks with known truth."""

import json

import numpy as np
import pytest

from merge3._errors import Merge3Error
from merge3.itembank import IRTFit
from merge3.itembank._estimators import Estimate, Estimator
from merge3.itembank._fidelity import fidelity_benchmark, format_fidelity_table
from merge3.itembank._subsets import select_subset
from merge3.itembank._synthetic_irt import simulate_bank, simulate_merges

TASKS = ("t0", "t1", "t2", "t3")


def mae(est, truth):
    return float(np.abs(np.asarray(est) - np.asarray(truth)).mean())


@pytest.fixture(scope="module")
def bank():
    """One-ability bank: 4 tasks × 250 items; the first 160 subjects calibrate, the last 60 are new."""
    return simulate_bank(n_subjects=220, items_per_task=250, tasks=TASKS, dims=1, seed=0)


@pytest.fixture(scope="module")
def estimator(bank):
    return Estimator.calibrate(
        bank.responses[:160], bank.tasks, ns=(10, 20), subset_methods=("random", "anchor-irt"),
        fit=IRTFit(kind="2pl"), endpoints=[0, 1, 2], seed=0,
    )


def truth_of(bank, rows):
    R = bank.responses[rows]
    return np.stack([R[:, bank.tasks == t].mean(1) for t in TASKS], 1)


# ------------------------------------------------------------------------------------------------------------
# Subsets


def test_random_subset_is_seeded_and_stratified(bank):
    a = select_subset(bank.tasks, 10, method="random", seed=3)
    b = select_subset(bank.tasks, 10, method="random", seed=3)
    c = select_subset(bank.tasks, 10, method="random", seed=4)
    assert np.array_equal(a.indices, b.indices) and not np.array_equal(a.indices, c.indices)
    for t, (idx, w) in a.by_task.items():
        assert len(idx) == 10 and len(set(idx)) == 10 and np.all(bank.tasks[idx] == t)
        assert np.allclose(w, 0.1)


def test_subset_larger_than_task_takes_all_items():
    tasks = np.array(["x"] * 3 + ["y"] * 30)
    s = select_subset(tasks, 5, method="random", seed=0)
    idx, w = s.by_task["x"]
    assert idx.tolist() == [0, 1, 2] and np.allclose(w, 1 / 3)
    assert s.n_items == 8


def test_anchor_subsets_weights_are_cluster_shares(bank, estimator):
    for method, kw in (("anchor-irt", {"model": estimator.model}), ("anchor-correct", {"responses": bank.responses[:160]})):
        s = select_subset(bank.tasks, 10, method=method, seed=0, **kw)
        again = select_subset(bank.tasks, 10, method=method, seed=0, **kw)
        assert np.array_equal(s.indices, again.indices)
        for t, (idx, w) in s.by_task.items():
            assert len(idx) == 10 and len(set(idx)) == 10 and np.all(bank.tasks[idx] == t)
            assert np.isclose(w.sum(), 1.0) and np.all(w > 0)
            assert np.allclose(w * 250, np.round(w * 250))  # a share counts whole items
    # anchors spread over difficulty: more of the range than 10 random items typically span
    s = select_subset(bank.tasks, 10, method="anchor-irt", seed=0, model=estimator.model)
    b = estimator.model.b[s.indices[s.tasks == "t0"]]
    assert np.ptp(b) > 0.6 * np.ptp(estimator.model.b[bank.tasks == "t0"])


def test_subset_bad_input(bank):
    with pytest.raises(Merge3Error, match="unknown subset method"):
        select_subset(bank.tasks, 5, method="stratified")
    with pytest.raises(Merge3Error, match="needs a fitted IRT model"):
        select_subset(bank.tasks, 5, method="anchor-irt")
    with pytest.raises(Merge3Error, match="needs the calibration response matrix"):
        select_subset(bank.tasks, 5, method="anchor-correct")
    with pytest.raises(Merge3Error, match="≥ 1"):
        select_subset(bank.tasks, 0)


# ------------------------------------------------------------------------------------------------------------
# Estimators


@pytest.mark.parametrize("n", [10, 20])
@pytest.mark.parametrize("subset", ["random", "anchor-irt"])
def test_irt_estimators_beat_naive_on_new_subjects(bank, estimator, n, subset):
    """Per task, IRT pools the answers of all tasks into one ability: a clear gain over the per-task naive mean."""
    new = np.arange(160, 220)
    truth = truth_of(bank, new)
    est = {m: estimator.estimate_matrix(bank.responses[new], m, n=n, subset=subset) for m in ("naive", "irt", "p-irt", "gp-irt")}
    per_task = {m: mae(v, truth) for m, v in est.items()}
    overall = {m: mae(v.mean(1), truth.mean(1)) for m, v in est.items()}
    print(f"\n{subset} n={n}: per-task MAE {per_task}\n  overall MAE {overall}")
    assert per_task["p-irt"] < 0.6 * per_task["naive"], per_task
    assert per_task["gp-irt"] < 0.7 * per_task["naive"], per_task
    assert overall["p-irt"] < overall["naive"] and overall["gp-irt"] < overall["naive"], overall


def test_estimate_one_candidate_by_id_or_index(bank, estimator):
    row = bank.responses[200]
    ids = estimator.items(n=20, subset="random")
    idx = estimator.items(n=20, subset="random", as_indices=True)
    by_id = estimator.estimate({i: bool(row[j]) for i, j in zip(ids, idx)}, "gp-irt", n=20, subset="random")
    by_index = estimator.estimate({j: int(row[j]) for j in idx}, "gp-irt", n=20, subset="random")
    assert isinstance(by_id, Estimate) and by_id == by_index
    assert by_id.items_evaluated == 80 and by_id.method == "gp-irt" and by_id.n == 20
    assert set(by_id.per_task) == set(TASKS)
    assert np.isclose(by_id.overall, np.mean(list(by_id.per_task.values())))
    extra = {j: row[j] for j in range(1000)}  # the whole bank answered: only the subset is read
    assert estimator.estimate(extra, "gp-irt", n=20, subset="random") == by_id


def test_estimate_bad_answers(bank, estimator):
    idx = estimator.items(n=10, subset="random", as_indices=True)
    good = {j: True for j in idx}
    with pytest.raises(Merge3Error, match="miss 1 of the 40"):
        estimator.estimate({j: True for j in idx[1:]}, n=10, subset="random")
    with pytest.raises(Merge3Error, match="unknown item"):
        estimator.estimate({**good, "nope": True}, n=10, subset="random")
    with pytest.raises(Merge3Error, match="correct/incorrect"):
        estimator.estimate({**good, idx[0]: 0.5}, n=10, subset="random")
    with pytest.raises(Merge3Error, match="correct/incorrect"):
        estimator.estimate({**good, idx[0]: float("nan")}, n=10, subset="random")
    with pytest.raises(Merge3Error, match="unknown estimator"):
        estimator.estimate(good, "tiny-irt", n=10, subset="random")
    with pytest.raises(Merge3Error, match="no calibrated subset"):
        estimator.estimate(good, n=7, subset="random")


def test_fitted_constants_are_sane(estimator):
    for key, c in estimator.constants.items():
        assert set(c["lambda"]) == set(TASKS) and all(0 <= v <= 1 for v in c["lambda"].values())
        assert all(0 <= v <= 1 for v in c["delta"].values())
    deltas = [v for c in estimator.constants.values() for v in c["delta"].values()]
    assert any(abs(v - 0.5) > 0.05 for v in deltas)  # fitted, not the official hard-coded 0.5
    assert "validation MAE" in estimator.summary()


def test_calibration_is_reproducible(bank):
    kw = dict(ns=(10,), subset_methods=("anchor-irt",), fit=IRTFit(kind="2pl"), seed=1)
    a = Estimator.calibrate(bank.responses[:80, :400], bank.tasks[:400], **kw)
    b = Estimator.calibrate(bank.responses[:80, :400], bank.tasks[:400], **kw)
    assert np.array_equal(a.model.b, b.model.b)
    assert np.array_equal(a.subsets[("anchor-irt", 10)].indices, b.subsets[("anchor-irt", 10)].indices)
    assert a.constants == b.constants
    assert a.model.metadata["validation_subjects"] == b.model.metadata["validation_subjects"]
    assert a.metadata["backend"] == a.model.metadata["backend"] == "torch"  # the model says what fitted it


def test_save_load_gives_identical_estimates(tmp_path, bank, estimator):
    folder = estimator.save(tmp_path / "cal")
    assert json.loads((folder / "estimator.json").read_text())["format"] == "merge3-estimator"
    back = Estimator.load(folder)
    row = bank.responses[210]
    for m in ("naive", "p-irt", "gp-irt", "mp-irt", "gmp-irt"):
        answers = {j: row[j] for j in estimator.items(n=10, subset="anchor-irt", as_indices=True)}
        assert back.estimate(answers, m, n=10, subset="anchor-irt") == estimator.estimate(answers, m, n=10, subset="anchor-irt")
    with pytest.raises(Merge3Error, match="estimator.json is missing"):
        Estimator.load(tmp_path / "empty")


def test_mp_irt_on_synthetic_merges():
    """Endpoints are task specialists; merges mix their abilities. mp-IRT should track the merges' accuracy."""
    base = simulate_bank(n_subjects=4, items_per_task=200, tasks=("x", "y", "z"), dims=3, seed=4)
    E = np.array([[2.0, -1.0, -1.0], [-1.0, 2.0, -1.0], [-1.0, -1.0, 2.0], [0.0, 0.0, 0.0]])
    th_cal, _ = simulate_merges(E, 100, seed=1, spread=0.2)
    th_new, _ = simulate_merges(E, 50, seed=2, spread=0.2)
    R_cal = np.vstack([base.sample(E, 5), base.sample(th_cal, 6)])
    R_new = base.sample(th_new, 7)
    est = Estimator.calibrate(R_cal, base.tasks, endpoints=[0, 1, 2, 3], ns=(10,), subset_methods=("random",),
                              fit=IRTFit(kind="mirt", dims=3), seed=0)
    assert est.endpoint_theta.shape == (4, 3) and est.endpoint_ids == ["0", "1", "2", "3"]
    truth = np.stack([R_new[:, base.tasks == t].mean(1) for t in ("x", "y", "z")], 1)
    errs = {m: mae(est.estimate_matrix(R_new, m, n=10, subset="random"), truth)
            for m in ("naive", "mp-irt", "gmp-irt", "p-irt")}
    assert errs["mp-irt"] < 0.8 * errs["naive"], errs
    assert errs["gmp-irt"] < 0.8 * errs["naive"], errs


def test_mp_irt_needs_endpoints(bank):
    est = Estimator.calibrate(bank.responses[:60, :200], bank.tasks[:200], ns=(5,), subset_methods=("random",),
                              fit=IRTFit(kind="1pl"), seed=0)
    with pytest.raises(Merge3Error, match="needs endpoint abilities"):
        est.estimate({j: True for j in est.items(as_indices=True)}, "mp-irt")


@pytest.mark.filterwarnings("ignore::merge3.itembank.ConstantItemWarning")
def test_calibrate_bad_input(bank):
    R, tasks = bank.responses[:60, :100], bank.tasks[:100]
    with pytest.raises(Merge3Error, match="duplicate item ids"):
        Estimator.calibrate(R, tasks, item_ids=["a"] * 100, fit=IRTFit(kind="1pl"))
    with pytest.raises(Merge3Error, match="task\\(s\\) with no items"):
        Estimator.calibrate(R, tasks, task_names=["t0", "t9"], fit=IRTFit(kind="1pl"))
    with pytest.raises(Merge3Error, match="not a calibration subject"):
        Estimator.calibrate(R, tasks, endpoints=["model-x"], fit=IRTFit(kind="1pl"))
    with pytest.raises(Merge3Error, match="too few"):
        Estimator.calibrate(R[:4], tasks, fit=IRTFit(kind="1pl"))
    with pytest.raises(Merge3Error, match="too few for a 20-dimensional"):
        Estimator.calibrate(R, tasks, fit=IRTFit(kind="mirt", dims=20))


def test_fidelity_benchmark_smoke():
    bank = simulate_bank(n_subjects=100, items_per_task=120, tasks=("x", "y"), dims=1, seed=5)
    rows = fidelity_benchmark(bank.responses[:70], bank.tasks, bank.responses[70:], endpoints=[0, 1], ns=(5, 20),
                              subset_methods=("random", "anchor-correct"), fit=IRTFit(kind="2pl"), seed=0)
    assert len(rows) == 2 * 2 * 6
    for r in rows:
        assert np.isfinite(r["mae"]) and np.isfinite(r["max_error"]) and r["max_error"] >= r["mae"]
        assert r["spearman"] is None or -1 <= r["spearman"] <= 1
        assert r["items"] == 2 * r["n"]
    get = {(r["estimator"], r["subset"], r["n"]): r for r in rows}
    assert get[("p-irt", "random", 20)]["mae"] < get[("naive", "random", 5)]["mae"]
    table = format_fidelity_table(rows)
    assert len(table.splitlines()) == len(rows) + 1 and "gmp-irt" in table
