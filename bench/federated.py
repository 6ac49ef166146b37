"""Federated merge rounds on the digits data: FedAvg against other server aggregators and low-rank client deltas.

Five simulated clients, each holding a disjoint shard of the training images seen through its own input domain
(upright, rot90, inverted, flipud, permuted: non-IID by construction), train the shared global MLP 64-256-256-10 for
``--steps`` Adam steps per round; the server aggregates. Every round's global model is scored on the **test split**
of the server's bank (held-out images under every client domain, never seen by any client or by a server search).
Aggregators: FedAvg (task arithmetic with the sample shares), FedAvg with a server step of 2 (θ_g + 2·Σ p_k τ_k), TIES, TSV-Merge, a per-round merge3 search on the
bank's search split (per-layer task-arithmetic weights of the clients' deltas), and FedAvg with every 2-D client delta
sent as a rank-r SVD truncation (TSV-C on the wire). Writes bench/results/federated.json and prints a table.

Usage::

    .venv/bin/python bench/federated.py [--seeds 0 1 2] [--rounds 20] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "federated.json"
CLIENTS = ["upright", "rot90", "inverted", "flipud", "permuted"]


def aggregators(args) -> dict[str, dict]:
    search = {"methods": ["task_arithmetic"], "granularity": "layer", "weights": [0.0, 0.6],
              "population": args.population, "generations": args.generations}
    return {
        "FedAvg": {},
        "FedAvg, server step 2": {"aggregate": {"params": {"scale": 2.0}}},
        f"FedAvg, rank-{args.rank} deltas": {"compress": {"rank": args.rank}},
        "FedAvg, 90 % energy deltas": {"compress": {"energy": 0.9}},
        "TIES (density 0.2)": {"aggregate": {"method": "ties", "params": {"density": 0.2}}},
        "TSV-Merge": {"aggregate": {"method": "tsv_merge"}},
        "merge3 search": {"aggregate": {"search": search}},
        f"merge3 search, rank-{args.rank} deltas": {"aggregate": {"search": search}, "compress": {"rank": args.rank}},
    }


def main(argv=None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these aggregators (names as printed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from merge3.federated import federate

    rows = {}
    with tempfile.TemporaryDirectory() as runs_dir:
        for name, over in aggregators(args).items():
            if args.only and name not in args.only:
                continue
            per_seed = []
            for seed in args.seeds:
                config = {"name": "bench", "seed": seed, "rounds": args.rounds, "data": {"clients": CLIENTS},
                          "local": {"steps": args.steps}, **over}
                started = time.perf_counter()
                run = federate(config, runs_dir=runs_dir, name=f"{len(rows)}-s{seed}", log=lambda *a: None)
                seconds = time.perf_counter() - started
                per_seed.append(_summary(run.rounds(), seed, seconds))
                print(f"{name}, seed {seed}: test {per_seed[-1]['final_test']:.4f} in {seconds:.0f} s", flush=True)
            rows[name] = {"config": over, "seeds": per_seed}
    result = {"clients": CLIENTS, "rounds": args.rounds, "local_steps": args.steps, "seeds": args.seeds,
              "model": [64, 256, 256, 10], "split": "every accuracy is on the bank's test split", "rows": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "load_average": list(os.getloadavg())}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _table(result)
    return result


def _summary(rounds: list[dict], seed: int, seconds: float) -> dict:
    trained = [r for r in rounds if r["round"] > 0]
    return {
        "seed": seed, "seconds": round(seconds, 1),
        "test_per_round": [round(r["test_mean"], 4) for r in rounds],
        "final_test": trained[-1]["test_mean"], "final_test_per_task": trained[-1]["test"],
        "upload_bytes_per_round": int(np.mean([r["bytes"]["upload"] for r in trained])),
        "dense_upload_bytes_per_round": int(np.mean([r["bytes"]["upload_dense"] for r in trained])),
        "download_bytes_per_round": int(np.mean([r["bytes"]["download"] for r in trained])),
        "server_seconds_per_round": float(np.mean([r["seconds"]["server"] for r in trained])),
        "server_items_answered": int(sum(r["aggregator"].get("search", {}).get("items_answered", 0) for r in trained)),
    }


def _mean_sd(values) -> str:
    values = np.asarray(values, dtype=float)
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.3f} ± {sd:.3f}"


def _table(result: dict) -> None:
    rounds = result["rounds"]
    marks = sorted({min(5, rounds), min(10, rounds), rounds})
    print(f"\n| aggregator | {' | '.join(f'test after {m} rounds' for m in marks)} | upload / round | vs FedAvg | "
          "server s / round |")
    print("|---|" + "---|" * (len(marks) + 3))
    fedavg = np.mean([s["upload_bytes_per_round"] for s in result["rows"]["FedAvg"]["seeds"]]) \
        if "FedAvg" in result["rows"] else None
    for name, row in result["rows"].items():
        seeds = row["seeds"]
        cells = [_mean_sd([s["test_per_round"][m] for s in seeds]) for m in marks]
        upload = np.mean([s["upload_bytes_per_round"] for s in seeds])
        ratio = f"{fedavg / upload:.1f}× less" if fedavg and upload < fedavg else "1×"
        server = np.mean([s["server_seconds_per_round"] for s in seeds])
        print(f"| {name} | {' | '.join(cells)} | {upload / 2**20:.2f} MiB | {ratio} | {server:.2f} |")
    print(f"\n{len(result['seeds'])} seeds ({', '.join(map(str, result['seeds']))}); mean ± sd over seeds; "
          "test split of the server's bank.")


if __name__ == "__main__":
    main()
