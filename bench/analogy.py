"""Task analogies on the digits zoo: "a is to b as c is to D" — can θ_c + (θ_b − θ_a) classify a domain D that no
model was trained on?

Each analogy takes a = upright, b = a domain (inverted or flipud), c = another domain (rot90 or inverted), and D =
c's images put through b's transform (``rot90+inverted``: rotated, then inverted). D is new: no fine-tune, and no
pretraining domain, saw it. Every encoder is read by c's frozen head (D's labels are c's digits; the analogy moves
the encoder, not the head). Rows, all scored on the **test split** of a bank of the held-out images under D (chosen
settings are picked on its search split):

- ``base``, ``c alone`` (the fine-tune for the nearest known domain), ``b alone``;
- ``addition``: θ₀ + λ(τ_b + τ_c), λ picked on the search split (does subtracting a matter?);
- ``analogy``: θ_c + θ_b − θ_a (scale 1, no data for D), and with its scale picked on the search split;
- ``analogy, merge3 search``: one scale per layer on the analogy direction, a GA on the search split;
- ``oracle``: c fine-tuned on D's own training images (what the analogy avoids needing), c's head frozen.

Writes bench/results/analogy.json and prints a table. Usage::

    .venv/bin/python bench/analogy.py [--zoo zoo/digits] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "analogy.json"
ANALOGIES = [("upright", "inverted", "rot90"), ("upright", "rot90", "inverted"),
             ("upright", "flipud", "rot90"), ("upright", "flipud", "inverted")]
GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def main(argv=None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "zoo" / "digits")
    parser.add_argument("--banks", type=Path, default=ROOT / "item_banks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="GA seeds of the per-layer search")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from merge3.zoo import build_digits_zoo

    zoo = build_digits_zoo(args.zoo, args.banks, log=lambda *a: None)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_analogy(zoo, a, b, c, Path(tmp), args) for a, b, c in ANALOGIES]
    result = {"zoo": str(args.zoo), "seeds": args.seeds, "grid": list(GRID), "analogies": rows,
              "split": "test split of the held-out images under D; settings picked on its search split"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _table(rows)
    return result


def one_analogy(zoo, a: str, b: str, c: str, tmp: Path, args) -> dict:
    from merge3.itembank import ItemBank, make_evaluator
    from merge3.methods import analogy, task_arithmetic
    from merge3.models import load_model, load_state_dict
    from merge3.zoo import DigitsRecipe, write_domain_bank

    started = time.perf_counter()
    target = f"{c}+{b}"
    recipe = DigitsRecipe(seed=zoo.info["recipe"]["seed"])
    head = (zoo.bank / "heads" / f"{c}.safetensors").read_bytes()
    bank_dir = tmp / target.replace("+", "-")
    write_domain_bank(bank_dir, {target: target}, recipe, heads={target: head}, name=f"digits-{target}",
                      description=f"held-out digits under {target}, read by {c}'s head")
    bank = ItemBank.load(bank_dir)
    evaluate = make_evaluator(bank)
    encoder = load_model(zoo.base)

    def score(state: dict) -> dict:
        module = copy.deepcopy(encoder)
        module.load_state_dict(state)
        splits = bank.per_split_accuracy(evaluate(module), np.arange(len(bank)))
        return {split: splits[split][target] for split in ("search", "test")}

    base = load_state_dict(zoo.base)
    fts = {t: load_state_dict(zoo.finetuned[t]) for t in (a, b, c)}
    rows = {"base": score(base), "c alone": score(fts[c]), "b alone": score(fts[b])}
    rows["addition"] = _picked({lam: score(task_arithmetic(base, [fts[b], fts[c]], scale=lam)) for lam in GRID})
    rows["analogy"] = score(analogy(base, [fts[a], fts[b], fts[c]]))
    rows["analogy, scale picked"] = _picked({s: score(analogy(base, [fts[a], fts[b], fts[c]], scale=s)) for s in GRID})
    searched = [_search(zoo, bank_dir, (a, b, c), seed, tmp, args) for seed in args.seeds]
    rows["analogy, merge3 search"] = {"search": float(np.mean([s["search"] for s in searched])),
                                      "test": float(np.mean([s["test"] for s in searched])),
                                      "test_sd": float(np.std([s["test"] for s in searched], ddof=1))
                                      if len(searched) > 1 else 0.0, "seeds": searched}
    rows["oracle (fine-tuned on D)"] = score(_fine_tune(zoo, fts[c], c, target, recipe))
    gap = rows["oracle (fine-tuned on D)"]["test"] - rows["c alone"]["test"]
    closed = {name: (rows[name]["test"] - rows["c alone"]["test"]) / gap if gap > 0 else None
              for name in ("analogy", "analogy, scale picked", "analogy, merge3 search")}
    return {"a": a, "b": b, "c": c, "D": target, "head": c, "rows": rows, "gap_closed": closed,
            "items": {"search": len(bank.search_indices), "test": len(bank.test_indices)},
            "seconds": round(time.perf_counter() - started, 1)}


def _picked(by_setting: dict) -> dict:
    """The setting with the best search-split accuracy, and its test accuracy."""
    best = max(by_setting, key=lambda k: by_setting[k]["search"])
    return {**by_setting[best], "setting": best}


def _search(zoo, bank_dir: Path, roles: tuple[str, str, str], seed: int, tmp: Path, args) -> dict:
    import merge3

    space = {
        "name": f"analogy-{roles[2]}-{roles[1]}", "seed": seed, "device": "cpu",
        "models": {"base": str(zoo.base), "endpoints": [str(zoo.finetuned[r]) for r in roles], "names": list(roles)},
        "bank": {"path": str(bank_dir), "items_per_task": None, "estimator": "full"},
        "genome": {"granularity": "layer", "methods": ["analogy"], "params": {"analogy.scale": {"low": 0.0, "high": 2.0}}},
        "objectives": ["mean"],
        "engine": {"name": "pymoo", "population": args.population, "generations": args.generations},
        "executor": {"kind": "local"},
    }
    outcome = merge3.search(space, runs_dir=tmp / "runs", progress=_Silent())
    verified = merge3.verify(outcome.run.path, top=1, log=lambda *a: None)[0]
    return {"seed": seed, "search": verified["search_mean"], "test": verified["test_mean"],
            "scales": [g["params"]["scale"] for g in outcome.best.plan]}


class _Silent:
    """No progress lines (each run's log.txt has them)."""

    def advance(self, record):
        pass

    def generation(self, summary):
        pass

    def close(self):
        pass


def _fine_tune(zoo, encoder_state: dict, head_task: str, target: str, recipe, epochs: int = 10) -> dict:
    """c's encoder fine-tuned on D's training images with c's head frozen: the upper bound with data for D."""
    import torch
    from safetensors.torch import load_file
    from torch import nn

    from merge3.models import load_model
    from merge3.zoo import domain_transform

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    train, _ = train_test_split(np.arange(len(x)), test_size=0.5, stratify=data.target, random_state=recipe.seed)
    xs = torch.from_numpy(np.ascontiguousarray(domain_transform(target, recipe.seed)(x[train]), dtype=np.float32))
    ys = torch.from_numpy(data.target[train].astype(np.int64))
    encoder = load_model(zoo.finetuned[head_task])
    encoder.load_state_dict(encoder_state)
    head = nn.Linear(encoder.sizes[-1], 10)
    head.load_state_dict(load_file(str(zoo.bank / "heads" / f"{head_task}.safetensors")))
    head.requires_grad_(False)
    opt = torch.optim.Adam(encoder.parameters(), lr=recipe.lr)
    order = torch.Generator().manual_seed(recipe.seed)
    encoder.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(xs), generator=order).split(recipe.batch_size):
            loss = nn.functional.cross_entropy(head(encoder(xs[batch])), ys[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def _table(rows: list[dict]) -> None:
    names = list(rows[0]["rows"])
    print("\n| D = c then b (head: c) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for r in rows:
        cells = []
        for name in names:
            row = r["rows"][name]
            cell = f"{row['test']:.3f}"
            if "test_sd" in row:
                cell += f" ± {row['test_sd']:.3f}"
            if "setting" in row:
                cell += f" (λ={row['setting']})"
            cells.append(cell)
        print(f"| {r['D']} (a={r['a']}) | " + " | ".join(cells) + " |")
    print("\ngap closed between c alone and the oracle, on test: " + "; ".join(
        f"{r['D']}: " + ", ".join(f"{k} {v:+.2f}" for k, v in r["gap_closed"].items() if v is not None) for r in rows))


if __name__ == "__main__":
    main()
