"""The item-bank folder format.

::

    item_banks/<name>/
      bank.yaml          name, tasks, items file, scoring, evaluator settings
      items.parquet      one row per item: item_id, task, the input (or prompt/choices) and the answer
      heads/<task>.safetensors   (classifier and text-classifier banks) the frozen head of each task

``bank.yaml`` example::

    name: digits
    tasks: [upright, rot90]
    items: items.parquet
    scoring: accuracy
    evaluator: {kind: classifier, heads: {upright: heads/upright.safetensors, rot90: heads/rot90.safetensors}}
    split: {column: split, method: stratified, test_fraction: 0.333, seed: 0}

**Splits.** Every item belongs to the ``search`` split (calibration, fitness subsets, verification) or the ``test``
split (never read by calibration or search: only final reports). The items' ``split`` column says which; ``split``
in bank.yaml records how it was made. A bank without a split still loads, with a :class:`NoTestSplitWarning`: all its
items are then search items and every score is "search split only".

Calibration (``calibration/``) and fixed-recipe scores (``baselines/``) live beside these files.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import unicodedata
import warnings
from collections import Counter
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import pandas as pd
import yaml
from pydantic import Field, ValidationError

from merge3._config import NoRepeats, StrictConfig
from merge3._errors import Merge3Error, validation_message
from merge3.models import read_yaml_mapping

BANK_FILE = "bank.yaml"
SPLITS = ("search", "test")
SPLIT_COLUMN = "split"
_DERIVED = ("calibration", "baselines")  # folders inside a bank that hold expensive results made from its items


class NoTestSplitWarning(UserWarning):
    """A bank without a test split: every score is on the items a search may have optimised."""




class ClassifierSpec(StrictConfig):
    """Items are feature vectors (column ``input``) scored by argmax of ``head(model(x))`` against ``answer``.

    ``heads`` maps each task to a safetensors file with ``weight``/``bias`` of a linear head; ``None`` means the
    model itself outputs class logits (e.g. same-task models for C2M3).
    """

    kind: Literal["classifier"]
    heads: dict[str, str] | None = None
    batch_size: int = Field(1024, gt=0)
    classes: int | None = Field(None, ge=2, description="without heads: how many class logits the model outputs "
                                "(default: the highest answer + 1); a model of another output width is refused")


class MultipleChoiceSpec(StrictConfig):
    """Causal LM: the choice (column ``choices``) with the highest summed log-likelihood after ``prompt`` wins."""

    kind: Literal["multiple_choice"]
    tokenizer: str | None = None  # folder; default: the model's own folder
    batch_size: int = Field(16, gt=0)


class GenerationSpec(StrictConfig):
    """Causal LM: greedy generation after ``prompt``, exact match (after strip) with ``answer``."""

    kind: Literal["generation"]
    tokenizer: str | None = None
    max_new_tokens: int = Field(16, gt=0)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    batch_size: int = Field(16, gt=0)


Normalize = Literal["strip", "lower", "number"]


class GenerationSettings(StrictConfig):
    """One task's overrides of a causal-LM bank's generation settings (unset fields: the bank's own)."""

    max_new_tokens: int | None = Field(None, gt=0)
    stop: list[str] | None = None
    normalize: Normalize | None = None


class CausalLMSpec(StrictConfig):
    """Causal LM, mixed items: column ``format`` says per item how it is scored.

    - ``multiple_choice``: the choice (column ``choices``, a list of ≥ 2 strings) with the highest Σ log p(choice
      tokens | prompt) wins; ``answer`` is the right choice's 0-based index as a decimal string (``"2"``).
    - ``generation``: greedy decoding after ``prompt`` for at most ``max_new_tokens``, cut at the first ``stop``
      string (or EOS), compared with ``answer`` after ``normalize``: ``strip``; ``lower`` (strip, casefold, collapse
      spaces, drop trailing punctuation); ``number`` (the first number of each).

    ``chat_template`` wraps every prompt as one user turn with the tokenizer's chat template (generation prompt
    added); ``per_task`` overrides the generation settings of single tasks (lm-eval tasks differ in ``until``).
    ``batch_size`` counts prompts per forward pass.
    """

    kind: Literal["causal_lm"]
    tokenizer: str | None = None
    chat_template: bool = False
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(16, gt=0)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    normalize: Normalize = "strip"
    per_task: dict[str, GenerationSettings] = Field(default_factory=dict)

    def generation_for(self, task: str) -> tuple[int, tuple[str, ...], str]:
        """(max_new_tokens, stop strings, normalize) for ``task``, its overrides applied.

        >>> spec = CausalLMSpec(kind="causal_lm", per_task={"gsm": {"normalize": "number"}})
        >>> spec.generation_for("gsm"), spec.generation_for("other")
        ((16, ('\\n',), 'number'), (16, ('\\n',), 'strip'))
        """
        own = self.per_task.get(task) or GenerationSettings()
        return (own.max_new_tokens or self.max_new_tokens, tuple(self.stop if own.stop is None else own.stop),
                own.normalize or self.normalize)


class TextClassifierSpec(StrictConfig):
    """Text encoder + one frozen linear head per task over sentence embeddings (column ``text``).

    The embedding is the mean of the encoder's last hidden states over the attention mask (sentence-transformers'
    mean pooling), L2-normalised when ``normalize`` (as all-MiniLM-L6-v2 does); the task's head maps it to class
    logits and the argmax is compared with ``answer``. ``heads`` maps every task to a safetensors file with
    ``weight`` [classes, dim] and ``bias`` [classes]; ``tokenizer`` is a folder relative to the bank (default: the
    model's own folder). Texts are truncated to ``max_length`` tokens.
    """

    kind: Literal["text_classifier"]
    heads: dict[str, str]
    tokenizer: str | None = None
    max_length: int = Field(128, gt=0)
    pooling: Literal["mean"] = "mean"
    normalize: bool = True
    batch_size: int = Field(32, gt=0)


EvaluatorSpec = Annotated[
    Union[ClassifierSpec, TextClassifierSpec, MultipleChoiceSpec, GenerationSpec, CausalLMSpec],
    Field(discriminator="kind"),
]


class SplitSpec(StrictConfig):
    """How the search/test split of a bank was made: ``stratified`` (a seeded ``test_fraction`` of each task) or
    ``column`` (given with the items, e.g. a zoo that holds out the same source images in every task)."""

    column: Literal["split"] = SPLIT_COLUMN
    method: Literal["stratified", "column"]
    test_fraction: float | None = Field(None, gt=0, le=0.9)
    seed: int | None = None
    description: str = ""


class BankSpec(StrictConfig):
    name: str
    description: str = ""
    tasks: Annotated[list[str], NoRepeats] = Field(min_length=1)
    items: str = "items.parquet"
    scoring: Literal["accuracy"] = "accuracy"
    evaluator: EvaluatorSpec
    split: SplitSpec | None = None
    source: dict = Field(default_factory=dict)


_REQUIRED_COLUMNS = {
    "classifier": ("item_id", "task", "input", "answer"),
    "text_classifier": ("item_id", "task", "text", "answer"),
    "multiple_choice": ("item_id", "task", "prompt", "choices", "answer"),
    "generation": ("item_id", "task", "prompt", "answer"),
    "causal_lm": ("item_id", "task", "format", "prompt", "choices", "answer"),
}
FORMATS = ("multiple_choice", "generation")


class ItemBank:
    """A loaded, validated item bank.

    >>> bank = ItemBank.load("item_banks/digits")  # doctest: +SKIP
    >>> bank.tasks, len(bank), bank.task_indices["upright"][:3]  # doctest: +SKIP
    """

    def __init__(self, path: Path, spec: BankSpec, items: pd.DataFrame, *, warn: bool = True):
        self.path = path
        self.spec = spec
        self.items = items.reset_index(drop=True)
        self._validate()
        self.item_ids: list[str] = [str(i) for i in self.items["item_id"]]
        self.task_of = self.items["task"].to_numpy().astype(str)
        self.task_indices = {t: np.flatnonzero(self.task_of == t) for t in self.tasks}
        self.split_of = (self.items[SPLIT_COLUMN].to_numpy().astype(str)
                         if spec.split is not None and SPLIT_COLUMN in self.items.columns
                         else np.full(len(self.items), "search"))  # a missing column: _validate_split says so
        self._validate_split()
        if spec.split is None and warn:
            warnings.warn(f"item bank '{path}' has no test split: test scores are unavailable and every score is on "
                          f"the search split only (add one: merge3 bank split {path} --test-fraction 0.33)",
                          NoTestSplitWarning, stacklevel=2)

    @property
    def has_test_split(self) -> bool:
        return self.spec.split is not None

    def split_indices(self, split: str) -> np.ndarray:
        """Row positions of the ``search`` or ``test`` items (``all``: every item), in bank order."""
        if split == "all":
            return np.arange(len(self))
        if split not in SPLITS:
            raise Merge3Error(f"unknown split '{split}' (search, test or all)")
        return np.flatnonzero(self.split_of == split)

    @property
    def search_indices(self) -> np.ndarray:
        return self.split_indices("search")

    @property
    def test_indices(self) -> np.ndarray:
        return self.split_indices("test")

    def fingerprint(self, split: str = "search") -> str:
        """Hash of the ids, tasks and answers of a split's items: a calibration made on other items is stale."""
        rows = self.split_indices(split)
        digest = hashlib.sha256()
        for i in rows:
            digest.update(f"{self.item_ids[i]}\x1f{self.task_of[i]}\x1f{self.items['answer'][i]}\x1e".encode())
        return digest.hexdigest()[:16]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tasks(self) -> list[str]:
        return list(self.spec.tasks)

    def __len__(self) -> int:
        return len(self.items)

    def resolve(self, relative: str, *, inside: bool = True) -> Path:
        """A path named in bank.yaml, relative to the bank folder. Files the bank owns (heads) must stay inside it
        (``inside``: a path leading out is refused); a reference to a model folder (the tokenizer) may point anywhere."""
        root = self.path.resolve()
        path = (root / relative).resolve()
        if inside and path != root and root not in path.parents:
            raise Merge3Error(f"item bank '{self.path}': '{relative}' leads outside the bank folder")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, warn: bool = True) -> ItemBank:
        path = Path(path)
        spec_file = path / BANK_FILE
        if not spec_file.exists():
            raise Merge3Error(f"item bank '{path}' has no {BANK_FILE} (is this an item-bank folder?)")
        raw = read_yaml_mapping(spec_file, "item bank file", "a mapping with tasks, items, evaluator, …",
                                empty_ok=True)
        try:
            spec = BankSpec.model_validate(raw)
        except ValidationError as e:
            raise Merge3Error(validation_message(e, str(spec_file))) from None
        items_file = path / spec.items
        if not items_file.exists():
            raise Merge3Error(f"{spec_file}: field 'items': file '{items_file}' does not exist")
        return cls(path, spec, read_items(items_file), warn=warn)

    def _validate(self) -> None:
        where = f"item bank '{self.path}'"
        missing = [c for c in _REQUIRED_COLUMNS[self.spec.evaluator.kind] if c not in self.items.columns]
        if missing:
            raise Merge3Error(f"{where}: items lack column '{missing[0]}' (needed by a {self.spec.evaluator.kind} bank)")
        if self.items["answer"].isna().any():
            row = int(np.flatnonzero(self.items["answer"].isna().to_numpy())[0])
            raise Merge3Error(f"{where}: item '{self.items['item_id'][row]}' has no answer")
        duplicates = [i for i, n in Counter(map(str, self.items["item_id"])).items() if n > 1]
        if duplicates:
            raise Merge3Error(f"{where}: duplicate item_id '{duplicates[0]}'")
        present = set(self.items["task"].astype(str))
        empty = [t for t in self.spec.tasks if t not in present]
        if empty:
            raise Merge3Error(f"{where}: task '{empty[0]}' has no items")
        unknown = sorted(present - set(self.spec.tasks))
        if unknown:
            raise Merge3Error(f"{where}: items use task '{unknown[0]}', which bank.yaml does not list under 'tasks'")
        if isinstance(self.spec.evaluator, CausalLMSpec):
            _validate_causal_lm(self.items, self.spec, where)

    def _validate_split(self) -> None:
        where = f"item bank '{self.path}'"
        has_column = SPLIT_COLUMN in self.items.columns
        if self.spec.split is None:
            if has_column:
                raise Merge3Error(f"{where}: items have a '{SPLIT_COLUMN}' column but bank.yaml has no 'split' entry")
            return
        if not has_column:
            raise Merge3Error(f"{where}: bank.yaml has a split but the items lack column '{SPLIT_COLUMN}'")
        unknown = sorted(set(self.split_of) - set(SPLITS))
        if unknown:
            raise Merge3Error(f"{where}: column '{SPLIT_COLUMN}' has unknown value '{unknown[0]}' (use search or test)")
        for task in self.tasks:
            present = set(self.split_of[self.task_indices[task]])
            for split in SPLITS:
                if split not in present:
                    raise Merge3Error(f"{where}: task '{task}' has no {split} items")

    def per_split_accuracy(self, correct: np.ndarray, indices: np.ndarray) -> dict[str, dict[str, float] | None]:
        """``{"search": per-task accuracy, "test": per-task accuracy or None}`` of answers on ``indices``."""
        indices, correct = np.asarray(indices), np.asarray(correct)
        out: dict[str, dict[str, float] | None] = {}
        for split in SPLITS:
            keep = self.split_of[indices] == split
            out[split] = self.per_task_accuracy(correct[keep], indices[keep]) if keep.any() else None
        return out

    def chance_accuracy(self, split: str = "search") -> dict[str, float]:
        """Per task, the accuracy of always giving the task's most frequent answer on ``split``: what a model that
        has forgotten the task still scores (the floor of a ``forget:`` objective)."""
        rows = self.split_indices(split)
        answers = self.items["answer"].astype(str).to_numpy()[rows]
        tasks = self.task_of[rows]
        out = {}
        for task in self.tasks:
            mine = answers[tasks == task]
            if mine.size:
                out[task] = float(pd.Series(mine).value_counts().iloc[0] / mine.size)
        return out

    def per_task_accuracy(self, correct: np.ndarray, indices: np.ndarray | None = None) -> dict[str, float]:
        """Mean correctness per task for ``correct`` aligned with ``indices`` (all items when None)."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices)
        tasks = self.task_of[indices]
        correct = np.asarray(correct, dtype=float)
        return {t: float(correct[tasks == t].mean()) for t in self.tasks if (tasks == t).any()}


def _validate_causal_lm(items: pd.DataFrame, spec: BankSpec, where: str) -> None:
    """Every item of a ``causal_lm`` bank can be scored: a known format, a prompt, and an answer that fits it."""
    evaluator = spec.evaluator
    stray = [t for t in evaluator.per_task if t not in spec.tasks]
    if stray:
        raise Merge3Error(f"{where}: evaluator.per_task names task '{stray[0]}', which bank.yaml does not list under 'tasks'")
    columns = zip(items["item_id"], items["task"], items["format"], items["prompt"], items["choices"], items["answer"])
    for item_id, task, fmt, prompt, choices, answer in columns:
        item = f"{where}: item '{item_id}'"
        if fmt not in FORMATS:
            raise Merge3Error(f"{item}: field 'format' is {fmt!r}; expected 'multiple_choice' or 'generation'")
        if not isinstance(prompt, str) or not prompt.strip():
            raise Merge3Error(f"{item}: field 'prompt' is empty")
        if fmt == "multiple_choice":
            choice_index(choices, answer, item)
        elif evaluator.generation_for(str(task))[2] == "number" and normalize_answer(str(answer), "number") is None:
            raise Merge3Error(f"{item}: field 'answer' {str(answer)!r} has no number (task '{task}' compares numbers)")


def as_choice_list(value) -> list | None:
    """A ``choices`` cell as a list (parquet gives numpy arrays, JSON null gives None); None when it is no list."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    return None


def choice_index(choices, answer, item: str) -> int:
    """The 0-based index that ``answer`` (a decimal string such as ``"2"``) names among ``choices``, checked.

    >>> choice_index(["a", "b", "c"], "2", "item 'q'")
    2
    """
    options = as_choice_list(choices)
    if options is None:
        raise Merge3Error(f"{item}: field 'choices' must be a list of strings, not {type(choices).__name__}")
    if len(options) < 2:
        raise Merge3Error(f"{item}: field 'choices' has {len(options)} choice(s); a multiple_choice item needs at least 2")
    empty = [j for j, c in enumerate(options) if not isinstance(c, str) or not c.strip()]
    if empty:
        raise Merge3Error(f"{item}: field 'choices': choice {empty[0]} is empty or not a string")
    text = str(answer).strip()
    if not re.fullmatch(r"\d+", text):
        raise Merge3Error(f"{item}: field 'answer' {text!r} is not a choice index (a 0-based integer such as \"2\")")
    if int(text) >= len(options):
        raise Merge3Error(f"{item}: field 'answer' {text} is out of range for {len(options)} choices (0-based)")
    return int(text)


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def normalize_answer(text: str, how: str) -> str | None:
    """A generation answer (or target) as compared under ``how``; None when ``number`` finds no number.

    >>> normalize_answer("  Paris. ", "strip"), normalize_answer(" The  PARIS!. ", "lower")
    ('Paris.', 'the paris')
    >>> normalize_answer("about 1,234.50 dollars", "number"), normalize_answer("x = -3.0", "number")
    ('1234.5', '-3')
    >>> normalize_answer("none", "number") is None
    True
    """
    if how == "strip":
        return text.strip()
    if how == "lower":
        text = " ".join(text.casefold().split())
        while text and (unicodedata.category(text[-1]).startswith("P") or text[-1].isspace()):
            text = text[:-1]  # "Paris." and "paris" are the same answer; "3.5" keeps its inner point
        return text
    if how == "number":
        match = _NUMBER.search(text)
        if match is None:
            return None
        try:
            value = Decimal(match.group().replace(",", ""))
        except InvalidOperation:
            return None
        return format(value.normalize(), "f")  # 3, 3.0 and +3 compare equal; 100 stays "100", not "1E+2"
    raise Merge3Error(f"unknown normalize {how!r}; expected 'strip', 'lower' or 'number'")


def read_items(path: str | os.PathLike) -> pd.DataFrame:
    """Items from a parquet/jsonl/csv file through ``datasets`` (kept in memory: no cache written); with pandas
    where ``datasets`` is not installed (e.g. a GPU machine with only torch's stack)."""
    path = Path(path)
    builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}.get(path.suffix)
    if builder is None:
        raise Merge3Error(f"items file '{path}' must be .parquet, .jsonl, .json or .csv")
    if builder != "parquet":
        _check_utf8(path)
    try:
        import datasets
    except ImportError:
        return _read_items_pandas(path, builder)
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception:  # noqa: BLE001  (its messages are generic: pandas says what is wrong with the file)
        return _read_items_pandas(path, builder)
    return table.to_pandas()


def _check_utf8(path: Path) -> None:
    """A text items file must be UTF-8 (pyarrow would fail on the first bad string only when it is used)."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise Merge3Error(f"items file '{path}' is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    except OSError as e:
        raise Merge3Error(f"cannot read items file '{path}': {e.strerror or e}") from None


def _read_items_pandas(path: Path, builder: str) -> pd.DataFrame:
    try:
        if builder == "parquet":
            return pd.read_parquet(path)
        if builder == "csv":
            return pd.read_csv(path)
        return pd.read_json(path, lines=path.suffix == ".jsonl")
    except Exception as e:  # noqa: BLE001  (any reader error is a bad file)
        raise Merge3Error(f"cannot read items file '{path}': {str(e).splitlines()[0]}") from None


def stratified_split(tasks: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """``search``/``test`` per item: a seeded ``test_fraction`` of every task's items (at least one of each).

    >>> stratified_split(np.array(["a"] * 6 + ["b"] * 3), 1 / 3, seed=0).tolist().count("test")
    3
    """
    _check_test_fraction(test_fraction)
    tasks = np.asarray(tasks).astype(str)
    split = np.full(tasks.size, "search", dtype=object)
    for k, task in enumerate(sorted(set(tasks))):
        rows = np.flatnonzero(tasks == task)
        if rows.size < 2:
            raise Merge3Error(f"task '{task}' has {rows.size} item: a split needs at least one search and one test item")
        n_test = min(max(1, int(round(test_fraction * rows.size))), rows.size - 1)
        rng = np.random.default_rng([int(seed), k])
        split[rng.choice(rows, size=n_test, replace=False)] = "test"
    return split


def _check_test_fraction(test_fraction: float) -> None:
    if not (isinstance(test_fraction, (int, float)) and np.isfinite(test_fraction) and 0 < test_fraction <= 0.9):
        raise Merge3Error(f"test_fraction must be in (0, 0.9], got {test_fraction}")


def with_split(spec: BankSpec, items: pd.DataFrame, test_fraction: float | None = None, seed: int = 0,
               description: str = "") -> tuple[BankSpec, pd.DataFrame]:
    """Spec and items with a search/test split: a stratified ``test_fraction``, or the items' own ``split`` column."""
    if test_fraction is not None:
        if SPLIT_COLUMN in items.columns:
            raise Merge3Error(f"items already have a '{SPLIT_COLUMN}' column: give test_fraction or the column, not both")
        items = items.assign(**{SPLIT_COLUMN: stratified_split(items["task"].to_numpy(), test_fraction, seed)})
        split = SplitSpec(method="stratified", test_fraction=float(test_fraction), seed=int(seed),
                          description=description or f"a seeded {test_fraction:.3g} of each task's items")
    elif SPLIT_COLUMN in items.columns:
        split = SplitSpec(method="column", description=description or "given with the items")
    else:
        return spec, items
    return spec.model_copy(update={"split": split}), items


def _content_hash(spec: BankSpec, items: pd.DataFrame, files: dict[str, bytes]) -> str:
    digest = hashlib.sha256(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(pd.util.hash_pandas_object(items.astype(str), index=False).to_numpy().tobytes())
    for name in sorted(files):
        digest.update(name.encode() + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


def _existing_hash(path: Path) -> str | None:
    try:
        bank = ItemBank.load(path, warn=False)
    except Merge3Error:
        return None
    files = {}
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path)
        if file.is_file() and rel.parts[0] not in _DERIVED and str(rel) not in (BANK_FILE, bank.spec.items):
            files[str(rel)] = file.read_bytes()
    items_file = path / bank.spec.items
    items = pd.read_parquet(items_file) if items_file.suffix == ".parquet" else read_items(items_file)
    return _content_hash(bank.spec, items, files)


def write_bank(path: str | os.PathLike, spec: BankSpec, items: pd.DataFrame, files: dict[str, bytes] | None = None,
               *, test_fraction: float | None = None, seed: int = 0, split_description: str = "",
               force: bool = False) -> ItemBank:
    """Write a bank folder atomically (validating it first) and return it loaded.

    ``test_fraction`` adds a stratified, seeded search/test split (or give the items a ``split`` column). A bank
    already at ``path`` with the same items, spec and files is kept as it is, with its calibration and baselines.
    One with other items is replaced only when it holds no calibration or baselines, or with ``force``: those take
    long to compute and would silently become stale.
    """
    from merge3.models import atomic_dir

    path = Path(path)
    files = dict(files or {})
    spec, items = with_split(spec, items, test_fraction, seed, split_description)
    ItemBank(path, spec, items, warn=False)  # validate before anything touches the disk
    if path.exists() and not path.is_dir():
        raise Merge3Error(f"'{path}' is a file: an item bank is a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / BANK_FILE).exists():
        raise Merge3Error(f"'{path}' exists and is not an item bank: refusing to replace it (choose another folder)")
    if path.exists() and (path / BANK_FILE).exists():
        if _existing_hash(path) == _content_hash(spec, read_items_frame(items), files):
            return ItemBank.load(path, warn=False)
        derived = [d for d in _DERIVED if (path / d).exists()]
        if derived and not force:
            raise Merge3Error(f"item bank '{path}' exists with other items and holds {' and '.join(derived)}: "
                              "refusing to replace it (use --force, or write the new bank elsewhere)")
    with atomic_dir(path, overwrite=True) as tmp:
        items.to_parquet(tmp / spec.items, index=False)
        (tmp / BANK_FILE).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
    return ItemBank.load(path, warn=False)


def read_items_frame(items: pd.DataFrame) -> pd.DataFrame:
    """``items`` as they read back from parquet (so that written and unwritten items hash alike)."""
    import io

    buffer = io.BytesIO()
    items.to_parquet(buffer, index=False)
    buffer.seek(0)
    return pd.read_parquet(buffer)


def split_bank(path: str | os.PathLike, test_fraction: float, seed: int = 0, *, force: bool = False) -> ItemBank:
    """Add a stratified search/test split to an existing bank, atomically (``merge3 bank split``).

    Its calibration is kept on disk but no longer matches (its cache key holds the search items), so the next
    ``merge3 calibrate`` refits it; cached baselines are dropped (they were chosen on every item).
    """
    from merge3.models import atomic_dir

    _check_test_fraction(test_fraction)
    bank = ItemBank.load(path, warn=False)
    if bank.has_test_split and not force:
        raise Merge3Error(f"item bank '{bank.path}' is already split ({bank.spec.split.method}); use --force to "
                          "split it again (its calibration will be refitted)")
    items = bank.items.drop(columns=[SPLIT_COLUMN], errors="ignore")
    spec, items = with_split(bank.spec.model_copy(update={"split": None}), items, test_fraction, seed)
    ItemBank(bank.path, spec, items, warn=False)
    with atomic_dir(bank.path, overwrite=True) as tmp:
        shutil.copytree(bank.path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("baselines"))
        items.to_parquet(tmp / spec.items, index=False)
        (tmp / BANK_FILE).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    return ItemBank.load(bank.path, warn=False)
