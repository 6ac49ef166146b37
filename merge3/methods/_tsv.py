"""Task Singular Vectors (Gargiulo et al., CVPR 2025): TSV-Merge, TSV-C compression, singular task interference.

For each 2-D weight (except ``text_projection``) every task keeps its top ``int(r/T)`` singular triplets; the
concatenated singular vectors are orthogonalised (nearest orthonormal matrix), which removes the interference
between tasks, and the merged task matrix is ``U⊥ diag(s) V⊥ᵀ``. Other tensors get the mean task vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from merge3.methods._arithmetic import Weights, add_weighted
from merge3.methods._inputs import MergeInputs, is_tsv_key
from merge3.methods._kernels import check_inputs, kernel, merge_state_dicts
from merge3.methods._params import LayerValue
from merge3.methods._registry import Bounds, StateDict, merge_method

Alpha = Annotated[LayerValue, Bounds(-10.0, 10.0, search=(0.1, 3.0))]


@merge_method
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
    return merge_state_dicts("tsv_merge", base, models, dict(alpha=alpha, weights=weights))


@kernel("tsv_merge")
def _tsv_merge_key(inputs: MergeInputs, key: str, p: dict, context: None, out: torch.Tensor) -> None:
    alpha, w = p["alpha"], p["weights"]
    anchor = inputs.anchor32(key)
    if not is_tsv_key(key, inputs.shape(key)):
        add_weighted(out, anchor, inputs.deltas(key), [alpha * x / inputs.n_models for x in w])
    elif inputs.caching or any(isinstance(x, torch.Tensor) for x in w):
        # the builder (per-task components precomputed, a build is a weighted sum) or row-block weights, which
        # scale rows of each task's component rather than its singular values
        add_weighted(out, anchor, inputs.tsv_components(key), [alpha * x for x in w])
    else:
        weights = torch.tensor(w, dtype=torch.float32, device=anchor.device)
        torch.add(anchor, inputs.tsv(key).weighted(weights), alpha=alpha, out=out)


def truncate(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation (Eckart–Young) of a 2-D tensor."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank, :]


def compressed_rank(shape: Sequence[int], n_tasks: int, rank_fraction: float | None) -> int:
    """TSV-C's rank: ``int(r/T)`` as the official code, or ``max(1, int(r · rank_fraction))``."""
    r = min(shape)
    return int(r * (1 / n_tasks)) if rank_fraction is None else max(1, int(r * rank_fraction))


def tsv_compress(base: StateDict, models: Sequence[StateDict], rank_fraction: float | None = None) -> list[StateDict]:
    """TSV-C: every model with each 2-D task matrix replaced by its low-rank truncation (one output per model).

    The rank is ``int(r/T)`` for T models (the official choice, ~T× less storage for the task matrices) or
    ``rank_fraction`` of r. Other tensors (biases, norms, ``text_projection``) keep their full task vectors, and
    integer buffers the base value. This compresses, it does not merge, so it is not a registered merge method.

    >>> import torch
    >>> base = {"w": torch.zeros(4, 4)}
    >>> ft = {"w": torch.diag(torch.tensor([4., 3., 2., 1.]))}
    >>> tsv_compress(base, [ft, ft])[0]["w"].diagonal().tolist()
    [4.0, 3.0, 0.0, 0.0]
    """
    from merge3._errors import Merge3Error

    if rank_fraction is not None and not (0.0 < rank_fraction <= 1.0):
        raise Merge3Error(f"tsv_compress: rank_fraction = {rank_fraction} is out of range (0, 1]")
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


__all__ = ["compressed_rank", "singular_task_interference", "truncate", "tsv_compress", "tsv_merge"]
