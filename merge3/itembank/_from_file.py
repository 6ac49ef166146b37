"""``causal_lm`` item banks from local files: JSONL / CSV / parquet rows, or lm-eval-harness task YAMLs.

Rows become items of one task per file (or per value of a task column)::

    bank_from_file(["arc.jsonl"], "item_banks/arc", choices_column="choices", answer_column="answerKey")
    bank_from_file(["capitals.csv"], "item_banks/capitals", prompt_column="question", template="Q: {question}\\nA:")
    bank_from_file([], "item_banks/mix", task_yaml=["tasks/sciq.yaml", "tasks/arith.yaml"], test_fraction=0.3)

- **Multiple choice** when a choices column (a list; in CSV also a list literal such as ``["a", "b"]``) or several
  choice columns are given; the answer is a 0-based index, one choice's text, or (with choice columns) the name of
  the right column (``answer: C`` with columns ``A``..``D``). Choices are stored after ``target_delimiter`` (``" "``,
  as lm-eval scores ``prompt + " " + choice``).
- **Generation** otherwise: prompt column and answer column (the target text).

An lm-eval task YAML (``task``, ``dataset_path``, ``dataset_kwargs.data_files``, ``test_split`` /
``validation_split``, ``output_type`` ``multiple_choice`` / ``generate_until``, ``doc_to_text``, ``doc_to_choice``,
``doc_to_target``, ``target_delimiter``, ``description``, ``generation_kwargs.until`` / ``max_gen_toks``,
``include``) reads its rows from local files only: ``dataset_path`` must be an existing file or folder (relative
paths: to the YAML's folder, then the working directory), or ``json`` / ``csv`` / ``parquet`` with local
``data_files`` — nothing is ever downloaded. ``doc_to_*`` are column names or Jinja2 templates rendered in a
``SandboxedEnvironment`` (no Python is ever evaluated; a list such as ``"{{[a, b]}}"`` is read with
``ast.literal_eval``, which only reads literals); ``!function`` entries are refused. Other keys (metrics, filters,
metadata) are ignored: merge3 scores argmax multiple choice and greedy generation under the bank's ``normalize``.
Each task's ``until`` and ``max_gen_toks`` become its ``per_task`` generation settings; without them the bank's own
apply.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import ValidationError

from merge3._config import first_repeat
from merge3._errors import Merge3Error, validation_message
from merge3.itembank._bank import BankSpec, ItemBank, read_items, write_bank
from merge3.models import plain, read_yaml_mapping

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_BUILDERS = ("json", "csv", "parquet")  # lm-eval's `dataset_path: json` + local data_files
OUTPUT_TYPES = {"multiple_choice": "multiple_choice", "generate_until": "generation"}


@dataclass(frozen=True)
class FileTask:
    """One local data file and how its rows become items (see the module docstring).

    ``task`` defaults to the file's stem; ``task_column`` names a column holding each row's task instead.
    ``prompt_column`` defaults to ``question``, else ``prompt``; ``choices_column`` to ``choices`` when the file has
    one (then the rows are multiple choice); ``template`` (``{column}`` placeholders) builds the
    prompt from several columns instead. ``id_column`` keeps the file's ids (default ``<task>-<n>``).
    """

    path: str | os.PathLike
    task: str | None = None
    task_column: str | None = None
    prompt_column: str | None = None
    choices_column: str | None = None
    choice_columns: Sequence[str] = ()
    answer_column: str = "answer"
    template: str | None = None
    target_delimiter: str = " "
    id_column: str | None = None


def bank_from_file(files: Sequence[str | os.PathLike | FileTask], out: str | os.PathLike, *,
                   task_yaml: Sequence[str | os.PathLike] = (), name: str | None = None,
                   tasks: Sequence[str] | None = None, task_column: str | None = None,
                   prompt_column: str | None = None, choices_column: str | None = None,
                   choice_columns: Sequence[str] = (), answer_column: str = "answer", template: str | None = None,
                   target_delimiter: str = " ", id_column: str | None = None, chat_template: bool = False,
                   tokenizer: str | os.PathLike | None = None, batch_size: int = 16, max_new_tokens: int = 16,
                   stop: Sequence[str] = ("\n",), normalize: str = "strip", test_fraction: float | None = None,
                   seed: int | None = None, description: str = "", force: bool = False) -> ItemBank:
    """Build the ``causal_lm`` bank ``out`` from local data ``files`` and/or lm-eval ``task_yaml`` files.

    Column settings apply to every entry of ``files`` given as a path (a :class:`FileTask` carries its own);
    ``tasks`` names each file's task (default: its stem). ``tokenizer`` (a folder, stored relative to the bank) is
    checked for a chat template when ``chat_template`` is asked for. ``test_fraction`` / ``seed`` go to
    :func:`write_bank` (a stratified search/test split), and ``force`` (replace a bank at ``out`` that holds other
    items and a calibration). Every problem raises one :class:`Merge3Error` naming the
    file, row and column; nothing is written unless the whole bank is valid.

    >>> bank = bank_from_file(["qa.jsonl"], "item_banks/qa", choices_column="choices")  # doctest: +SKIP
    >>> bank.tasks, bank.items["format"][0]  # doctest: +SKIP
    (['qa'], 'multiple_choice')
    """
    if tasks is not None and len(tasks) != len(files):
        raise Merge3Error(f"tasks names {len(tasks)} task(s) for {len(files)} file(s): give one per file")
    if not files and not task_yaml:
        raise Merge3Error("no input: give data files, task YAMLs, or both")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise Merge3Error(f"tokenizer '{tokenizer}' does not exist (give a local tokenizer or model folder)")
    shared = dict(task_column=task_column, prompt_column=prompt_column, choices_column=choices_column,
                  choice_columns=tuple(choice_columns), answer_column=answer_column, template=template,
                  target_delimiter=target_delimiter, id_column=id_column)
    rows: list[dict] = []
    per_task: dict[str, dict] = {}
    sources, named_by = [], {}
    for k, entry in enumerate(files):
        source = entry if isinstance(entry, FileTask) else FileTask(path=entry, **shared)
        if tasks is not None:
            source = replace(source, task=tasks[k])
        if not source.task_column:  # one task per file: two files must not fall silently into one task
            task = source.task or Path(source.path).stem
            if task in named_by:
                how = "" if source.task else " (the stem of both names)"
                raise Merge3Error(f"files '{named_by[task]}' and '{source.path}' are both task '{task}'{how}: give "
                                  "each file its own task name (--task), or put both in one file")
            named_by[task] = source.path
        rows += _file_rows(source)
        sources.append(_provenance(source.path))
    for path in task_yaml:
        task, task_rows, settings, data_files = _yaml_rows(Path(path))
        if task in per_task or any(r["task"] == task for r in rows):
            raise Merge3Error(f"{path}: task '{task}' is given twice (task names must differ across files and YAMLs)")
        rows += task_rows
        if settings:
            per_task[task] = settings
        sources.append(_provenance(path) | {"data": [_provenance(f) for f in data_files]})
    if not rows:
        raise Merge3Error("the input files hold no rows")
    _number_ids(rows)
    if chat_template and tokenizer is not None:
        _check_chat_template(tokenizer)
    out = Path(out)
    evaluator = {"kind": "causal_lm", "chat_template": chat_template, "batch_size": batch_size,
                 "max_new_tokens": max_new_tokens, "stop": list(stop), "normalize": normalize, "per_task": per_task}
    if tokenizer is not None:
        evaluator["tokenizer"] = os.path.relpath(Path(tokenizer).resolve(), out.resolve())
    task_names = list(dict.fromkeys(r["task"] for r in rows))
    try:
        spec = BankSpec.model_validate({"name": name or out.name, "description": description, "tasks": task_names,
                                        "evaluator": evaluator, "source": {"from_file": sources}})
    except ValidationError as e:
        raise Merge3Error(validation_message(e, f"bank '{out}'")) from None
    items = pd.DataFrame(rows, columns=["item_id", "task", "format", "prompt", "choices", "answer"])
    split = {} if test_fraction is None else {"test_fraction": test_fraction}
    if test_fraction is not None and seed is not None:
        split["seed"] = seed
    return write_bank(out, spec, items, **split, **({"force": True} if force else {}))


def _provenance(path) -> dict:
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
    return {"path": str(path), "sha256": digest}


def _number_ids(rows: list[dict]) -> None:
    """``<task>-<n>`` for rows without an id of their own, counted per task across all sources."""
    counts: dict[str, int] = {}
    for row in rows:
        n = counts.get(row["task"], 0)
        counts[row["task"]] = n + 1
        if row["item_id"] is None:
            row["item_id"] = f"{row['task']}-{n}"


def _check_chat_template(tokenizer) -> None:
    from merge3.itembank._evaluators import load_tokenizer

    if not getattr(load_tokenizer(tokenizer), "chat_template", None):
        raise Merge3Error(f"chat_template is asked for but the tokenizer in '{tokenizer}' has no chat template")


# --- plain data files -------------------------------------------------------------------------------------------


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise Merge3Error(f"data file '{path}' does not exist")
    if path.suffix not in DATA_SUFFIXES:
        raise Merge3Error(f"data file '{path}' must be .jsonl, .json, .csv or .parquet")
    if path.stat().st_size == 0:
        raise Merge3Error(f"data file '{path}' is empty")
    frame = read_items(path)
    if frame.empty:
        raise Merge3Error(f"data file '{path}' has no rows")
    return frame


def _need(frame: pd.DataFrame, column: str, path, role: str) -> None:
    if column not in frame.columns:
        columns = ", ".join(map(str, frame.columns))
        raise Merge3Error(f"{path}: no column '{column}' ({role}); its columns are {columns}")


def _file_rows(source: FileTask) -> list[dict]:
    path = Path(source.path)
    frame = _read(path)
    prompt_column = source.prompt_column
    if source.template is None and prompt_column is None:
        prompt_column = next((c for c in ("question", "prompt") if c in frame.columns), None)
        if prompt_column is None:
            raise Merge3Error(f"{path}: no column 'question' or 'prompt' (give the prompt column or a template); "
                              f"its columns are {', '.join(map(str, frame.columns))}")
    if source.choices_column is None and not source.choice_columns and "choices" in frame.columns:
        source = replace(source, choices_column="choices")  # a list column named 'choices' makes it multiple choice
    fields = _template_fields(source.template, path) if source.template is not None else []
    needed = [(prompt_column, "prompt")] if prompt_column else []
    needed += [(f, "template placeholder") for f in fields] + [(source.answer_column, "answer")]
    needed += [(c, "choices") for c in ([source.choices_column] if source.choices_column else [])]
    needed += [(c, "choice") for c in source.choice_columns]
    needed += [(c, role) for c, role in ((source.task_column, "task"), (source.id_column, "item id")) if c]
    for column, role in needed:
        _need(frame, column, path, role)
    is_mc = bool(source.choices_column or source.choice_columns)
    rows = []
    for n, record in enumerate(_records(frame), start=1):
        where = f"{path}, row {n}"
        prompt = (_fill(source.template, record, fields) if source.template is not None
                  else _text(record[prompt_column]))
        if not prompt.strip():
            raise Merge3Error(f"{where}: empty prompt")
        answer = record[source.answer_column]
        if _missing(answer):
            raise Merge3Error(f"{where}: column '{source.answer_column}' is empty (no answer)")
        task = _text(record[source.task_column]) if source.task_column else (source.task or path.stem)
        if not task.strip():
            raise Merge3Error(f"{where}: column '{source.task_column}' is empty (no task)")
        row = {"item_id": _text(record[source.id_column]) if source.id_column else None, "task": task}
        if is_mc:
            if source.choices_column:
                choices, names = _choice_list(record[source.choices_column], where, source.choices_column), ()
            else:
                choices, names = [_text(record[c]) for c in source.choice_columns], tuple(source.choice_columns)
            index = _answer_index(answer, choices, where, names)
            row.update(format="multiple_choice", prompt=prompt, choices=[source.target_delimiter + c for c in choices],
                       answer=str(index))
        else:
            row.update(format="generation", prompt=prompt, choices=[], answer=_text(answer))
            if not row["answer"].strip():
                raise Merge3Error(f"{where}: empty answer (a generation item needs the text to compare with)")
        rows.append(row)
    return rows


def _records(frame: pd.DataFrame) -> list[dict]:
    # pandas gives numpy arrays for list columns, which Jinja would render as ['a' 'b']
    return [plain(record) for record in frame.to_dict("records")]


def _text(value) -> str:
    if _missing(value):
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))  # a CSV column of whole numbers with a gap reads as floats: 3.0 means "3"
    return str(value)


def _missing(value) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and np.isnan(value))


def _template_fields(template: str, path) -> list[str]:
    """The column names a ``{column}`` template uses; attribute and index access is refused (plain names only)."""
    try:
        parts = [(f, spec, conversion) for _, f, spec, conversion in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise Merge3Error(f"{path}: template {template!r} is not a valid '{{column}}' template: {e}") from None
    fields = [f for f, _, _ in parts]
    bad = [f for f in fields if not f or not re.fullmatch(r"[^.\[\]{}!:]+", f)]
    if bad:
        raise Merge3Error(f"{path}: template field {{{bad[0]}}} must be a plain column name")
    # a format spec or conversion ({q:>99999999999}, {q!r}) would reshape the text, or exhaust memory: plain {column}s only
    styled = next(((f, spec, conversion) for f, spec, conversion in parts if spec or conversion), None)
    if styled is not None:
        f, spec, conversion = styled
        shown = f"{{{f}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
        raise Merge3Error(f"{path}: template field {shown} has a format spec or conversion; use a plain {{{f}}}")
    return list(dict.fromkeys(fields))


def _fill(template: str, record: dict, fields: list[str]) -> str:
    return template.format_map({f: _text(record[f]) for f in fields})


def _choice_list(value, where: str, column: str) -> list[str]:
    if isinstance(value, str) and value.strip().startswith("["):
        try:  # CSV has no list type: ["a", "b"] arrives as text; literal_eval reads literals only, never code
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise Merge3Error(f"{where}: column '{column}' holds {value!r}, not a list of choices") from None
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise Merge3Error(f"{where}: column '{column}' must hold a list of choices, not {type(value).__name__}")
    return [_text(c) for c in value]


def _answer_index(answer, choices: list[str], where: str, names: Sequence[str] = (), prefer_index: bool = False) -> int:
    """The right choice's index from an index, a choice's text, or the name of its choice column.

    >>> _answer_index("Paris", ["Rome", "Paris"], "here"), _answer_index(1, ["a", "b"], "here")
    (1, 1)
    >>> _answer_index("C", ["x", "y", "z"], "here", names=["A", "B", "C"])
    2
    """
    if len(choices) < 2:
        raise Merge3Error(f"{where}: {len(choices)} choice(s); a multiple-choice item needs at least 2")
    stripped = [c.strip() for c in choices]
    twice = first_repeat(stripped)
    if twice is not None:  # two identical choices: the item has no single right answer by log-likelihood
        raise Merge3Error(f"{where}: the choice {twice!r} is given twice")
    if isinstance(answer, (bool, np.bool_)):
        raise Merge3Error(f"{where}: answer {answer!r} is neither a choice index nor a choice's text")
    whole_float = isinstance(answer, (float, np.floating)) and float(answer).is_integer()
    if isinstance(answer, (int, np.integer)) or whole_float:
        index = int(answer)
    else:
        text = str(answer).strip()
        if prefer_index and text.isdigit():
            index = int(text)
        elif text in choices or text in [c.strip() for c in choices]:
            return [c.strip() for c in choices].index(text)
        elif text in names:
            return list(names).index(text)
        elif text.isdigit():
            index = int(text)
        else:
            raise Merge3Error(f"{where}: answer {text!r} is not among the choices {choices}")
    if not 0 <= index < len(choices):
        raise Merge3Error(f"{where}: answer index {index} is out of range for {len(choices)} choices (0-based)")
    return index


# --- lm-eval-harness task YAMLs ---------------------------------------------------------------------------------


def _load_yaml(path: Path, depth: int = 0) -> dict:
    """A task YAML with its ``include`` chain merged in (the including file wins)."""
    try:
        config = read_yaml_mapping(path, "task YAML", "a mapping of keys such as task, dataset_path, doc_to_text")
    except Merge3Error as e:
        if "!function" in str(e):
            raise Merge3Error(f"{e}: give doc_to_text, doc_to_choice and doc_to_target as Jinja templates or "
                              "column names") from None
        raise
    include = config.pop("include", None)
    if include is None:
        return config
    if depth >= 5:
        raise Merge3Error(f"{path}: include chain deeper than 5 files (a loop?)")
    return {**_load_yaml(path.parent / str(include), depth + 1), **config}


def _yaml_rows(path: Path) -> tuple[str, list[dict], dict, list[Path]]:
    config = _load_yaml(path)
    task = config.get("task")
    if not isinstance(task, str) or not task.strip():
        raise Merge3Error(f"{path}: field 'task' must be the task's name (group YAMLs are not read)")
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise Merge3Error(f"{path}: unknown output_type '{output_type}' "
                          "(merge3 reads multiple_choice and generate_until)")
    if config.get("num_fewshot"):
        raise Merge3Error(f"{path}: num_fewshot {config['num_fewshot']} is not supported (zero-shot prompts only)")
    frame, files = _yaml_data(config, path)
    data_name = ", ".join(f.name for f in files)
    fmt = OUTPUT_TYPES[output_type]
    delimiter = str(config.get("target_delimiter", " "))
    columns = set(frame.columns)
    rows = []
    for n, doc in enumerate(_records(frame), start=1):
        where = f"{path} ({data_name}, row {n})"
        prompt = _text(_doc_value(config, "doc_to_text", doc, columns, where))
        if config.get("description"):
            prompt = _text(_render(str(config["description"]), doc, where, "description")) + prompt
        if not prompt.strip():
            raise Merge3Error(f"{where}: doc_to_text gives an empty prompt")
        target = _doc_value(config, "doc_to_target", doc, columns, where)
        row = {"item_id": None, "task": task, "format": fmt, "prompt": prompt}
        if fmt == "multiple_choice":
            choices = _yaml_choices(config, doc, columns, where)
            from_template = isinstance(config.get("doc_to_target"), str) and config["doc_to_target"] not in columns
            index = _answer_index(_single(target, where), choices, where, prefer_index=from_template)
            row.update(choices=[delimiter + c for c in choices], answer=str(index))
        else:
            row.update(choices=[], answer=_text(_single(target, where)))
            if _missing(target) or not row["answer"].strip():
                raise Merge3Error(f"{where}: doc_to_target gives an empty target")
        rows.append(row)
    return task, rows, _generation_settings(config, path), files


def _single(target, where: str):
    if isinstance(target, (list, tuple, np.ndarray)):
        raise Merge3Error(f"{where}: doc_to_target gives several targets {list(target)}; merge3 needs exactly one")
    return target


def _generation_settings(config: dict, path: Path) -> dict:
    kwargs = config.get("generation_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise Merge3Error(f"{path}: generation_kwargs must be a mapping")
    settings = {}
    if "until" in kwargs:
        until = kwargs["until"]
        until = [until] if isinstance(until, str) else until
        if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
            raise Merge3Error(f"{path}: generation_kwargs.until must be a string or a list of strings")
        settings["stop"] = until
    if "max_gen_toks" in kwargs:
        if not isinstance(kwargs["max_gen_toks"], int) or kwargs["max_gen_toks"] <= 0:
            raise Merge3Error(f"{path}: generation_kwargs.max_gen_toks must be a positive integer")
        settings["max_new_tokens"] = kwargs["max_gen_toks"]
    return settings


def _local(base: Path, value, path: Path, field: str) -> Path:
    """An existing local path, relative to the YAML's folder or else the working directory."""
    candidate = Path(os.path.expanduser(str(value)))
    for found in ([candidate] if candidate.is_absolute() else [base / candidate, candidate]):
        if found.exists():
            return found
    raise Merge3Error(f"{path}: {field} '{value}' is not an existing local file or folder (merge3 reads local data "
                      "only and never downloads datasets)")


def _yaml_data(config: dict, path: Path) -> tuple[pd.DataFrame, list[Path]]:
    """The rows of the task's evaluation split (``test_split``, else ``validation_split``) and their files."""
    dataset_path = config.get("dataset_path")
    if dataset_path is None:
        raise Merge3Error(f"{path}: field 'dataset_path' is missing (a local data file or folder)")
    if config.get("dataset_name") is not None:
        raise Merge3Error(f"{path}: dataset_name '{config['dataset_name']}' is not supported (local files only)")
    kwargs = config.get("dataset_kwargs") or {}
    data_files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    split = config.get("test_split") or config.get("validation_split")
    if isinstance(data_files, dict):
        if split is None or split not in data_files:
            raise Merge3Error(f"{path}: dataset_kwargs.data_files has no entry for split '{split}' "
                              f"(it has {', '.join(map(str, data_files))}; set test_split or validation_split)")
        data_files = data_files[split]
    if dataset_path in _BUILDERS:
        if data_files is None:
            raise Merge3Error(f"{path}: dataset_path '{dataset_path}' needs local dataset_kwargs.data_files")
        base = path.parent
    else:
        base = _local(path.parent, dataset_path, path, "dataset_path")
        if base.is_file():
            data_files, base = [base], base.parent
        elif data_files is None:
            data_files = [_split_file(base, split, path)]
    files = [_local(base, f, path, "data file") for f in ([data_files] if isinstance(data_files, (str, Path))
                                                           else list(data_files))]
    frames = [_read(f) for f in files]
    return pd.concat(frames, ignore_index=True), files


def _split_file(folder: Path, split: str | None, path: Path) -> Path:
    """The data file of ``split`` in a dataset folder (``test.jsonl`` etc.), or its only data file."""
    data = sorted(f for f in folder.iterdir() if f.suffix in DATA_SUFFIXES)
    named = [f for f in data if split is not None and f.stem == split]
    if named:
        return named[0]
    if len(data) == 1:
        return data[0]
    raise Merge3Error(f"{path}: dataset folder '{folder}' has no file for split '{split}' "
                      f"({len(data)} data files; name one with dataset_kwargs.data_files)")


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


_ENV = None


def _render(template: str, doc: dict, where: str, field: str) -> str:
    """A Jinja2 template over one row, in a sandbox (templates may not reach Python internals)."""
    global _ENV
    import jinja2
    from jinja2.sandbox import SecurityError

    _ENV = _ENV or _environment()
    try:
        return _ENV.from_string(template).render(**doc)
    except jinja2.UndefinedError as e:
        raise Merge3Error(f"{where}: {field}: {e.message} (missing column? the columns are "
                          f"{', '.join(map(str, doc))})") from None
    except SecurityError as e:
        raise Merge3Error(f"{where}: {field}: refused by the template sandbox: {e}") from None
    except jinja2.TemplateError as e:
        raise Merge3Error(f"{where}: {field}: bad Jinja template {template!r}: {e}") from None


def _is_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def _doc_value(config: dict, field: str, doc: dict, columns: set, where: str):
    """``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` of one row: a column, a template or a constant."""
    spec = config.get(field)
    if spec is None:
        raise Merge3Error(f"{where}: field '{field}' is missing")
    if isinstance(spec, (int, list)) and not isinstance(spec, bool):
        return spec  # a constant index (doc_to_target: 0) or a list of choices
    if isinstance(spec, dict) and field == "doc_to_choice":
        return list(spec.values())
    if not isinstance(spec, str):
        raise Merge3Error(f"{where}: field '{field}' must be a column name or a Jinja template, "
                          f"not {type(spec).__name__}")
    if spec in columns:
        return doc[spec]
    if _is_template(spec):
        return _render(spec, doc, where, field)
    raise Merge3Error(f"{where}: {field} '{spec}' is neither a column of the data (columns: "
                      f"{', '.join(sorted(map(str, columns)))}) nor a Jinja template")


def _yaml_choices(config: dict, doc: dict, columns: set, where: str) -> list[str]:
    value = _doc_value(config, "doc_to_choice", doc, columns, where)
    if isinstance(value, str):
        try:  # a rendered list literal such as "['yes', 'no']": read as data, never evaluated as code
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise Merge3Error(f"{where}: doc_to_choice gives {value!r}, not a list of choices") from None
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise Merge3Error(f"{where}: doc_to_choice gives a {type(value).__name__}, not a list of choices")
    return [_text(c) for c in value]
