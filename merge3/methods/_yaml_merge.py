"""``merge3 merge CONFIG.yaml --out DIR``: a merge described in mergekit's YAML schema (or with merge3's methods),
streamed tensor by tensor into sharded safetensors with an index, the base's config/tokenizer, a model card and a
manifest that records exactly what went in.

Accepted config (mergekit's schema for the methods both tools have)::

    merge_method: ties            # any mergekit method merge3 has (`merge3 methods`), or a merge3 method
    base_model: ./base            # local folders or weight files only: merge3 never downloads
    models:
      - model: ./math
        parameters: {weight: 1.0, density: 0.5}
      - model: ./code
        parameters: {weight: [0.2, 1.0], density: 0.5}    # a list is a gradient across layers
    parameters: {lambda: 1.0, normalize: true}              # global; mergekit's `lambda` is merge3's `scale`
    dtype: bfloat16

Per-layer values may be numbers, lists (gradients), mergekit's ``[{filter: attn, value: 0.5}, {value: 1.0}]`` or
merge3's mappings ``{attn: 0.5, "*": 1.0}``. For merge3 methods, ``parameters`` use merge3's names.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from pydantic import Field, ValidationError
from safetensors.torch import save_file

from merge3._config import Seed, StrictConfig
from merge3._errors import Merge3Error, validation_message
from merge3.methods._inputs import MergeInputs
from merge3.models import plain
from merge3.methods._kernels import Sink, run_method
from merge3.methods._mergekit import check_complemented, complement, mergekit_methods, per_model_keys, per_model_params
from merge3.methods._params import is_layer_value, is_row_blocks, layer_positions
from merge3.methods._registry import get_method, list_methods

Number = Union[float, int]
FilterEntry = dict[str, Any]
ParamValue = Union[Number, bool, str, list[Union[Number, FilterEntry]], dict[str, Number]]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_IGNORED = {"int8_mask"}  # mergekit memory options with no effect on the result


class ModelEntry(StrictConfig):
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class MergeConfig(StrictConfig):
    """A merge config; unknown fields are refused with their name."""

    merge_method: str
    base_model: Optional[str] = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: Optional[Literal["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"]] = None
    seed: Optional[Seed] = None
    name: Optional[str] = None


def load_config(path: str | os.PathLike) -> MergeConfig:
    """Read and validate a merge config; a ``Merge3Error`` names the file and the first bad field."""
    from merge3.models import read_yaml_mapping

    path = Path(path)
    data = read_yaml_mapping(path, "merge config", "a mapping with merge_method, models, …")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as e:
        raise Merge3Error(validation_message(e, f"merge config '{path}'")) from None


def _layer_value(value: Any, field: str) -> Any:
    """mergekit's ``[{filter, value}, …]`` → merge3's ``{pattern: value}``; other forms pass through."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        mapping = {}
        for i, entry in enumerate(value):
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise Merge3Error(f"field '{field}[{i}]': expected {{filter: NAME, value: NUMBER}}, got {entry}")
            mapping[str(entry.get("filter", "*"))] = entry["value"]
        return mapping
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        raise Merge3Error(f"field '{field}': mix of numbers and filter entries")
    return value


def merge_params(config: MergeConfig) -> tuple[str, dict[str, Any]]:
    """The merge3 method and its validated parameters for ``config`` (mergekit names translated)."""
    mergekit_name = config.merge_method
    known = mergekit_methods()
    method_name, fixed = known.get(mergekit_name, (mergekit_name, {}))
    if method_name not in list_methods() or method_name.startswith("_"):
        supported = sorted(set(known) | {m for m in list_methods() if not m.startswith("_")})
        raise Merge3Error(f"field 'merge_method': '{mergekit_name}' is not supported (supported: {', '.join(supported)})")
    method = get_method(method_name)
    from_mergekit = mergekit_name if mergekit_name in known else None
    params: dict[str, Any] = dict(method.mergekit.imported.get(mergekit_name, {})) if from_mergekit else {}
    for key, value in config.parameters.items():
        if key in _IGNORED:
            continue
        target = {"lambda": "scale", "weight": "weights"}.get(key, key)  # mergekit's names, accepted everywhere
        value = _layer_value(value, f"parameters.{key}")
        form = method.mergekit if from_mergekit else None
        if key == "density" and form is not None and form.density and form.density != "density":
            target = form.density  # DARE: mergekit's shared density is merge3's drop_rate = 1 − density
            if form.complement:
                check_complemented(method, target, value, "parameters.density")
                value = complement(value)
        params[target] = value
    allowed = per_model_keys(method, from_mergekit)
    per_model: dict[str, list[Any]] = {}
    for i, entry in enumerate(config.models):
        for key, value in entry.parameters.items():
            if key == "weight" and key not in allowed:
                raise Merge3Error(f"field 'models[*].parameters.weight': {method_name} takes no per-model weights")
            if key not in allowed:
                raise Merge3Error(f"field 'models.{i}.parameters.{key}': {method_name} takes "
                                  f"{', '.join(sorted(allowed)) or 'no parameters'} per model (put the others under "
                                  "the global 'parameters')")
            value = _layer_value(value, f"models.{i}.parameters.{key}")
            if key != "role" and not (is_layer_value(value) or is_row_blocks(value)):  # roles are names
                raise Merge3Error(f"field 'models.{i}.parameters.{key}': expected a number, a list of numbers (per "
                                  f"layer) or a mapping pattern → number, got {value!r}")
            per_model.setdefault(key, [None] * len(config.models))[i] = value
    params = per_model_params(method, from_mergekit, per_model, params, len(config.models))
    if config.seed is not None and "seed" in method.params:
        params["seed"] = config.seed
    params.update(fixed)
    if "weights" in params and "weights" not in method.params:
        raise Merge3Error(f"field 'models[*].parameters.weight': {method_name} takes no per-model weights")
    try:
        return method_name, method.validate(params, len(config.models))
    except Merge3Error as e:
        raise Merge3Error(f"field 'parameters': {e}") from None


def _resolve_path(text: str, config_dir: Path, field: str) -> Path:
    for candidate in (Path(text).expanduser(), config_dir / text):
        if candidate.exists():
            return candidate.resolve()
    raise Merge3Error(f"field '{field}': '{text}' does not exist (merge3 reads local folders or files only)")


class _FiniteInput(Mapping[str, torch.Tensor]):
    """An input model whose every tensor is checked as it is read: NaN/Inf weights are refused even where the merge
    would hide them (a zero weight, a dropped or trimmed entry)."""

    def __init__(self, model: Mapping[str, torch.Tensor], name: str):
        self._model, self._name = model, name

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self._model[key]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise Merge3Error(f"{self._name} has {bad} NaN/Inf value(s) in '{key}': refusing to merge non-finite "
                              "weights")
        return tensor

    def __iter__(self):
        return iter(self._model)

    def __len__(self) -> int:
        return len(self._model)

    def __getattr__(self, name: str):  # shape, dtype, path of the lazy state dict
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._model, name)


class _ShardWriter(Sink):
    """Collects merged tensors into shards planned from the tensor sizes, writing each shard when it is complete,
    so at most one shard of output is in memory."""

    def __init__(self, inputs: MergeInputs, folder: Path, dtype: torch.dtype | None, max_shard_bytes: int):
        self.inputs, self.folder, self.dtype = inputs, folder, dtype
        keys = inputs.keys()
        self.out_dtype = {k: (dtype if dtype is not None and inputs.is_float(k) else inputs.dtype(k)) for k in keys}
        sizes = [(k, _numel(inputs.shape(k)) * _itemsize(self.out_dtype[k])) for k in keys]
        from merge3.models import plan_shards

        shards = plan_shards(sizes, max_shard_bytes)
        self.total_size = sum(size for _, size in sizes)
        self.names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        self.shard_of = {k: i for i, keys in enumerate(shards) for k in keys}
        self.pending = [set(keys) for keys in shards]
        self.buffers: list[dict[str, torch.Tensor]] = [{} for _ in shards]

    def write(self, key: str, value: torch.Tensor | None) -> None:
        tensor = self.inputs.raw_anchor(key) if value is None else value
        tensor = tensor.to(device="cpu", dtype=self.out_dtype[key]).contiguous()  # checked as written: casts overflow
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise Merge3Error(f"the merged tensor '{key}' has NaN/Inf values (from {self._culprit(key)}): refusing to "
                              "write non-finite weights")
        i = self.shard_of[key]
        self.buffers[i][key] = tensor
        self.pending[i].discard(key)
        if not self.pending[i]:
            save_file(self.buffers[i], str(self.folder / self.names[i]), metadata={"format": "pt"})
            self.buffers[i] = {}

    def _culprit(self, key: str) -> str:
        """Which input holds the non-finite values of ``key`` (or the merge itself, e.g. an overflow)."""
        sources = ([("the base", self.inputs.base)] if self.inputs.base is not None else [])
        sources += [(f"model {i}", m) for i, m in enumerate(self.inputs.models)]
        for name, source in sources:
            t = source[key]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"{name}, '{getattr(source, 'path', name)}'"
        return "the merge itself: an overflow in the output dtype" if self.dtype is not None else "the merge itself"

    def write_index(self) -> None:
        index = {"metadata": {"total_size": self.total_size},
                 "weight_map": {k: self.names[i] for k, i in self.shard_of.items()}}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def merge_from_config(config_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                      max_shard_size: int | str = "5GB", device: str | None = None) -> Path:
    """Run the merge described by a YAML config into ``out_dir`` (which must not exist or be empty).

    Streams one tensor at a time across all models (peak memory ≈ one tensor per model plus one output shard;
    ``ties`` with ``trim: model`` must first see every tensor). Writes sharded safetensors + index, the base's
    config/tokenizer files, ``README.md`` (model card) and ``merge3-manifest.json`` (inputs with the sha256 of each
    weight file, method, all parameters, merge3 version), atomically.

    >>> import tempfile, pathlib, torch, merge3.models as io
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for name, v in [("base", 0.0), ("a", 1.0), ("b", 3.0)]:
    ...     _ = io.save_state_dict({"w": torch.full((2,), v)}, d / name)
    >>> _ = (d / "m.yaml").write_text("merge_method: task_arithmetic\\nbase_model: base\\nmodels:\\n"
    ...     "  - {model: a, parameters: {weight: 0.5}}\\n  - {model: b, parameters: {weight: 0.5}}\\n")
    >>> out = merge_from_config(d / "m.yaml", d / "merged")
    >>> io.load_state_dict(out)["w"].tolist(), (out / "merge3-manifest.json").exists()
    ([2.0, 2.0], True)
    """
    from merge3.models import (atomic_dir, check_compatible, check_pack_base, check_same_architecture,
                               check_same_tokenizer, copy_model_files, open_lazy, parse_size)

    config_path = Path(config_path)
    config = load_config(config_path)
    method_name, params = merge_params(config)
    method = get_method(method_name)
    if method.needs_base and config.base_model is None:
        raise Merge3Error(f"field 'base_model': {config.merge_method} needs a base model")
    base_path = _resolve_path(config.base_model, config_path.parent, "base_model") if config.base_model else None
    model_paths = [_resolve_path(m.model, config_path.parent, f"models.{i}.model") for i, m in enumerate(config.models)]
    check_pack_base(base_path, model_paths, "models")
    reference_path = base_path if base_path is not None else model_paths[0]
    check_same_tokenizer(reference_path, [p for p in model_paths if p != reference_path])
    names = [m.model for m in config.models]
    check_same_architecture(reference_path, model_paths, names, config.base_model or names[0])
    base = open_lazy(base_path) if base_path is not None else None
    models = [open_lazy(p) for p in model_paths]
    if base is not None:
        check_compatible(base, models, names, reference_name=config.base_model, check_dtypes=False)
    else:
        check_compatible(models[0], models[1:], names[1:], reference_name=names[0], check_dtypes=False)
    dtype = _DTYPES[config.dtype] if config.dtype else None
    base = _FiniteInput(base, f"base_model '{base_path}'") if base is not None else None
    models = [_FiniteInput(m, f"models.{i}.model '{p}'") for i, (m, p) in enumerate(zip(models, model_paths))]
    inputs = MergeInputs(base, models, device=device)
    keys = inputs.keys()
    with atomic_dir(out_dir) as tmp:
        writer = _ShardWriter(inputs, tmp, dtype, parse_size(max_shard_size))
        with torch.no_grad():
            run_method(inputs, method_name, params, keys, layer_positions(keys), writer)
        writer.write_index()
        copied = copy_model_files(reference_path, tmp) if reference_path.is_dir() else []
        if dtype is not None and "config.json" in copied:
            _set_config_dtype(tmp / "config.json", config.dtype)
        manifest = _manifest(config, method_name, params, base_path, model_paths, writer.names, copied)
        (tmp / "merge3-manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(_model_card(config, config_path, method_name, manifest))
    return Path(out_dir)


def _set_config_dtype(path: Path, dtype: str) -> None:
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
    data = json.loads(path.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in data or key == "torch_dtype":
            data[key] = name
    path.write_text(json.dumps(data, indent=2) + "\n")


def _inputs_record(path: Path) -> dict:
    from merge3.models import file_sha256, weight_files

    return {"path": str(path), "files": [{"name": f.name, "sha256": file_sha256(f)} for f in weight_files(path)]}


def _manifest(config: MergeConfig, method: str, params: dict, base_path: Path | None, model_paths: list[Path],
              shards: list[str], copied: list[str]) -> dict:
    import merge3

    return {
        "merge3_version": merge3.__version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "merge_method": config.merge_method,
        "method": method,
        "parameters": plain(params),
        "dtype": config.dtype,
        "base_model": _inputs_record(base_path) if base_path is not None else None,
        "models": [_inputs_record(p) for p in model_paths],
        "config": plain(config.model_dump(exclude_none=True)),
        "output": {"shards": shards, "copied_files": copied},
    }


def _model_card(config: MergeConfig, config_path: Path, method: str, manifest: dict) -> str:
    title = config.name or f"{config.merge_method} merge"
    base = f"`{config.base_model}`" if config.base_model else "none (base-free method)"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, merge3]",
        "---",
        f"# {title}",
        "",
        f"This model was merged with [merge3](https://github.com/merge3) {manifest['merge3_version']} using "
        f"**{config.merge_method}** (merge3 method `{method}`).",
        "",
        f"- Base model: {base}",
        "- Models:",
        *[f"  - `{m.model}`" for m in config.models],
        "",
        "Input files and their sha256 are recorded in `merge3-manifest.json`.",
        "",
        "## Configuration",
        "",
        "```yaml",
        config_path.read_text().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


__all__ = ["MergeConfig", "load_config", "merge_from_config", "merge_params"]
