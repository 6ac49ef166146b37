"""Weight disentanglement (Ortiz-Jiménez et al., "Task arithmetic in the tangent space", 2023): how far adding a
second task vector changes what the model predicts on the first task's inputs, and vice versa.

For tasks t₁, t₂ with task vectors τ₁, τ₂ and a grid of coefficients,

    ξ(α₁, α₂) = Σ_{t ∈ {1, 2}} E_{x ∼ task t} [ f(x; θ₀ + α₁τ₁ + α₂τ₂) ≠ f(x; θ₀ + α_t τ_t) ]

(predictions compared, not answers). ξ = 0 means the two edits do not touch each other's inputs: task arithmetic can
add them without interference. Each term is reported too (``xi_a``: on the first task's items). With τ₂ = 0 the
first task's term is exactly 0 (the second term then measures how much τ₁ alone moves task 2's predictions).

Needs a classifier or text-classifier bank (one head per task); a causal-LM bank's outputs are generated text, for
which this 0-1 disagreement is not defined here.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from merge3._errors import Merge3Error
from merge3.itembank._bank import ItemBank
from merge3.itembank._evaluators import load_model_for, make_evaluator

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


@dataclass
class Disentanglement:
    """ξ per task pair over an α grid: ``table`` has columns task_a, task_b, alpha_a, alpha_b, xi, xi_a, xi_b."""

    table: pd.DataFrame
    split: str

    def matrix(self, task_a: str, task_b: str) -> pd.DataFrame:
        """ξ of one pair as an α_a × α_b grid."""
        rows = self.table[(self.table.task_a == task_a) & (self.table.task_b == task_b)]
        return rows.pivot(index="alpha_a", columns="alpha_b", values="xi")

    def pairs(self) -> list[tuple[str, str]]:
        return list(dict.fromkeys(zip(self.table.task_a, self.table.task_b)))

    def summary(self) -> pd.DataFrame:
        """Per pair: ξ at α = (1, 1) (when on the grid), the mean over the grid and the worst cell."""
        out = []
        for a, b in self.pairs():
            m = self.matrix(a, b)
            at_one = float(m.loc[1.0, 1.0]) if 1.0 in m.index and 1.0 in m.columns else float("nan")
            out.append({"task_a": a, "task_b": b, "xi_at_1_1": at_one, "xi_mean": float(m.to_numpy().mean()),
                        "xi_max": float(m.to_numpy().max())})
        return pd.DataFrame(out)

    def write_into(self, folder: str | os.PathLike) -> list[str]:
        """``disentanglement.csv`` and one heatmap PNG per pair into ``folder``; returns the file names."""
        from merge3.methods import write_heatmap

        folder = Path(folder)
        self.table.to_csv(folder / "disentanglement.csv", index=False)
        written = ["disentanglement.csv"]
        for a, b in self.pairs():
            name = f"disentanglement_{a}_{b}.png"
            write_heatmap(self.matrix(a, b), folder / name,
                          f"ξ on the {self.split} split: rows α_{a}, columns α_{b}", "magma", 0, 2)
            written.append(name)
        return written


def disentanglement(bank: ItemBank | str | os.PathLike, base: str | os.PathLike,
                    models: Mapping[str, str | os.PathLike], alphas: Sequence[float] = DEFAULT_ALPHAS,
                    pairs: Sequence[tuple[str, str]] | None = None,
                    split: str = "search", device: str = "cpu") -> Disentanglement:
    """ξ for every pair of ``models`` (task name → fine-tuned model folder, the names being tasks of ``bank``),
    on the bank's ``split`` items of each task.

    >>> d = disentanglement("item_banks/digits", "zoo/digits/base",
    ...                     {"upright": "zoo/digits/ft-upright", "rot90": "zoo/digits/ft-rot90"})  # doctest: +SKIP
    >>> d.matrix("upright", "rot90")  # doctest: +SKIP
    """
    from merge3.models import check_compatible, check_finite, load_state_dict

    bank = bank if isinstance(bank, ItemBank) else ItemBank.load(bank, warn=False)
    if bank.spec.evaluator.kind not in ("classifier", "text_classifier"):
        raise Merge3Error(f"disentanglement needs a classifier bank (one head per task); '{bank.path}' is "
                          f"{bank.spec.evaluator.kind}")
    unknown = [t for t in models if t not in bank.tasks]
    if unknown:
        raise Merge3Error(f"disentanglement: '{unknown[0]}' is not a task of bank '{bank.path}' "
                          f"(tasks: {', '.join(bank.tasks)}); name each model by its task")
    if len(models) < 2:
        raise Merge3Error("disentanglement: give at least two fine-tuned models (one per task)")
    alphas = [float(a) for a in alphas]
    if not alphas or not all(np.isfinite(alphas)):
        raise Merge3Error(f"disentanglement: alphas must be finite numbers, got {list(alphas)}")
    if split not in ("search", "test"):
        raise Merge3Error(f"disentanglement: split must be 'search' or 'test', got {split!r}")
    module = load_model_for(bank, base, device=device)
    evaluate = make_evaluator(bank, device=device, tokenizer_from=base)
    base_sd = load_state_dict(base)
    tuned = {t: load_state_dict(p) for t, p in models.items()}
    check_compatible(base_sd, list(tuned.values()), names=[str(p) for p in models.values()], reference_name=str(base))
    for t, sd in tuned.items():
        check_finite(sd, str(models[t]))
    keys = [k for k in base_sd if base_sd[k].is_floating_point()]
    tau = {t: {k: sd[k].float() - base_sd[k].float() for k in keys} for t, sd in tuned.items()}
    live = module.state_dict()
    missing = [k for k in keys if k not in live]
    if missing:
        raise Merge3Error(f"disentanglement: the model has no tensor '{missing[0]}' that the weights have")
    in_split = set(bank.split_indices(split).tolist())
    items = {t: np.array([i for i in bank.task_indices[t] if i in in_split], dtype=np.int64) for t in models}
    empty = [t for t, rows in items.items() if len(rows) == 0]
    if empty:
        raise Merge3Error(f"disentanglement: bank '{bank.path}' has no {split}-split items of task '{empty[0]}'")
    pairs = list(pairs or itertools.combinations(models, 2))
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1] or any(t not in models for t in pair):
            raise Merge3Error(f"disentanglement: pair {tuple(pair)} must name two different models' tasks")

    def predict(coefficients: Mapping[str, float], rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            for k in keys:
                value = base_sd[k].float().clone()
                for t, alpha in coefficients.items():
                    if alpha:
                        value += alpha * tau[t][k]
                live[k].copy_(value.to(live[k].dtype))
        return evaluate.predict(module, rows)

    single = {(t, a): predict({t: a}, items[t]) for t in models for a in alphas}
    rows = []
    for a, b in pairs:
        both = np.concatenate([items[a], items[b]])
        for alpha_a, alpha_b in itertools.product(alphas, alphas):
            joint = predict({a: alpha_a, b: alpha_b}, both)
            xi_a = float(np.mean(joint[: len(items[a])] != single[(a, alpha_a)]))
            xi_b = float(np.mean(joint[len(items[a]):] != single[(b, alpha_b)]))
            rows.append({"task_a": a, "task_b": b, "alpha_a": alpha_a, "alpha_b": alpha_b, "xi": xi_a + xi_b,
                         "xi_a": xi_a, "xi_b": xi_b})
    return Disentanglement(pd.DataFrame(rows), split)
