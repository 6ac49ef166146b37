"""What the merge kernels read, per tensor: task vectors, trim thresholds, DARE draws and TSV factors.

``MergeInputs`` computes each of these on demand. The pure functions use a fresh one per call (nothing kept);
``CandidateBuilder`` uses one with ``cache=True``, so everything that does not depend on a candidate's coefficients
is computed once: stacked task vectors, sorted magnitudes (a trim threshold for any density is then an index),
uniform draws per DARE seed (a mask for any drop rate is then ``u < p``), and TSV's orthogonalised per-task
components (a TSV merge with any per-task weights is then a weighted sum).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from merge3._errors import Merge3Error


# TSV treats 2-D weights as matrices, except CLIP's text_projection (the official code skips it)
_TSV_SKIP = "text_projection"


def is_tsv_key(key: str, shape: Sequence[int]) -> bool:
    """Whether TSV merges ``key`` by its singular vectors (2-D, not ``text_projection``) or by the mean."""
    return len(shape) == 2 and _TSV_SKIP not in key


def dare_seed(seed: int, key: str, task: int) -> int:
    """The generator seed of one (seed, tensor, task) triple: a key's DARE mask does not depend on which other keys
    are merged with it, nor in which order, so group plans and full merges draw the same masks."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode()), int(task)]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending; on CPU in place through numpy, since torch.sort would also return int64 indices
    (three times the memory of the magnitudes, for a whole model under ``trim="model"``)."""
    if x.device.type == "cpu":
        x.numpy().sort(axis=1)
        return x
    return torch.sort(x, dim=1).values


def keep_count(density: float, n: int) -> int | None:
    """How many of n entries a per-tensor trim at ``density`` keeps (mergekit: ``max(1, int(density·n))``, none at
    density ≤ 0); None means all of them (density ≥ 1)."""
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


@dataclass(frozen=True)
class TSVFactors:
    """One 2-D key's TSV decomposition: ``τ_TSV = U⊥ diag(s) V⊥ᵀ``, where slot j belongs to task ``owner[j]``
    (-1 for the zero padding when T·k < r)."""

    u_perp: torch.Tensor  # m × r, orthonormal columns (a partial isometry when the task blocks are dependent)
    s: torch.Tensor  # r
    vh_perp: torch.Tensor  # r × n, orthonormal rows (likewise)
    owner: torch.Tensor  # r, long

    def components(self, n_tasks: int) -> torch.Tensor:
        """Each task's share ``U⊥_t diag(s_t) V⊥_tᵀ``, stacked (T × m × n); zeros for a task without slots."""
        return torch.stack([(self.u_perp[:, self.owner == t] * self.s[self.owner == t]) @ self.vh_perp[self.owner == t]
                            for t in range(n_tasks)])

    def weighted(self, weights: torch.Tensor) -> torch.Tensor:
        """U⊥ diag(w_owner · s) V⊥ᵀ: every task's singular values scaled by its weight."""
        coeffs = self.s * _per_slot(weights, self.owner)
        return (self.u_perp * coeffs) @ self.vh_perp


def _per_slot(weights: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    padded = torch.cat([weights, weights.new_zeros(1)])  # index -1 → the appended 0
    return padded[owner]


def tsv_factors(deltas: torch.Tensor, rank: int | None = None) -> TSVFactors:
    """TSV-Merge of one key's stacked task matrices ``deltas`` (T × m × n), as the official code does it.

    Each task keeps its top ``k = int(r · (1/T))`` singular triplets (r = min(m, n)); the kept U and V blocks are
    concatenated and each replaced by its nearest orthonormal matrix ``P Qᵀ`` (from the SVD ``P Σ Qᵀ``).
    """
    n_tasks, m, n = deltas.shape
    r = min(m, n)
    k = int(r * (1 / n_tasks)) if rank is None else rank
    u_cat = deltas.new_zeros(m, r)
    s_cat = deltas.new_zeros(r)
    vh_cat = deltas.new_zeros(r, n)
    owner = torch.full((r,), -1, dtype=torch.long, device=deltas.device)
    for t in range(n_tasks):
        u, s, vh = torch.linalg.svd(deltas[t], full_matrices=False)
        block = slice(t * k, (t + 1) * k)
        u_cat[:, block], s_cat[block], vh_cat[block, :] = u[:, :k], s[:k], vh[:k, :]
        owner[block] = t
    return TSVFactors(_nearest_orthonormal(u_cat), s_cat, _nearest_orthonormal(vh_cat), owner)


def _nearest_orthonormal(x: torch.Tensor) -> torch.Tensor:
    """``P Qᵀ`` from the SVD ``P Σ Qᵀ``, over the singular values that are not numerically zero.

    When the concatenated blocks are linearly dependent (in practice: neurons that no task updated, e.g. dead ReLU
    units, leave task vectors with shared zero rows), the full ``P Qᵀ`` is not unique: its null-space part is
    whatever basis LAPACK returns, so the merge changes with the machine and the precision. The official code has
    that ambiguity; keeping only the numerical range (the nearest partial isometry) is unique, and equals ``P Qᵀ``
    whenever the blocks are independent.
    """
    p, s, qh = torch.linalg.svd(x, full_matrices=False)
    rank = int((s > s[0] * max(x.shape) * torch.finfo(s.dtype).eps).sum()) if s.numel() else 0
    return p[:, :rank] @ qh[:rank]


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

    def _remember(self, name: tuple, make):
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
        return self._remember(("anchor", key), lambda: self._f32(self.anchor[key]))

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

        return self._remember(("deltas", key), make)

    # --- TIES trimming -------------------------------------------------------------------------------------------

    def trim_thresholds(self, key: str, density: float) -> torch.Tensor | None:
        """Per-task magnitude threshold keeping the top ``max(1, int(density·n))`` entries of each task vector
        (mergekit's per-tensor trim); None keeps everything (density ≥ 1)."""
        deltas = self.deltas(key)
        n = deltas[0].numel()
        k = keep_count(density, n)
        if k is None:
            return None
        if k == 0:
            return torch.full((self.n_models,), float("inf"), device=deltas.device)
        return self._kth_smallest(("sorted", key), lambda: deltas.reshape(self.n_models, -1).abs(), n - k + 1)

    def global_thresholds(self, keys: Sequence[str], density: float) -> torch.Tensor | None:
        """Per-task threshold over all ``keys`` flattened together, as the official TIES code: with D entries,
        ``thr = kthvalue(|τ|, D − int(D·density))`` and entries with ``|τ| ≥ thr`` are kept."""
        if density >= 1 or not keys:
            return None

        def magnitudes():
            device = self.deltas(keys[0]).device
            return torch.cat([self.deltas(k).reshape(self.n_models, -1).abs().to(device) for k in keys], dim=1)

        total = sum(int(np.prod(self.shape(k))) for k in keys)
        kth = total - int(total * density)
        if kth == 0:
            return None
        return self._kth_smallest(("sorted_global", tuple(keys)), magnitudes, kth)

    def _kth_smallest(self, name: tuple, magnitudes, kth: int) -> torch.Tensor:
        """The ``kth`` smallest (1-based) of each row: a lookup in the sorted rows when caching, else a selection."""
        if self._cache is None:
            return torch.kthvalue(magnitudes(), kth, dim=1).values
        ordered = self._remember(name, lambda: _sorted_rows(magnitudes()))
        return ordered[:, kth - 1].clone()

    # --- DARE ----------------------------------------------------------------------------------------------------

    def uniforms(self, key: str, seed: int) -> torch.Tensor:
        """Uniform [0, 1) draws of every task-vector entry for ``seed``; DARE drops the entries with ``u < p``.

        Drawn on the CPU by a generator seeded from (seed, key, task), so the masks are the same on every device.
        """

        def make():
            shape = self.shape(key)
            draws = torch.empty((self.n_models, *shape), dtype=torch.float32)
            for t in range(self.n_models):
                generator = torch.Generator().manual_seed(dare_seed(seed, key, t))
                torch.rand(shape, generator=generator, out=draws[t])
            return draws.to(self.deltas(key).device)

        return self._remember(("uniforms", key, int(seed)), make)

    # --- TSV -----------------------------------------------------------------------------------------------------

    def tsv(self, key: str) -> TSVFactors:
        return self._remember(("tsv", key), lambda: tsv_factors(self.deltas(key)))

    @property
    def caching(self) -> bool:
        return self._cache is not None

    def tsv_components(self, key: str) -> torch.Tensor:
        """Each task's share ``U⊥_t diag(s_t) V⊥_tᵀ`` of ``key``'s TSV matrix, stacked (T × m × n), cached.

        With these a TSV merge with any per-task weights is a weighted sum of T matrices (memory-bound, like task
        arithmetic) instead of an m×r×n product per candidate.
        """
        return self._remember(("tsv_components", key), lambda: self._tsv_components(key))

    def _tsv_components(self, key: str) -> torch.Tensor:
        components = self.tsv(key).components(self.n_models)
        self.forget_one(("tsv", key))  # the components replace the factors
        return components

    def forget_one(self, name: tuple) -> None:
        if self._cache is not None:
            self._cache.pop(name, None)
