"""Task Singular Vectors (Gargiulo et al., CVPR 2025): TSV-Merge, TSV-C compression, singular task interference.

For each 2-D weight (except ``text_projection``) every task keeps its top ``int(r/T)`` singular triplets; the
concatenated singular vectors are orthogonalised (nearest orthonormal matrix), which removes the interference
between tasks, and the merged task matrix is ``U⊥ diag(s) V⊥ᵀ``. Other tensors get the mean task vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Optional

import torch

from merge3._errors import Merge3Error
from merge3.methods._arithmetic import Scale, Weights, add_weighted
from merge3.methods._inputs import MergeInputs
from merge3.methods._kernels import check_inputs
from merge3.methods._params import LayerValue
from merge3.methods._registry import Bounds, Kernel, StateDict, merge_method

Alpha = Annotated[LayerValue, Bounds(-10.0, 10.0, search=(0.1, 3.0))]


# TSV treats 2-D weights as matrices, except CLIP's text_projection (the official code skips it)
_TSV_SKIP = "text_projection"


def is_tsv_key(key: str, shape: Sequence[int]) -> bool:
    """Whether TSV merges ``key`` by its singular vectors (2-D, not ``text_projection``) or by the mean."""
    return len(shape) == 2 and _TSV_SKIP not in key


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


def tsv_of(inputs: MergeInputs, key: str) -> TSVFactors:
    """``key``'s TSV factors (cached while the builder has not replaced them by the components)."""
    return inputs.remember(("tsv", key), lambda: tsv_factors(inputs.deltas(key)))


def tsv_components(inputs: MergeInputs, key: str) -> torch.Tensor:
    """Each task's share ``U⊥_t diag(s_t) V⊥_tᵀ`` of ``key``'s TSV matrix, stacked (T × m × n), cached.

    With these a TSV merge with any per-task weights is a weighted sum of T matrices (memory-bound, like task
    arithmetic) instead of an m×r×n product per candidate.
    """

    def make():
        components = tsv_of(inputs, key).components(inputs.n_models)
        inputs.forget_one(("tsv", key))  # the components replace the factors
        return components

    return inputs.remember(("tsv_components", key), make)


def _tsv_precompute(inputs: MergeInputs, key: str, seeds: Sequence[int]) -> None:
    if is_tsv_key(key, inputs.shape(key)):
        tsv_components(inputs, key)


def _tsv_merge_key(inputs: MergeInputs, key: str, p: dict, context: None, out: torch.Tensor) -> None:
    alpha, w = p["alpha"], p["weights"]
    anchor = inputs.anchor32(key)
    if not is_tsv_key(key, inputs.shape(key)):
        add_weighted(out, anchor, inputs.deltas(key), [alpha * x / inputs.n_models for x in w])
    elif inputs.caching or any(isinstance(x, torch.Tensor) for x in w):
        # the builder (per-task components precomputed, a build is a weighted sum) or row-block weights, which
        # scale rows of each task's component rather than its singular values
        add_weighted(out, anchor, tsv_components(inputs, key), [alpha * x for x in w])
    else:
        weights = torch.tensor(w, dtype=torch.float32, device=anchor.device)
        torch.add(anchor, tsv_of(inputs, key).weighted(weights), alpha=alpha, out=out)


@merge_method(kernel=Kernel(_tsv_merge_key), precompute=_tsv_precompute, label="TSV-M", redundant=["alpha"],
              recipes=[{"scale": s} for s in (0.5, 1.0, 1.5, 2.0, 2.5)])
def tsv_merge(base: StateDict, models: Sequence[StateDict], alpha: Alpha = 1.0, weights: Weights = None) -> StateDict:
    """TSV-Merge: θ = θ₀ + alpha · τ_TSV, as the official code (2-D keys by TSV, others by the mean task vector).

    Per-task ``weights`` scale each task's singular values (U⊥ diag(w·s) V⊥ᵀ; the mean becomes Σ w τ / T); the
    orthogonalised vectors are those of the unweighted tasks, so weights never change the subspaces.

    >>> import torch
    >>> base = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    >>> e = torch.eye(4)
    >>> a = {"w": 2 * torch.outer(e[0], e[1]), "b": torch.ones(4)}
    >>> b = {"w": 3 * torch.outer(e[2], e[3]), "b": torch.zeros(4)}
    >>> merged = tsv_merge(base, [a, b])
    >>> torch.allclose(merged["w"], a["w"] + b["w"], atol=1e-6), merged["b"].tolist()
    (True, [0.5, 0.5, 0.5, 0.5])
    """


def truncate(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation (Eckart–Young) of a 2-D tensor."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank, :]


def check_rank_fraction(rank_fraction: float | None) -> None:
    if rank_fraction is not None and not (0.0 < rank_fraction <= 1.0):
        raise Merge3Error(f"tsv_compress: rank_fraction = {rank_fraction} is out of range (0, 1]")


def compressed_rank(shape: Sequence[int], n_tasks: int, rank_fraction: float | None) -> int:
    """TSV-C's rank: ``int(r/T)`` as the official code, or ``max(1, int(r · rank_fraction))``."""
    r = min(shape)
    return int(r * (1 / n_tasks)) if rank_fraction is None else max(1, int(r * rank_fraction))


def tsv_compress_models(base: StateDict, models: Sequence[StateDict],
                        rank_fraction: float | None = None) -> list[StateDict]:
    """TSV-C for every task at once: each model with each 2-D task matrix replaced by its low-rank truncation (one
    output per model; ``tsv_compress`` is the same compression as a one-output merge method).

    The rank is ``int(r/T)`` for T models (the official choice, ~T× less storage for the task matrices) or
    ``rank_fraction`` of r. Other tensors (biases, norms, ``text_projection``) keep their full task vectors, and
    integer buffers the base value.

    >>> import torch
    >>> base = {"w": torch.zeros(4, 4)}
    >>> ft = {"w": torch.diag(torch.tensor([4., 3., 2., 1.]))}
    >>> tsv_compress_models(base, [ft, ft])[0]["w"].diagonal().tolist()
    [4.0, 3.0, 0.0, 0.0]
    """
    check_rank_fraction(rank_fraction)
    check_inputs(base, models, "tsv_merge")
    inputs = MergeInputs(base, models)
    outputs: list[StateDict] = [{} for _ in models]
    for key in inputs.keys():
        raw = inputs.raw_anchor(key)
        if not inputs.is_float(key):
            for out in outputs:
                out[key] = raw.clone()
            continue
        deltas = inputs.deltas(key)
        tsv = is_tsv_key(key, deltas.shape[1:])
        rank = compressed_rank(deltas.shape[1:], len(models), rank_fraction) if tsv else 0
        for t, out in enumerate(outputs):
            delta = truncate(deltas[t], rank) if tsv else deltas[t]
            out[key] = (inputs.anchor32(key) + delta).to(raw.dtype)
    return outputs


RankFraction = Annotated[Optional[LayerValue], Bounds(0.0, 1.0, search=(0.02, 0.5))]


def _singular_factors(inputs: MergeInputs, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each task's SVD of ``key``, as ``U·diag(s)`` (T × m × r) and ``Vᵀ`` (T × r × n), cached: a candidate at any
    rank and weights is then one product of the leading columns."""

    def make():
        u, s, vh = torch.linalg.svd(inputs.deltas(key), full_matrices=False)
        return u.mul_(s.unsqueeze(-2)), vh

    return inputs.remember(("tsv_compress", key), make)


def _tsv_compress_precompute(inputs: MergeInputs, key: str, seeds: Sequence[int]) -> None:
    if is_tsv_key(key, inputs.shape(key)):
        _singular_factors(inputs, key)


def _tsv_compress_key(inputs: MergeInputs, key: str, p: dict, context: None, out: torch.Tensor) -> None:
    shape, anchor, coefficients = inputs.shape(key), inputs.anchor32(key), [p["scale"] * x for x in p["weights"]]
    if not is_tsv_key(key, shape):
        add_weighted(out, anchor, inputs.deltas(key), coefficients)
        return
    check_rank_fraction(p["rank_fraction"])
    rank = compressed_rank(shape, inputs.n_models, p["rank_fraction"])
    scaled_u, vh = _singular_factors(inputs, key)
    # Σ_t c_t U_t,k diag(s_t,k) V_t,kᵀ as one product: [c_1 U_1 S_1 | … | c_T U_T S_T] @ [V_1ᵀ; …; V_Tᵀ]
    left = torch.cat([scaled_u[t, :, :rank] * c for t, c in enumerate(coefficients)], dim=1)
    torch.addmm(anchor, left, vh[:, :rank].reshape(-1, vh.shape[-1]), out=out)


@merge_method(kernel=Kernel(_tsv_compress_key), precompute=_tsv_compress_precompute, label="TSV-C TA",
              redundant=["scale"])
def tsv_compress(base: StateDict, models: Sequence[StateDict], rank_fraction: RankFraction = None,
                 scale: Scale = 1.0, weights: Weights = None) -> StateDict:
    """TSV-C as a merge: θ = θ₀ + scale · Σ_t w_t · trunc_k(τ_t), each 2-D task matrix cut to its top k singular
    triplets (k = ``int(r/T)`` for T models, the official choice, or ``max(1, int(r · rank_fraction))``); other
    tensors (biases, norms, ``text_projection``) add their full task vectors.

    With one model (or one-hot weights) this is that task's compressed model, what a skill pack stores
    (``merge3 compress``); with several it is task arithmetic on the compressed task vectors, whose rank a genome
    can evolve per layer. ``tsv_compress_models`` returns every task's compressed model at once.

    >>> import torch
    >>> base = {"w": torch.zeros(4, 4)}
    >>> ft = {"w": torch.diag(torch.tensor([4., 3., 2., 1.]))}
    >>> tsv_compress(base, [ft], rank_fraction=0.5)["w"].diagonal().tolist()
    [4.0, 3.0, 0.0, 0.0]
    """


def singular_task_interference(deltas: torch.Tensor) -> float:
    """STI = ‖(U_catᵀ U_cat − I) S_cat (V_catᵀ V_cat − I)‖₁ of one key's stacked task matrices (T × m × n).

    U_cat, S_cat, V_cat concatenate each task's top ``int(r/T)`` singular triplets, as TSV-Merge keeps them;
    0 means the tasks use mutually orthogonal singular directions (no interference).
    """
    n_tasks, m, n = deltas.shape
    k = int(min(m, n) * (1 / n_tasks))
    if k == 0:
        return 0.0
    us, ss, vs = [], [], []
    for t in range(n_tasks):
        u, s, vh = torch.linalg.svd(deltas[t].float(), full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k, :].T)
    u_cat, s_cat, v_cat = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    eye = torch.eye(u_cat.shape[1], dtype=u_cat.dtype, device=u_cat.device)
    return float((((u_cat.T @ u_cat - eye) * s_cat) @ (v_cat.T @ v_cat - eye)).abs().sum())


__all__ = ["TSVFactors", "compressed_rank", "is_tsv_key", "singular_task_interference", "truncate", "tsv_compress",
           "tsv_compress_models", "tsv_factors", "tsv_merge"]
