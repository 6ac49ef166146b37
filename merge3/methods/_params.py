"""Per-layer parameter values, mergekit style.

A merge parameter may be given as
- a scalar: the same value for every tensor;
- a list: a "gradient" interpolated linearly across the model's depth (mergekit's semantics: the first value at the
  first layer, the last at the last layer);
- a mapping from tensor-name pattern to value: the first pattern that matches a key wins. A pattern with a shell
  wildcard (``*?[``) is matched with fnmatch against the whole key, any other pattern as a substring (mergekit's
  ``filter``). ``"*"`` is the usual fallback entry.

A per-model weight may also be ``{"row_blocks": [w_1, …, w_K]}``: each tensor's first dimension (a Linear layer's
output neurons) is cut into K contiguous, near-equal blocks and block j gets weight w_j — coefficients finer than a
layer, which a search can evolve (mergekit has no such form, so such merges export without a mergekit.yaml).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Union

import numpy as np
import torch

from merge3._errors import Merge3Error

LayerValue = Union[float, Sequence[float], Mapping[str, float]]

_LAYER_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(key: str) -> int | None:
    """The first integer path component of a tensor name (``model.layers.3.mlp.weight`` → 3), or None."""
    match = _LAYER_NUMBER.search(key)
    return int(match.group(1)) if match else None


def layer_positions(keys: Iterable[str]) -> dict[str, float]:
    """Depth of every key in [0, 1] for gradients, exactly as mergekit computes it: layer i of N is i / (N - 1)
    (1 when there is a single layer); keys without a layer number (embeddings, final norm, head) are at 0.

    >>> layer_positions(["embed.weight", "layers.0.w", "layers.1.w", "layers.2.w", "lm_head.weight"])
    {'embed.weight': 0.0, 'layers.0.w': 0.0, 'layers.1.w': 0.5, 'layers.2.w': 1.0, 'lm_head.weight': 0.0}
    """
    keys = list(keys)
    numbers = sorted({n for n in map(layer_index, keys) if n is not None})
    rank = {n: i for i, n in enumerate(numbers)}
    positions = {}
    for key in keys:
        n = layer_index(key)
        if n is None:
            positions[key] = 0.0
        else:
            positions[key] = rank[n] / (len(numbers) - 1) if len(numbers) > 1 else 1.0
    return positions


def _matches(pattern: str, key: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(key, pattern)
    return pattern in key


def resolve(value: LayerValue, key: str, position: float) -> float:
    """The scalar a per-layer ``value`` takes for tensor ``key`` at depth ``position``."""
    if isinstance(value, Mapping):
        for pattern, v in value.items():
            if _matches(pattern, key):
                return float(v)
        raise Merge3Error(f"no pattern in {list(value)} matches tensor '{key}'; add a '*' entry as a fallback")
    if isinstance(value, (list, tuple, np.ndarray)):
        values = [float(v) for v in value]
        if len(values) == 1:
            return values[0]
        return float(np.interp(position, np.linspace(0.0, 1.0, len(values)), values))
    return float(value)


ROW_BLOCKS = "row_blocks"


def is_row_blocks(value: object) -> bool:
    """``{"row_blocks": [numbers…]}``: per-block weights along a tensor's first dimension."""
    return (isinstance(value, Mapping) and list(value) == [ROW_BLOCKS] and isinstance(value[ROW_BLOCKS], (list, tuple))
            and len(value[ROW_BLOCKS]) > 0 and all(_is_number(v) for v in value[ROW_BLOCKS]))


def has_row_blocks(params: Mapping[str, object]) -> bool:
    """Whether any per-model parameter of a method's ``params`` is given per row block."""
    return any(isinstance(v, (list, tuple)) and any(is_row_blocks(x) for x in v) for v in params.values())


def block_sizes(rows: int, blocks: int) -> list[int]:
    """Sizes of ``blocks`` contiguous blocks covering ``rows`` (the first ``rows % blocks`` one longer, as
    ``torch.tensor_split``; blocks beyond ``rows`` are empty)."""
    return [rows // blocks + (1 if j < rows % blocks else 0) for j in range(blocks)]


def row_weights(value: Mapping[str, Sequence[float]], shape: Sequence[int], device) -> torch.Tensor | float:
    """A row-block weight as a tensor that broadcasts against a tensor of ``shape`` (one value per row); a 0-d
    tensor has no rows and takes the blocks' mean.

    >>> row_weights({"row_blocks": [1.0, 2.0]}, (3, 2), "cpu").flatten().tolist()
    [1.0, 1.0, 2.0]
    """
    values = [float(v) for v in value[ROW_BLOCKS]]
    if not shape:
        return float(np.mean(values))
    sizes = torch.tensor(block_sizes(shape[0], len(values)))
    per_row = torch.repeat_interleave(torch.tensor(values, dtype=torch.float32), sizes)
    return per_row.to(device).reshape(-1, *([1] * (len(shape) - 1)))


def mean_weight(value: object) -> float:
    """A per-model weight as one number: itself, or the mean of its row blocks (for tables and plots)."""
    return float(np.mean(value[ROW_BLOCKS])) if is_row_blocks(value) else float(value)


def scalars_in(value: LayerValue) -> list[float]:
    """Every scalar a per-layer value can take, for bounds checks."""
    if is_row_blocks(value):
        return [float(v) for v in value[ROW_BLOCKS]]
    if isinstance(value, Mapping):
        return [float(v) for v in value.values()]
    if isinstance(value, (list, tuple, np.ndarray)):
        return [float(v) for v in value]
    return [float(value)]


def is_layer_value(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_number(v) for k, v in value.items()) and len(value) > 0
    if isinstance(value, (list, tuple, np.ndarray)):
        return len(value) > 0 and all(_is_number(v) for v in value)
    return False


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
