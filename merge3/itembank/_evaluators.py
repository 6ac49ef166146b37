"""Evaluators: run a model on (a subset of) an item bank and return per-item correctness.

Every evaluator is a callable ``evaluator(model, indices=None) -> np.ndarray[bool]`` aligned with ``indices`` (row
positions in the bank; all items when None). Anything with that call signature can stand in for one.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from merge3._errors import Merge3Error
from merge3.itembank._bank import (
    CausalLMSpec,
    ClassifierSpec,
    GenerationSpec,
    ItemBank,
    MultipleChoiceSpec,
    TextClassifierSpec,
    as_choice_list,
    normalize_answer,
)


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
        self.inputs = torch.tensor(_input_matrix(bank), dtype=torch.float32, device=self.device)
        self.answers = bank.items["answer"].to_numpy().astype(np.int64)  # compared on the host, with the predictions
        self.heads = {t: load_head_file(bank, t, f, self.device) for t, f in (spec.heads or {}).items()}
        missing = [t for t in bank.tasks if spec.heads is not None and t not in self.heads]
        if missing:
            raise Merge3Error(f"item bank '{bank.path}': evaluator.heads has no head for task '{missing[0]}'")
        for task, (weight, _) in self.heads.items():
            _check_answers(bank, task, weight.shape[0])
        # without heads the model's outputs are the logits: an encoder (1024 features) would score 0.0 in silence
        self.classes = spec.classes or (int(self.answers.max()) + 1 if self.answers.size else 0)
        if spec.heads is None and spec.classes is not None:
            for task in bank.tasks:
                _check_answers(bank, task, spec.classes)

    def _task_logits(self, model: nn.Module, indices: np.ndarray):
        """(positions in ``indices``, class logits) per task: through the task's head when the bank has heads."""
        tasks = self.bank.task_of[indices]
        for task in np.unique(tasks):
            where = np.flatnonzero(tasks == task)
            rows = torch.as_tensor(indices[where], device=self.device)
            chunks = []
            for chunk in rows.split(self.batch_size):
                out = self._forward(model, self.inputs[chunk]).float()
                if self.heads:
                    weight, bias = self.heads[task]
                    if out.shape[-1] != weight.shape[1]:
                        raise Merge3Error(f"item bank '{self.bank.path}': the head of task '{task}' "
                                          f"({self.bank.spec.evaluator.heads[task]}) takes {weight.shape[1]} features; "
                                          f"the model gives {out.shape[-1]}")
                    out = out @ weight.T + bias
                elif out.shape[-1] != self.classes:
                    raise Merge3Error(f"item bank '{self.bank.path}' has no heads, so the model's outputs are its class "
                                      f"logits: it gives {out.shape[-1]} per item, the bank's answers are "
                                      f"{self.classes} classes (an encoder needs evaluator.heads; set "
                                      "evaluator.classes if the model outputs classes the bank never answers)")
                chunks.append(out)
            yield where, torch.cat(chunks)

    @torch.inference_mode()
    def predict(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray:
        """The predicted class of every item in ``indices`` (through its task's head when the bank has heads)."""
        indices = _all(self.bank, indices)
        return _predicted(self._task_logits(model, indices), len(indices))

    @torch.inference_mode()
    def confidence(self, model: nn.Module, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(right?, the probability the model gives the right class) of every item in ``indices``."""
        indices = _all(self.bank, indices)
        return _logit_confidence(self._task_logits(model, indices), self.answers[indices])

    def __call__(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray:
        indices = _all(self.bank, indices)
        return self.predict(model, indices) == self.answers[indices]

    def _forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        try:
            return model(x)
        except RuntimeError as e:  # shapes that do not fit: the bank's inputs are not this model's
            raise Merge3Error(f"item bank '{self.bank.path}': the model cannot take its items' 'input' "
                              f"({x.shape[-1]} values each): {str(e).splitlines()[0]}") from None


def _predicted(task_logits, n: int) -> np.ndarray:
    """The argmax class of each of ``n`` items from (positions, logits) per task (a classifier's ``_task_logits``)."""
    predicted = np.zeros(n, dtype=np.int64)
    for where, logits in task_logits:
        predicted[where] = logits.argmax(-1).cpu().numpy()
    return predicted


def _logit_confidence(task_logits, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right?, the probability of the right class) of each item from (positions, logits) per task; ``answers``
    aligned with the positions."""
    correct, p_right = np.zeros(len(answers), dtype=bool), np.zeros(len(answers))
    for where, logits in task_logits:
        correct[where], p_right[where] = _right_and_probability(logits, answers[where])
    return correct, p_right


def _right_and_probability(logits: torch.Tensor, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: is the argmax the answer, and the softmax probability of the answer (a soft score of the item)."""
    right = torch.as_tensor(answers, device=logits.device)
    p = torch.softmax(logits.float(), -1)[torch.arange(len(answers), device=logits.device), right]
    return (logits.argmax(-1) == right).cpu().numpy(), p.cpu().numpy().astype(np.float64)


def _input_matrix(bank: ItemBank) -> np.ndarray:
    """The items' ``input`` vectors as one float matrix: vectors of finite numbers, all of one length (an item of
    another length than most is named)."""
    rows = []
    for k, vector in enumerate(bank.items["input"].to_numpy()):
        try:
            row = np.asarray(vector, dtype=np.float64)
        except (TypeError, ValueError):
            row = np.zeros((0, 0))
        if row.ndim != 1:
            raise Merge3Error(f"item bank '{bank.path}': item '{bank.item_ids[k]}' has an 'input' that is not a vector "
                              "of numbers")
        if not np.isfinite(row).all():
            raise Merge3Error(f"item bank '{bank.path}': item '{bank.item_ids[k]}' has NaN/Inf in its 'input'")
        with np.errstate(over="ignore"):
            beyond = not np.isfinite(row.astype(np.float32)).all()
        if beyond:  # the model reads float32: 1e300 would reach it as Inf
            raise Merge3Error(f"item bank '{bank.path}': item '{bank.item_ids[k]}' has an 'input' value beyond "
                              f"float32's range (±{np.finfo(np.float32).max:.3g})")
        rows.append(row)
    sizes = np.array([r.size for r in rows])
    usual = int(np.bincount(sizes).argmax()) if rows else 0
    odd = np.flatnonzero(sizes != usual)
    if odd.size:
        raise Merge3Error(f"item bank '{bank.path}': item '{bank.item_ids[odd[0]]}' has {sizes[odd[0]]} input values, "
                          f"the other items {usual}")
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), dtype=np.float32)


def _check_answers(bank: ItemBank, task: str, classes: int) -> None:
    """Every answer of ``task`` is a class its head can output."""
    answers = bank.items["answer"].to_numpy()[bank.task_indices[task]].astype(np.int64)
    bad = np.flatnonzero((answers < 0) | (answers >= classes))
    if bad.size:
        item = bank.item_ids[bank.task_indices[task][bad[0]]]
        raise Merge3Error(f"item bank '{bank.path}': item '{item}' has answer {answers[bad[0]]}, but task '{task}' has "
                          f"{classes} classes (its head's outputs, or evaluator.classes)")


def load_head_file(bank: ItemBank, task: str, file: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the linear head ``file`` (safetensors inside the bank) for ``task``, checked."""
    path = bank.resolve(file)
    if not path.exists():
        raise Merge3Error(f"item bank '{bank.path}': head file '{file}' for task '{task}' does not exist")
    try:
        head = load_file(str(path), device=str(device))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types on damaged files)
        raise Merge3Error(f"item bank '{bank.path}': head file '{file}' for task '{task}' is not readable "
                          f"safetensors ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if "weight" not in head or "bias" not in head or head["weight"].ndim != 2:
        raise Merge3Error(f"item bank '{bank.path}': head file '{file}' needs a 2-D 'weight' and a 'bias'")
    if head["bias"].shape != head["weight"].shape[:1]:
        raise Merge3Error(f"item bank '{bank.path}': head file '{file}': bias {tuple(head['bias'].shape)} does not "
                          f"fit weight {tuple(head['weight'].shape)}")
    weight, bias = head["weight"].float(), head["bias"].float()
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise Merge3Error(f"item bank '{bank.path}': head file '{file}' for task '{task}' holds NaN/Inf values")
    return weight, bias


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
        self.heads = {t: load_head_file(bank, t, f, self.device) for t, f in spec.heads.items() if t in bank.tasks}
        for task, (weight, _) in self.heads.items():
            _check_answers(bank, task, weight.shape[0])
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

    def predict(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray:
        """The predicted class of every item in ``indices`` (its task head's argmax)."""
        indices = _all(self.bank, indices)
        if len(indices) == 0:
            return np.zeros(0, dtype=np.int64)
        return _predicted(self._task_logits(model, indices), len(indices))

    def _task_logits(self, model: nn.Module, indices: np.ndarray):
        """(positions in ``indices``, head logits) per task."""
        emb = self.embeddings(model, indices)
        tasks = self.bank.task_of[indices]
        for task in np.unique(tasks):
            where = np.flatnonzero(tasks == task)
            weight, bias = self.heads[task]
            yield where, emb[torch.as_tensor(where, device=emb.device)] @ weight.T + bias

    @torch.inference_mode()
    def confidence(self, model: nn.Module, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(right?, the probability the head gives the right class) of every item in ``indices``."""
        indices = _all(self.bank, indices)
        if len(indices) == 0:
            return np.zeros(0, dtype=bool), np.zeros(0)
        return _logit_confidence(self._task_logits(model, indices), self.answers[indices])

    def __call__(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray:
        indices = _all(self.bank, indices)
        return self.predict(model, indices) == self.answers[indices]


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


def _cache_argument(model: nn.Module) -> str | None:
    """The keyword under which ``model`` takes a KV cache (``cache`` in transformers 5, ``past_key_values`` before),
    or None when it takes none."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _returned_cache(out):
    cache = getattr(out, "cache", None)  # only then the old name: reading it in transformers 5 logs a deprecation
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _cache_rows(cache, rows: torch.Tensor):
    """The cache of batch rows ``rows`` (repeats allowed): each choice gets its own prompt's keys and values."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(rows)  # in place: this prompt cache is used once
        return cache
    return tuple(tuple(t.index_select(0, rows) for t in layer) for layer in cache)  # legacy tuple caches


def _buckets(keys: Sequence, batch_size: int) -> list[np.ndarray]:
    """Positions 0..n-1 in batches of similar ``keys`` (sorted, stable), so padding stays small.

    >>> [b.tolist() for b in _buckets([5, 1, 4, 2, 9], 2)]
    [[1, 3], [2, 0], [4]]
    """
    order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _left_padded(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """(ids, attention mask, position ids): rows end at the right edge; positions count real tokens only, so a row's
    numbers do not depend on how much padding its batch needs."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[r, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under ``logits`` [..., vocab] without materialising a second vocab-sized tensor."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def _encode(tok, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []


def _per_item(flat: torch.Tensor, choices: Sequence[Sequence]) -> list[list[float]]:
    values, out, start = flat.tolist(), [], 0
    for cs in choices:
        out.append(values[start : start + len(cs)])
        start += len(cs)
    return out


def score_choices_shared(model: nn.Module, prompts: Sequence[list[int]], choices: Sequence[Sequence[list[int]]],
                         pad_id: int, device: torch.device) -> list[list[float]]:
    """Σ log p(choice | prompt) for every choice of every prompt, each prompt's forward pass shared by its choices.

    One left-padded pass over the prompts (KV cache kept, only the last position's logits, which score every
    choice's first token); then all choices of all prompts as one batch continuing from their prompt's cache rows.
    Falls back to :func:`score_choices_full` for a model that takes or returns no cache.
    """
    cache_arg = _cache_argument(model)
    if cache_arg is None:
        return score_choices_full(model, prompts, choices, pad_id, device)
    ids, mask, positions = _left_padded(prompts, pad_id, device)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep)
    flat = [c for cs in choices for c in cs]
    owner = torch.tensor([b for b, cs in enumerate(choices) for _ in cs], dtype=torch.long, device=device)
    first = torch.tensor([c[0] for c in flat], dtype=torch.long, device=device)
    total = _token_logprobs(out.logits[:, -1][owner], first)
    width = max(len(c) for c in flat) - 1  # the last choice token is only a target, never an input
    if width == 0:
        return _per_item(total, choices)
    cache = _returned_cache(out)
    if cache is None:
        return score_choices_full(model, prompts, choices, pad_id, device)
    inputs = torch.full((len(flat), width), pad_id, dtype=torch.long)
    targets = torch.zeros((len(flat), width), dtype=torch.long)
    live = torch.zeros((len(flat), width), dtype=torch.long)
    for r, c in enumerate(flat):
        n = len(c) - 1
        inputs[r, :n], targets[r, :n], live[r, :n] = torch.tensor(c[:-1]), torch.tensor(c[1:]), 1
    inputs, targets, live = inputs.to(device), targets.to(device), live.to(device)
    lengths = mask.sum(-1)[owner]
    step = torch.arange(width, device=device)
    out = model(input_ids=inputs, attention_mask=torch.cat([mask[owner], live], 1),
                position_ids=lengths[:, None] + step, use_cache=True, **{cache_arg: _cache_rows(cache, owner)})
    total = total + (_token_logprobs(out.logits, targets) * live).sum(-1)
    return _per_item(total, choices)


def score_choices_full(model: nn.Module, prompts: Sequence[list[int]], choices: Sequence[Sequence[list[int]]],
                       pad_id: int, device: torch.device) -> list[list[float]]:
    """The plain computation: one right-padded forward pass over every prompt+choice sequence."""
    seqs = [(p + c, len(c)) for p, cs in zip(prompts, choices) for c in cs]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (seq, _) in enumerate(seqs):
        ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
    ids, mask = ids.to(device), mask.to(device)
    token_lp = _token_logprobs(model(input_ids=ids, attention_mask=mask).logits[:, :-1], ids[:, 1:])
    total = torch.stack([token_lp[r, len(s) - 1 - n : len(s) - 1].sum() for r, (s, n) in enumerate(seqs)])
    return _per_item(total, choices)


class _StopWhenDone:
    """Per row of a generate() batch: done once it produced EOS or its cut (:func:`cut_at_stop`) can no longer
    move; generation ends when every row is done (transformers' StoppingCriteria protocol: a bool per row).

    A cut is settled once the text runs the longest stop string past it: a stop string that starts earlier and is
    still incomplete (``"s a c"`` around ``"a"``) would otherwise cut earlier in the unbatched, full-length text.
    """

    def __init__(self, tok, start: int, stop: Sequence[str], eos_ids: Sequence[int]):
        self.tok, self.start, self.stop, self.eos = tok, start, [s for s in stop if s], list(eos_ids)
        self.longest = max(map(len, self.stop), default=0)
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.start :]
        if self.done is None:
            self.done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        if self.eos:
            self.done |= torch.isin(new[:, -1], torch.tensor(self.eos, device=input_ids.device))
        if self.stop:
            for r in torch.nonzero(~self.done).flatten().tolist():
                text = self.tok.decode(new[r], skip_special_tokens=True)
                cuts = [text.index(s) for s in self.stop if s in text]
                if cuts and len(text) - min(cuts) >= self.longest:
                    self.done[r] = True
        return self.done.clone()


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The completion before its first stop string, stripped.

    >>> cut_at_stop(" city\\nQ: next", ["\\n"])
    'city'
    """
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[: min(cuts)] if cuts else text).strip()


class _CausalLMItems:
    """What the causal-LM evaluators share.

    Every prompt (and every choice) is tokenised once, at construction. Multiple choice runs each prompt once and
    continues all its choices from the prompt's KV cache (:func:`score_choices_shared`); generation is batched
    greedy decoding that stops as soon as every row has produced a stop string or EOS. Batches are length-bucketed
    (sorted by prompt length) and left-padded with positions that count real tokens only, so an item's result does
    not depend on which other items share its batch (beyond float noise). ``batch_size`` counts prompts.
    """

    def __init__(self, bank: ItemBank, tokenizer, device: str | torch.device, batch_size: int,
                 chat_template: bool = False, choice_rows: Sequence[int] | None = None):
        self.bank, self.tok, self.device, self.batch_size = bank, tokenizer, torch.device(device), batch_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else int(pad)
        prompts = [str(p) for p in bank.items["prompt"]]
        if chat_template:
            prompts = [_as_user_turn(tokenizer, p) for p in prompts]
        self.prompt_ids = _encode(tokenizer, prompts)
        empty = [bank.item_ids[i] for i, ids in enumerate(self.prompt_ids) if not ids]
        if empty:
            raise Merge3Error(f"item bank '{bank.path}': item '{empty[0]}': its prompt tokenises to nothing")
        self.choice_ids: list[list[list[int]]] = [[] for _ in range(len(bank))]
        rows = range(len(bank)) if choice_rows is None else choice_rows
        texts = {i: [str(c) for c in as_choice_list(bank.items["choices"][i]) or []] for i in rows}
        flat = _encode(tokenizer, [c for i in rows for c in texts[i]])
        start = 0
        for i in rows:
            self.choice_ids[i], start = flat[start : start + len(texts[i])], start + len(texts[i])
            bad = [c for c, ids in zip(texts[i], self.choice_ids[i]) if not ids]
            if bad:
                raise Merge3Error(f"item '{bank.item_ids[i]}': choice {bad[0]!r} tokenises to nothing")

    @torch.inference_mode()
    def loglikelihoods(self, model: nn.Module, indices: np.ndarray) -> list[list[float]]:
        """Σ log p(choice tokens | prompt) of every choice, per item of ``indices`` (aligned with them)."""
        indices = np.asarray(indices, dtype=np.int64)
        keys = [(len(self.prompt_ids[i]), max(map(len, self.choice_ids[i]), default=0)) for i in indices]
        scores: list[list[float]] = [[] for _ in indices]
        for batch in _buckets(keys, self.batch_size):
            rows = indices[batch]
            got = score_choices_shared(model, [self.prompt_ids[i] for i in rows], [self.choice_ids[i] for i in rows],
                                       self.pad_id, self.device)
            for pos, s in zip(batch, got):
                scores[pos] = s
        return scores

    def _generation_of(self, row: int) -> tuple[int, tuple[str, ...], str]:
        raise NotImplementedError

    @torch.inference_mode()
    def completions(self, model: nn.Module, indices: np.ndarray) -> list[str]:
        """Greedy completions of the items ``indices``, cut at their first stop string and stripped."""
        indices = np.asarray(indices, dtype=np.int64)
        out = [""] * len(indices)
        groups: dict[tuple, list[int]] = {}
        for pos, i in enumerate(indices):  # items of tasks with other stop strings or lengths go in other batches
            groups.setdefault(self._generation_of(int(i))[:2], []).append(pos)
        for (max_new_tokens, stop), positions in groups.items():
            positions = np.asarray(positions)
            for batch in _buckets([len(self.prompt_ids[indices[p]]) for p in positions], self.batch_size):
                where = positions[batch]
                texts = self._greedy(model, [self.prompt_ids[i] for i in indices[where]], max_new_tokens, stop)
                for pos, text in zip(where, texts):
                    out[pos] = text
        return out

    def _eos_ids(self, model: nn.Module) -> list[int]:
        config = getattr(model, "generation_config", None)  # its EOS (e.g. a chat model's end of turn) also ends a row
        ids = {self.tok.eos_token_id, *np.atleast_1d(getattr(config, "eos_token_id", None) or [])}
        return sorted(int(i) for i in ids if i is not None)

    def _greedy(self, model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                stop: Sequence[str]) -> list[str]:
        from transformers import GenerationConfig, StoppingCriteriaList

        ids, mask, _ = _left_padded(prompts, self.pad_id, self.device)
        eos = self._eos_ids(model)
        # plain greedy decoding: a model's own repetition penalties would make scores depend on its generation_config
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=self.pad_id,
                                  eos_token_id=eos or None, repetition_penalty=1.0, no_repeat_ngram_size=0)
        criteria = StoppingCriteriaList([_StopWhenDone(self.tok, ids.shape[1], stop, eos)])
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                   stopping_criteria=criteria)
        texts = []
        for row in generated[:, ids.shape[1] :].tolist():
            end = next((k for k, t in enumerate(row) if t in eos), len(row))  # what follows EOS is padding
            texts.append(cut_at_stop(self.tok.decode(row[:end], skip_special_tokens=True), stop))
        return texts


def _as_user_turn(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def generation_correct(completion: str, answer: str, normalize: str) -> bool:
    """Does a (cut, stripped) completion match ``answer`` under ``normalize``?

    >>> generation_correct("The answer is 12.", "12", "number"), generation_correct("Paris", "paris.", "lower")
    (True, True)
    """
    target = normalize_answer(str(answer), normalize)
    return target is not None and normalize_answer(completion, normalize) == target


class MultipleChoiceEvaluator(_CausalLMItems):
    """Causal LM multiple choice: argmax over choices of Σ log p(choice tokens | prompt)."""

    def __init__(self, bank: ItemBank, tokenizer, device: str | torch.device = "cpu"):
        super().__init__(bank, tokenizer, device, bank.spec.evaluator.batch_size)

    def __call__(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray:
        return self.confidence(model, indices)[0]

    def confidence(self, model: nn.Module, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(right?, the right choice's share of the choices' likelihoods) of every item in ``indices``."""
        indices = _all(self.bank, indices)
        answers = self.bank.items["answer"].to_numpy()[indices].astype(int)
        return _choice_confidence(self.loglikelihoods(model, indices), answers)


def _choice_confidence(scores: Sequence[Sequence[float]], answers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per item: is the best-scored choice the answer, and the answer's softmax share over the choices' Σ log p."""
    correct = np.array([int(np.argmax(s)) == int(a) for s, a in zip(scores, answers)], dtype=bool)
    share = [float(torch.softmax(torch.tensor(s, dtype=torch.float64), 0)[int(a)]) for s, a in zip(scores, answers)]
    return correct, np.array(share, dtype=np.float64)


class GenerationEvaluator(_CausalLMItems):
    """Causal LM greedy generation, exact match of the stripped completion (cut at the first stop string)."""

    def __init__(self, bank: ItemBank, tokenizer, device: str | torch.device = "cpu"):
        self.spec: GenerationSpec = bank.spec.evaluator
        super().__init__(bank, tokenizer, device, self.spec.batch_size, choice_rows=[])

    def _generation_of(self, row: int) -> tuple[int, tuple[str, ...], str]:
        return self.spec.max_new_tokens, tuple(self.spec.stop), "strip"

    def __call__(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray:
        indices = _all(self.bank, indices)
        answers = self.bank.items["answer"].to_numpy()[indices]
        return np.array([generation_correct(c, a, "strip") for c, a in zip(self.completions(model, indices), answers)],
                        dtype=bool)


class CausalLMEvaluator(_CausalLMItems):
    """A ``causal_lm`` bank: multiple-choice and generation items side by side (column ``format``), each answered
    as :class:`MultipleChoiceEvaluator` / :class:`GenerationEvaluator` would, with the bank's (or its task's)
    generation settings and answer normalisation; prompts optionally wrapped with the tokenizer's chat template.

    >>> evaluator = make_evaluator(ItemBank.load("item_banks/mixed"), tokenizer_from="zoo/lm/base")  # doctest: +SKIP
    >>> evaluator(model, np.array([0, 5, 7]))  # doctest: +SKIP
    array([ True, False,  True])
    """

    def __init__(self, bank: ItemBank, tokenizer, device: str | torch.device = "cpu"):
        self.spec: CausalLMSpec = bank.spec.evaluator
        if self.spec.chat_template and not getattr(tokenizer, "chat_template", None):
            raise Merge3Error(f"item bank '{bank.path}': evaluator.chat_template is true but the tokenizer has no chat "
                              "template (use a tokenizer that has one, or set chat_template: false)")
        self.formats = bank.items["format"].to_numpy().astype(str)
        super().__init__(bank, tokenizer, device, self.spec.batch_size, self.spec.chat_template,
                         np.flatnonzero(self.formats == "multiple_choice").tolist())
        self.answers = [str(a).strip() for a in bank.items["answer"]]

    def _generation_of(self, row: int) -> tuple[int, tuple[str, ...], str]:
        return self.spec.generation_for(str(self.bank.task_of[row]))

    def __call__(self, model: nn.Module, indices: np.ndarray | None = None) -> np.ndarray:
        return self.confidence(model, indices)[0]

    def confidence(self, model: nn.Module, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(right?, soft score) of every item: a multiple-choice item's right-choice share of the likelihoods, a
        generation item's exact match (0 or 1: greedy text has no softer score)."""
        indices = _all(self.bank, indices)
        correct, p_right = np.zeros(len(indices), dtype=bool), np.zeros(len(indices))
        mc = np.flatnonzero(self.formats[indices] == "multiple_choice")
        if mc.size:
            scores = self.loglikelihoods(model, indices[mc])
            correct[mc], p_right[mc] = _choice_confidence(scores, [int(self.answers[i]) for i in indices[mc]])
        gen = np.flatnonzero(self.formats[indices] == "generation")
        if gen.size:
            texts = self.completions(model, indices[gen])
            correct[gen] = [generation_correct(t, self.answers[i], self._generation_of(int(i))[2])
                            for t, i in zip(texts, indices[gen])]
            p_right[gen] = correct[gen]
        return correct, p_right


def make_evaluator(bank: ItemBank, device: str | torch.device = "cpu", tokenizer_from: str | os.PathLike | None = None) -> Evaluator:
    """The evaluator a bank's ``bank.yaml`` asks for.

    Text-classifier and causal-LM banks need a tokenizer: ``evaluator.tokenizer`` in bank.yaml (relative to the bank), else
    ``tokenizer_from`` (usually the model folder).
    """
    spec = bank.spec.evaluator
    if isinstance(spec, ClassifierSpec):
        return ClassifierEvaluator(bank, device)
    source = bank.resolve(spec.tokenizer, inside=False) if spec.tokenizer else tokenizer_from
    if source is None:
        raise Merge3Error(f"item bank '{bank.path}' needs a tokenizer: set evaluator.tokenizer or pass a model folder")
    tok = load_tokenizer(source)
    cls = {MultipleChoiceSpec: MultipleChoiceEvaluator, GenerationSpec: GenerationEvaluator,
           TextClassifierSpec: TextClassifierEvaluator, CausalLMSpec: CausalLMEvaluator}[type(spec)]
    return cls(bank, tok, device)


HF_CLASS_FOR = {"classifier": "AutoModel", "text_classifier": "AutoModel", "multiple_choice": "AutoModelForCausalLM",
                "generation": "AutoModelForCausalLM", "causal_lm": "AutoModelForCausalLM"}


def load_model_for(bank: ItemBank, path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The runnable module at ``path`` in the class the bank's evaluator needs (classifier encoder, text encoder or
    causal LM): the one loading path of search workers, calibration, verify, baselines and ``merge3 eval``.

    >>> model = load_model_for(ItemBank.load("item_banks/digits"), "zoo/digits/base")  # doctest: +SKIP
    """
    from merge3.models import check_finite, load_model

    module = load_model(path, device=device, hf_class=HF_CLASS_FOR[bank.spec.evaluator.kind])
    check_finite(dict(module.state_dict()), str(path))  # an accuracy of NaN weights means nothing
    return module
