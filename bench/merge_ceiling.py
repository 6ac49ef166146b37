"""How high can merge coefficients go on the digits zoo? An optimistic ceiling by gradient descent.

The search evolves one coefficient per (layer group, endpoint) and a method per group. This bench fits those
coefficients — and finer ones, per block of output neurons — by gradient descent on the cross-entropy of the **whole
bank**, i.e. on the very items the accuracy is measured on. That overfits on purpose: no search over the same space
can beat it by much, so it bounds what a genome of that granularity can reach.

    python bench/merge_ceiling.py [--steps 200] [--blocks 1 4 16 1024]

Spaces: task arithmetic (θ = θ₀ + Σ c·τ) and TSV (θ = θ₀ + Σ c·component, TSV-M's orthogonalised per-task parts),
with c per (layer, task, block of output rows); blocks = 1 is the search's per-layer genome, 1024 one per neuron.
Writes bench/results/merge_ceiling.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from merge3.models import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "merge_ceiling.json"
TASKS = ["upright", "rot90", "inverted", "flipud", "permuted"]


def tsv_components(deltas: torch.Tensor) -> torch.Tensor:
    """TSV-M's per-task parts of one 2-D key (T × m × n), exactly as merge3 builds them."""
    from merge3.methods import tsv_factors

    return tsv_factors(deltas).components(deltas.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="zoo/digits")
    parser.add_argument("--bank", default="item_banks/digits")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16, 1024])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    from merge3.itembank import ItemBank
    from merge3.models import load_state_dict

    bank = ItemBank.load(args.bank)
    x = torch.tensor(np.stack(bank.items["input"].to_numpy()), dtype=torch.float32)
    y = torch.tensor(bank.items["answer"].to_numpy().astype(np.int64))
    rows = {t: torch.as_tensor(np.flatnonzero(bank.task_of == t)) for t in TASKS}
    heads = {t: load_file(str(bank.resolve(bank.spec.evaluator.heads[t]))) for t in TASKS}
    base = load_state_dict(Path(args.zoo) / "base")
    fts = [load_state_dict(Path(args.zoo) / f"ft-{t}") for t in TASKS]
    keys = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    tau = {k: torch.stack([f[k] - base[k] for f in fts]) for k in keys}
    spaces = {"task arithmetic": (tau, 0.3),
              "TSV": ({k: tsv_components(v) if v.dim() == 3 else v / len(TASKS) for k, v in tau.items()}, 1.5)}

    def merged(vectors, coefficients, blocks):
        width = base["layers.0.bias"].numel()
        out = {}
        for i, key in enumerate(keys):
            c = coefficients[i // 2].repeat_interleave(width // blocks, dim=-1)  # (T, rows)
            v = vectors[key]
            out[key] = base[key] + (c.unsqueeze(-1) * v if v.dim() == 3 else c * v).sum(0)
        return out

    def accuracy_and_loss(w):
        accs, loss = [], 0.0
        for t in TASKS:
            h = torch.relu(x[rows[t]] @ w["layers.0.weight"].T + w["layers.0.bias"])
            logits = torch.relu(h @ w["layers.1.weight"].T + w["layers.1.bias"]) @ heads[t]["weight"].T + heads[t]["bias"]
            loss = loss + torch.nn.functional.cross_entropy(logits, y[rows[t]])
            accs.append(float((logits.argmax(-1) == y[rows[t]]).float().mean()))
        return float(np.mean(accs)), loss / len(TASKS)

    results = []
    for name, (vectors, init) in spaces.items():
        for blocks in args.blocks:
            started = time.perf_counter()
            c = torch.full((2, len(TASKS), blocks), init, requires_grad=True)
            opt = torch.optim.Adam([c], lr=0.05 if blocks < 64 else 0.02)
            best = 0.0
            for _ in range(args.steps):
                acc, loss = accuracy_and_loss(merged(vectors, c, blocks))
                best = max(best, acc)
                opt.zero_grad()
                loss.backward()
                opt.step()
            results.append({"space": name, "blocks_per_layer": blocks, "coefficients": c.numel(),
                            "best_accuracy": best, "seconds": round(time.perf_counter() - started, 1)})
            print(f"{name:16s} {blocks:5d} blocks/layer ({c.numel():6d} coefficients): best mean accuracy {best:.4f}",
                  flush=True)
    doc = {"note": "coefficients fitted on the whole bank (the evaluation items): an optimistic ceiling",
           "steps": args.steps, "results": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS, json.dumps(doc, indent=2) + "\n")
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
