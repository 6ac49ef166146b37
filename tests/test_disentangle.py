"""The weight-disentanglement error ξ on the digits zoo: 0 where nothing is added, the own-task term 0 beside a zero
task vector, growing with α, and `merge3 inspect --bank` writing its table and heatmaps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from merge3 import Merge3Error
from merge3.cli import main
from merge3.itembank import ItemBank, disentanglement, load_model_for, make_evaluator


def test_xi_is_zero_without_edits_and_grows_with_alpha(digits_zoo):
    models = {t: digits_zoo.finetuned[t] for t in ("upright", "rot90")}
    xi = disentanglement(digits_zoo.bank, digits_zoo.base, models, alphas=[0.0, 0.5, 1.5])
    m = xi.matrix("upright", "rot90")
    assert m.loc[0.0, 0.0] == 0.0
    assert 0.0 < m.loc[0.5, 0.5] < m.loc[1.5, 1.5] <= 2.0
    assert set(xi.summary().columns) >= {"xi_at_1_1", "xi_mean", "xi_max"}


def test_beside_a_zero_task_vector_the_own_term_vanishes(digits_zoo):
    bank = ItemBank.load(digits_zoo.bank, warn=False)
    xi = disentanglement(bank, digits_zoo.base, {"rot90": digits_zoo.finetuned["rot90"], "flipud": digits_zoo.base},
                         alphas=[0.0, 1.0])
    assert (xi.table.xi_a == 0).all()  # θ₀ + α τ_rot90 + β·0 predicts what θ₀ + α τ_rot90 does on rot90 items
    # the other term is how far τ_rot90 alone moves the flipud items' predictions away from the base's
    evaluate = make_evaluator(bank)
    rows = np.array([i for i in bank.task_indices["flipud"] if i in set(bank.search_indices.tolist())])
    moved = np.mean(evaluate.predict(load_model_for(bank, digits_zoo.finetuned["rot90"]), rows)
                    != evaluate.predict(load_model_for(bank, digits_zoo.base), rows))
    cell = xi.table[(xi.table.alpha_a == 1.0) & (xi.table.alpha_b == 1.0)].iloc[0]
    assert cell.xi_b == pytest.approx(moved)


def test_bad_requests_are_refused(digits_zoo, tiny_lm):
    with pytest.raises(Merge3Error, match="'ft-rot90' is not a task of bank"):
        disentanglement(digits_zoo.bank, digits_zoo.base, {"ft-rot90": digits_zoo.finetuned["rot90"],
                                                          "upright": digits_zoo.finetuned["upright"]})
    with pytest.raises(Merge3Error, match="at least two fine-tuned models"):
        disentanglement(digits_zoo.bank, digits_zoo.base, {"rot90": digits_zoo.finetuned["rot90"]})
    with pytest.raises(Merge3Error, match="alphas must be finite"):
        disentanglement(digits_zoo.bank, digits_zoo.base, {t: digits_zoo.finetuned[t] for t in ("rot90", "upright")},
                        alphas=[float("nan")])


def test_inspect_with_a_bank_writes_xi(digits_zoo, tmp_path, capsys):
    fts = [str(digits_zoo.finetuned[t]) for t in ("upright", "rot90")]
    rc = main(["inspect", str(digits_zoo.base), *fts, "--names", "upright,rot90", "--bank", str(digits_zoo.bank),
               "--alphas", "0,1", "--out", str(tmp_path / "out")])
    assert rc == 0 and "weight disentanglement error" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "disentanglement.csv")
    assert len(table) == 4 and (tmp_path / "out" / "disentanglement_upright_rot90.png").exists()
