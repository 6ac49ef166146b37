"""Cheap full-bank accuracy estimates from a few answers: naive, IRT, p-IRT, gp-IRT, mp-IRT and gmp-IRT.

Everything that needs data is fitted once by :meth:`Estimator.calibrate` (IRT parameters, subsets with weights,
gp-IRT λ* and gmp-IRT δ per task and subset size, endpoint abilities); estimating a candidate is then one cheap call
(a few Newton steps on D or K numbers), :meth:`Estimator.estimate`.

For a candidate with answers y on the subset S_t (n_t of the N_t items of task t):

- ``naive``: Σ_{j∈S_t} w_j y_j (subset weights: 1/n for random subsets, cluster shares for anchors).
- ``irt``: mean_{j∈t} P_j(θ̂), θ̂ the MAP ability from all seen answers, calibration population as prior.
- ``p-irt``: (n_t/N_t)·mean(y_S) + (1 − n_t/N_t)·mean_{j∈t∖S} P_j(θ̂).
- ``gp-irt``: λ*·naive + (1 − λ*)·p-irt. ``gp_lambda="validation"`` (default) fits λ* per task in closed form to
  minimise the validation MSE of the blend; ``"tinybenchmarks"`` uses λ* = b²/(b² + v/(c·n)), b² the p-IRT
  validation MSE, v the naive's per-item variance (mean ȳ(1 − ȳ) over validation subjects, finite-population
  corrected), c = 4 for anchor subsets and 1 for random ones. On synthetic banks the validation fit is the better.
- ``mp-irt`` (MERGE³): θ = Σ_k λ_k θ_k over the endpoints' abilities, λ fitted on the candidate's answers by MAP
  with a N(1/K, s²) prior. The official code runs unconstrained BFGS from 1/K (``mp_prior_scale=None``); the
  default ``"auto"`` picks s from (0.5, 1, 2, 5, unconstrained) by validation MSE, per subset, since the right
  amount of pull toward the plain average depends on how far merges stray from the endpoints' span.
- ``gmp-irt``: δ·naive + (1 − δ)·mp-irt with δ fitted per task on validation subjects (closed-form MSE minimiser;
  the official code fixes δ = 0.5).

>>> import numpy as np
>>> from merge3.itembank._synthetic_irt import simulate_bank
>>> from merge3.itembank import IRTFit
>>> bank = simulate_bank(n_subjects=60, items_per_task=60, tasks=("x", "y"), seed=1)
>>> est = Estimator.calibrate(bank.responses, bank.tasks, ns=(10,), fit=IRTFit(kind="2pl"), endpoints=[0, 1], seed=0)
>>> answers = {i: bool(bank.responses[5, i]) for i in est.items(as_indices=True)}
>>> e = est.estimate(answers, "gp-irt")
>>> e.items_evaluated, sorted(e.per_task), 0 <= e.overall <= 1
(20, ['x', 'y'], True)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from merge3._errors import Merge3Error
from merge3.models import plain, write_text_atomic
from merge3.itembank._irt import IRTModel, map_logistic
from merge3.itembank._irt_fit import (
    IRTFit,
    _check_enough_subjects,
    _check_kind,
    _defaults,
    _fit_map,
    _split_subjects,
    _to_model,
    select_dims,
)
from merge3.itembank._responses import _warn_constant_items, check_item_ids, check_tasks, response_matrix, task_order
from merge3.itembank._subsets import SUBSET_METHODS, Subset, select_subset

ESTIMATORS = ("naive", "irt", "p-irt", "gp-irt", "mp-irt", "gmp-irt")
_NEEDS_ENDPOINTS = ("mp-irt", "gmp-irt")
GP_LAMBDA_RULES = ("validation", "tinybenchmarks")
MP_PRIOR_GRID = (0.5, 1.0, 2.0, 5.0, None)  # None: unconstrained, as the official MERGE³ code
FORMAT = "merge3-estimator"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Estimate:
    """A candidate's estimated accuracy per task and overall (mean of the per-task values)."""

    per_task: dict[str, float]
    overall: float
    items_evaluated: int
    method: str
    subset: str = ""
    n: int = 0


@dataclass
class Estimator:
    """Everything fitted at calibration; :meth:`estimate` turns a candidate's subset answers into an estimate."""

    model: IRTModel
    subsets: dict[tuple[str, int], Subset]
    constants: dict[tuple[str, int], dict[str, dict[str, float]]]  # (subset, n) → {"lambda"|"delta": task → value}
    endpoint_theta: np.ndarray | None = None
    endpoint_ids: list[str] | None = None
    mp_prior_scale: float | str | None = "auto"
    gp_lambda: str = "validation"
    default_method: str = "gp-irt"
    default_subset: str = "anchor-irt"
    default_n: int = 20
    diagnostics: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------------------------
    # Calibration

    @classmethod
    def calibrate(
        cls,
        responses: Any,
        tasks: Sequence[Any],
        *,
        item_ids: Sequence[Any] | None = None,
        subject_ids: Sequence[Any] | None = None,
        task_names: Sequence[str] | None = None,
        mask: Any = None,
        endpoints: Sequence[int | str] | None = None,
        ns: Sequence[int] = (20,),
        subset_methods: Sequence[str] = ("anchor-irt",),
        fit: IRTFit = IRTFit(),
        seed: int = 0,
        validation_fraction: float = 0.2,
        mp_prior_scale: float | str | None = "auto",
        gp_lambda: str = "validation",
    ) -> "Estimator":
        """Fit IRT, pick subsets for every (subset method, n) and fit λ*/δ on held-out validation subjects.

        ``responses``: calibration subjects × items, 0/1 with NaN (or ``mask`` False) for missing answers.
        ``endpoints``: the subjects (indices or ``subject_ids``) whose abilities mp-IRT mixes; they always stay in
        the training split. A seeded ``validation_fraction`` of the other subjects is held out: it chooses D
        (``dims="auto"``) and fits λ*/δ against the IRT model fitted on the rest. ``refit`` then refits the chosen
        model on all subjects (subsets and λ*/δ are kept; they were fitted one step more pessimistically).
        ``fit`` says how the item model is fitted (``IRTFit``: kind, dimension, optimiser, backend, refit).
        """
        if not isinstance(fit, IRTFit):
            raise Merge3Error(f"fit must be an IRTFit (e.g. IRTFit(kind='2pl')), got {fit!r}")
        kind, dims, dims_grid, backend, refit = fit.kind, fit.dims, fit.dims_grid, fit.backend, fit.refit
        _check_kind(kind, dims)
        if backend != "torch" and not refit:
            raise Merge3Error(f"backend {backend!r} fits the final model on all subjects: it needs refit=True")
        Y, M = response_matrix(responses, mask)
        S, N = Y.shape
        ids = check_item_ids(item_ids, N)
        labels = check_tasks(tasks, N, task_names)
        subj = [str(i) for i in range(S)] if subject_ids is None else [str(s) for s in subject_ids]
        if len(subj) != S:
            raise Merge3Error(f"{len(subj)} subject ids for {S} subjects")
        ends = _endpoint_indices(endpoints, subj)
        ns = sorted({int(n) for n in ns})
        if not ns or ns[0] < 1:
            raise Merge3Error(f"ns (items per task) must be positive integers, got {ns}")
        for m in subset_methods:
            if m not in SUBSET_METHODS:
                raise Merge3Error(f"unknown subset method {m!r}; use one of {SUBSET_METHODS}")
        n_const = _warn_constant_items(Y, M, ids)
        epochs, lr = _defaults(fit.optimizer, fit.epochs, fit.lr)
        fit_kw = dict(kind=kind, seed=seed, optimizer=fit.optimizer, epochs=epochs, lr=lr, positive_a=fit.positive_a)

        train, val = _split_subjects(S, validation_fraction, seed, keep_in_train=ends)
        if val.size < 2:
            raise Merge3Error(
                f"{S} calibration subjects leave too few for validation (need ≥ 2 non-endpoint subjects held out); "
                "add calibration subjects or raise validation_fraction"
            )
        selection = None
        if kind == "mirt" and dims in ("auto", None):
            D, selection, fits = select_dims(Y, M, train, val, dims_grid, **fit_kw)
            fitted = fits[D]
        else:
            D = 1 if kind != "mirt" else int(dims)
            _check_enough_subjects(train.size, D)
            fitted = _fit_map(Y[train], M[train], D=D, **fit_kw)
        meta = {**fit_kw, "backend": backend, "dims": dims, "n_subjects": S, "train_subjects": [subj[i] for i in train],
                "validation_subjects": [subj[i] for i in val], "validation_fraction": validation_fraction}
        model = _to_model(fitted, kind, ids, labels, [subj[i] for i in train], meta)
        pos = {int(s): k for k, s in enumerate(train)}
        theta_e = model.theta[[pos[e] for e in ends]] if ends else None

        subsets = {
            (m, n): select_subset(labels, n, method=m, seed=seed, model=model, responses=np.where(M, Y, np.nan)[train])
            for m in subset_methods
            for n in ns
        }
        if gp_lambda not in GP_LAMBDA_RULES:
            raise Merge3Error(f"unknown gp_lambda rule {gp_lambda!r}; use one of {GP_LAMBDA_RULES}")
        est = cls(model, subsets, {}, theta_e, [subj[e] for e in ends] or None, mp_prior_scale, gp_lambda,
                  default_subset=subset_methods[0], default_n=20 if 20 in ns else ns[0])
        est.diagnostics["validation"] = est._fit_constants(Y[val], M[val])
        est.diagnostics["constant_items"] = n_const
        if selection is not None:
            est.model.diagnostics["dims_selection"] = selection
        if refit:
            final = _final_fit(Y, M, D, backend, fit_kw)
            final.diagnostics["dims_selection"] = selection
            final.diagnostics["validation_fit"] = fitted.diagnostics
            est.model = _to_model(final, kind, ids, labels, subj, {**meta, "refit_on_all_subjects": True})
            est.endpoint_theta = est.model.theta[ends] if ends else None
        est.metadata = {"seed": seed, "ns": ns, "subset_methods": list(subset_methods), "refit": refit,
                        "backend": backend}
        return est

    def _fit_constants(self, Yv: np.ndarray, Mv: np.ndarray) -> dict:
        """λ* (gp-IRT) and δ (gmp-IRT) per task for every subset, from validation subjects; returns diagnostics."""
        truth = _task_accuracy(Yv, Mv, self.model.tasks, self.task_names)
        report = {}
        for key, subset in self.subsets.items():
            methods = ["naive", "irt", "p-irt"]
            est = self._core(Yv, Mv, subset, methods, constants=None)
            err = {m: est[m] - truth for m in methods}
            scale = self._choose_mp_scale(Yv, Mv, subset, truth)
            if scale is not False:
                err["mp-irt"] = self._core(Yv, Mv, subset, ["mp-irt"], {"mp_prior_scale": scale})["mp-irt"] - truth
            lam, delta = {}, {}
            for k, t in enumerate(self.task_names):
                n_t, N_t = int((subset.tasks == t).sum()), int((self.model.tasks == t).sum())
                if self.gp_lambda == "validation":
                    lam[t] = 1.0 if n_t >= N_t else _blend_weight(err["naive"][:, k], err["p-irt"][:, k])
                else:
                    lam[t] = _gp_lambda(err["p-irt"][:, k], truth[:, k], n_t, N_t, subset.method)
                if "mp-irt" in err:
                    delta[t] = _blend_weight(err["naive"][:, k], err["mp-irt"][:, k])
            self.constants[key] = {"lambda": lam, **({"delta": delta, "mp_prior_scale": scale} if delta else {})}
            everything = ["naive", "irt", "p-irt", "gp-irt"] + (list(_NEEDS_ENDPOINTS) if delta else [])
            full = self._core(Yv, Mv, subset, everything, self.constants[key])
            report[f"{key[0]}/n={key[1]}"] = {
                m: {"mae_overall": float(np.abs(v.mean(1) - truth.mean(1)).mean()), "mae_task": float(np.abs(v - truth).mean())}
                for m, v in full.items()
            }
        return {"n_subjects": int(Yv.shape[0]), "errors": report}

    def _choose_mp_scale(self, Yv, Mv, subset: Subset, truth: np.ndarray) -> float | None | bool:
        """mp-IRT prior scale on λ: the fixed one, or ("auto") the grid value with the lowest validation MSE."""
        if self.endpoint_theta is None:
            return False
        if self.mp_prior_scale != "auto":
            return self.mp_prior_scale
        mse = {}
        for s in MP_PRIOR_GRID:
            v = self._core(Yv, Mv, subset, ["mp-irt"], {"mp_prior_scale": s})["mp-irt"]
            mse[s] = float(((v - truth) ** 2).mean())
        return min(mse, key=mse.get)

    def with_model(self, model: IRTModel) -> "Estimator":
        """This estimator on a refitted item model (online recalibration): subsets and λ*/δ stay, the endpoints'
        abilities are read from the refit (their subject ids)."""
        import dataclasses

        theta_e = self.endpoint_theta
        if self.endpoint_ids and model.subject_ids:
            where = {s: k for k, s in enumerate(model.subject_ids)}
            theta_e = model.theta[[where[s] for s in self.endpoint_ids]]
        return dataclasses.replace(self, model=model, endpoint_theta=theta_e)

    # ------------------------------------------------------------------------------------------------------------
    # Estimation

    @property
    def task_names(self) -> list[str]:
        return task_order(self.model.tasks)

    def subset(self, n: int | None = None, subset: str | None = None) -> Subset:
        """The calibrated subset for (``subset`` method, ``n``), defaults as calibrated."""
        key = (subset or self.default_subset, int(n or self.default_n))
        if key not in self.subsets:
            raise Merge3Error(f"no calibrated subset {key[0]!r} with n={key[1]}; calibrated: {sorted(self.subsets)}")
        return self.subsets[key]

    def items(self, n: int | None = None, subset: str | None = None, *, as_indices: bool = False) -> list:
        """The items a candidate must answer (ids, or indices into the bank)."""
        idx = self.subset(n, subset).indices
        return idx.tolist() if as_indices else [self.model.item_ids[i] for i in idx]

    def estimate(
        self,
        answers: Mapping[Any, Any],
        method: str | None = None,
        *,
        n: int | None = None,
        subset: str | None = None,
    ) -> Estimate:
        """Estimate full-bank accuracy from ``answers`` {item id or index: correct} covering :meth:`items`.

        Answers to items outside the subset are ignored; a missing subset item is an error.
        """
        method = method or self.default_method
        sub = self.subset(n, subset)
        y = self._answer_vector(answers, sub)
        out = self.estimate_matrix(y[None, :], method, n=sub.n, subset=sub.method, subset_only=True)[0]
        per_task = {t: float(v) for t, v in zip(self.task_names, out)}
        return Estimate(per_task, float(np.mean(out)), sub.n_items, method, sub.method, sub.n)

    def estimate_matrix(
        self,
        responses: Any,
        method: str | None = None,
        *,
        n: int | None = None,
        subset: str | None = None,
        subset_only: bool = False,
    ) -> np.ndarray:
        """Per-task estimates (C, T) for many candidates at once.

        ``responses``: (C, N) over the whole bank (only subset columns are read; NaN = not answered) or, with
        ``subset_only``, (C, k) in the order of :meth:`items`.
        """
        method = method or self.default_method
        if method not in ESTIMATORS:
            raise Merge3Error(f"unknown estimator {method!r}; use one of {ESTIMATORS}")
        if method in _NEEDS_ENDPOINTS and self.endpoint_theta is None:
            raise Merge3Error(f"estimator {method!r} needs endpoint abilities: calibrate with endpoints=[...]")
        sub = self.subset(n, subset)
        R = np.asarray(responses, dtype=np.float64)
        if R.ndim != 2:
            raise Merge3Error(f"responses must be 2-D (candidates × items), got shape {R.shape}")
        if subset_only:
            if R.shape[1] != sub.n_items:
                raise Merge3Error(f"{R.shape[1]} answers for a subset of {sub.n_items} items")
            full = np.full((R.shape[0], self.model.n_items), np.nan)
            full[:, sub.indices] = R
            R = full
        elif R.shape[1] != self.model.n_items:
            raise Merge3Error(f"responses have {R.shape[1]} items, the bank {self.model.n_items}")
        if not (~np.isnan(R[:, sub.indices])).any(1).all():
            raise Merge3Error("every candidate needs at least one answer on the subset items")
        Y, M = response_matrix(R)
        return self._core(Y, M, sub, [method], self.constants.get((sub.method, sub.n)))[method]

    def _answer_vector(self, answers: Mapping[Any, Any], sub: Subset) -> np.ndarray:
        index = {iid: j for j, iid in enumerate(self.model.item_ids)}
        y = np.full(self.model.n_items, np.nan)
        for key, value in answers.items():
            j = index.get(key) if isinstance(key, str) else int(key) if isinstance(key, (int, np.integer)) else None
            if j is None or not 0 <= j < self.model.n_items:
                raise Merge3Error(f"unknown item {key!r} in answers")
            try:
                v = float(value)
            except (TypeError, ValueError):
                v = math.nan
            if v not in (0.0, 1.0):
                raise Merge3Error(f"answer for item {key!r} must be correct/incorrect (bool or 0/1), got {value!r}")
            y[j] = v
        missing = [self.model.item_ids[j] for j in sub.indices if np.isnan(y[j])]
        if missing:
            raise Merge3Error(
                f"answers miss {len(missing)} of the {sub.n_items} subset items ({sub.method}, n={sub.n}), e.g. {missing[:5]}"
            )
        return y[sub.indices]

    def _core(self, Y, M, subset: Subset, methods: Sequence[str], constants: dict | None) -> dict[str, np.ndarray]:
        """All requested estimators for every row of (Y, M), per task: {method: (C, T)}."""
        model, names = self.model, self.task_names
        idx, w = subset.indices, subset.weights
        Ys, Ms = Y[:, idx], M[:, idx]
        out: dict[str, np.ndarray] = {}
        naive = task_means(Ys, Ms, subset.tasks, names, w)
        if {"irt", "p-irt", "gp-irt"} & set(methods):
            prec = np.linalg.inv(model.theta_cov)
            theta = map_logistic(model.a[idx], model.b[idx], Ys, Ms, model.theta_mean, prec)
            P = model.predict(theta)
            out["irt"] = np.stack([P[:, model.tasks == t].mean(1) for t in names], 1)
            out["p-irt"] = self._pirt(P, Y, M, subset)
            if "gp-irt" in methods:
                out["gp-irt"] = _blend(naive, out["p-irt"], constants, "lambda", names)
        if {"mp-irt", "gmp-irt"} & set(methods):
            E = self.endpoint_theta
            K = E.shape[0]
            s = (constants or {}).get("mp_prior_scale", self.mp_prior_scale)
            s = 1.0 if s == "auto" else s
            prec = np.eye(K) * (1e-6 if s is None else 1.0 / s**2)
            lam = map_logistic(model.a[idx] @ E.T, model.b[idx], Ys, Ms, np.full(K, 1.0 / K), prec)
            out["mp-irt"] = self._pirt(model.predict(lam @ E), Y, M, subset)
            if "gmp-irt" in methods:
                out["gmp-irt"] = _blend(naive, out["mp-irt"], constants, "delta", names)
        out["naive"] = naive
        bad = [m for m in methods if not np.isfinite(out[m]).all()]
        if bad:
            raise Merge3Error(f"estimator(s) {bad} produced non-finite values; check the answers and the calibration")
        return {m: out[m] for m in methods}

    def _pirt(self, P: np.ndarray, Y: np.ndarray, M: np.ndarray, subset: Subset) -> np.ndarray:
        """(n/N)·mean of the seen answers + (1 − n/N)·mean predicted P over the task's other items."""
        cols = []
        for t in self.task_names:
            items = np.flatnonzero(self.model.tasks == t)
            seen = subset.indices[subset.tasks == t]
            O = M[:, seen]  # seen and actually answered
            n_o, N_t = O.sum(1), items.size
            seen_mean = (Y[:, seen] * O).sum(1) / np.maximum(n_o, 1)
            rest = P[:, items].sum(1) - (P[:, seen] * O).sum(1)
            unseen_mean = rest / np.maximum(N_t - n_o, 1)
            cols.append((n_o / N_t) * seen_mean + (1 - n_o / N_t) * unseen_mean)
        return np.stack(cols, 1)

    # ------------------------------------------------------------------------------------------------------------
    # Persistence

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the IRT model (``irt.json``, ``irt_params.npz``) and ``estimator.json`` into ``folder``."""
        folder = Path(folder)
        self.model.save(folder)
        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "defaults": {"method": self.default_method, "subset": self.default_subset, "n": self.default_n},
            "mp_prior_scale": self.mp_prior_scale,
            "gp_lambda": self.gp_lambda,
            "endpoint_ids": self.endpoint_ids,
            "endpoint_theta": None if self.endpoint_theta is None else self.endpoint_theta.tolist(),
            "subsets": [s.to_json() for s in self.subsets.values()],
            "constants": [{"subset": k[0], "n": k[1], **v} for k, v in self.constants.items()],
            "diagnostics": plain(self.diagnostics, nonfinite_as_none=True),
            "metadata": plain(self.metadata, nonfinite_as_none=True),
        }
        write_text_atomic(folder / "estimator.json", json.dumps(doc, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Estimator":
        """Read an estimator written by :meth:`save`."""
        folder = Path(folder)
        path = folder / "estimator.json"
        if not path.exists():
            raise Merge3Error(f"no calibrated estimator in {folder}: estimator.json is missing (run calibration)")
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Merge3Error(f"{path} cannot be read ({e}): recalibrate the bank") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise Merge3Error(f"{path} is not a merge3 estimator (format {got!r})")
        subsets = {(s.method, s.n): s for s in map(Subset.from_json, doc["subsets"])}
        constants = {(c["subset"], int(c["n"])): {k: v for k, v in c.items() if k not in ("subset", "n")} for c in doc["constants"]}
        d = doc["defaults"]
        theta_e = doc["endpoint_theta"]
        return cls(
            IRTModel.load(folder),
            subsets,
            constants,
            None if theta_e is None else np.asarray(theta_e, dtype=np.float64),
            doc["endpoint_ids"],
            doc["mp_prior_scale"],
            doc["gp_lambda"],
            d["method"],
            d["subset"],
            int(d["n"]),
            doc["diagnostics"],
            doc["metadata"],
        )

    def summary(self) -> str:
        """Human-readable summary: the IRT fit, subsets, λ*/δ and validation errors."""
        lines = [self.model.summary()]
        for (m, n), c in sorted(self.constants.items()):
            lam = ", ".join(f"{t}={v:.2f}" for t, v in c["lambda"].items())
            lines.append(f"  subset {m} n={n}/task ({self.subsets[(m, n)].n_items} items): λ* {lam}")
            if "delta" in c:
                lines.append("      δ " + ", ".join(f"{t}={v:.2f}" for t, v in c["delta"].items()))
            errs = self.diagnostics.get("validation", {}).get("errors", {}).get(f"{m}/n={n}", {})
            if errs:
                lines.append("      validation MAE " + ", ".join(f"{k} {v['mae_overall']:.4f}" for k, v in errs.items()))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _final_fit(Y: np.ndarray, M: np.ndarray, D: int, backend: str, fit_kw: dict):
    """The fit on all subjects: our MAP (``torch``) or py-irt's SVI (``py-irt``, its own environment)."""
    if backend == "torch":
        return _fit_map(Y, M, D=D, **fit_kw)
    if backend == "py-irt":
        from merge3.itembank._pyirt import fit_pyirt

        return fit_pyirt(Y, M, kind=fit_kw["kind"], D=D, seed=fit_kw["seed"], epochs=2000, lr=0.1)
    raise Merge3Error(f"unknown IRT backend {backend!r}; use 'torch' or 'py-irt'")


def _endpoint_indices(endpoints: Sequence[int | str] | None, subject_ids: list[str]) -> list[int]:
    if not endpoints:
        return []
    pos = {s: i for i, s in enumerate(subject_ids)}
    out = []
    for e in endpoints:
        if isinstance(e, (int, np.integer)) and not isinstance(e, bool):
            i = int(e)
        elif str(e) in pos:
            i = pos[str(e)]
        else:
            raise Merge3Error(f"endpoint {e!r} is not a calibration subject")
        if not 0 <= i < len(subject_ids):
            raise Merge3Error(f"endpoint index {i} out of range for {len(subject_ids)} subjects")
        out.append(i)
    if len(set(out)) != len(out):
        raise Merge3Error(f"duplicate endpoints: {list(endpoints)}")
    return out


def task_means(Y: np.ndarray, M: np.ndarray, tasks: np.ndarray, names: Sequence[str],
               weights: np.ndarray | None = None) -> np.ndarray:
    """The naive estimate, the one place it is computed: per row and task, the (weighted) mean of the observed
    answers, (C, T). ``M`` marks which answers were observed; ``weights`` are item weights (1/n for a random subset,
    cluster shares for anchor points; None: plain means). A row with no observed answer on a task gets 0.

    >>> task_means(np.array([[1., 0., 1., 1.]]), np.ones((1, 4)), np.array(["a", "a", "b", "b"]), ["a", "b"]).tolist()
    [[0.5, 1.0]]
    """
    cols = []
    for t in names:
        chosen = tasks == t
        ww = M[:, chosen] if weights is None else M[:, chosen] * weights[chosen]
        cols.append((ww * Y[:, chosen]).sum(1) / np.maximum(ww.sum(1), 1e-300))
    return np.stack(cols, 1)


def _task_accuracy(Y: np.ndarray, M: np.ndarray, tasks: np.ndarray, names: list[str]) -> np.ndarray:
    """Observed per-task accuracy (C, T) of subjects that answered every task."""
    for t in names:
        if not M[:, tasks == t].any(1).all():
            raise Merge3Error(f"a validation subject has no answers on task {t!r}")
    return task_means(Y, M, tasks, names)


def _gp_lambda(err_pirt: np.ndarray, truth: np.ndarray, n: int, N: int, method: str) -> float:
    """λ* = b²/(b² + v/(c·n)): b² the p-IRT validation MSE, v the naive's per-item variance."""
    if n >= N:
        return 1.0  # the subset is the whole task: naive is exact
    b2 = float(np.mean(err_pirt**2))
    fpc = (N - n) / (N - 1)  # sampling without replacement
    v = float(np.mean(truth * (1 - truth))) * fpc
    c = 4.0 if method.startswith("anchor") else 1.0
    if b2 + v == 0:
        return 0.5
    return b2 / (b2 + v / (c * n))


def _blend_weight(err_a: np.ndarray, err_b: np.ndarray) -> float:
    """δ ∈ [0, 1] minimising the validation MSE of δ·a + (1 − δ)·b (closed form)."""
    d = err_b - err_a
    den = float(np.sum(d * d))
    if den < 1e-15:
        return 0.5
    return float(np.clip(np.sum(err_b * d) / den, 0.0, 1.0))


def _blend(naive: np.ndarray, irt: np.ndarray, constants: dict | None, key: str, names: list[str]) -> np.ndarray:
    if constants is None or key not in constants:
        raise Merge3Error(f"no fitted {'λ*' if key == 'lambda' else 'δ'} for this subset: recalibrate")
    w = np.array([constants[key][t] for t in names])
    return w * naive + (1 - w) * irt

