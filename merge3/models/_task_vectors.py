"""Task vectors and the checks that must pass before any merge."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from merge3._errors import Merge3Error
from merge3.models._io import StateDict

_VOCAB_KEY = re.compile(r"(embed|wte|word_embeddings|lm_head|shared|output\.weight)", re.IGNORECASE)


def is_mergeable(t: torch.Tensor) -> bool:
    """Floating tensors carry task vectors; integer/bool buffers (step counters, masks, ids) keep the base value."""
    return t.is_floating_point()


def task_vector(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> StateDict:
    """τ = θ_ft − θ_base over floating keys (computed in float32).

    >>> import torch
    >>> task_vector({"w": torch.zeros(2)}, {"w": torch.ones(2)})["w"].tolist()
    [1.0, 1.0]
    """
    return {k: finetuned[k].float() - base[k].float() for k in base if is_mergeable(base[k])}


def task_vectors(base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]]) -> list[StateDict]:
    return [task_vector(base, m) for m in models]


def apply_task_vector(
    base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], scale: float = 1.0
) -> StateDict:
    """θ_base + scale·τ, cast back to the base dtypes; keys without a delta keep the base value."""
    out = {}
    for k, t in base.items():
        out[k] = (t.float() + scale * delta[k]).to(t.dtype) if k in delta else t.clone()
    return out


def _describe(shape) -> str:
    return "×".join(map(str, shape)) or "scalar"


def check_compatible(
    reference: Mapping[str, torch.Tensor],
    others: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str] | None = None,
    reference_name: str = "base",
    check_dtypes: bool = True,
) -> None:
    """Same keys, shapes and dtypes in every model, or one ``Merge3Error`` naming the model and first mismatches.

    Works on lazy state dicts too (only shapes and dtypes are read when the mapping offers ``shape``/``dtype``).
    """
    names = list(names) if names is not None else [f"model {i}" for i in range(len(others))]
    ref_keys = list(reference)
    for name, other in zip(names, others):
        missing = [k for k in ref_keys if k not in other]
        extra = [k for k in other if k not in reference]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {_first(missing)}")
            if extra:
                parts.append(f"unexpected {_first(extra)}")
            raise Merge3Error(f"{name} does not match {reference_name}: {'; '.join(parts)}")
        shape_bad = [(k, _shape(reference, k), _shape(other, k)) for k in ref_keys if _shape(reference, k) != _shape(other, k)]
        if shape_bad:
            vocab = [b for b in shape_bad if _VOCAB_KEY.search(b[0]) and len(b[1]) and len(b[1]) == len(b[2]) and b[1][1:] == b[2][1:]]
            if vocab:
                k, a, b = vocab[0]
                raise Merge3Error(
                    f"{name} has a different vocabulary size than {reference_name}: '{k}' has {b[0]} rows vs {a[0]}; "
                    "merge models that share a tokenizer (resize embeddings to a common vocabulary first)"
                )
            shown = ", ".join(f"'{k}' {_describe(b)} vs {_describe(a)}" for k, a, b in shape_bad[:3])
            more = f" (+{len(shape_bad) - 3} more)" if len(shape_bad) > 3 else ""
            raise Merge3Error(f"{name} has shapes that differ from {reference_name}: {shown}{more}")
        # Without check_dtypes float widths may differ (fp16 with bf16, as mergekit allows); floats and integers never.
        same = (lambda a, b: a == b) if check_dtypes else (lambda a, b: a.is_floating_point == b.is_floating_point)
        dtype_bad = [(k, a, b) for k in ref_keys if not same(a := _dtype(reference, k), b := _dtype(other, k))]
        if dtype_bad:
            k, a, b = dtype_bad[0]
            raise Merge3Error(f"{name} has dtype {b} for '{k}' where {reference_name} has {a} (+{len(dtype_bad) - 1} more)")


def _first(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _shape(sd, key) -> tuple[int, ...]:
    return tuple(sd.shape(key)) if hasattr(sd, "shape") and not isinstance(sd, dict) else tuple(sd[key].shape)


def _dtype(sd, key) -> torch.dtype:
    return sd.dtype(key) if hasattr(sd, "dtype") and not isinstance(sd, dict) else sd[key].dtype


def check_finite(state_dict: Mapping[str, torch.Tensor], name: str = "model") -> None:
    """Refuse NaN/Inf weights, naming the first bad tensor."""
    for key, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise Merge3Error(f"{name} has {bad} NaN/Inf value(s) in '{key}': refusing non-finite weights")
