"""IRT calibration: parameter recovery on synthetic banks, determinism, D selection, persistence, bad input."""

import json
import warnings

import numpy as np
import pytest

from merge3._errors import Merge3Error
from merge3.itembank import ConstantItemWarning, IRTModel, fit_irt, sigmoid
from merge3.itembank._responses import response_matrix
from merge3.itembank._synthetic_irt import simulate_bank


def corr(x, y):
    return float(np.corrcoef(np.ravel(x), np.ravel(y))[0, 1])


def explained(truth, fitted):
    """R² of regressing each true ability axis on the fitted ones (abilities are identified up to rotation)."""
    X = np.column_stack([fitted, np.ones(len(fitted))])
    coef, *_ = np.linalg.lstsq(X, truth, rcond=None)
    resid = truth - X @ coef
    return 1 - resid.var(0) / truth.var(0)


@pytest.fixture(scope="module")
def bank1d():
    return simulate_bank(n_subjects=200, items_per_task=150, dims=1, seed=0)


@pytest.fixture(scope="module")
def fit2pl(bank1d):
    return fit_irt(bank1d.responses, kind="2pl", tasks=bank1d.tasks, seed=0)


def test_2pl_recovers_known_parameters(bank1d, fit2pl):
    m = fit2pl
    assert m.kind == "2pl" and m.D == 1 and m.diagnostics["converged"]
    assert corr(m.b, bank1d.b) > 0.97
    assert corr(m.a, bank1d.a) > 0.7  # a is the hard one: only 200 subjects per item
    assert corr(m.theta, bank1d.theta) > 0.97  # same sign: higher ability, more correct answers
    assert (m.a > 0).all()


def test_1pl_recovers_difficulties_and_abilities(bank1d):
    m = fit_irt(bank1d.responses, kind="1pl", seed=0)
    assert np.all(m.a == 1.0)
    assert corr(m.b, bank1d.b) > 0.95
    assert corr(m.theta, bank1d.theta) > 0.97
    assert m.diagnostics["prior"]["sigma_theta"] > 0.3  # the learned ability spread, not collapsed


def test_mirt_recovers_abilities_up_to_rotation():
    bank = simulate_bank(n_subjects=200, items_per_task=100, dims=2, seed=3)
    m = fit_irt(bank.responses, kind="mirt", dims=2, tasks=bank.tasks, seed=0)
    assert m.D == 2 and m.a.shape == (400, 2)
    assert corr(m.b, bank.b) > 0.95
    assert explained(bank.theta, m.theta).min() > 0.85


def test_same_seed_same_parameters_other_seed_differs():
    bank = simulate_bank(n_subjects=60, items_per_task=40, dims=2, seed=1)
    m1 = fit_irt(bank.responses, kind="mirt", dims=2, seed=5)
    m2 = fit_irt(bank.responses, kind="mirt", dims=2, seed=5)
    m3 = fit_irt(bank.responses, kind="mirt", dims=2, seed=6)
    assert np.array_equal(m1.a, m2.a) and np.array_equal(m1.b, m2.b) and np.array_equal(m1.theta, m2.theta)
    assert not np.array_equal(m1.a, m3.a)
    assert m1.metadata["seed"] == 5 and m1.metadata["optimizer"] == "lbfgs"


def test_dimension_selection_picks_the_true_dimension():
    bank = simulate_bank(n_subjects=160, items_per_task=100, tasks=("t0", "t1", "t2", "t3"), dims=2, seed=2)
    m = fit_irt(bank.responses, kind="mirt", dims="auto", dims_grid=(1, 2, 4), tasks=bank.tasks, seed=0)
    sel = m.diagnostics["dims_selection"]
    assert sel["chosen"] == 2 and m.D == 2, sel["scores"]
    assert sel["scores"][1]["gap"] > 3 * sel["scores"][1]["gap_se"]  # D=1 is clearly worse, not a coin flip
    assert "D=4" in m.summary()


@pytest.mark.filterwarnings("ignore::merge3.itembank.ConstantItemWarning")
def test_dimension_selection_skips_dims_with_too_few_subjects():
    bank = simulate_bank(n_subjects=30, items_per_task=40, dims=1, seed=0)
    m = fit_irt(bank.responses, kind="mirt", dims="auto", dims_grid=(1, 2, 15), seed=0)
    assert m.diagnostics["dims_selection"]["skipped_too_few_subjects"] == [15]


def test_fit_ability_recovers_new_subjects(bank1d, fit2pl):
    rng = np.random.default_rng(9)
    theta = rng.normal(size=(40, 1))
    y = bank1d.sample(theta, seed=10)
    est = fit2pl.fit_ability(y)
    assert est.shape == (40, 1) and corr(est, theta) > 0.97
    few = fit2pl.fit_ability(np.ones(5), items=[0, 1, 2, 3, 4])  # all correct: MLE would be +inf
    assert np.isfinite(few).all() and few.shape == (1,)
    with pytest.raises(Merge3Error, match="answers"):
        fit2pl.fit_ability([1, 0], items=[0, 1, 2])


def test_predict_clips_logits():
    m = IRTModel(a=np.ones((2, 1)), b=np.zeros(2), kind="2pl")
    p = m.predict(np.array([1e6]))
    assert np.all(p < 1) and np.allclose(p, sigmoid(np.array(30.0)))


def test_save_load_roundtrip_without_pickle(tmp_path, fit2pl):
    folder = fit2pl.save(tmp_path / "irt")
    meta = json.loads((folder / "irt.json").read_text())
    assert meta["kind"] == "2pl" and meta["D"] == 1 and meta["metadata"]["seed"] == 0
    with np.load(folder / "irt_params.npz", allow_pickle=False) as z:
        assert set(z.files) >= {"a", "b", "theta", "theta_mean", "theta_cov"}
    back = IRTModel.load(folder)
    assert np.array_equal(back.a, fit2pl.a) and np.array_equal(back.b, fit2pl.b)
    assert back.item_ids == fit2pl.item_ids and list(back.tasks) == list(fit2pl.tasks)
    th = np.array([[0.3]])
    assert np.array_equal(back.predict(th), fit2pl.predict(th))
    with pytest.raises(Merge3Error, match="no IRT model"):
        IRTModel.load(tmp_path / "nowhere")


def _damage_params(folder, **arrays):
    with np.load(folder / "irt_params.npz", allow_pickle=False) as z:
        saved = {k: z[k] for k in z.files}
    np.savez(folder / "irt_params.npz", **{**saved, **arrays})


@pytest.mark.parametrize("damage, message", [
    (lambda f, m: _damage_params(f, a=np.full_like(m.a, np.nan)), "'a' holds NaN/Inf"),
    (lambda f, m: _damage_params(f, theta_cov=np.array([[np.inf]])), "'theta_cov' holds NaN/Inf"),
    (lambda f, m: _damage_params(f, b=m.b[:-1]), "'b' has shape"),
    (lambda f, m: _damage_params(f, a=m.a.astype(str)), "'a' holds NaN/Inf or non-numbers"),
    (lambda f, m: (f / "irt_params.npz").write_bytes((f / "irt_params.npz").read_bytes()[:100]), "cannot be read"),
    (lambda f, m: (f / "irt_params.npz").unlink(), "irt_params.npz is missing"),
    (lambda f, m: (f / "irt.json").write_text('{"format": "merge3-irt", "ki'), "irt.json cannot be read"),
    (lambda f, m: (f / "irt.json").write_text("[]"), "is not a merge3 IRT model"),
])
def test_a_damaged_saved_model_is_one_error_naming_the_file_never_nan_estimates(tmp_path, fit2pl, damage, message):
    folder = fit2pl.save(tmp_path / "irt")
    damage(folder, fit2pl)
    with pytest.raises(Merge3Error, match=message) as e:
        IRTModel.load(folder)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)


def test_missing_answers_are_masked_not_propagated(bank1d):
    R = bank1d.responses.copy()[:80, :200]
    R[np.random.default_rng(0).random(R.shape) < 0.2] = np.nan
    m = fit_irt(R, kind="2pl", seed=0)
    assert np.isfinite(m.a).all() and np.isfinite(m.b).all() and np.isfinite(m.theta).all()
    assert m.diagnostics["n_answers"] == int((~np.isnan(R)).sum())
    mask = ~np.isnan(R)
    m2 = fit_irt(np.nan_to_num(R), mask=mask, kind="2pl", seed=0)
    assert np.array_equal(m.b, m2.b)


def test_2pl_and_mirt_recover_the_items_of_a_200_by_2000_bank():
    """Issue #4's size. How long the fits take is measured by bench/irt_fit_speed.py, not asserted here."""
    bank = simulate_bank(n_subjects=200, items_per_task=500, dims=3, seed=0)
    for kind, dims in (("2pl", 1), ("mirt", 3)):
        m = fit_irt(bank.responses, kind=kind, dims=dims, seed=0)
        assert m.diagnostics["converged"], kind
        assert corr(m.b, bank.b) > 0.95, kind


# ------------------------------------------------------------------------------------------------------------
# Bad input: one clear error or a named warning, never a silent NaN


def test_duplicate_item_ids():
    with pytest.raises(Merge3Error, match="duplicate item ids"):
        fit_irt(np.ones((10, 3)), kind="1pl", item_ids=["a", "b", "a"])


def test_non_binary_and_infinite_values():
    with pytest.raises(Merge3Error, match="0/1"):
        response_matrix([[0, 1], [2, 1]])
    with pytest.raises(Merge3Error, match="inf"):
        response_matrix([[0, np.inf], [1, 1]])
    with pytest.raises(Merge3Error, match="no observed answers"):
        response_matrix([[np.nan, np.nan]])
    with pytest.raises(Merge3Error, match="2-D"):
        response_matrix([0, 1, 1])


def test_constant_column_warns_by_name():
    bank = simulate_bank(n_subjects=30, items_per_task=20, dims=1, seed=0)
    R = bank.responses.copy()
    R[:, 3] = 1.0
    with pytest.warns(ConstantItemWarning, match="constant"):
        m = fit_irt(R, kind="2pl", seed=0)
    assert np.isfinite(m.b).all() and m.diagnostics["constant_items"] >= 1


def test_too_few_subjects_for_requested_dims():
    with pytest.raises(Merge3Error, match="too few for a 5-dimensional"):
        fit_irt(np.random.default_rng(0).random((10, 30)) < 0.5, kind="mirt", dims=5)


def test_kind_and_dims_mismatch():
    with pytest.raises(Merge3Error, match="unknown IRT kind"):
        fit_irt(np.ones((10, 3)), kind="3pl")
    with pytest.raises(Merge3Error, match="one-dimensional"):
        fit_irt(np.ones((10, 3)), kind="2pl", dims=3)


def test_task_label_problems():
    with pytest.raises(Merge3Error, match="task labels"):
        fit_irt(np.ones((10, 3)), kind="1pl", tasks=["x", "y"])
    with pytest.raises(Merge3Error, match="empty task label"):
        fit_irt(np.ones((10, 3)), kind="1pl", tasks=["x", "", "y"])


def test_no_nan_in_a_fit_with_an_all_missing_item():
    bank = simulate_bank(n_subjects=40, items_per_task=20, dims=1, seed=0)
    R = bank.responses.copy()
    R[:, 0] = np.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = fit_irt(R, kind="2pl", seed=0)
    assert any(issubclass(w.category, ConstantItemWarning) for w in caught)
    assert np.isfinite(m.predict(np.zeros(1))).all()
