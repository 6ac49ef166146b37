"""Search/test splits: every bank has one, calibration and search only ever read search items, and every reported
score says which split it is on."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import yaml

import merge3
from merge3 import Merge3Error
from merge3.itembank import BankSpec, ItemBank, NoTestSplitWarning, stratified_split, write_bank

SPEC = BankSpec(name="toy", tasks=["a", "b"], evaluator={"kind": "classifier"})


def toy_items(n=30):
    return pd.DataFrame({"item_id": [f"i{k}" for k in range(n)], "task": ["a"] * (2 * n // 3) + ["b"] * (n - 2 * n // 3),
                         "input": [[1.0, 0.0]] * n, "answer": [0, 1] * (n // 2)})


def test_stratified_split_is_seeded_and_stratified_per_task():
    tasks = np.array(["a"] * 60 + ["b"] * 30)
    first, again, other = (stratified_split(tasks, 1 / 3, seed) for seed in (0, 0, 1))
    assert first.tolist() == again.tolist() and first.tolist() != other.tolist()
    assert (first[:60] == "test").sum() == 20 and (first[60:] == "test").sum() == 10


def test_write_bank_records_the_split_and_loads_it(tmp_path):
    written = write_bank(tmp_path / "b", SPEC, toy_items(), test_fraction=0.25, seed=3)
    raw = yaml.safe_load((tmp_path / "b" / "bank.yaml").read_text())
    assert raw["split"] == {"column": "split", "method": "stratified", "test_fraction": 0.25, "seed": 3,
                            "description": raw["split"]["description"]}
    again = ItemBank.load(tmp_path / "b")
    assert list(again.split_of) == list(written.split_of)
    assert again.has_test_split and len(again.test_indices) == 5 + 2 and len(again.search_indices) == 30 - 7
    assert set(again.split_of[again.test_indices]) == {"test"}
    assert again.fingerprint("search") != again.fingerprint("test")


def test_a_bank_without_a_split_warns_by_name_and_is_all_search(tmp_path):
    write_bank(tmp_path / "b", SPEC, toy_items())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = ItemBank.load(tmp_path / "b")
    assert [w.category for w in caught] == [NoTestSplitWarning]
    assert "no test split" in str(caught[0].message) and "search split only" in str(caught[0].message)
    assert len(bank.search_indices) == 30 and len(bank.test_indices) == 0 and not bank.has_test_split


@pytest.mark.parametrize("fraction", [0, -0.1, 0.95, 1.0, float("nan")])
def test_test_fraction_outside_the_range_is_one_clear_error(tmp_path, fraction):
    with pytest.raises(Merge3Error, match=r"test_fraction must be in \(0, 0.9\]"):
        write_bank(tmp_path / "b", SPEC, toy_items(), test_fraction=fraction)
    assert not (tmp_path / "b").exists()


def test_bad_split_columns_are_one_clear_error(tmp_path):
    items = toy_items().assign(split=["search", "test", "holdout"] * 10)
    with pytest.raises(Merge3Error, match="unknown value 'holdout'"):
        write_bank(tmp_path / "b", SPEC, items)
    only_search_b = toy_items().assign(split=["test", "search"] * 10 + ["search"] * 10)
    with pytest.raises(Merge3Error, match="task 'b' has no test items"):
        write_bank(tmp_path / "b", SPEC, only_search_b)
    with pytest.raises(Merge3Error, match="give test_fraction or the column, not both"):
        write_bank(tmp_path / "b", SPEC, toy_items().assign(split="search"), test_fraction=0.3)
    assert not (tmp_path / "b").exists(), "nothing half-written"


def test_bank_split_command_splits_once_atomically_and_keeps_the_calibration(tmp_path, capsys):
    from merge3.cli import main

    write_bank(tmp_path / "b", SPEC, toy_items())
    (tmp_path / "b" / "calibration").mkdir()
    (tmp_path / "b" / "calibration" / "calibration.json").write_text("{}")
    (tmp_path / "b" / "baselines").mkdir()
    assert main(["bank", "split", str(tmp_path / "b"), "--test-fraction", "0.2", "--seed", "1"]) == 0
    bank = ItemBank.load(tmp_path / "b")
    assert bank.spec.split.test_fraction == 0.2 and len(bank.test_indices) == 4 + 2
    assert (tmp_path / "b" / "calibration" / "calibration.json").exists(), "kept: its cache key no longer matches"
    assert not (tmp_path / "b" / "baselines").exists(), "baselines chosen on every item are dropped"
    before = (tmp_path / "b" / "items.parquet").read_bytes()
    assert main(["bank", "split", str(tmp_path / "b"), "--test-fraction", "0.3"]) == 2
    assert "already split" in capsys.readouterr().err
    assert (tmp_path / "b" / "items.parquet").read_bytes() == before
    assert main(["bank", "split", str(tmp_path / "b"), "--test-fraction", "1.5"]) == 2
    assert "test_fraction must be in (0, 0.9]" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"], "no temporary folder left behind"


def test_rewriting_a_bank_keeps_its_calibration_and_refuses_other_items(tmp_path):
    write_bank(tmp_path / "b", SPEC, toy_items(), test_fraction=0.3)
    (tmp_path / "b" / "calibration").mkdir()
    (tmp_path / "b" / "calibration" / "estimator.json").write_text("{}")
    write_bank(tmp_path / "b", SPEC, toy_items(), test_fraction=0.3)  # the same items: nothing is lost
    assert (tmp_path / "b" / "calibration" / "estimator.json").exists()
    with pytest.raises(Merge3Error, match="exists with other items and holds calibration"):
        write_bank(tmp_path / "b", SPEC, toy_items(), test_fraction=0.3, seed=7)
    assert (tmp_path / "b" / "calibration" / "estimator.json").exists()
    write_bank(tmp_path / "b", SPEC, toy_items(), test_fraction=0.3, seed=7, force=True)
    assert not (tmp_path / "b" / "calibration").exists()


# ---- the real digits zoo ------------------------------------------------------------------------------------------


def test_digits_banks_hold_out_the_same_images_in_every_task(digits_zoo):
    bank = ItemBank.load(digits_zoo.bank)
    assert bank.has_test_split and bank.spec.split.method == "column"
    images = {t: set(bank.items["source_index"][bank.test_indices][bank.task_of[bank.test_indices] == t])
              for t in bank.tasks}
    assert len({frozenset(v) for v in images.values()}) == 1, "one set of test images for all tasks"
    share = len(bank.test_indices) / len(bank)
    assert 0.32 < share < 0.35
    labels = bank.items["answer"].to_numpy()
    for task in bank.tasks:
        rows = bank.task_indices[task]
        test = rows[bank.split_of[rows] == "test"]
        assert np.bincount(labels[test], minlength=10).min() >= 25, "stratified by digit"


def test_calibration_never_reads_a_test_item(calibrated_zoo):
    from merge3.itembank import Estimator

    bank = ItemBank.load(calibrated_zoo.bank)
    folder = calibrated_zoo.bank / "calibration"
    estimator = Estimator.load(folder)
    search_ids = {bank.item_ids[i] for i in bank.search_indices}
    assert set(estimator.model.item_ids) == search_ids
    assert np.load(folder / "responses.npz")["responses"].shape[1] == len(search_ids)
    for subject in (json.loads(line) for line in (folder / "subjects.jsonl").read_text().splitlines()):
        assert set(subject["accuracy"]) == set(bank.tasks)


def space(zoo, **bank):
    return {"name": "split", "seed": 0,
            "models": {"base": str(zoo.base), "endpoints": [str(p) for p in zoo.finetuned.values()]},
            "bank": {"path": str(zoo.bank), **bank},
            "genome": {"granularity": "layer", "methods": ["task_arithmetic", "tsv_merge"]},
            "engine": {"population": 6, "generations": 2}, "executor": {"kind": "local"}}


@pytest.mark.parametrize("bank", [{"estimator": "gp-irt", "items_per_task": 20, "subset": "anchor"},
                                  {"estimator": "full", "items_per_task": None}])
def test_a_search_never_answers_a_test_item_and_verify_scores_both_splits(calibrated_zoo, tmp_path, bank):
    from merge3._api import verify

    outcome = merge3.search(space(calibrated_zoo, **bank), runs_dir=tmp_path, name="r", progress=False)
    items = ItemBank.load(calibrated_zoo.bank)
    test = set(items.test_indices.tolist())
    for record in outcome.run.records():
        answered = set(record.answers["items"])
        assert answered and not answered & test
        assert record.items_evaluated == len(answered)
    # generation 0: all 8 recipes (more than the population of 6), then one generation of 6
    assert outcome.run.meta["full_bank_equivalent"] == (8 + 6) * len(items.search_indices)
    entries = verify(outcome.run.path, top=2, log=lambda *a: None, baselines=True)
    for entry in entries:
        assert set(entry["search"]) == set(entry["test"]) == set(items.tasks)
        assert entry["items"] == {"search": len(items.search_indices), "test": len(items.test_indices)}
        assert entry["search_mean"] == pytest.approx(np.mean(list(entry["search"].values())))
    stored = json.loads((outcome.run.path / "verified.json").read_text())
    assert all(v["test_mean"] is not None for v in stored.values())
    frame = merge3.leaderboard(outcome.run.path)
    verified = frame[(frame["kind"] == "merge") & frame["verified"]]
    assert (verified["score_on"] == "test").all() and (verified["score"] == verified["test_mean"]).all()
    assert (verified["gap"] == verified["test_mean"] - verified["search_mean"]).all()
    baselines = frame[frame["kind"] == "baseline"]
    assert baselines["test_mean"].notna().all() and baselines["search_mean"].notna().all()
    tiers = frame["score_on"].map({"test": 0, "search": 1, "estimate": 2}).tolist()
    assert tiers == sorted(tiers), "test-scored rows first, then search-only, then estimates"
    page = (outcome.run.path / "report.html").read_text()
    assert "test split (unseen)" in page and "best fixed recipe" in page and "generalisation gap" in page


def test_fixed_recipes_are_chosen_on_the_search_split_and_reported_on_test():
    from merge3.runs import Baseline, best_per_method, best_recipe

    rows = [Baseline("base", "task_arithmetic", {}, {"a": 0.4}, {"a": 0.4}),
            Baseline("TA λ=0.3", "task_arithmetic", {"scale": 0.3}, {"a": 0.60}, {"a": 0.50}),
            Baseline("TA λ=0.5", "task_arithmetic", {"scale": 0.5}, {"a": 0.55}, {"a": 0.70}),
            Baseline("TSV-M λ=1", "tsv_merge", {"scale": 1.0}, {"a": 0.58}, {"a": 0.65})]
    kept = {r.name for r in best_per_method(rows)}
    assert kept == {"base", "TA λ=0.3", "TSV-M λ=1"}, "the test-best TA λ=0.5 must not be picked"
    assert best_recipe(rows).name == "TA λ=0.3" and best_recipe(rows).test_mean == 0.50
