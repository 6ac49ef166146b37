"""Causal-LM evaluation: the mixed ``causal_lm`` bank, the KV-shared multiple choice and early-stopping batched
generation (checked against plain, unbatched computations), and banks built from local files and lm-eval YAMLs."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from merge3 import Merge3Error
from merge3.itembank import (
    BankSpec,
    ItemBank,
    bank_from_file,
    load_tokenizer,
    make_evaluator,
    normalize_answer,
    score_choices_full,
    write_bank,
)
from merge3.itembank._evaluators import generation_correct
from merge3.models import load_model


torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*has no test split")  # most banks here are unsplit on purpose

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} is a{% endif %}"


@pytest.fixture(scope="module")
def tiny(tiny_lm):
    """(folder, model, tokenizer) of the session's tiny GPT-2 (conftest ``tiny_lm``)."""
    return tiny_lm, load_model(tiny_lm, hf_class="AutoModelForCausalLM"), load_tokenizer(tiny_lm)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny, tmp_path_factory):
    """The tiny tokenizer with a chat template that turns the user turn "red" into "red is a"."""
    folder = tmp_path_factory.mktemp("chat") / "tok"
    tok = load_tokenizer(tiny[0])
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


def mc(item_id, prompt, choices, answer, task="mc"):
    return {"item_id": item_id, "task": task, "format": "multiple_choice", "prompt": prompt, "choices": choices,
            "answer": str(answer)}


def gen(item_id, prompt, answer, task="gen"):
    return {"item_id": item_id, "task": task, "format": "generation", "prompt": prompt, "choices": [], "answer": answer}


def causal_bank(path, rows, **evaluator):
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    spec = BankSpec(name="lm", tasks=tasks, evaluator={"kind": "causal_lm", **evaluator})
    return write_bank(path, spec, pd.DataFrame(rows))


MIXED = [
    mc("m0", "red is a", ["color", "number", "city"], 0),
    mc("m1", "dog is", ["a city", "an animal", "a number"], 1),  # two-token choices: the continuation pass
    mc("m2", "rome is a", ["number", "city"], 0),  # deliberately wrong key
    mc("m3", "seven", ["is a color", "is a number"], 1),  # three tokens
    gen("g0", "cat is an", "animal"),
    gen("g1", "paris is a", "city"),
    gen("g2", "two is a", "color"),  # the model says "number"
]


def test_mixed_bank_hand_checked(tmp_path, tiny):
    folder, model, _ = tiny
    bank = causal_bank(tmp_path / "mixed", MIXED, max_new_tokens=4, batch_size=3)
    assert ItemBank.load(bank.path).spec.evaluator.kind == "causal_lm"
    evaluator = make_evaluator(bank, tokenizer_from=folder)
    assert evaluator(model).tolist() == [True, True, False, True, True, True, False]
    assert evaluator(model, np.array([6, 1, 4])).tolist() == [False, True, True]  # aligned with the indices
    assert evaluator.completions(model, np.array([4, 5, 6])) == ["animal", "city", "number"]
    assert bank.per_task_accuracy(evaluator(model)) == {"mc": 0.75, "gen": pytest.approx(2 / 3)}
    # soft scores: a choice item's right-choice share of the likelihoods, a generation item's 0/1
    correct, soft = evaluator.confidence(model)
    assert correct.tolist() == evaluator(model).tolist()
    formats = np.array([r["format"] for r in MIXED])
    mc_rows = np.flatnonzero(formats == "multiple_choice")
    scores = evaluator.loglikelihoods(model, mc_rows)
    shares = [float(torch.softmax(torch.tensor(s), 0)[int(MIXED[i]["answer"])]) for s, i in zip(scores, mc_rows)]
    assert soft[mc_rows] == pytest.approx(shares, abs=1e-6)
    assert soft[formats == "generation"].tolist() == correct[formats == "generation"].astype(float).tolist()


def reference_scores(model, tok, prompt, choices):
    """Σ log p(choice | prompt) from one unpadded forward pass per prompt+choice sequence."""
    out = []
    for choice in choices:
        p, c = tok(prompt, add_special_tokens=False)["input_ids"], tok(choice, add_special_tokens=False)["input_ids"]
        lp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
        out.append(sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c)))
    return out


def test_kv_shared_multiple_choice_equals_the_plain_computation(tmp_path, tiny):
    folder, model, tok = tiny
    rows = [r for r in MIXED if r["format"] == "multiple_choice"]
    rows.append(mc("m4", "cat", ["is an animal", "is a city", "color"], 0))
    bank = causal_bank(tmp_path / "kv", rows, batch_size=3)  # batches mix prompt and choice lengths: padding
    evaluator = make_evaluator(bank, tokenizer_from=folder)
    shared = evaluator.loglikelihoods(model, np.arange(len(rows)))
    with torch.inference_mode():
        full = score_choices_full(model, evaluator.prompt_ids, evaluator.choice_ids, evaluator.pad_id, torch.device("cpu"))
        for i, row in enumerate(rows):
            assert shared[i] == pytest.approx(reference_scores(model, tok, row["prompt"], row["choices"]), abs=1e-4)
            assert shared[i] == pytest.approx(full[i], abs=1e-4)


def test_batched_equals_unbatched(tmp_path, tiny):
    folder, model, _ = tiny
    rows = MIXED + [mc(f"x{k}", p, ["a color", "a city", "an animal"], a) for k, (p, a) in
                    enumerate([("red is", 0), ("paris is", 1), ("cat is", 2), ("blue", 0), ("rome", 1)])]
    bank = causal_bank(tmp_path / "batch", rows, max_new_tokens=4, batch_size=16)
    evaluator = make_evaluator(bank, tokenizer_from=folder)
    together = evaluator(model)
    alone = np.array([evaluator(model, np.array([i]))[0] for i in range(len(rows))])
    assert together.tolist() == alone.tolist()
    mc_rows = np.flatnonzero(evaluator.formats == "multiple_choice")
    batched = evaluator.loglikelihoods(model, mc_rows)
    for i, scores in zip(mc_rows, batched):
        assert scores == pytest.approx(evaluator.loglikelihoods(model, np.array([i]))[0], abs=1e-4)
    reversed_order = np.arange(len(rows))[::-1]
    assert evaluator(model, reversed_order).tolist() == together[::-1].tolist()


PROMPTS = ["cat is an", "paris is", "two is a", "red", "seven is", "rome is a"]


@pytest.mark.parametrize("stop", [["\n"], ["city"], ["is"], ["a", "s a c"]])
def test_early_stopping_generation_equals_unbatched_greedy(tmp_path, tiny, stop):
    folder, model, tok = tiny
    rows = [gen(f"g{k}", p, "x") for k, p in enumerate(PROMPTS)]
    bank = causal_bank(tmp_path / "early", rows, max_new_tokens=8, stop=stop, batch_size=16)
    evaluator = make_evaluator(bank, tokenizer_from=folder)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        batched = evaluator.completions(model, np.arange(len(rows)))
    finally:
        hook.remove()
    expected = []
    with torch.inference_mode():
        for p in PROMPTS:  # plain greedy decoding of one unpadded prompt, all 8 tokens, then cut
            ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
            out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            cuts = [text.index(s) for s in stop if s in text]
            expected.append((text[: min(cuts)] if cuts else text).strip())
    assert batched == expected
    assert len(calls) < 8  # every row reached EOS or a stop string early: generation did not run to 8 tokens
    if stop == ["is"]:  # "red" → "is a color": the stop string ends that row at once, before EOS
        assert batched[PROMPTS.index("red")] == ""


@pytest.mark.parametrize(
    "text, how, expected",
    [
        ("  Paris. ", "strip", "Paris."),
        ("  The   PARIS!. ", "lower", "the paris"),
        ("3.5", "lower", "3.5"),
        ("It is 1,234.50 dollars", "number", "1234.5"),
        ("x = -3.0, then 4", "number", "-3"),
        ("+7", "number", "7"),
        ("100", "number", "100"),
        ("no digits", "number", None),
    ],
)
def test_normalizations(text, how, expected):
    assert normalize_answer(text, how) == expected


def test_normalize_in_the_bank(tmp_path, tiny):
    folder, model, _ = tiny
    rows = [gen("g0", "cat is an", "ANIMAL."), gen("g1", "paris is a", " City!")]
    strict = make_evaluator(causal_bank(tmp_path / "strip", rows, max_new_tokens=4), tokenizer_from=folder)
    assert strict(model).tolist() == [False, False]
    loose = make_evaluator(causal_bank(tmp_path / "lower", rows, max_new_tokens=4, normalize="lower"),
                           tokenizer_from=folder)
    assert loose(model).tolist() == [True, True]
    assert generation_correct("The total is 12 apples", "12.0", "number")
    assert not generation_correct("twelve", "12", "number")
    # per-task overrides: only task 'gen' compares lowercased
    per_task = causal_bank(tmp_path / "per", rows, max_new_tokens=4, per_task={"gen": {"normalize": "lower"}})
    assert make_evaluator(per_task, tokenizer_from=folder)(model).tolist() == [True, True]


def test_chat_template_wraps_each_prompt(tmp_path, tiny, chat_tokenizer):
    folder, model, _ = tiny
    rows = [gen("g0", "red", "color"), gen("g1", "paris", "city"), mc("m0", "rome", ["animal", "city"], 1)]
    bank = causal_bank(tmp_path / "chat", rows, max_new_tokens=3, chat_template=True,
                       tokenizer=str(chat_tokenizer))
    evaluator = make_evaluator(bank)
    assert evaluator.tok.decode(evaluator.prompt_ids[0]) == "red is a"
    assert evaluator(model).tolist() == [True, True, True]
    plain = make_evaluator(causal_bank(tmp_path / "plain", rows, max_new_tokens=3), tokenizer_from=folder)
    assert plain.completions(model, np.array([0])) == ["is a color"]  # without the template "red" goes on "is a…"
    with pytest.raises(Merge3Error, match="chat_template is true but the tokenizer has no chat template"):
        make_evaluator(causal_bank(tmp_path / "nochat", rows, chat_template=True), tokenizer_from=folder)


@pytest.mark.parametrize(
    "row, evaluator, message",
    [
        ({"format": "ranking"}, {}, "item 'm0': field 'format' is 'ranking'"),
        ({"answer": "first"}, {}, "item 'm0': field 'answer' 'first' is not a choice index"),
        ({"answer": "3"}, {}, "item 'm0': field 'answer' 3 is out of range for 3 choices"),
        ({"choices": ["color"]}, {}, "item 'm0': field 'choices' has 1 choice.*at least 2"),
        ({"choices": ["color", " "]}, {}, "item 'm0': field 'choices': choice 1 is empty"),
        ({"prompt": "  "}, {}, "item 'm0': field 'prompt' is empty"),
        ({}, {"per_task": {"nope": {"normalize": "lower"}}}, "evaluator.per_task names task 'nope'"),
        ({}, {"normalize": "number"}, "item 'g0': field 'answer' 'animal' has no number"),
    ],
)
def test_bad_causal_lm_banks_fail_with_one_clear_error(tmp_path, row, evaluator, message):
    rows = [{**MIXED[0], **row}, MIXED[4]]
    with pytest.raises(Merge3Error, match=message):
        causal_bank(tmp_path / "bad", rows, **evaluator)
    assert not (tmp_path / "bad").exists()  # nothing half-written


def test_bad_bank_yaml_field_is_named(tmp_path):
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "bank.yaml").write_text("name: x\ntasks: [a]\nevaluator: {kind: causal_lm, normalize: fuzzy}\n")
    with pytest.raises(Merge3Error, match="field 'evaluator.causal_lm.normalize'"):
        ItemBank.load(folder)


# --- banks from local files ---------------------------------------------------------------------------------------

FACTS = [("red", "a", "color"), ("seven", "a", "number"), ("dog", "an", "animal"), ("paris", "a", "city"),
         ("blue", "a", "color"), ("cat", "an", "animal")]
KINDS = ["color", "number", "animal", "city"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bank_from_jsonl_csv_and_parquet(tmp_path, tiny):
    folder, model, _ = tiny
    mc_file = write_jsonl(tmp_path / "kinds.jsonl", [{"question": f"{s} is {a}", "choices": KINDS, "answer": k}
                                                     for s, a, k in FACTS])  # answers as choice text
    csv_file = tmp_path / "letters.csv"
    pd.DataFrame({"subject": [s for s, _, _ in FACTS], "article": [a for _, a, _ in FACTS],
                  "A": "color", "B": "number", "C": "animal", "D": "city",
                  "key": ["ABCD"[KINDS.index(k)] for _, _, k in FACTS]}).to_csv(csv_file, index=False)
    parquet_file = tmp_path / "open.parquet"
    pd.DataFrame({"prompt": [f"{s} is {a}" for s, a, _ in FACTS], "answer": [k for _, _, k in FACTS]}).to_parquet(
        parquet_file)

    bank = bank_from_file([mc_file], tmp_path / "b1")
    assert bank.tasks == ["kinds"] and bank.items["answer"].tolist() == ["0", "1", "2", "3", "0", "2"]
    assert list(bank.items["choices"][0]) == [" color", " number", " animal", " city"]  # target_delimiter " "
    bank = bank_from_file([csv_file], tmp_path / "b2", template="{subject} is {article}", choice_columns="ABCD",
                          answer_column="key")
    assert bank.items["prompt"][2] == "dog is an" and bank.items["answer"].tolist() == ["0", "1", "2", "3", "0", "2"]
    both = bank_from_file([mc_file, parquet_file], tmp_path / "b3", tasks=["mc", "open"], max_new_tokens=3,
                          test_fraction=0.5, seed=1)
    assert both.tasks == ["mc", "open"] and set(both.items["format"]) == {"multiple_choice", "generation"}
    assert both.has_test_split and (both.split_of == "test").sum() == 6
    assert make_evaluator(both, tokenizer_from=folder)(model).all()


def test_bank_from_csv_with_a_list_literal_and_index_answers(tmp_path):
    csv_file = tmp_path / "idx.csv"
    pd.DataFrame({"question": ["red is a", "dog is an"], "options": ['["color", "city"]', "['city', 'animal']"],
                  "answer": [0, 1], "topic": ["t1", "t2"]}).to_csv(csv_file, index=False)
    bank = bank_from_file([csv_file], tmp_path / "b", choices_column="options", task_column="topic")
    assert bank.tasks == ["t1", "t2"] and bank.items["answer"].tolist() == ["0", "1"]


@pytest.mark.parametrize(
    "records, kwargs, message",
    [
        ([{"question": "red is a", "answer": "color"}], {"answer_column": "label"},
         r"kinds.jsonl: no column 'label' \(answer\)"),
        ([{"query": "red is a", "answer": "color"}], {}, "kinds.jsonl: no column 'question' or 'prompt'"),
        ([{"question": "red is a", "choices": KINDS, "answer": 4}], {},
         r"kinds.jsonl, row 1: answer index 4 is out of range for 4 choices"),
        ([{"question": "red is a", "choices": KINDS, "answer": "colour"}], {},
         "kinds.jsonl, row 1: answer 'colour' is not among the choices"),
        ([{"question": "red", "choices": KINDS, "answer": 0}, {"question": " ", "choices": KINDS, "answer": 0}], {},
         "kinds.jsonl, row 2: empty prompt"),
        ([{"question": "red is a", "answer": "color"}], {"template": "{question} {missing}"},
         r"no column 'missing' \(template placeholder\)"),
        ([{"question": "red is a", "answer": "color"}], {"template": "{question.__class__}"},
         "must be a plain column name"),
    ],
)
def test_bad_files_fail_with_one_clear_error(tmp_path, records, kwargs, message):
    path = write_jsonl(tmp_path / "kinds.jsonl", records)
    kwargs.setdefault("choices_column", "choices" if "choices" in records[0] else None)
    with pytest.raises(Merge3Error, match=message):
        bank_from_file([path], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_chat_template_asked_for_needs_one(tmp_path, tiny, chat_tokenizer):
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "red", "answer": "color"}])
    with pytest.raises(Merge3Error, match="chat_template is asked for but the tokenizer in .* has no chat template"):
        bank_from_file([path], tmp_path / "out", chat_template=True, tokenizer=tiny[0])
    bank = bank_from_file([path], tmp_path / "ok", chat_template=True, tokenizer=chat_tokenizer, max_new_tokens=3)
    assert make_evaluator(bank)(tiny[1]).tolist() == [True]  # the stored relative tokenizer path resolves


def lm_eval_task(tmp_path):
    """Two lm-eval task YAMLs over local JSONL: a Jinja multiple choice (json builder + data_files) and a
    generation task whose dataset_path is a folder, with until / max_gen_toks."""
    docs = [{"subject": s, "article": a, "kind": k, "wrong": next(w for w in KINDS if w != k), "gold_first": i % 2 == 0}
            for i, (s, a, k) in enumerate(FACTS)]
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "test.jsonl", docs)
    write_jsonl(data / "train.jsonl", docs[:1])
    (tmp_path / "_base.yaml").write_text("output_type: multiple_choice\ntarget_delimiter: ' '\n")
    (tmp_path / "kinds.yaml").write_text(yaml.safe_dump({
        "include": "_base.yaml", "task": "kinds", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "data/test.jsonl", "train": "data/train.jsonl"}},
        "test_split": "test", "doc_to_text": "{{subject}} is {{article}}",
        "doc_to_choice": "{{[kind, wrong] if gold_first else [wrong, kind]}}",
        "doc_to_target": "{{0 if gold_first else 1}}", "metric_list": [{"metric": "acc"}],
    }))
    (tmp_path / "open.yaml").write_text(yaml.safe_dump({
        "task": "open", "dataset_path": "data", "test_split": "test", "output_type": "generate_until",
        "doc_to_text": "{{subject | lower}} is {{article}}", "doc_to_target": "kind",
        "generation_kwargs": {"until": ["\n", "</s>"], "max_gen_toks": 3, "do_sample": False},
    }))
    return tmp_path / "kinds.yaml", tmp_path / "open.yaml"


def test_lm_eval_yaml_end_to_end(tmp_path, tiny):
    folder, model, _ = tiny
    kinds, open_ = lm_eval_task(tmp_path)
    bank = bank_from_file([], tmp_path / "bank", task_yaml=[kinds, open_])
    assert bank.tasks == ["kinds", "open"] and len(bank) == 12
    first = bank.items.iloc[1]
    assert first["prompt"] == "seven is a" and list(first["choices"]) == [" color", " number"] and first["answer"] == "1"
    assert bank.spec.evaluator.per_task["open"].stop == ["\n", "</s>"]
    assert bank.spec.evaluator.generation_for("open")[0] == 3 and bank.spec.evaluator.generation_for("kinds")[0] == 16
    correct = make_evaluator(bank, tokenizer_from=folder)(model)
    assert correct.all()  # the tiny model knows all six facts, both as choices and as completions
    # the bank re-evaluates identically after a reload (the items round-trip through parquet)
    assert make_evaluator(ItemBank.load(bank.path), tokenizer_from=folder)(model).tolist() == correct.tolist()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"output_type": "loglikelihood_rolling"}, "unknown output_type 'loglikelihood_rolling'"),
        ({"dataset_path": "allenai/ai2_arc"}, "dataset_path 'allenai/ai2_arc' is not an existing local file"),
        ({"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "https://x.org/t.jsonl"}}},
         "data file 'https://x.org/t.jsonl' is not an existing local file"),
        ({"doc_to_text": "{{subjekt}} is"}, "doc_to_text: 'subjekt' is undefined"),
        ({"doc_to_text": "subjekt"}, "doc_to_text 'subjekt' is neither a column"),
        ({"doc_to_target": "{{kind}}x"}, "answer 'colorx' is not among the choices"),
        ({"doc_to_target": "{{5}}"}, "answer index 5 is out of range for 2 choices"),
        ({"doc_to_text": "{{ ''.__class__.__mro__ }}"}, "refused by the template sandbox: access to attribute .__class__."),
        ({"doc_to_choice": "{{kind}}"}, "doc_to_choice gives 'color', not a list of choices"),
        ({"doc_to_text": "{% if false %}x{% endif %}"}, "doc_to_text gives an empty prompt"),
        ({"num_fewshot": 5}, "num_fewshot 5 is not supported"),
    ],
)
def test_bad_task_yamls_fail_with_one_clear_error(tmp_path, change, message):
    kinds, _ = lm_eval_task(tmp_path)
    config = {**yaml.safe_load(kinds.read_text()), **change}
    kinds.write_text(yaml.safe_dump(config))
    with pytest.raises(Merge3Error, match=message):
        bank_from_file([], tmp_path / "out", task_yaml=[kinds])
    assert not (tmp_path / "out").exists()


def test_task_yaml_with_python_functions_is_refused(tmp_path):
    kinds, _ = lm_eval_task(tmp_path)
    kinds.write_text(kinds.read_text() + "process_docs: !function utils.process_docs\n")
    with pytest.raises(Merge3Error, match="!function .*never runs"):
        bank_from_file([], tmp_path / "out", task_yaml=[kinds])


def test_dataset_path_can_be_a_single_local_file(tmp_path, tiny):
    _, open_ = lm_eval_task(tmp_path)
    config = {**yaml.safe_load(open_.read_text()), "dataset_path": str(tmp_path / "data" / "test.jsonl")}
    open_.write_text(yaml.safe_dump(config))
    shutil.rmtree(tmp_path / "bank", ignore_errors=True)
    bank = bank_from_file([], tmp_path / "bank", task_yaml=[open_], normalize="lower")
    assert bank.items["answer"].tolist() == [k for _, _, k in FACTS]
    assert make_evaluator(bank, tokenizer_from=tiny[0])(tiny[1]).all()


def test_arc_style_yaml_with_struct_choices(tmp_path, tiny):
    """lm-eval's own ARC task: choices in a struct column, the key as a label looked up in it."""
    docs = [{"question": f"{s} is {a}", "choices": {"text": KINDS, "label": list("ABCD")},
             "answerKey": "ABCD"[KINDS.index(k)]} for s, a, k in FACTS]
    write_jsonl(tmp_path / "arc.jsonl", docs)
    (tmp_path / "arc.yaml").write_text(
        "task: arc_tiny\ndataset_path: arc.jsonl\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: '{{choices.label.index(answerKey)}}'\n"
        "doc_to_choice: '{{choices.text}}'\n")
    bank = bank_from_file([], tmp_path / "bank", task_yaml=[tmp_path / "arc.yaml"])
    assert bank.items["answer"].tolist() == ["0", "1", "2", "3", "0", "2"]
    assert make_evaluator(bank, tokenizer_from=tiny[0])(tiny[1]).all()


def test_bad_bank_settings_name_the_field(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "red is a", "answer": "color"}])
    with pytest.raises(Merge3Error, match="field 'evaluator.causal_lm.normalize'"):
        bank_from_file([path], tmp_path / "out", normalize="fuzzy")
    with pytest.raises(Merge3Error, match="item 'g-0': field 'answer' 'color' has no number"):
        bank_from_file([path], tmp_path / "out", normalize="number")
