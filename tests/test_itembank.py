import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file

from merge3 import Merge3Error
from merge3.itembank import BankSpec, ItemBank, make_evaluator, write_bank
from merge3.models import load_model


def classifier_bank(tmp_path, heads=True):
    items = pd.DataFrame({
        "item_id": ["a0", "a1", "a2", "b0", "b1"],
        "task": ["a", "a", "a", "b", "b"],
        "input": [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 0.0], [0.0, 1.0]],
        "answer": [0, 1, 0, 1, 0],
    })  # fmt: skip
    files = {}
    evaluator = {"kind": "classifier"}
    if heads:
        # task a: identity head; task b: swapped head (class 1 for feature 0)
        eye = torch.eye(2)
        files = {
            "heads/a.safetensors": _safetensors_bytes({"weight": eye, "bias": torch.zeros(2)}, tmp_path / "ha"),
            "heads/b.safetensors": _safetensors_bytes({"weight": eye.flip(0), "bias": torch.zeros(2)}, tmp_path / "hb"),
        }
        evaluator["heads"] = {"a": "heads/a.safetensors", "b": "heads/b.safetensors"}
    spec = BankSpec(name="toy", tasks=["a", "b"], evaluator=evaluator)
    return write_bank(tmp_path / "bank", spec, items, files)


def _safetensors_bytes(tensors, path):
    save_file(tensors, str(path))
    return path.read_bytes()


class Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_classifier_with_frozen_heads_hand_checked(tmp_path):
    bank = classifier_bank(tmp_path)
    evaluator = make_evaluator(bank)
    # identity encoder: task a argmax(x) → [0, 1, 0] all right; task b argmax(flip x) → [1, 0] all right
    assert evaluator(Identity()).tolist() == [True, True, True, True, True]
    # a negating encoder flips every prediction (ties excluded by construction): all wrong
    assert evaluator(lambda x: -x).tolist() == [False] * 5
    # subsets are aligned with the indices asked for
    assert evaluator(Identity(), np.array([4, 0])).tolist() == [True, True]
    assert bank.per_task_accuracy(np.array([1, 0, 1, 1, 1])) == {"a": pytest.approx(2 / 3), "b": 1.0}


def test_classifier_confidence_is_the_softmax_probability_of_the_right_class_hand_checked(tmp_path):
    bank = classifier_bank(tmp_path)
    evaluator = make_evaluator(bank)
    correct, p = evaluator.confidence(Identity(), np.array([2, 0, 4]))
    # item a2: logits (2, 1), answer 0 → e²/(e²+e); a0: (1, 0), answer 0; b1 through the swapped head: (1, 0), answer 0
    assert correct.tolist() == evaluator(Identity(), np.array([2, 0, 4])).tolist() == [True, True, True]
    assert p == pytest.approx([np.exp(1) / (np.exp(1) + 1), np.exp(1) / (np.exp(1) + 1), np.exp(1) / (np.exp(1) + 1)])
    wrong, q = evaluator.confidence(lambda x: -x, np.array([2]))
    assert wrong.tolist() == [False] and q == pytest.approx([1 / (1 + np.exp(1))])


def test_bank_round_trip_and_yaml_is_plain(tmp_path):
    bank = classifier_bank(tmp_path)
    again = ItemBank.load(bank.path)
    assert again.item_ids == ["a0", "a1", "a2", "b0", "b1"]
    assert list(again.task_indices["b"]) == [3, 4]
    raw = yaml.safe_load((bank.path / "bank.yaml").read_text())
    assert raw["evaluator"]["kind"] == "classifier" and raw["tasks"] == ["a", "b"]


def test_jsonl_items_load_through_datasets(tmp_path):
    folder = tmp_path / "jb"
    folder.mkdir()
    pd.DataFrame({"item_id": ["x"], "task": ["t"], "input": [[1.0, 2.0]], "answer": [1]}).to_json(
        folder / "items.jsonl", orient="records", lines=True)
    (folder / "bank.yaml").write_text(yaml.safe_dump(
        {"name": "j", "tasks": ["t"], "items": "items.jsonl", "evaluator": {"kind": "classifier"}}))
    bank = ItemBank.load(folder)
    assert make_evaluator(bank)(Identity()).tolist() == [True]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda items, spec: items.assign(item_id=["a0", "a0", "a2", "b0", "b1"]), "duplicate item_id 'a0'"),
        (lambda items, spec: items.assign(answer=[0, None, 0, 1, 0]), "item 'a1' has no answer"),
        (lambda items, spec: items[items.task == "a"], "task 'b' has no items"),
        (lambda items, spec: items.drop(columns=["input"]), "lack column 'input'"),
    ],
)
def test_bad_banks_fail_with_one_clear_error(tmp_path, mutate, message):
    bank = classifier_bank(tmp_path)
    with pytest.raises(Merge3Error, match=message):
        ItemBank(tmp_path, bank.spec, mutate(bank.items.copy(), bank.spec))


def test_bad_bank_yaml_names_the_field(tmp_path):
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "bank.yaml").write_text("name: x\ntasks: [a]\nevaluator: {kind: regression}\n")
    with pytest.raises(Merge3Error, match="field 'evaluator"):
        ItemBank.load(folder)
    (folder / "bank.yaml").write_text("name: x\ntasks: [a]\nevaluator: {kind: classifier}\n")
    with pytest.raises(Merge3Error, match="field 'items'"):
        ItemBank.load(folder)


def lm_bank(tmp_path, kind, rows):
    spec = BankSpec(name=f"facts-{kind}", tasks=["facts"], evaluator={"kind": kind, "batch_size": 3})
    return write_bank(tmp_path / kind, spec, pd.DataFrame(rows))


def test_multiple_choice_on_a_tiny_gpt2(tmp_path, tiny_lm):
    rows = {
        "item_id": ["q0", "q1", "q2", "q3"], "task": ["facts"] * 4,
        "prompt": ["red is a", "seven is a", "dog is an", "rome is a"],
        "choices": [["color", "number", "city"], ["color", "number", "city"], ["animal", "color"], ["number", "city"]],
        "answer": [0, 1, 0, 0],  # the last one is deliberately wrong
    }  # fmt: skip
    bank = lm_bank(tmp_path, "multiple_choice", rows)
    model = load_model(tiny_lm, hf_class="AutoModelForCausalLM")
    evaluator = make_evaluator(bank, tokenizer_from=tiny_lm)
    assert evaluator(model).tolist() == [True, True, True, False]
    # batched scores equal a plain, one-sequence-at-a-time computation
    scores = evaluator.loglikelihoods(model, np.arange(4))
    tok = evaluator.tok
    for i, (prompt, choices) in enumerate(zip(rows["prompt"], rows["choices"])):
        for c, choice in enumerate(choices):
            p, ch = tok(prompt)["input_ids"], tok(choice)["input_ids"]
            ids = torch.tensor([p + ch])
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            expected = sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(ch))
            assert scores[i][c] == pytest.approx(expected, abs=1e-4)


def test_greedy_generation_exact_match(tmp_path, tiny_lm):
    rows = {"item_id": ["g0", "g1", "g2"], "task": ["facts"] * 3,
            "prompt": ["cat is an", "paris is a", "two is a"], "answer": ["animal", "city", "color"]}
    bank = lm_bank(tmp_path, "generation", rows)
    model = load_model(tiny_lm, hf_class="AutoModelForCausalLM")
    evaluator = make_evaluator(bank, tokenizer_from=tiny_lm)
    assert evaluator.completions(model, np.arange(3))[:2] == ["animal", "city"]
    assert evaluator(model).tolist() == [True, True, False]
