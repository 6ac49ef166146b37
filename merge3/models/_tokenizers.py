"""Refuse to merge models whose tokenizers differ: a merged embedding row means one token only if every endpoint
gives that row the same token.

Two tokenizers are the same here when they map every id to the same token string (the model's vocabulary plus its
added/special tokens) and, for BPE, apply the same merges in the same order. A folder without tokenizer files has
nothing to compare and passes (it uses whatever tokenizer the merge is given).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from merge3._errors import Merge3Error

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


def _merge_string(merge) -> str:
    return " ".join(merge) if isinstance(merge, (list, tuple)) else str(merge)


def tokenizer_table(folder: str | os.PathLike) -> tuple[dict[int, str], list[str]] | None:
    """(id -> token string, BPE merges in rank order) of the tokenizer in ``folder``; None without tokenizer files.

    Reads ``tokenizer.json`` directly when there is one (fast: no tokenizer object is built); otherwise loads the
    folder with ``AutoTokenizer`` (vocab.json/merges.txt, vocab.txt, sentencepiece models).
    """
    folder = Path(folder)
    if not has_tokenizer(folder):
        return None
    file = folder / "tokenizer.json"
    if file.is_file():
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Merge3Error(f"'{file}' is not a readable tokenizer.json: {str(e).splitlines()[0]}") from None
        model = data.get("model") or {}
        vocab = model.get("vocab") or {}
        if isinstance(vocab, dict):  # BPE, WordLevel, WordPiece: token -> id
            table = {int(i): str(t) for t, i in vocab.items()}
        else:  # Unigram: [[piece, score], ...] in id order
            table = {i: str(entry[0]) for i, entry in enumerate(vocab)}
        for added in data.get("added_tokens") or []:
            table[int(added["id"])] = str(added["content"])
        return table, [_merge_string(m) for m in model.get("merges") or []]
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise Merge3Error(f"cannot load the tokenizer in '{folder}': {str(e).splitlines()[0]}") from None
    table = {int(i): str(t) for t, i in tok.get_vocab().items()}
    merges: list[str] = []
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        merges = [_merge_string(m) for m in json.loads(backend.to_str()).get("model", {}).get("merges") or []]
    return table, merges


def check_same_tokenizer(base_folder: str | os.PathLike, endpoint_folders) -> None:
    """Raise one ``Merge3Error`` naming the first endpoint whose tokenizer differs from the base's, and the first
    differing token (its id and both strings) or BPE merge; identical tokenizers and folders without tokenizer files
    pass.

    >>> check_same_tokenizer("zoo/smollm/base", ["zoo/smollm/ft-arithmetic"])  # doctest: +SKIP
    """
    base = tokenizer_table(base_folder)
    if base is None:
        return
    base_vocab, base_merges = base
    for folder in endpoint_folders:
        other = tokenizer_table(folder)
        if other is None:
            continue
        vocab, merges = other
        where = f"the tokenizer of '{folder}' differs from the base's ('{base_folder}')"
        for i in sorted(set(base_vocab) | set(vocab)):
            a, b = base_vocab.get(i), vocab.get(i)
            if a != b:
                shown = lambda t: "(none)" if t is None else repr(t)  # noqa: E731
                sizes = "" if len(base_vocab) == len(vocab) else f"; vocabulary sizes {len(base_vocab)} vs {len(vocab)}"
                raise Merge3Error(f"{where}: token id {i} is {shown(a)} in the base but {shown(b)} here{sizes}")
        for rank, (a, b) in enumerate(zip(base_merges, merges)):
            if a != b:
                raise Merge3Error(f"{where}: BPE merge #{rank} is {a!r} in the base but {b!r} here (same tokens, "
                                  "different merges)")
        if len(base_merges) != len(merges):
            raise Merge3Error(f"{where}: {len(base_merges)} BPE merges in the base but {len(merges)} here")
