"""Item response theory for cheap evaluation: 1PL, 2PL and multidimensional 2PL, fitted by full-batch MAP.

Model: ``P(y_ij = 1) = σ(a_jᵀ θ_i − b_j)`` with logits clipped to ±30. Subjects are models (endpoints, merges),
items are bank items. Priors are hierarchical: ``b_j ~ N(μ_b, σ_b²)``, ``log a_jd ~ N(0, σ_a²)`` (2PL and
positive multidimensional 2PL; ``a_jd ~ N(0, σ_a²)`` when a may be negative), ``θ_i ~ N(0, I)`` (1PL: ``N(0, σ_θ²)`` since a = 1 fixes the scale), with inverse-gamma
hyperpriors on every variance so that the joint MAP cannot collapse a scale to zero.

This module holds the model (its parameters, predictions, abilities by MAP, save and load) and the numerics it
shares with estimation; ``_responses`` checks inputs, ``_irt_fit`` fits (torch, imported when fitting, so that the
model loads in the separate py-irt cross-check environment too) and chooses the dimension, ``_pyirt`` is the optional
py-irt backend.

>>> import numpy as np
>>> from merge3.itembank import fit_irt
>>> rng = np.random.default_rng(0)
>>> theta, b = rng.normal(size=(60, 1)), rng.normal(size=200)
>>> y = rng.random((60, 200)) < 1 / (1 + np.exp(-(theta - b)))
>>> model = fit_irt(y, kind="2pl", seed=0)
>>> model.D, model.a.shape
(1, (200, 1))
>>> bool(np.corrcoef(model.b, b)[0, 1] > 0.9)
True
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from merge3._errors import Merge3Error
from merge3.itembank._responses import task_order
from merge3.models import plain, write_text_atomic

LOGIT_CLIP = 30.0
KINDS = ("1pl", "2pl", "mirt")
FORMAT = "merge3-irt"
FORMAT_VERSION = 1


class IRTConvergenceWarning(UserWarning):
    """The optimiser stopped at its iteration limit before the gradient tolerance was met."""


# ----------------------------------------------------------------------------------------------------------------
# Small numerics shared by fitting and estimation (numpy only)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function on logits clipped to ±30."""
    return 1.0 / (1.0 + np.exp(-np.clip(z, -LOGIT_CLIP, LOGIT_CLIP)))


def _loglik(z: np.ndarray, Y: np.ndarray) -> np.ndarray:
    z = np.clip(z, -LOGIT_CLIP, LOGIT_CLIP)
    return -np.logaddexp(0.0, np.where(Y > 0.5, -z, z))


def map_logistic(
    X: np.ndarray,
    c: np.ndarray,
    Y: np.ndarray,
    M: np.ndarray,
    mean: np.ndarray,
    precision: np.ndarray,
    *,
    iters: int = 50,
    tol: float = 1e-8,
) -> np.ndarray:
    """Batched MAP of ``x`` in ``P(y_j = 1) = σ(X_j x − c_j)`` with prior ``N(mean, precision⁻¹)``, per row of Y.

    Damped Newton: the objective is concave, so a few iterations with step halving converge. Used for abilities
    (X = a) and for mp-IRT mixing weights (X = a Θ_endpointsᵀ). Y, M: (C, N); returns (C, K).
    """
    C, K = Y.shape[0], X.shape[1]
    P = precision + 1e-8 * np.eye(K)

    def objective(x: np.ndarray) -> np.ndarray:
        d = x - mean
        return (_loglik(x @ X.T - c, Y) * M).sum(1) - 0.5 * np.einsum("ck,kl,cl->c", d, P, d)

    x = np.tile(np.asarray(mean, dtype=np.float64), (C, 1))
    f = objective(x)
    for _ in range(iters):
        p = sigmoid(x @ X.T - c)
        grad = ((Y - p) * M) @ X - (x - mean) @ P
        H = np.einsum("cn,nk,nl->ckl", p * (1 - p) * M, X, X) + P
        step = np.linalg.solve(H, grad[..., None])[..., 0]
        t = np.ones(C)
        for _ in range(40):
            x_new = x + t[:, None] * step
            f_new = objective(x_new)
            worse = f_new < f - 1e-12
            if not worse.any():
                break
            t[worse] *= 0.5
        moved = np.abs(t[:, None] * step).max()
        x, f = x_new, np.maximum(f_new, f)
        if moved < tol:
            break
    return x


# ----------------------------------------------------------------------------------------------------------------
# The fitted model


def _check_saved(arrays: dict[str, np.ndarray], n: int, params: Path) -> None:
    """Saved parameters whose shapes fit together, finite numbers only: a damaged calibration must not turn into
    NaN estimates (or a traceback) later."""
    for name in ("a", "b", "theta_mean", "theta_cov"):
        if name not in arrays:
            raise KeyError(name)
    D = arrays["theta_mean"].shape[0] if arrays["theta_mean"].ndim == 1 else 0
    want = {"a": (n, D), "b": (n,), "theta_mean": (D,), "theta_cov": (D, D)}
    for name, shape in want.items():
        if D < 1 or arrays[name].shape != shape:
            raise Merge3Error(f"{params}: '{name}' has shape {arrays[name].shape}, expected {shape} for {n} items "
                              f"and D = {D}: recalibrate the bank")
    for name, values in arrays.items():
        if not np.issubdtype(values.dtype, np.number) or not np.isfinite(values).all():
            raise Merge3Error(f"{params}: '{name}' holds NaN/Inf or non-numbers: recalibrate the bank")


@dataclass
class IRTModel:
    """Fitted item parameters (and calibration abilities) of an IRT model.

    ``a``: (N, D) discriminations, ``b``: (N,) difficulties (intercepts), ``theta``: (S, D) calibration abilities,
    ``theta_mean``/``theta_cov``: the population prior used for new subjects.

    >>> import numpy as np
    >>> m = IRTModel(a=np.ones((3, 1)), b=np.array([-1.0, 0.0, 1.0]), kind="2pl")
    >>> np.round(m.predict(np.zeros(1)), 3).tolist()
    [0.731, 0.5, 0.269]
    >>> theta = m.fit_ability([1, 1, 0], items=[0, 1, 2])
    >>> theta.shape
    (1,)
    """

    a: np.ndarray
    b: np.ndarray
    kind: str
    theta: np.ndarray | None = None
    item_ids: list[str] | None = None
    tasks: np.ndarray | None = None
    subject_ids: list[str] | None = None
    theta_mean: np.ndarray | None = None
    theta_cov: np.ndarray | None = None
    diagnostics: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.a = np.asarray(self.a, dtype=np.float64).reshape(len(self.b), -1)
        self.b = np.asarray(self.b, dtype=np.float64)
        if self.item_ids is None:
            self.item_ids = [str(j) for j in range(self.n_items)]
        if self.tasks is None:
            self.tasks = np.full(self.n_items, "all", dtype=object)
        self.tasks = np.asarray(self.tasks, dtype=object)
        if self.theta_mean is None:
            self.theta_mean = np.zeros(self.D)
        if self.theta_cov is None:
            self.theta_cov = np.eye(self.D)

    @property
    def D(self) -> int:
        return self.a.shape[1]

    @property
    def n_items(self) -> int:
        return self.b.shape[0]

    def logits(self, theta: np.ndarray, items: Sequence[int] | None = None) -> np.ndarray:
        """Clipped logits ``a_jᵀθ − b_j``; theta (D,) → (N,), (C, D) → (C, N)."""
        a, b = (self.a, self.b) if items is None else (self.a[np.asarray(items)], self.b[np.asarray(items)])
        theta = np.asarray(theta, dtype=np.float64)
        return np.clip(theta @ a.T - b, -LOGIT_CLIP, LOGIT_CLIP)

    def predict(self, theta: np.ndarray, items: Sequence[int] | None = None) -> np.ndarray:
        """P(correct) for ability ``theta`` ((D,) or (C, D)) on all items or on ``items``."""
        return sigmoid(self.logits(theta, items))

    def fit_ability(self, responses: Any, items: Sequence[int] | None = None, *, prior_scale: float = 1.0) -> np.ndarray:
        """MAP ability of new subject(s) from a few answers, with the calibration population as prior.

        ``responses``: (n,) or (C, n) 0/1 (NaN = not answered) on ``items`` (indices; default: all N items).
        ``prior_scale`` widens (>1) or narrows (<1) the prior. Returns (D,) or (C, D).
        """
        R = np.asarray(responses, dtype=np.float64)
        single = R.ndim == 1
        R = np.atleast_2d(R)
        idx = np.arange(self.n_items) if items is None else np.asarray(items, dtype=np.int64)
        if R.shape[1] != idx.size:
            raise Merge3Error(f"{R.shape[1]} answers for {idx.size} items")
        M = ~np.isnan(R)
        if (M & (R != 0) & (R != 1)).any():
            raise Merge3Error("answers must be 0/1 (NaN = not answered)")
        if not prior_scale > 0:
            raise Merge3Error(f"prior_scale must be > 0, got {prior_scale}")
        prec = np.linalg.inv(self.theta_cov * prior_scale**2)
        theta = map_logistic(self.a[idx], self.b[idx], np.where(M, R, 0.0), M, self.theta_mean, prec)
        return theta[0] if single else theta

    # -- persistence: JSON for everything readable, npz (no pickle) for arrays --

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``irt.json`` and ``irt_params.npz`` into ``folder`` (created if needed); returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"a": self.a, "b": self.b, "theta_mean": self.theta_mean, "theta_cov": self.theta_cov}
        if self.theta is not None:
            arrays["theta"] = self.theta
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "D": self.D,
            "item_ids": list(self.item_ids),
            "tasks": [str(t) for t in self.tasks],
            "subject_ids": None if self.subject_ids is None else list(self.subject_ids),
            "diagnostics": plain(self.diagnostics, nonfinite_as_none=True),
            "metadata": plain(self.metadata, nonfinite_as_none=True),
        }
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_text_atomic(folder / "irt_params.npz", buffer.getvalue())
        write_text_atomic(folder / "irt.json", json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "IRTModel":
        """Read a model written by :meth:`save`."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "irt.json").read_text())
        except FileNotFoundError as e:
            raise Merge3Error(f"no IRT model in {folder}: {e.filename} is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Merge3Error(f"{folder / 'irt.json'} cannot be read ({e}): recalibrate the bank") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise Merge3Error(f"{folder / 'irt.json'} is not a merge3 IRT model (format {got!r})")
        params = folder / "irt_params.npz"
        try:
            with np.load(params, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise Merge3Error(f"no IRT model in {folder}: {params} is missing") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a truncated or foreign .npz
            raise Merge3Error(f"{params} cannot be read ({type(e).__name__}: {e}): recalibrate the bank") from None
        try:
            _check_saved(arrays, len(meta["item_ids"]), params)
            return cls(a=arrays["a"], b=arrays["b"], kind=meta["kind"], theta=arrays.get("theta"),
                       item_ids=meta["item_ids"], tasks=np.asarray(meta["tasks"], dtype=object),
                       subject_ids=meta["subject_ids"], theta_mean=arrays["theta_mean"],
                       theta_cov=arrays["theta_cov"], diagnostics=meta["diagnostics"], metadata=meta["metadata"])
        except (KeyError, TypeError) as e:
            raise Merge3Error(f"IRT model in {folder}: {e.args[0]!r} is missing: recalibrate the bank") from None

    def summary(self) -> str:
        """One human-readable paragraph: kind, D, sizes, fit quality and the dimension-selection scores."""
        d = self.diagnostics
        lines = [
            f"IRT {self.kind} D={self.D}: {self.n_items} items, {d.get('n_subjects', '?')} subjects, "
            f"{len(task_order(self.tasks))} tasks",
            f"  fit: mean log-lik/answer {d.get('loglik_per_answer', float('nan')):.4f}, "
            f"{d.get('iterations', '?')} iterations, {d.get('seconds', float('nan')):.2f} s, "
            f"converged={d.get('converged')}",
        ]
        for D, s in (d.get("dims_selection") or {}).get("scores", {}).items():
            lines.append(
                f"  D={D}: held-out log-lik {s['heldout_loglik']:.4f} (−{s['gap']:.4f} ± {s['gap_se']:.4f} vs best), "
                f"accuracy error {s['heldout_acc_error']:.4f}"
            )
        return "\n".join(lines)


