"""How low can the forgotten domain go with this genome at all? A gradient oracle for ``bench/forget.py``.

TSV-Merge with per-task weights is linear in the weights (θ = θ₀ + Σ_l Σ_t w[l, t] · C[l, t], C the task's TSV
component in layer group l; biases by the mean task vector), so the genome that ``bench/forget.py`` searches can be
optimised by gradient descent instead of a GA: a differentiable surrogate (softmax probability of the right answer on
the forgotten task, pushed down to chance; cross-entropy on every kept task, held at or below the best addition
merge's) on the **search** split, the weights clipped to the genome's range, and the result read as accuracies on the
search and the **test** split. It says what the genome can express, not what a search finds: if even the oracle
cannot bring the forgotten domain near chance while the kept ones hold, the genome is the limit; if it can, the
search is. ``--row-blocks B`` gives each task one weight per layer and block of output rows (``genome.row_blocks``),
``--row-blocks 0`` one per output row (the finest linear genome over these components).

Writes bench/results/forget_oracle.json and prints a table.

Usage::

    .venv/bin/python bench/forget_oracle.py [--task rot90] [--row-blocks 1 4 16 0] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "forget_oracle.json"
NAMES = ["upright", "rot90", "inverted", "flipud", "permuted"]


def main(argv=None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rot90")
    parser.add_argument("--row-blocks", type=int, nargs="+", default=[1, 4, 16, 0])
    parser.add_argument("--low", type=float, default=-1.5)
    parser.add_argument("--high", type=float, default=2.5)
    parser.add_argument("--margin", type=float, default=0.03)
    parser.add_argument("--penalties", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    setup = load_setup()
    recipe = accuracies(setup, {l: torch.full((len(NAMES), 1), 1.5) for l in setup["layers"]})
    keep = {t: recipe["search"][t] - args.margin for t in NAMES if t != args.task}
    rows = []
    for blocks in args.row_blocks:
        best = None
        for penalty in args.penalties:
            started = time.perf_counter()
            weights = optimise(setup, args, blocks, penalty)
            scores = accuracies(setup, weights)
            feasible = all(scores["search"][t] >= v for t, v in keep.items())
            row = {"row_blocks": blocks, "penalty": penalty, "genes": sum(w.numel() for w in weights.values()),
                   "feasible_on_search": feasible, "seconds": round(time.perf_counter() - started, 1), **scores}
            rows.append(row)
            print(f"row_blocks {blocks or 'per-row'} penalty {penalty}: {args.task} search "
                  f"{scores['search'][args.task]:.3f} test {scores['test'][args.task]:.3f}, feasible {feasible}")
            if feasible and (best is None or scores["search"][args.task] < best["search"][args.task]):
                best = row
        if best is not None:
            best["chosen"] = True
    result = {"task": args.task, "low": args.low, "high": args.high, "margin": args.margin, "keep_search": keep,
              "recipe": {"name": "TSV-M λ=1.5", **recipe}, "chance_test": setup["chance"], "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return result


def load_setup() -> dict:
    """Base, the per-task TSV components of each layer group, the frozen heads and the bank's items as tensors."""
    import torch
    from safetensors.torch import load_file

    from merge3.itembank import ItemBank
    from merge3.methods import tsv_merge
    from merge3.models import load_state_dict

    zoo = ROOT / "zoo" / "digits"
    if not (zoo / "base").exists():
        raise SystemExit("error: no digits zoo (run: .venv/bin/merge3 zoo build digits)")
    base = load_state_dict(zoo / "base")
    models = [load_state_dict(zoo / f"ft-{n}") for n in NAMES]
    layers = sorted({k.rsplit(".", 1)[0] for k in base})
    components = {l: {} for l in layers}  # layer → key → [T, *shape]
    for t in range(len(NAMES)):
        onehot = [1.0 if i == t else 0.0 for i in range(len(NAMES))]
        merged = tsv_merge(base, models, weights=onehot)
        for key in base:
            components[key.rsplit(".", 1)[0]].setdefault(key, []).append(merged[key] - base[key])
    components = {l: {k: torch.stack(v) for k, v in keys.items()} for l, keys in components.items()}
    bank = ItemBank.load(ROOT / "item_banks" / "digits", warn=False)
    items = bank.items
    data = {}
    for split in ("search", "test"):
        for task in NAMES:
            rows = items[(items["task"] == task) & (items["split"] == split)]
            x = torch.tensor(np.stack(rows["input"].to_numpy()), dtype=torch.float32)
            y = torch.tensor(rows["answer"].astype(int).to_numpy())
            data[split, task] = (x, y)
    heads = {t: load_file(str(ROOT / "item_banks" / "digits" / "heads" / f"{t}.safetensors")) for t in NAMES}
    return {"base": base, "components": components, "layers": layers, "data": data, "heads": heads,
            "chance": bank.chance_accuracy("test")}


def merged_state(setup: dict, weights: dict) -> dict:
    """θ₀ + Σ_t w[t, rows] · C_t per layer; ``weights[layer]`` is [T, B]: B equal blocks of output rows."""
    import torch

    state = {}
    for layer in setup["layers"]:
        w = weights[layer]
        for key, comp in setup["components"][layer].items():
            rows = comp.shape[1]
            per_row = torch.repeat_interleave(w, -(-rows // w.shape[1]), dim=1)[:, :rows]  # [T, rows]
            shape = (comp.shape[0], rows) + (1,) * (comp.dim() - 2)
            state[key] = setup["base"][key] + (per_row.reshape(shape) * comp).sum(0)
    return state


def logits(setup: dict, state: dict, task: str, x):
    import torch

    h = x
    for layer in setup["layers"]:
        h = torch.relu(h @ state[f"{layer}.weight"].T + state[f"{layer}.bias"])
    head = setup["heads"][task]
    return h @ head["weight"].T + head["bias"]


def accuracies(setup: dict, weights: dict) -> dict:
    import torch

    with torch.no_grad():
        state = merged_state(setup, weights)
        out = {}
        for split in ("search", "test"):
            out[split] = {}
            for task in NAMES:
                x, y = setup["data"][split, task]
                out[split][task] = float((logits(setup, state, task, x).argmax(1) == y).float().mean())
    return out


def optimise(setup: dict, args, blocks: int, penalty: float) -> dict:
    """Adam on the genome's weights from the best addition merge (uniform 1.5): the forgotten task's mean
    probability of the right answer down to chance, a hinge on each kept task's cross-entropy above the recipe's."""
    import torch
    import torch.nn.functional as F

    def width(layer):
        return next(iter(setup["components"][layer].values())).shape[1] if blocks == 0 else blocks

    weights = {l: torch.full((len(NAMES), width(l)), 1.5, requires_grad=True) for l in setup["layers"]}
    with torch.no_grad():
        state = merged_state(setup, weights)
        reference = {t: float(F.cross_entropy(logits(setup, state, t, setup["data"]["search", t][0]),
                                              setup["data"]["search", t][1])) for t in NAMES}
    chance = setup["chance"][args.task]
    opt = torch.optim.Adam(weights.values(), lr=0.02)
    for _ in range(args.steps):
        state = merged_state(setup, weights)
        x, y = setup["data"]["search", args.task]
        p_right = F.softmax(logits(setup, state, args.task, x), 1).gather(1, y[:, None]).mean()
        loss = torch.relu(p_right - chance)
        for t in NAMES:
            if t != args.task:
                xt, yt = setup["data"]["search", t]
                loss = loss + penalty * torch.relu(F.cross_entropy(logits(setup, state, t, xt), yt) - reference[t])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for w in weights.values():
                w.clamp_(args.low, args.high)
    return {l: w.detach() for l, w in weights.items()}


def print_table(result: dict) -> None:
    task = result["task"]
    kept = [t for t in NAMES if t != task]
    print(f"| genome | genes | penalty | feasible (search) | {task} search | {task} test | "
          + " | ".join(f"{t} test" for t in kept) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(kept))
    r = result["recipe"]
    print(f"| TSV-M λ=1.5 (best addition) | – | – | – | {r['search'][task]:.3f} | {r['test'][task]:.3f} | "
          + " | ".join(f"{r['test'][t]:.3f}" for t in kept) + " |")
    for row in result["runs"]:
        name = "per row" if row["row_blocks"] == 0 else f"{row['row_blocks']} block(s)"
        mark = " **chosen**" if row.get("chosen") else ""
        print(f"| {name}{mark} | {row['genes']} | {row['penalty']} | {row['feasible_on_search']} | "
              f"{row['search'][task]:.3f} | {row['test'][task]:.3f} | "
              + " | ".join(f"{row['test'][t]:.3f}" for t in kept) + " |")
    print(f"chance on test: {result['chance_test'][task]:.3f}")


if __name__ == "__main__":
    main()
