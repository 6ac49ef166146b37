"""Cross-check against py-irt (runs only where py-irt is installed: the separate `make test-pyirt` environment).

py-irt pins Python < 3.12, pandas < 3 and rich < 14, so it never shares merge3's main environment; there this
module is skipped.
"""

import time

import numpy as np
import pytest

pytest.importorskip("py_irt")

from merge3.itembank import IRTFit, fit_irt  # noqa: E402
from merge3.itembank._synthetic_irt import simulate_bank  # noqa: E402


def corr(x, y):
    return float(np.corrcoef(np.ravel(x), np.ravel(y))[0, 1])


@pytest.mark.parametrize("kind,dims", [("2pl", 1), ("mirt", 2)])
def test_torch_and_pyirt_agree_on_difficulties(kind, dims):
    bank = simulate_bank(n_subjects=150, items_per_task=100, tasks=("x", "y", "z"), dims=dims, structured=False, seed=0)
    times = {}
    fits = {}
    for backend in ("torch", "py-irt"):
        t = time.perf_counter()
        fits[backend] = fit_irt(bank.responses, kind=kind, dims=dims, seed=0, backend=backend)
        times[backend] = time.perf_counter() - t
    ours, theirs = fits["torch"], fits["py-irt"]
    print(f"\n{kind} D={dims}: torch {times['torch']:.1f} s, py-irt {times['py-irt']:.1f} s; "
          f"corr(b) {corr(ours.b, theirs.b):.3f}, truth {corr(ours.b, bank.b):.3f} / {corr(theirs.b, bank.b):.3f}")
    assert theirs.metadata["backend"] == "py-irt" and theirs.a.shape == ours.a.shape
    assert corr(ours.b, theirs.b) > 0.95
    assert corr(ours.b, bank.b) > 0.95 and corr(theirs.b, bank.b) > 0.9


def test_estimator_calibration_with_the_pyirt_backend():
    from merge3.itembank._estimators import Estimator

    bank = simulate_bank(n_subjects=60, items_per_task=40, tasks=("x", "y"), seed=1)
    est = Estimator.calibrate(bank.responses, bank.tasks, ns=(10,), seed=0, fit=IRTFit(kind="2pl", backend="py-irt"))
    assert est.metadata["backend"] == "py-irt" and est.model.metadata["backend"] == "py-irt"
    answers = {i: bool(bank.responses[3, i]) for i in est.items(as_indices=True)}
    assert 0 <= est.estimate(answers, "gp-irt").overall <= 1
