"""``merge3 inspect BASE MODEL…``: how much will these task vectors interfere if merged?

- pairwise cosine similarity of the task vectors (over all floating-point tensors);
- pairwise sign-conflict rate: among entries both tasks changed, the share they moved in opposite directions
  (what TIES' sign election resolves);
- per-layer task-vector norms (which layers each fine-tune moved);
- TSV singular task interference per matrix (0: the tasks use orthogonal singular directions).

Reads one tensor at a time, so it works on models larger than memory when given paths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from merge3._errors import Merge3Error
from merge3.methods._groups import layer_groups
from merge3.methods._inputs import MergeInputs
from merge3.methods._kernels import check_inputs
from merge3.methods._tsv import is_tsv_key
from merge3.models import check_finite
from merge3.methods._tsv import singular_task_interference

ModelLike = Mapping[str, torch.Tensor] | str | os.PathLike


@dataclass
class Inspection:
    """Interference diagnostics as DataFrames (rows and columns named by model)."""

    cosine: pd.DataFrame  # models × models
    sign_conflicts: pd.DataFrame  # models × models, in [0, 1]
    layer_norms: pd.DataFrame  # layer groups × models, ‖τ‖₂ of each group
    interference: pd.DataFrame  # one row per 2-D tensor: key, shape, sti

    def summary(self) -> str:
        """A few lines for a terminal."""
        n = len(self.cosine)
        pairs = [(self.cosine.index[i], self.cosine.columns[j]) for i in range(n) for j in range(i + 1, n)]
        lines = [f"{a} vs {b}: cosine {self.cosine.loc[a, b]:+.3f}, sign conflicts {self.sign_conflicts.loc[a, b]:.1%}"
                 for a, b in pairs]
        if len(self.interference):
            lines.append(f"TSV singular task interference: total {self.interference['sti'].sum():.4g} over "
                         f"{len(self.interference)} matrices")
        return "\n".join(lines)


def _open(model: ModelLike) -> Mapping[str, torch.Tensor]:
    if isinstance(model, Mapping):
        return model
    from merge3.models import open_lazy

    return open_lazy(model)


def inspect_models(base: ModelLike, models: Sequence[ModelLike], names: Sequence[str] | None = None,
                   max_sti_elements: int = 4096 * 4096) -> Inspection:
    """Interference diagnostics of ``models``' task vectors relative to ``base`` (state dicts or paths).

    STI needs T SVDs per matrix; matrices with more than ``max_sti_elements`` entries are skipped.

    >>> import torch
    >>> base = {"w": torch.zeros(2, 2)}
    >>> a, b = {"w": torch.tensor([[1., 0.], [0., 0.]])}, {"w": torch.tensor([[-1., 0.], [0., 1.]])}
    >>> report = inspect_models(base, [a, b], names=["a", "b"])
    >>> round(float(report.cosine.loc["a", "b"]), 3), float(report.sign_conflicts.loc["a", "b"])
    (-0.707, 1.0)
    """
    if len(models) < 1:
        raise Merge3Error("inspect: give a base model and at least one fine-tuned model")
    names = list(names) if names is not None else [_name(m, i) for i, m in enumerate(models)]
    if len(names) != len(models):
        raise Merge3Error(f"inspect: {len(names)} names for {len(models)} models")
    base_sd, model_sds = _open(base), [_open(m) for m in models]
    check_inputs(base_sd, model_sds)
    for name, sd in zip(["base", *names], [base_sd, *model_sds]):
        check_finite(sd, name)  # a cosine of NaN weights is a table of NaN
    inputs = MergeInputs(base_sd, model_sds)
    keys = [k for k in inputs.keys() if inputs.is_float(k)]
    t = len(models)
    gram = torch.zeros(t, t, dtype=torch.float64)
    conflicts = torch.zeros(t, t, dtype=torch.float64)
    overlap = torch.zeros(t, t, dtype=torch.float64)
    group_of = {k: g for g, ks in layer_groups(keys, "layer").items() for k in ks}
    squares: dict[str, torch.Tensor] = {}
    sti_rows = []
    for key in keys:
        deltas = inputs.deltas(key)
        flat = deltas.reshape(t, -1)
        gram += (flat @ flat.T).double().cpu()
        for i in range(t):
            for j in range(i + 1, t):
                product = flat[i] * flat[j]
                conflicts[i, j] += float((product < 0).sum())
                overlap[i, j] += float((product != 0).sum())
        group = squares.setdefault(group_of[key], torch.zeros(t, dtype=torch.float64))
        group += (flat.double() ** 2).sum(dim=1).cpu()
        if t > 1 and is_tsv_key(key, deltas.shape[1:]) and deltas[0].numel() <= max_sti_elements:
            sti_rows.append({"key": key, "shape": "×".join(map(str, deltas.shape[1:])),
                             "sti": singular_task_interference(deltas)})
    norms = gram.diagonal().sqrt()
    cosine = gram / torch.outer(norms, norms).clamp_min(1e-30)
    conflicts = conflicts + conflicts.T
    overlap = overlap + overlap.T
    rate = torch.where(overlap > 0, conflicts / overlap.clamp_min(1), torch.zeros_like(overlap))
    return Inspection(
        cosine=pd.DataFrame(cosine.numpy(), index=names, columns=names),
        sign_conflicts=pd.DataFrame(rate.numpy(), index=names, columns=names),
        layer_norms=pd.DataFrame({g: v.sqrt().numpy() for g, v in squares.items()}, index=names).T,
        interference=pd.DataFrame(sti_rows, columns=["key", "shape", "sti"]),
    )


def _name(model: ModelLike, i: int) -> str:
    return Path(model).name if isinstance(model, (str, os.PathLike)) else f"model {i}"


def write_heatmap(frame: pd.DataFrame, path: str | os.PathLike, title: str, cmap: str = "viridis",
                  vmin: float | None = None, vmax: float | None = None) -> Path:
    """A PNG heatmap of ``frame`` with its values written in the cells (when small enough to read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = frame.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * cols + 2.5), max(3.0, 0.4 * rows + 1.5)))
    image = ax.imshow(frame.to_numpy(dtype=float), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(cols), [str(c) for c in frame.columns], rotation=45, ha="right")
    ax.set_yticks(range(rows), [str(r) for r in frame.index])
    if rows * cols <= 400:
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{frame.iat[i, j]:.2g}", ha="center", va="center", fontsize=7, color="white")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_inspection(report: Inspection, out_dir: str | os.PathLike, extras: Sequence = ()) -> list[Path]:
    """CSV tables and PNG heatmaps (cosine, sign conflicts, per-layer norms) of a report, into ``out_dir`` (a new or
    empty folder: written in a temporary folder and renamed, so no file of the user's is overwritten). ``extras``:
    more diagnostics written into the same folder, each by its ``write_into(folder) -> [file names]``."""
    from merge3.models import atomic_dir

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        written = []
        for name in ("cosine", "sign_conflicts", "layer_norms", "interference"):
            getattr(report, name).to_csv(tmp / f"{name}.csv", index=name != "interference")
            written.append(f"{name}.csv")
        write_heatmap(report.cosine, tmp / "cosine.png", "task-vector cosine similarity", "coolwarm", -1, 1)
        write_heatmap(report.sign_conflicts, tmp / "sign_conflicts.png", "sign-conflict rate", "magma", 0, 1)
        write_heatmap(report.layer_norms, tmp / "layer_norms.png", "task-vector norm per layer")
        written += ["cosine.png", "sign_conflicts.png", "layer_norms.png"]
        for extra in extras:
            written += extra.write_into(tmp)
    return [out / name for name in written]


__all__ = ["Inspection", "inspect_models", "write_heatmap", "write_inspection"]
