"""Reading and writing weights in the formats people use.

Inputs: a ``.safetensors`` file, a folder of sharded safetensors with ``model.safetensors.index.json``, a Hugging
Face model folder (``config.json`` + weights), or a torch ``.pt``/``.bin`` file, which is only ever read with
``torch.load(weights_only=True)`` so that a pickle cannot run code. Output: sharded safetensors + index JSON,
written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge3._errors import Merge3Error

StateDict = dict[str, torch.Tensor]

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files that make up the model at ``path`` (a file, a sharded folder, or an HF folder)."""
    path = Path(path)
    if not path.exists():
        raise Merge3Error(f"model path '{path}' does not exist (merge3 never downloads: give a local file or folder)")
    if path.is_file():
        if path.suffix not in _WEIGHT_SUFFIXES:
            raise Merge3Error(f"'{path}' is not a weight file (expected .safetensors, .pt, .bin or .pth)")
        return [path]
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index = path / index_name
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise Merge3Error(f"'{index}' has no weight_map")
            names = set(weight_map.values())
            outside = [n for n in names if not isinstance(n, str) or n in ("", ".", "..") or Path(n).name != n]
            if outside:  # shards sit beside their index, as Hugging Face writes them: no path may lead elsewhere
                raise Merge3Error(f"'{index}' names shard {json.dumps(outside[0])}, which is not a file name in "
                                  f"'{path}' (a shard path may not lead outside the model folder)")
            shards = [path / name for name in sorted(names)]
            missing = [s.name for s in shards if not s.exists()]
            if missing:
                raise Merge3Error(f"'{index}' names shard '{missing[0]}', which is missing from '{path}'")
            folders = [s.name for s in shards if s.is_dir()]
            if folders:
                raise Merge3Error(f"'{index}' names shard '{folders[0]}', which is a folder in '{path}', not a file")
            return shards
    for name in _SINGLE_FILES:
        if (path / name).exists():
            return [path / name]
    found = sorted(p for p in path.glob("*.safetensors"))
    if found:
        return found
    raise Merge3Error(f"no weights found in folder '{path}' (expected model.safetensors, a sharded index, or .bin)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise Merge3Error(f"'{path}' is not valid JSON: {e}") from None


def _torch_load(path: Path) -> StateDict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # weights_only refuses anything that is not plain tensors and containers
        raise Merge3Error(f"refusing to load '{path}': it is not a plain tensor file ({_load_failure(e)})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise Merge3Error(f"'{path}' does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def _load_failure(error: Exception) -> str:
    """What ``torch.load`` refused, in a few words: the pickled class it met (its message is a page of advice)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it pickles the Python object {found.group(1)}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class LazyStateDict(Mapping[str, torch.Tensor]):
    """Read-only mapping name → tensor that reads one tensor at a time from disk.

    Safetensors files are memory-mapped through ``safe_open``, so iterating a merge key by key across many models
    holds only the tensors in use. Torch files are memory-mapped too (``mmap=True``).

    >>> import tempfile, torch, merge3.models as mm
    >>> d = tempfile.mkdtemp()
    >>> _ = mm.save_state_dict({"w": torch.ones(2)}, d + "/m")
    >>> lazy = mm.open_lazy(d + "/m"); list(lazy), lazy.shape("w")
    (['w'], (2,))
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._eager: StateDict = {}
        for file in weight_files(self.path):
            if file.suffix == ".safetensors":
                handle = self._open(file)
                for key in handle.keys():
                    self._where[key] = file
            else:
                tensors = _torch_load(file)
                self._eager.update(tensors)
                self._where.update(dict.fromkeys(tensors, file))

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:
                raise Merge3Error(f"cannot read safetensors file '{file}': {e}") from None
        return self._handles[file]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._eager:
            return self._eager[key]
        if key not in self._where:
            raise KeyError(key)
        # A fresh handle per read, dropped at once: a kept handle keeps every page it ever read mapped, so a merge
        # that streams tensor by tensor would still end up with all its inputs in RSS (bench/merge_memory.py).
        try:
            handle = safe_open(str(self._where[key]), framework="pt", device="cpu")
        except Exception as e:
            raise Merge3Error(f"cannot read safetensors file '{self._where[key]}': {e}") from None
        tensor = handle.get_tensor(key)
        del handle
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def _slice(self, key: str):
        return self._open(self._where[key]).get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._eager:
            return tuple(self._eager[key].shape)
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        if key in self._eager:
            return self._eager[key].dtype
        return _SAFETENSORS_DTYPES[self._slice(key).get_dtype()]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def open_lazy(path: str | os.PathLike) -> LazyStateDict:
    """Open the weights at ``path`` for per-tensor access without reading them all (a skill pack: the model it stands
    for, rebuilt from its base and factors one tensor at a time)."""
    from merge3.models._packs import PackStateDict, is_pack

    return PackStateDict(path) if is_pack(path) else LazyStateDict(path)


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> StateDict:
    """Read every tensor of the model at ``path`` into memory on ``device``."""
    lazy = open_lazy(path)
    return {key: lazy[key].to(device) for key in lazy}


def parse_size(size: int | str) -> int:
    """``"2GB"`` → 2·10⁹ bytes (decimal units, like Hugging Face's ``max_shard_size``)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)]) * factor
            except ValueError:
                break
            if not math.isfinite(value) or value < 1:
                break  # inf, nan, zero and negative sizes are no shard size
            return int(value)
    if re.fullmatch(r"[0-9.]+", text):
        raise Merge3Error(f"size '{size}' has no unit: write e.g. {text}MB or {text}GB (B, KB, MB, GB, KiB, MiB, GiB)")
    raise Merge3Error(f"cannot read size '{size}': expected a positive size such as 500MB, 2GB or 1GiB")


def plan_shards(keys_sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Keys in order, cut into shards of at most ``max_bytes`` (a tensor larger than that gets a shard alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in keys_sizes:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


_NON_CONFIG = {SAFETENSORS_INDEX, TORCH_INDEX, "README.md", "merge3-manifest.json"}


def copy_model_files(source: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy config, tokenizer and other small non-weight files of an HF folder; return their names."""
    source = Path(source)
    if source.is_file():
        source = source.parent
    copied = []
    for file in sorted(source.iterdir()):
        if file.is_file() and file.suffix not in _WEIGHT_SUFFIXES and file.name not in _NON_CONFIG:
            shutil.copy2(file, Path(dest) / file.name)
            copied.append(file.name)
    return copied


class atomic_dir:
    """Context manager yielding a temporary folder that is renamed to ``path`` only if the block succeeds.

    Refuses to replace an existing non-empty folder unless ``overwrite``: never clobber a user's run or model.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        _check_parent(self.path)
        if self.path.is_symlink():  # renaming onto a link replaces the link (or fails), never writes where it points
            raise Merge3Error(f"output '{self.path}' is a symbolic link (give the folder it points to, or a new path)")
        if self.path.exists() and not self.path.is_dir():  # a folder never replaces a file, overwrite or not
            raise Merge3Error(f"output '{self.path}' is a file, not a folder (choose another path)")
        if self.path.exists() and any(self.path.iterdir()) and not overwrite:
            raise Merge3Error(f"output '{self.path}' already exists and is not empty (choose another path)")
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        except OSError as e:
            raise _unwritable(self.path, e) from None
        os.chmod(self.tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any mkdir'd folder
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if not self.overwrite:
            # One rename, checked by the kernel: it replaces nothing or an empty folder, and fails if a file or a
            # non-empty folder appeared at the path while this one was written (another run, a user's mkdir).
            try:
                os.rename(self.tmp, self.path)
            except OSError as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise Merge3Error(f"output '{self.path}' appeared while merge3 was writing it ({e.strerror}); it was "
                                  "left as it is and nothing was written (choose another path)") from None
            return
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            self.path.rename(old)
            self.tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.path)


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file at ``folder`` or at one of its ancestors that keeps ``folder`` from being (made) a folder, else None.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "f"
    >>> _ = f.write_text("x")
    >>> file_in_the_way(f / "a" / "b") == f, file_in_the_way(f.parent / "new")
    (True, None)
    """
    folder = Path(folder)
    return next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)


_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_folder_name(name: str, what: str) -> str:
    """``name`` if it can be one folder inside an output (letters, digits, '.', '_', '-'; not starting with '.' or
    '-'), else one error line: a name from the user never reaches outside the folder it is written into.

    >>> check_folder_name("ft-rot90", "--names")
    'ft-rot90'
    """
    if not isinstance(name, str) or not _FOLDER_NAME.match(name):
        raise Merge3Error(f"{what} '{name}' is not a plain folder name (letters, digits, '.', '_' and '-' only, "
                          "starting with a letter or digit)")
    return name


def _unwritable(path: Path, error: OSError) -> Merge3Error:
    """One line for an output that cannot be made (a read-only or full disk, no permission): the user's path, not
    the temporary name beside it."""
    return Merge3Error(f"output '{path}' cannot be written in '{path.parent}': {error.strerror or error}")


def _check_parent(path: Path) -> None:
    """An output whose parent (or an ancestor) is a file cannot be made: say which one."""
    blocking = file_in_the_way(path.parent)
    if blocking is not None:
        raise Merge3Error(f"output '{path}': '{blocking}' is a file, not a folder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Write a file (text, or bytes) through a temporary name in the same folder, so readers never see half of it."""
    path = Path(path)
    _check_parent(path)
    if path.is_dir():
        raise Merge3Error(f"output '{path}' is a folder, not a file (give a file name)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise _unwritable(path, e) from None
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file should look like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_no_link(path: str | os.PathLike, what: str = "file"):
    """Open ``path`` (text, created if missing) for appending without following a symbolic link: a run folder
    handed over by someone else cannot make merge3 write into a file outside it (a link at ``.lock`` or
    ``evaluations.jsonl`` would otherwise truncate or grow its target). A link is one ``Merge3Error`` naming
    ``what``.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with open_no_link(folder / "log.txt") as f:
    ...     _ = f.write("one line\\n")
    >>> (folder / "link.txt").symlink_to(folder / "log.txt")
    >>> try:
    ...     open_no_link(folder / "link.txt", what="the run's log")
    ... except Merge3Error as e:
    ...     print(str(e).endswith("is a symbolic link: merge3 never writes through a link in a run folder "
    ...                           "(replace it with the file it points to)"))
    True
    """
    return os.fdopen(no_link_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what), "a")


def no_link_fd(path: str | os.PathLike, flags: int, what: str = "file") -> int:
    """``os.open(path, flags | O_NOFOLLOW)``, a symbolic link or an unwritable path being one ``Merge3Error`` (see
    :func:`open_no_link`); for callers that need the descriptor itself (the run lock's ``flock``)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _a_link(path, what) from None
        raise _unwritable(Path(path), e) from None


def check_not_a_link(path: str | os.PathLike, what: str = "file") -> None:
    """Refuse ``path`` when it is a symbolic link (the message :func:`open_no_link` gives), before any work starts."""
    if Path(path).is_symlink():
        raise _a_link(path, what)


def _a_link(path, what: str) -> Merge3Error:
    return Merge3Error(f"{what} '{path}' is a symbolic link: merge3 never writes through a link in a run folder "
                       "(replace it with the file it points to)")


def plain(value, nonfinite_as_none: bool = False):
    """``value`` as plain JSON-ready Python: mappings with string keys, lists for tuples and numpy arrays, Python
    numbers for numpy scalars; ``nonfinite_as_none`` writes NaN/Inf as None (strict JSON). What every file merge3
    writes goes through this, so numpy values from pandas or the IRT fit never leak into a record.

    >>> import numpy as np
    >>> plain({1: np.float32(0.5), "a": (np.int64(2), np.array([True])), "b": float("nan")}, nonfinite_as_none=True)
    {'1': 0.5, 'a': [2, [True]], 'b': None}
    """
    import numpy as np

    if isinstance(value, Mapping):
        return {str(k): plain(v, nonfinite_as_none) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, nonfinite_as_none) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist(), nonfinite_as_none)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and nonfinite_as_none and not math.isfinite(value):
        return None
    return value


@functools.lru_cache(maxsize=1)
def _yaml_loader():
    """``yaml.SafeLoader`` that also reads ``1e-3`` and ``5e30`` as numbers (YAML 1.2, and what users of Python
    and mergekit write), where PyYAML's YAML 1.1 rules demand a dot (``1.0e-3``) and make them strings, and that
    refuses a mapping key given twice."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            """A key given twice is an error, not the last one silently winning (a YAML merge ``<<`` may still be
            overridden)."""
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice",
                                                                key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    exponent = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789"))
    return Loader


_MAX_NESTING = 64


class YamlTooDeep(ValueError):
    """YAML nested deeper than any config: the parser, or the validators after it, would recurse without end."""


def safe_load_yaml(text: str):
    """``yaml.safe_load`` (no tags that build objects or run code) with YAML 1.2's exponent floats; a key given
    twice is an error, and so is nesting deeper than 64 levels (``YamlTooDeep``).

    >>> safe_load_yaml("weight: 5e-1\\ndensity: 0.5\\nname: 1e")
    {'weight': 0.5, 'density': 0.5, 'name': '1e'}
    """
    import yaml

    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506  (a SafeLoader subclass)
    except RecursionError:
        raise YamlTooDeep("is nested too deeply to read") from None
    if _nesting(data) > _MAX_NESTING:
        raise YamlTooDeep(f"is nested more than {_MAX_NESTING} levels deep")
    return data


def _nesting(data: Any) -> int:
    """How deeply lists and mappings nest in ``data`` (without recursion: the data may be deep)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= _MAX_NESTING:
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def read_yaml_mapping(path: str | os.PathLike, what: str, expected: str = "a mapping of keys",
                      empty_ok: bool = False) -> dict:
    """The YAML file ``path`` as a dict, read safely (:func:`safe_load_yaml`: no tags that build objects or run code),
    or one ``Merge3Error`` that calls the file ``what`` and says what is wrong with it (missing, a folder, not
    UTF-8, not YAML, not a mapping: ``expected`` says what it should hold). ``empty_ok``: an empty file is ``{}``.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "space.yaml"
    >>> _ = f.write_text("name: demo\\nseed: 3\\n")
    >>> read_yaml_mapping(f, "search space")
    {'name': 'demo', 'seed': 3}
    """
    import yaml

    path = Path(path)
    if path.is_dir():
        raise Merge3Error(f"{what} '{path}' is a folder: give the YAML file")
    if not path.is_file():
        raise Merge3Error(f"{what} '{path}' does not exist")
    try:
        data = safe_load_yaml(path.read_text())
    except UnicodeDecodeError:
        raise Merge3Error(f"{what} '{path}' is not UTF-8 text (is it a YAML file?)") from None
    except yaml.YAMLError as e:
        if "!function" in str(e):  # lm-eval-harness' Python hook
            raise Merge3Error(f"{what} '{path}' uses !function (Python code), which merge3 never runs") from None
        raise Merge3Error(f"{what} '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise Merge3Error(f"{what} '{path}' cannot be read: {e.strerror or e}") from None
    except YamlTooDeep as e:
        raise Merge3Error(f"{what} '{path}' {e} (is it a config file?)") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise Merge3Error(f"{what} '{path}' must be {expected}, got {type(data).__name__}")
    return data


def write_shards(state_dict: Mapping[str, torch.Tensor], folder: Path, max_shard_size: int | str = "2GB") -> dict:
    """Write ``state_dict`` as ``model-0000i-of-0000n.safetensors`` + index into an existing ``folder``."""
    max_bytes = parse_size(max_shard_size)
    sizes = [(k, state_dict[k].numel() * state_dict[k].element_size()) for k in state_dict]
    shards = plan_shards(sizes, max_bytes)
    weight_map, total = {}, sum(s for _, s in sizes)
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        # safetensors refuses tensors that share storage: give each its own contiguous copy where needed
        tensors = {k: _own_storage(state_dict[k]) for k in keys}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    max_shard_size: int | str = "2GB",
    copy_from: str | os.PathLike | None = None,
    config: dict | None = None,
    extra_files: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save as sharded safetensors + ``model.safetensors.index.json``, atomically.

    ``copy_from`` copies config/tokenizer files of an HF folder; ``config`` writes ``config.json``;
    ``extra_files`` maps file names to text (model card, manifest).
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if copy_from is not None:
            copy_model_files(copy_from, tmp)
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_shards(state_dict, tmp, max_shard_size)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out_dir


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes: equal hashes mean identical weights."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
