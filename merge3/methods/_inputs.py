"""What the merge kernels read, per tensor: the anchor, the stacked task vectors, work buffers, and a cache.

``MergeInputs`` computes these on demand. The pure functions use a fresh one per call (nothing kept);
``CandidateBuilder`` uses one with ``cache=True``, so everything that does not depend on a candidate's coefficients
is computed once. What a method caches beyond the task vectors is the method's own business: it stores it through
``remember`` (TIES: sorted magnitudes, so a trim threshold for any density is an index; DARE: uniform draws per
seed, so a mask for any drop rate is ``u < p``; TSV: per-task components, so any weighting is a weighted sum).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from merge3._errors import Merge3Error


class MergeInputs:
    """Base model (or, for base-free merges, the first model as anchor) and the models, read one key at a time.

    Works on any mapping of tensors, lazy ones included; tensors are moved to ``device`` (default: where the anchor's
    tensors are) and computed on in float32.
    """

    def __init__(
        self,
        base: Mapping[str, torch.Tensor] | None,
        models: Sequence[Mapping[str, torch.Tensor]],
        device: str | torch.device | None = None,
        cache: bool = False,
    ):
        if not models:
            raise Merge3Error("need at least one model to merge, got none")
        self.base = base
        self.models = list(models)
        self.anchor = base if base is not None else self.models[0]
        self.device = torch.device(device) if device is not None else None
        self._cache: dict | None = {} if cache else None
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._recent: dict[tuple, object] = {}

    @property
    def n_models(self) -> int:
        return len(self.models)

    def keys(self) -> list[str]:
        return list(self.anchor.keys())

    def dtype(self, key: str) -> torch.dtype:
        return self.anchor.dtype(key) if hasattr(self.anchor, "dtype") and not isinstance(self.anchor, dict) else self.anchor[key].dtype

    def is_float(self, key: str) -> bool:
        return self.dtype(key).is_floating_point

    def shape(self, key: str) -> tuple[int, ...]:
        if hasattr(self.anchor, "shape") and not isinstance(self.anchor, dict):
            return tuple(self.anchor.shape(key))
        return tuple(self.anchor[key].shape)

    def scratch(self, name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                device: torch.device | None = None) -> torch.Tensor:
        """A reusable work buffer (contents undefined), grown to the largest shape asked for under ``name``.

        Kernels work in place in these: a fresh tensor per operation would cost a page fault per 4 KiB on every
        candidate, which on CPU is slower than the arithmetic itself.
        """
        numel = int(np.prod(shape)) if len(shape) else 1
        device = device or self.device or torch.device("cpu")
        slot = (name, dtype, device)
        buffer = self._scratch.get(slot)
        if buffer is None or buffer.numel() < numel:
            buffer = self._scratch[slot] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(tuple(shape))

    def remember(self, name: tuple, make):
        """``make()``, computed once per ``name`` when caching (``name[0]`` is its kind, ``name[1]`` its key);
        without a cache only the key in hand's values are kept."""
        if self._cache is None:
            # no cache: still reuse what was computed for the key in hand (kernels ask for its task vectors more
            # than once), while holding at most one key's worth of tensors
            if name not in self._recent:
                if any(other[1:2] != name[1:2] for other in self._recent):
                    self._recent.clear()
                self._recent[name] = make()
            return self._recent[name]
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    def forget(self, kind: str) -> None:
        """Drop cached values of one kind ("deltas", "sorted", "uniforms", "tsv", ...) to free memory."""
        if self._cache is not None:
            for name in [n for n in self._cache if n[0] == kind]:
                del self._cache[name]

    def _f32(self, t: torch.Tensor) -> torch.Tensor:
        device = self.device if self.device is not None else t.device
        return t.to(device=device, dtype=torch.float32)

    def anchor32(self, key: str) -> torch.Tensor:
        return self.remember(("anchor", key), lambda: self._f32(self.anchor[key]))

    def raw_anchor(self, key: str) -> torch.Tensor:
        t = self.anchor[key]
        return t.to(self.device) if self.device is not None else t

    def deltas(self, key: str) -> torch.Tensor:
        """Task vectors of ``key`` stacked: T × shape, float32 (relative to the anchor for base-free merges)."""

        def make():
            anchor = self.anchor32(key)
            out = torch.empty((self.n_models, *anchor.shape), dtype=torch.float32, device=anchor.device)
            for t, model in enumerate(self.models):
                torch.sub(self._f32(model[key]), anchor, out=out[t])
            return out

        return self.remember(("deltas", key), make)

    @property
    def caching(self) -> bool:
        return self._cache is not None

    def forget_one(self, name: tuple) -> None:
        if self._cache is not None:
            self._cache.pop(name, None)
