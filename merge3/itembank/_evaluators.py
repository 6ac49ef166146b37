"""Evaluators: run a model on (a subset of) an item bank and return per-item correctness.

Every evaluator is a callable ``evaluator(model, indices=None) -> np.ndarray[bool]`` aligned with ``indices`` (row
positions in the bank; all items when None). Anything with that call signature can stand in for one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from merge3._errors import Merge3Error
from merge3.itembank._bank import ClassifierSpec, GenerationSpec, ItemBank, MultipleChoiceSpec, TextClassifierSpec


class Evaluator(Protocol):
    bank: ItemBank

    def __call__(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray: ...


def _all(bank: ItemBank, indices) -> np.ndarray:
    return np.arange(len(bank)) if indices is None else np.asarray(indices, dtype=np.int64)


class ClassifierEvaluator:
    """Shared encoder + one frozen linear head per task (the standard multi-task merging protocol).

    The merged model maps an input vector to features; the task's head maps features to class logits. With no
    heads, the model's own output are the logits.
    """

    def __init__(self, bank: ItemBank, device: str | torch.device = "cpu"):
        spec = bank.spec.evaluator
        assert isinstance(spec, ClassifierSpec)
        self.bank, self.device, self.batch_size = bank, torch.device(device), spec.batch_size
        self.inputs = torch.tensor(np.stack(bank.items["input"].to_numpy()), dtype=torch.float32, device=self.device)
        self.answers = torch.tensor(bank.items["answer"].to_numpy().astype(np.int64), device=self.device)
        self.heads = {t: self._load_head(bank, t, f) for t, f in (spec.heads or {}).items()}
        missing = [t for t in bank.tasks if spec.heads is not None and t not in self.heads]
        if missing:
            raise Merge3Error(f"item bank '{bank.path}': evaluator.heads has no head for task '{missing[0]}'")

    def _load_head(self, bank: ItemBank, task: str, file: str) -> tuple[torch.Tensor, torch.Tensor]:
        path = bank.resolve(file)
        if not path.exists():
            raise Merge3Error(f"item bank '{bank.path}': head file '{file}' for task '{task}' does not exist")
        head = load_file(str(path), device=str(self.device))
        return head["weight"].float(), head["bias"].float()

    @torch.inference_mode()
    def __call__(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray:
        indices = _all(self.bank, indices)
        correct = np.zeros(len(indices), dtype=bool)
        tasks = self.bank.task_of[indices]
        for task in np.unique(tasks):
            where = np.flatnonzero(tasks == task)
            rows = torch.as_tensor(indices[where], device=self.device)
            preds = []
            for chunk in rows.split(self.batch_size):
                out = model(self.inputs[chunk]).float()
                if self.heads:
                    weight, bias = self.heads[task]
                    out = out @ weight.T + bias
                preds.append(out.argmax(-1))
            correct[where] = (torch.cat(preds) == self.answers[rows]).cpu().numpy()
        return correct


def _load_head_file(bank: ItemBank, task: str, file: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    path = bank.resolve(file)
    if not path.exists():
        raise Merge3Error(f"item bank '{bank.path}': head file '{file}' for task '{task}' does not exist")
    head = load_file(str(path), device=str(device))
    if "weight" not in head or "bias" not in head or head["weight"].ndim != 2:
        raise Merge3Error(f"item bank '{bank.path}': head file '{file}' needs a 2-D 'weight' and a 'bias'")
    return head["weight"].float(), head["bias"].float()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Sentence embedding as in sentence-transformers: mean of token states over the attention mask, optionally
    L2-normalised (its ``Normalize`` module).

    >>> h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]]); m = torch.tensor([[1, 1, 0]])
    >>> mean_pool(h, m).tolist()
    [[2.0, 1.0]]
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled


class TextClassifierEvaluator:
    """A text encoder (HF ``AutoModel``, e.g. BERT/MiniLM) + one frozen linear head per task over its pooled,
    optionally normalised sentence embedding: the multi-task merging protocol for text.

    Texts are tokenised once. A batch is padded to the width of its own length bucket (the item's token count
    rounded up to a multiple of 8), so an item is scored the same way whichever subset it is evaluated in.
    """

    BUCKET = 8

    def __init__(self, bank: ItemBank, tokenizer, device: str | torch.device = "cpu"):
        spec = bank.spec.evaluator
        assert isinstance(spec, TextClassifierSpec)
        self.bank, self.tok, self.spec, self.device = bank, tokenizer, spec, torch.device(device)
        missing = [t for t in bank.tasks if t not in spec.heads]
        if missing:
            raise Merge3Error(f"item bank '{bank.path}': evaluator.heads has no head for task '{missing[0]}'")
        self.heads = {t: _load_head_file(bank, t, f, self.device) for t, f in spec.heads.items() if t in bank.tasks}
        texts = [str(t) for t in bank.items["text"].to_numpy()]
        self.input_ids: list[list[int]] = tokenizer(texts, truncation=True, max_length=spec.max_length)["input_ids"]
        lengths = np.array([len(ids) for ids in self.input_ids])
        self.widths = np.minimum(-(-lengths // self.BUCKET) * self.BUCKET, max(spec.max_length, 1))
        self.answers = bank.items["answer"].to_numpy().astype(np.int64)
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    def _batch(self, rows: np.ndarray, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            seq = self.input_ids[i]
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[r, : len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def embeddings(self, model: nn.Module, indices: np.ndarray | None = None) -> torch.Tensor:
        """Pooled (and normalised, if the bank says so) embeddings [len(indices), dim], aligned with ``indices``."""
        indices = _all(self.bank, indices)
        out: list[torch.Tensor | None] = [None] * len(indices)
        widths = self.widths[indices]
        for width in np.unique(widths):
            where = np.flatnonzero(widths == width)
            for start in range(0, len(where), self.spec.batch_size):
                chunk = where[start : start + self.spec.batch_size]
                ids, mask = self._batch(indices[chunk], int(width))
                result = model(input_ids=ids, attention_mask=mask)
                hidden = result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]
                pooled = mean_pool(hidden.float(), mask, self.spec.normalize)
                for r, pos in enumerate(chunk):
                    out[pos] = pooled[r]
        if not out:
            return torch.zeros((0, 0))
        return torch.stack(out)  # type: ignore[arg-type]

    def logits(self, model: nn.Module, indices: np.ndarray | None = None) -> list[torch.Tensor]:
        """Per item, its task head's logits (tasks may differ in their number of classes)."""
        indices = _all(self.bank, indices)
        emb = self.embeddings(model, indices)
        tasks = self.bank.task_of[indices]
        return [emb[r] @ self.heads[t][0].T + self.heads[t][1] for r, t in enumerate(tasks)]

    def __call__(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray:
        indices = _all(self.bank, indices)
        correct = np.zeros(len(indices), dtype=bool)
        if len(indices) == 0:
            return correct
        emb = self.embeddings(model, indices)
        tasks = self.bank.task_of[indices]
        for task in np.unique(tasks):
            where = np.flatnonzero(tasks == task)
            weight, bias = self.heads[task]
            preds = (emb[torch.as_tensor(where, device=emb.device)] @ weight.T + bias).argmax(-1).cpu().numpy()
            correct[where] = preds == self.answers[indices[where]]
        return correct


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise Merge3Error(f"tokenizer folder '{path}' does not exist (merge3 never downloads tokenizers)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise Merge3Error(f"cannot load a tokenizer from '{path}': {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


class MultipleChoiceEvaluator:
    """Causal LM multiple choice: argmax over choices of Σ log p(choice tokens | prompt)."""

    def __init__(self, bank: ItemBank, tokenizer, device: str | torch.device = "cpu"):
        self.bank, self.tok, self.device = bank, tokenizer, torch.device(device)
        self.batch_size = bank.spec.evaluator.batch_size

    def _sequences(self, indices: np.ndarray) -> list[tuple[int, list[int], int]]:
        """(item position, token ids of prompt+choice, number of choice tokens) per (item, choice)."""
        rows = []
        for pos, i in enumerate(indices):
            prompt_ids = self.tok(self.bank.items["prompt"][i], add_special_tokens=False)["input_ids"]
            for choice in self.bank.items["choices"][i]:
                choice_ids = self.tok(str(choice), add_special_tokens=False)["input_ids"]
                if not choice_ids:
                    raise Merge3Error(f"item '{self.bank.item_ids[i]}': choice {choice!r} tokenises to nothing")
                rows.append((pos, prompt_ids + choice_ids, len(choice_ids)))
        return rows

    @torch.inference_mode()
    def loglikelihoods(self, model: nn.Module, indices: np.ndarray) -> list[list[float]]:
        rows = self._sequences(indices)
        scores: list[list[float]] = [[] for _ in indices]
        pad = self.tok.pad_token_id
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            width = max(len(ids) for _, ids, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (_, seq, _) in enumerate(batch):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = ids[:, 1:].to(self.device)
            token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            for r, (pos, seq, n_choice) in enumerate(batch):
                end = len(seq) - 1  # logprob of token t sits at position t-1
                scores[pos].append(float(token_lp[r, end - n_choice : end].sum()))
        return scores

    def __call__(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray:
        indices = _all(self.bank, indices)
        scores = self.loglikelihoods(model, indices)
        answers = self.bank.items["answer"].to_numpy()[indices].astype(int)
        return np.array([int(np.argmax(s)) == a for s, a in zip(scores, answers)], dtype=bool)


class GenerationEvaluator:
    """Causal LM greedy generation, exact match of the stripped completion (cut at the first stop string)."""

    def __init__(self, bank: ItemBank, tokenizer, device: str | torch.device = "cpu"):
        self.bank, self.tok, self.device = bank, tokenizer, torch.device(device)
        self.spec: GenerationSpec = bank.spec.evaluator

    def completions(self, model: nn.Module, indices: np.ndarray) -> list[str]:
        self.tok.padding_side = "left"  # generation continues from the right edge of every row
        prompts = [str(p) for p in self.bank.items["prompt"].to_numpy()[indices]]
        out: list[str] = []
        for start in range(0, len(prompts), self.spec.batch_size):
            enc = self.tok(prompts[start : start + self.spec.batch_size], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                gen = model.generate(**enc, max_new_tokens=self.spec.max_new_tokens, do_sample=False,
                                     pad_token_id=self.tok.pad_token_id)
            for row in gen[:, enc["input_ids"].shape[1] :]:
                out.append(self._cut(self.tok.decode(row, skip_special_tokens=True)))
        return out

    def _cut(self, text: str) -> str:
        for stop in self.spec.stop:
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text.strip()

    def __call__(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray:
        indices = _all(self.bank, indices)
        answers = [str(a).strip() for a in self.bank.items["answer"].to_numpy()[indices]]
        return np.array([c == a for c, a in zip(self.completions(model, indices), answers)], dtype=bool)


def make_evaluator(bank: ItemBank, device: str | torch.device = "cpu", tokenizer_from: str | os.PathLike | None = None) -> Evaluator:
    """The evaluator a bank's ``bank.yaml`` asks for.

    Text-classifier and causal-LM banks need a tokenizer: ``evaluator.tokenizer`` in bank.yaml (relative to the bank), else
    ``tokenizer_from`` (usually the model folder).
    """
    spec = bank.spec.evaluator
    if isinstance(spec, ClassifierSpec):
        return ClassifierEvaluator(bank, device)
    source = bank.resolve(spec.tokenizer) if spec.tokenizer else tokenizer_from
    if source is None:
        raise Merge3Error(f"item bank '{bank.path}' needs a tokenizer: set evaluator.tokenizer or pass a model folder")
    tok = load_tokenizer(source)
    cls = {MultipleChoiceSpec: MultipleChoiceEvaluator, GenerationSpec: GenerationEvaluator,
           TextClassifierSpec: TextClassifierEvaluator}[type(spec)]
    return cls(bank, tok, device)


HF_CLASS_FOR = {"classifier": "AutoModel", "text_classifier": "AutoModel", "multiple_choice": "AutoModelForCausalLM",
                "generation": "AutoModelForCausalLM"}


def load_model_for(bank: ItemBank, path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The runnable module at ``path`` in the class the bank's evaluator needs (classifier encoder, text encoder or
    causal LM): the one loading path of search workers, calibration, verify, baselines and ``merge3 eval``.

    >>> model = load_model_for(ItemBank.load("item_banks/digits"), "zoo/digits/base")  # doctest: +SKIP
    """
    from merge3.models import load_model

    return load_model(path, device=device, hf_class=HF_CLASS_FOR[bank.spec.evaluator.kind])
