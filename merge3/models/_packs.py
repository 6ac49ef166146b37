"""Skill packs: a fine-tune stored as its base plus the low-rank factors of its task vector (TSV-C).

A pack is a folder ``PACKS/<task>/``::

    pack.json             format, task, the base's path and weights sha256, ranks per layer, bytes before/after
    factors.safetensors   per 2-D tensor K: ``K::U`` (m × k), ``K::S`` (k), ``K::Vh`` (k × n); per other float
                          tensor: ``K::delta`` (dense); integer buffers are the base's
    config.json …         the base's config and tokenizer files (so a pack is a model folder like any other)

``open_lazy`` (and so every loader: ``load_state_dict``, ``load_model``, merges, searches, calibration) reads a pack
as the model it stands for, θ₀ + U diag(S) Vᵀ per tensor, after checking that the base at the recorded path still
has the recorded weights. A merge or search whose own base is another model refuses the pack.

>>> import tempfile, torch, merge3.models as mm
>>> d = tempfile.mkdtemp()
>>> _ = mm.save_state_dict({"w": torch.zeros(8, 8)}, d + "/base")
>>> _ = mm.save_state_dict({"w": torch.diag(torch.arange(8.0, 0.0, -1.0))}, d + "/ft")
>>> packs = mm.compress_models(d + "/base", {"ft": d + "/ft"}, d + "/packs", rank=2)
>>> mm.load_state_dict(d + "/packs/ft")["w"].diagonal().tolist()
[8.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from merge3._errors import Merge3Error

PACK_FILE, FACTORS = "pack.json", "factors.safetensors"
FORMAT = "merge3-skill-pack"
_SEP = "::"
_HASHES: dict[tuple, str] = {}  # (path, files' mtimes and sizes) → weights sha256: a base is hashed once per change


def is_pack(path: str | os.PathLike) -> bool:
    return (Path(path) / PACK_FILE).is_file()


def pack_base(path: str | os.PathLike) -> Path:
    """The base model folder a skill pack was made from."""
    return Path(_read_manifest(Path(path))["base"].get("path", ""))


def truncated_svd(delta: torch.Tensor, rank: int | None = None, energy: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of a 2-D delta cut to ``rank`` singular triplets, or to the fewest that keep ``energy`` of its
    squared Frobenius norm (computed in float64; returned in float32).

    >>> u, s, vh = truncated_svd(torch.diag(torch.tensor([3., 1., 0.])), energy=0.9)
    >>> s.tolist(), tuple(u.shape), tuple(vh.shape)
    ([3.0], (3, 1), (1, 3))
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if rank is None:
        share = torch.cumsum(s**2, 0) / max(float((s**2).sum()), 1e-300)
        rank = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype) - 1e-12)) + 1
    rank = max(1, min(rank, len(s)))
    return u[:, :rank].float().contiguous(), s[:rank].float().contiguous(), vh[:rank].float().contiguous()


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of the weights of the model at ``path`` (names, dtypes, shapes, bytes), cached while its files do not
    change."""
    from merge3.models._io import open_lazy, state_dict_sha256, weight_files

    path = Path(path).resolve()
    files = weight_files(path)
    key = (str(path), *((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if key not in _HASHES:
        _HASHES[key] = state_dict_sha256(open_lazy(path))
    return _HASHES[key]


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / PACK_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Merge3Error(f"skill pack '{path}': {PACK_FILE} cannot be read ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("base"), dict):
        raise Merge3Error(f"skill pack '{path}': {PACK_FILE} is not a merge3 skill-pack manifest")
    return manifest


class PackStateDict(Mapping[str, torch.Tensor]):
    """A skill pack read as the model it stands for: θ₀[k] + U diag(S) Vh (or + delta), one tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        from merge3.models._io import open_lazy

        self.path = Path(path)
        manifest = _read_manifest(self.path)
        base_path = Path(manifest["base"].get("path", ""))
        self.base_sha256 = manifest["base"].get("sha256")
        if not base_path.exists():
            raise Merge3Error(f"skill pack '{self.path}': its base '{base_path}' does not exist")
        if weights_sha256(base_path) != self.base_sha256:
            raise Merge3Error(f"skill pack '{self.path}': its base '{base_path}' has changed since the pack was made "
                              "(weights sha256 differs): rebuild the pack from the base it belongs to")
        self.base = open_lazy(base_path)
        self.factors = open_lazy(self.path / FACTORS)
        self._stored = set(self.factors)
        present = {k.split(_SEP)[0] for k in self._stored}
        floats = [k for k in self.base if self.base.dtype(k).is_floating_point]
        missing = [k for k in floats if k not in present]
        if missing:
            raise Merge3Error(f"skill pack '{self.path}' is missing layer '{missing[0]}' of its base")
        extra = sorted(present - set(floats))
        if extra:
            raise Merge3Error(f"skill pack '{self.path}' has tensor '{extra[0]}', which its base does not have")

    def __getitem__(self, key: str) -> torch.Tensor:
        base = self.base[key]
        if not base.is_floating_point():
            return base
        if f"{key}{_SEP}delta" in self._stored:
            delta = self.factors[f"{key}{_SEP}delta"].float()
        else:
            u, s, vh = (self.factors[f"{key}{_SEP}{part}"] for part in ("U", "S", "Vh"))
            fits = u.shape[0] == base.shape[0] and vh.shape[1] == base.shape[1] and u.shape[1] == len(s) == vh.shape[0]
            if not fits:
                raise Merge3Error(f"skill pack '{self.path}': the factors of '{key}' do not fit its shape "
                                  f"{tuple(base.shape)}")
            delta = (u * s) @ vh
        return (base.float() + delta.reshape(base.shape)).to(base.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)


def check_pack_base(base_path: str | os.PathLike | None, endpoint_paths, where: str = "models") -> None:
    """Every skill pack among ``endpoint_paths`` must have been made from ``base_path`` (same weights sha256)."""
    packs = [p for p in endpoint_paths if p is not None and is_pack(p)]
    if not packs:
        return
    if base_path is None:
        raise Merge3Error(f"{where}: skill pack '{packs[0]}' is a task vector: it needs its base model")
    base_sha = weights_sha256(base_path)
    for pack in packs:
        if _read_manifest(Path(pack))["base"].get("sha256") != base_sha:
            raise Merge3Error(f"{where}: skill pack '{pack}' was made from another base than '{base_path}' "
                              "(weights sha256 differs)")


def compress_models(base: str | os.PathLike, models: Mapping[str, str | os.PathLike], out: str | os.PathLike, *,
                    rank: int | None = None, energy: float | None = None) -> dict:
    """Write one skill pack per model into ``out`` (atomically, refusing a non-empty ``out``) and return the manifest
    (``out/manifest.json``: per task its ranks per layer and bytes before/after).

    Every 2-D float tensor of a task vector keeps ``rank`` singular triplets, or the fewest that keep ``energy`` of
    its squared norm, or by default ``max(1, r // T)`` for T tasks (TSV-C's choice); where the factors would not be
    smaller than the matrix (a rank at or near the matrix's own, e.g. a 2-row embedding) the delta is kept whole, as
    are other float tensors (``ranks`` lists the factorised ones). A ``rank`` above every layer's rank is refused.
    """
    from merge3.models._io import atomic_dir, check_folder_name, copy_model_files, open_lazy
    from merge3.models._task_vectors import check_compatible, check_finite

    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise Merge3Error(f"--rank {rank}: a rank must be a positive integer")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise Merge3Error(f"--energy {energy} is outside (0, 1]")
    if rank is not None and energy is not None:
        raise Merge3Error("give --rank or --energy, not both")
    if not models:
        raise Merge3Error("compress: give at least one fine-tuned model")
    for name in models:
        check_folder_name(name, "compress: task name")
    base_path = Path(base).resolve()
    base_sd = open_lazy(base_path)
    lazies = {name: open_lazy(p) for name, p in models.items()}
    check_compatible(base_sd, list(lazies.values()), names=[str(p) for p in models.values()],
                     reference_name=str(base))
    for name, weights in [(str(base), base_sd), *((str(models[n]), m) for n, m in lazies.items())]:
        check_finite(weights, name)
    two_d = [k for k in base_sd if base_sd.dtype(k).is_floating_point and len(base_sd.shape(k)) == 2]
    if rank is not None and two_d and all(rank > min(base_sd.shape(k)) for k in two_d):
        k = max(two_d, key=lambda key: min(base_sd.shape(key)))
        raise Merge3Error(f"--rank {rank} is above the rank of every layer (the largest: '{k}', rank "
                          f"{min(base_sd.shape(k))}, shape {'×'.join(map(str, base_sd.shape(k)))})")
    base_hash = weights_sha256(base_path)
    manifest = {"format": "merge3-skill-packs", "base": {"path": str(base_path), "sha256": base_hash},
                "rank": rank, "energy": energy, "tasks": {}}
    with atomic_dir(out) as tmp:
        for name, model in lazies.items():
            folder = tmp / name
            folder.mkdir()
            info = _write_pack(folder, base_sd, model, two_d, rank, energy, len(models))
            info.update(format=FORMAT, task=name, base={"path": str(base_path), "sha256": base_hash},
                        source={"path": str(Path(models[name]).resolve())})
            (folder / PACK_FILE).write_text(json.dumps(info, indent=2) + "\n")
            if base_path.is_dir():
                copy_model_files(base_path, folder)
            manifest["tasks"][name] = {k: info[k] for k in ("bytes", "dense_bytes", "ranks")}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_pack(folder: Path, base, model, two_d: list[str], rank, energy, n_tasks: int) -> dict:
    tensors, ranks, dense = {}, {}, 0
    for key in base:
        if not base.dtype(key).is_floating_point:
            continue
        delta = model[key].float() - base[key].float()
        dense += delta.numel() * base[key].element_size()
        if key in two_d:
            k = rank if (rank is not None or energy is not None) else max(1, min(delta.shape) // n_tasks)
            u, s, vh = truncated_svd(delta, None if energy is not None else k, energy)
            m, n = delta.shape
            if len(s) * (m + n + 1) < m * n:  # factors only where they are smaller than the matrix itself
                tensors.update({f"{key}{_SEP}U": u, f"{key}{_SEP}S": s, f"{key}{_SEP}Vh": vh})
                ranks[key] = len(s)
                continue
        tensors[f"{key}{_SEP}delta"] = delta.contiguous()
    save_file(tensors, str(folder / FACTORS))
    return {"ranks": ranks, "bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "dense_bytes": dense,
            "rank": rank, "energy": energy}
