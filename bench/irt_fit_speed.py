"""How long one IRT fit takes at issue #4's size: 200 subjects × 2,000 items (4 tasks), one thread, fixed D.

    python bench/irt_fit_speed.py     # writes bench/results/irt_fit_speed.json and prints a table
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from merge3.itembank import fit_irt, simulate_bank
from merge3.models import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "irt_fit_speed.json"


def main(repeats: int = 3) -> None:
    torch.set_num_threads(1)
    bank = simulate_bank(n_subjects=200, items_per_task=500, dims=3, seed=0)
    rows = []
    for kind, dims in (("2pl", 1), ("mirt", 3)):
        seconds, iterations = [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            model = fit_irt(bank.responses, kind=kind, dims=dims, seed=0)
            seconds.append(time.perf_counter() - t0)
            iterations = model.diagnostics["iterations"]
        rows.append({"kind": kind, "dims": dims, "seconds": [round(s, 3) for s in seconds],
                     "median_seconds": round(float(np.median(seconds)), 3), "iterations": iterations,
                     "difficulty_correlation": round(float(np.corrcoef(model.b, bank.b)[0, 1]), 4)})
    result = {"subjects": 200, "items": 2000, "threads": 1, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "load_average": list(os.getloadavg())}}
    write_text_atomic(RESULTS, json.dumps(result, indent=2) + "\n")
    print(f"{'fit':10s} {'median s':>9s} {'iterations':>11s} {'corr(b)':>8s}")
    for r in rows:
        print(f"{r['kind'] + ' D=' + str(r['dims']):10s} {r['median_seconds']:9.2f} {r['iterations']:11d} "
              f"{r['difficulty_correlation']:8.3f}")


if __name__ == "__main__":
    main()
