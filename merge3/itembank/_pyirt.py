"""The optional py-irt backend (its own environment: py-irt pins Python < 3.12, pandas < 3, rich < 14): fit with
py-irt's hierarchical SVI and convert to merge3's parametrisation."""

from __future__ import annotations

import time

import numpy as np

from merge3._errors import Merge3Error
from merge3.itembank._irt import LOGIT_CLIP, _loglik
from merge3.itembank._irt_fit import _Fit

# ----------------------------------------------------------------------------------------------------------------
# Optional py-irt backend (separate environment: py-irt pins Python < 3.12, pandas < 3, rich < 14)

_PYIRT_MODELS = {"1pl": "1pl", "2pl": "2pl", "mirt": "multidim_2pl"}


def fit_pyirt(Y: np.ndarray, M: np.ndarray, *, kind: str, D: int, seed: int, epochs: int, lr: float) -> _Fit:
    """Fit with py-irt's hierarchical SVI and convert to our parametrisation.

    py-irt's logit is ``Σ_d γ_jd (θ_id − β_jd)`` (1PL/2PL: ``γ_j (θ_i − β_j)``), so ``a = γ`` and
    ``b = Σ_d γ_jd β_jd``.
    """
    try:
        import pyro
        from ordered_set import OrderedSet
        from py_irt.config import IrtConfig
        from py_irt.dataset import Dataset
        from py_irt.training import IrtModelTrainer
    except ImportError as e:
        raise Merge3Error(
            f"backend 'py-irt' needs py-irt ({e}); it cannot share merge3's main environment, "
            "use the separate one made by `make test-pyirt`"
        ) from None
    t0 = time.perf_counter()
    S, N = Y.shape
    subj, item = np.nonzero(M)
    dataset = Dataset(
        item_ids=OrderedSet(str(j) for j in range(N)),
        subject_ids=OrderedSet(str(i) for i in range(S)),
        item_id_to_ix={str(j): j for j in range(N)},
        ix_to_item_id={j: str(j) for j in range(N)},
        subject_id_to_ix={str(i): i for i in range(S)},
        ix_to_subject_id={i: str(i) for i in range(S)},
        observation_subjects=subj.tolist(),
        observation_items=item.tolist(),
        observations=Y[subj, item].tolist(),
        training_example=[True] * subj.size,
    )
    pyro.set_rng_seed(int(seed))
    config = IrtConfig(model_type=_PYIRT_MODELS[kind], epochs=epochs, lr=lr, priors="hierarchical", dims=D if kind == "mirt" else None, seed=seed)
    trainer = IrtModelTrainer(data_path=None, config=config, dataset=dataset, verbose=False)
    trainer.train(epochs=epochs)
    out = trainer.last_params
    theta = np.asarray(out["ability"], dtype=np.float64).reshape(S, -1)
    diff = np.asarray(out["diff"], dtype=np.float64).reshape(N, -1)
    disc = np.asarray(out.get("disc", np.ones_like(diff)), dtype=np.float64).reshape(N, -1)
    b = (disc * diff).sum(1)
    diag = {"seconds": time.perf_counter() - t0, "iterations": epochs, "converged": None, "n_subjects": S, "n_items": N, "n_answers": int(M.sum())}
    z = np.clip(theta @ disc.T - b, -LOGIT_CLIP, LOGIT_CLIP)
    diag["loglik_per_answer"] = float((_loglik(z, Y) * M).sum() / M.sum())
    return _Fit(theta, disc, b, diag)
