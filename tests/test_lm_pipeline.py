"""Causal-LM banks end to end on a tiny word-level GPT-2: calibrate → search with IRT fitness → verify → export,
through the one loading path that gives every stage the causal-LM class the bank needs."""

import itertools
import json

import pandas as pd
import pytest

import merge3
from merge3.itembank import BankSpec, ItemBank, write_bank
from merge3.search import CalibrationSettings, calibrate_bank

from _tiny_lm import FACTS, build_tiny_lm

CHOICES = ["color", "number", "animal", "city"]


def fact_items() -> pd.DataFrame:
    """Multiple-choice items from the tiny LM's facts, each asked with several choice orders; two tasks."""
    rows = []
    for fact in FACTS:
        subject, answer = fact.split(" is ")[0], fact.split()[-1]
        prompt = fact.rsplit(" ", 1)[0]
        task = "kinds" if answer in ("color", "number") else "things"
        for k, order in enumerate(itertools.islice(itertools.permutations(CHOICES), 0, 24, 6)):
            rows.append({"item_id": f"{subject}-{k}", "task": task, "prompt": prompt, "choices": list(order),
                         "answer": list(order).index(answer)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def lm_zoo(tmp_path_factory):
    """A base that has half-learnt the facts and two endpoints trained further (different lengths of training)."""
    root = tmp_path_factory.mktemp("lmzoo")
    for name, steps in (("base", 40), ("ft-long", 300), ("ft-mid", 120)):
        build_tiny_lm(root / name, steps=steps, seed=0)
    spec = BankSpec(name="facts", tasks=["kinds", "things"], evaluator={"kind": "multiple_choice", "batch_size": 8})
    write_bank(root / "bank", spec, fact_items(), test_fraction=0.25, seed=0)
    return root


def test_calibrate_search_verify_export_on_a_causal_lm_bank(lm_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    from merge3._api import export, verify

    base, endpoints = str(lm_zoo / "base"), [str(lm_zoo / "ft-long"), str(lm_zoo / "ft-mid")]
    settings = CalibrationSettings(random_merges=14, ns=[3], kind="2pl", dims=1, methods=["task_arithmetic", "ties"])
    estimator = calibrate_bank(lm_zoo / "bank", base, endpoints, settings, log=lambda *a: None)
    bank = ItemBank.load(lm_zoo / "bank")
    assert estimator.model.item_ids == [bank.item_ids[i] for i in bank.search_indices]
    space = {"name": "lm", "seed": 0, "models": {"base": base, "endpoints": endpoints},
             "bank": {"path": str(lm_zoo / "bank"), "estimator": "gp-irt", "items_per_task": 3, "subset": "random",
                      "fitness": {"items": "fresh", "promotion": {"top_k": 2, "factor": 2}}},
             "genome": {"granularity": "layer", "methods": ["task_arithmetic", "ties"]},
             "engine": {"population": 4, "generations": 2}, "executor": {"kind": "local"}}
    outcome = merge3.search(space, runs_dir=tmp_path, name="lm", progress=False)
    test_rows = set(bank.test_indices.tolist())
    assert all(r.error is None and not set(r.answers["items"]) & test_rows for r in outcome.run.records())
    verified = verify(outcome.run.path, top=2, log=lambda *a: None)
    assert all(v["test"] is not None and v["search"] is not None for v in verified)
    folder = export(outcome.run.path, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)  # loads as a causal LM ...
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok("red is a", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 1  # ... and generates
    manifest = json.loads((folder / "merge3-manifest.json").read_text())
    assert manifest["test_scores"] is not None
