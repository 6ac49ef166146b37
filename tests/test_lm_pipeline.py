"""Causal-LM banks end to end on a tiny word-level GPT-2: calibration loads the causal-LM class the bank needs."""

import pandas as pd
import pytest

from merge3.itembank import BankSpec, write_bank
from merge3.search import CalibrationSettings, calibrate_bank

from _tiny_lm import build_tiny_lm

CHOICES = ["color", "number", "animal", "city"]
PROMPTS = ["red is a", "seven is a", "dog is an", "rome is a", "blue is a", "two is a", "cat is an", "paris is a"]
ANSWERS = ["color", "number", "animal", "city", "color", "number", "animal", "city"]


@pytest.fixture(scope="module")
def lm_zoo(tmp_path_factory):
    """A base that has half-learnt the facts and two endpoints trained further (different lengths of training)."""
    root = tmp_path_factory.mktemp("lmzoo")
    for name, steps in (("base", 60), ("ft-long", 300), ("ft-mid", 150)):
        build_tiny_lm(root / name, steps=steps, seed=0)
    rows = {"item_id": [f"q{i}" for i in range(8)], "task": ["a"] * 4 + ["b"] * 4, "prompt": PROMPTS,
            "choices": [CHOICES] * 8, "answer": [CHOICES.index(a) for a in ANSWERS]}
    spec = BankSpec(name="facts", tasks=["a", "b"], evaluator={"kind": "multiple_choice", "batch_size": 8})
    write_bank(root / "bank", spec, pd.DataFrame(rows))
    return root


def test_calibrate_on_a_causal_lm_multiple_choice_bank(lm_zoo):
    settings = CalibrationSettings(random_merges=12, ns=[2], kind="2pl", dims=1, methods=["task_arithmetic", "ties"])
    estimator = calibrate_bank(lm_zoo / "bank", str(lm_zoo / "base"), [str(lm_zoo / "ft-long"), str(lm_zoo / "ft-mid")],
                               settings, log=lambda *a: None)
    assert estimator.model.n_items == 8 and len(estimator.model.subject_ids) == 1 + 2 + 12 + 10
