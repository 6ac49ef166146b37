"""`make bench`: the fast subset of the benches, in sequence (a few minutes on 2 cores).

1. candidate build speed on a 20M-parameter synthetic model and on the digits zoo (bench/merge_speed.py);
2. executor scaling on the demo workload (bench/ray_scaling.py);
3. peak memory of `merge3 merge` at 256 MiB of inputs (bench/merge_memory.py --quick);
4. a small full-vs-cheap search comparison (bench/search_efficiency.py --quick, one seed), per layer and per row
   block.
The full-size merge-speed run (100M parameters, minutes) is `python bench/merge_speed.py`.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZOO, BANKS = ROOT / "zoo" / "digits", ROOT / "item_banks"
TASKS = ["upright", "rot90", "inverted", "flipud", "permuted"]


def run(*args: str) -> None:
    print(f"\n$ {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def main() -> None:
    run("-m", "merge3", "zoo", "build", "digits", "--out", str(ZOO), "--banks-dir", str(BANKS))
    run("bench/merge_speed.py", "--params", "20000000", "--tsv-params", "1000000",
        "--zoo", str(ZOO / "base"), *(str(ZOO / f"ft-{t}") for t in TASKS),
        "--out", "bench/results/merge_speed_fast.json")
    calibrated = (BANKS / "digits" / "calibration" / "estimator.json").exists()
    run("bench/ray_scaling.py", "--zoo", str(ZOO), "--bank", str(BANKS / "digits"),
        "--estimator", "gp-irt" if calibrated else "naive")
    run("bench/merge_memory.py", "--quick", "--out", "bench/results/merge_memory_quick.json")
    run("bench/search_efficiency.py", "--quick", "--seeds", "0", "--estimators", "naive", "gp-irt")
    run("bench/search_efficiency.py", "--quick", "--genome", "rows", "--seeds", "0", "--estimators", "naive")


if __name__ == "__main__":
    main()
