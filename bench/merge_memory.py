"""Peak memory of ``merge3 merge CONFIG --out DIR``: does the YAML merge stream, or load every model?

A synthetic base and 3 fine-tuned models are saved as sharded safetensors (``merge3.models.save_state_dict``) in
``bench/.cache/merge_memory/`` (git-ignored by ``.cache/``; reused between runs). Each method's merge then runs in
its own subprocess, ``python -m merge3 merge CONFIG --out DIR`` exactly as a user types it, and we record
- ``peak RSS``: the child's ``ru_maxrss`` (exact, from ``os.wait4`` on that one child);
- ``peak anon``: the largest private (anonymous) RSS seen by polling ``/proc/PID/status`` every few ms: the memory
  the merge allocates, without the input files' pages that safetensors memory-maps (those are page cache, counted
  in RSS while mapped but shared and reclaimable);
and the same for a bare ``python -c "import merge3.methods, torch"``, subtracted as the import overhead.

A merge *streams* when peak − import baseline stays below one output shard (at most one model: the writer buffers
a shard until it is complete) plus a few of the largest tensor per input model (one key in flight: its tensors, task
vectors and the kernel's work buffers); it *loads everything* when it grows with the inputs.

Usage::

    .venv/bin/python bench/merge_memory.py            # 16 tensors of 2048×2048 float32: 256 MiB a model, 1 GiB in
                                                      # (tsv_merge: 16 of 1024×1024, its SVDs cost ∝ side³)
    .venv/bin/python bench/merge_memory.py --quick    # 16 tensors of 1024×1024 (TSV 512×512): under a minute
    .venv/bin/python bench/merge_memory.py --tensors 32 --side 1024 --methods ties

Writes bench/results/merge_memory.json (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import merge3  # noqa: E402
from merge3.models import open_lazy, parse_size, save_state_dict, weight_files  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "merge_memory.json"
CACHE = Path(__file__).resolve().parent / ".cache" / "merge_memory"
MiB = 2**20

# mergekit-schema configs (and merge3's tsv_merge, which the YAML merge accepts by its merge3 name)
CONFIGS = {
    "task_arithmetic": """merge_method: task_arithmetic
base_model: base
models:
  - {model: ft0, parameters: {weight: 0.5}}
  - {model: ft1, parameters: {weight: 0.3}}
  - {model: ft2, parameters: {weight: 0.2}}
parameters: {lambda: 1.0}
""",
    "ties": """merge_method: ties
base_model: base
models:
  - {model: ft0, parameters: {weight: 1.0, density: 0.5}}
  - {model: ft1, parameters: {weight: 1.0, density: 0.5}}
  - {model: ft2, parameters: {weight: 1.0, density: 0.5}}
parameters: {normalize: true}
""",
    "dare_ties": """merge_method: dare_ties
base_model: base
models:
  - {model: ft0, parameters: {weight: 1.0, density: 0.5}}
  - {model: ft1, parameters: {weight: 1.0, density: 0.5}}
  - {model: ft2, parameters: {weight: 1.0, density: 0.5}}
seed: 0
""",
    "tsv_merge": """merge_method: tsv_merge
base_model: base
models:
  - {model: ft0}
  - {model: ft1}
  - {model: ft2}
parameters: {alpha: 1.0}
""",
}
DEFAULT_METHODS = ["task_arithmetic", "ties", "tsv_merge"]


# --- inputs --------------------------------------------------------------------------------------------------------

def build_inputs(n_tensors: int, side: int, n_models: int, shard_size: str, rebuild: bool = False) -> dict:
    """Base + ``n_models`` fine-tunes of ``n_tensors`` float32 ``side × side`` matrices (plus a bias each), saved as
    sharded safetensors under ``CACHE``; reused when a previous run built the same spec."""
    spec = {"n_tensors": n_tensors, "side": side, "n_models": n_models, "dtype": "float32", "shard_size": shard_size,
            "merge3": merge3.__version__}
    folder = CACHE / f"{n_tensors}x{side}x{side}-f32-{n_models}models-shard{shard_size}"
    marker = folder / "spec.json"
    if rebuild or not marker.exists() or json.loads(marker.read_text()) != spec:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        started = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        base = {}
        for i in range(n_tensors):
            base[f"layers.{i}.weight"] = torch.randn(side, side, generator=g) * 0.02
            base[f"layers.{i}.bias"] = torch.zeros(side)
        save_state_dict(base, folder / "base", max_shard_size=shard_size)
        for m in range(n_models):
            ft = {k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()}
            save_state_dict(ft, folder / f"ft{m}", max_shard_size=shard_size)
            del ft
        del base
        marker.write_text(json.dumps(spec, indent=2) + "\n")
        print(f"built inputs in {folder.relative_to(ROOT)} ({time.perf_counter() - started:.1f} s)", flush=True)
    lazy = open_lazy(folder / "base")
    sizes = [_numel(lazy.shape(k)) * lazy.dtype(k).itemsize for k in lazy]
    model_bytes = sum(sizes)
    model_files = [sum(f.stat().st_size for f in weight_files(folder / name))
                   for name in ["base", *(f"ft{m}" for m in range(n_models))]]
    return {"folder": folder, "spec": spec, "n_keys": len(sizes), "model_bytes": model_bytes,
            "largest_tensor_bytes": max(sizes), "inputs_bytes": model_bytes * (n_models + 1),
            "input_files_bytes": sum(model_files), "shards_per_model": len(weight_files(folder / "base"))}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --- measuring a child ---------------------------------------------------------------------------------------------

# Runs in a fresh, small Python process: the command is forked from it, not from this (large) process, because a
# child's ru_maxrss starts at its parent's RSS at fork time (Linux keeps the pre-exec high-water mark).
_WRAPPER = r"""
import json, os, subprocess, sys, threading, time
cmd, log, interval = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3])
peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0, "polls": 0}
done = threading.Event()
started = time.perf_counter()
with open(log, "wb") as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    def poll():
        while not done.is_set():
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        name, _, value = line.partition(":")
                        if name in ("RssAnon", "RssFile", "VmHWM"):
                            peaks[name] = max(peaks[name], int(value.split()[0]))
            except (OSError, ValueError):
                pass
            peaks["polls"] += 1
            done.wait(interval)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    done.set()
    poller.join()
print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "ru_maxrss_kib": usage.ru_maxrss,
                  "seconds": seconds, **peaks}))
"""


def measure(cmd: Sequence[str], cwd: Path, interval: float = 0.005) -> dict:
    """Run ``cmd`` from a small wrapper process: its exact peak RSS (``ru_maxrss`` of that one child, via
    ``os.wait4``) and, polled every ``interval`` s from ``/proc/PID/status``, its peak anonymous and file-backed RSS."""
    with tempfile.NamedTemporaryFile(prefix="merge-memory-", suffix=".log") as log:
        wrapper = subprocess.run([sys.executable, "-c", _WRAPPER, json.dumps(list(cmd)), log.name, str(interval)],
                                 cwd=cwd, capture_output=True, text=True)
        text = Path(log.name).read_text(errors="replace")
    if wrapper.returncode != 0:
        raise RuntimeError(f"measuring wrapper failed:\n{wrapper.stderr[-3000:]}")
    r = json.loads(wrapper.stdout.strip().splitlines()[-1])
    if r["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r['returncode']}):\n{text[-3000:]}")
    return {"peak_rss_bytes": r["ru_maxrss_kib"] * 1024,  # KiB on Linux
            "peak_anon_bytes": r["RssAnon"] * 1024, "peak_file_bytes": r["RssFile"] * 1024,
            "polled_hwm_bytes": r["VmHWM"] * 1024, "polls": r["polls"], "seconds": r["seconds"]}


def baseline(repeats: int = 3) -> dict:
    """Import overhead: the smallest of a few runs of a bare ``import merge3.methods, torch``."""
    runs = [measure([sys.executable, "-c", "import merge3.methods, torch"], ROOT) for _ in range(repeats)]
    return {k: min(r[k] for r in runs) for k in ("peak_rss_bytes", "peak_anon_bytes", "peak_file_bytes", "seconds")}


def run_merge(method: str, inputs: dict, max_shard_size: str) -> dict:
    folder = inputs["folder"]
    config = folder / f"{method}.yaml"
    config.write_text(CONFIGS[method])
    work = Path(tempfile.mkdtemp(prefix=f"out-{method}-", dir=folder))
    try:
        result = measure([sys.executable, "-m", "merge3", "merge", str(config), "--out", str(work / "merged"),
                          "--max-shard-size", max_shard_size], ROOT)
        result["output_shards"] = len(weight_files(work / "merged"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def verdict(extra: int, inputs: dict, allowance_tensors: int, max_shard_bytes: int) -> str:
    """streams: extra memory below one output shard (the writer's buffer: at most one model) plus a few of the
    largest tensor per input model (that key's tensors, task vectors and the kernel's work buffers)."""
    limit = min(inputs["model_bytes"], max_shard_bytes) + allowance_tensors * inputs["largest_tensor_bytes"]
    return "streams" if extra < limit else "loads everything"


# --- report --------------------------------------------------------------------------------------------------------

def _mib(n: float) -> str:
    return f"{n / MiB:,.0f}"


def print_table(results: dict) -> None:
    b = results["baseline"]
    title = (f"merge3 merge peak memory (MiB), --max-shard-size {results['max_shard_size']}; import baseline "
             f"{_mib(b['peak_rss_bytes'])} RSS / {_mib(b['peak_anon_bytes'])} anon / {_mib(b['peak_file_bytes'])} "
             "file-backed")
    header = ["method", "workload", "model", "inputs", "largest tensor", "peak RSS", "− baseline", "÷ inputs",
              "anon − baseline", "÷ inputs", "file-backed − baseline", "time (s)", "verdict (RSS)", "verdict (anon)"]
    rows = []
    for method, r in results["methods"].items():
        w = results["workloads"][r["workload"]]
        rows.append([method, r["workload"], _mib(w["model_bytes"]), _mib(w["inputs_bytes"]),
                     _mib(w["largest_tensor_bytes"]), _mib(r["peak_rss_bytes"]), _mib(r["extra_rss_bytes"]),
                     f"{r['extra_rss_ratio']:.2f}", _mib(r["extra_anon_bytes"]), f"{r['extra_anon_ratio']:.2f}",
                     _mib(r["extra_file_bytes"]), f"{r['seconds']:.1f}", r["verdict_rss"], r["verdict_anon"]])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"\n{title}\n")
        print("| " + " | ".join(header) + " |")
        print("|---|---" + "|---:" * (len(header) - 4) + "|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i in (0, 1, len(header) - 2, len(header) - 1) else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(200, shutil.get_terminal_size().columns)).print(table)


def _workload_record(inputs: dict, description: str) -> dict:
    return {"description": description, "folder": str(inputs["folder"].relative_to(ROOT)), "n_keys": inputs["n_keys"],
            "model_bytes": inputs["model_bytes"], "inputs_bytes": inputs["inputs_bytes"],
            "input_files_bytes": inputs["input_files_bytes"], "largest_tensor_bytes": inputs["largest_tensor_bytes"],
            "model_over_largest_tensor": inputs["model_bytes"] / inputs["largest_tensor_bytes"],
            "shards_per_model": inputs["shards_per_model"], "input_shard_size": inputs["spec"]["shard_size"]}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024×1024 matrices (64 MiB a model), TSV 512×512")
    parser.add_argument("--tensors", type=int, default=16, help="matrices per model")
    parser.add_argument("--side", type=int, help="matrix side (default 2048, 1024 with --quick)")
    parser.add_argument("--tsv-side", type=int,
                        help="matrix side for tsv_merge, whose SVDs cost ∝ side³ per matrix (default 1024, 512 with "
                             "--quick; 0: same as --side)")
    parser.add_argument("--input-shard-size", default=None, help="shard size of the inputs (default: 4 shards)")
    parser.add_argument("--max-shard-size", default="5GB", help="merge3 merge --max-shard-size (its default: 5GB)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(CONFIGS))
    parser.add_argument("--allowance-tensors", type=int, default=6,
                        help="'streams' if peak − baseline < one output shard + this many of the largest tensor per "
                             "input model (base + 3 fine-tunes)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached inputs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    n_models = 3  # the configs merge ft0, ft1, ft2
    side = args.side or (1024 if args.quick else 2048)
    tsv_side = args.tsv_side if args.tsv_side is not None else (512 if args.quick else 1024)
    tsv_side = tsv_side or side
    workloads: dict[str, dict] = {}
    records: dict[str, dict] = {}

    def workload(s: int) -> tuple[str, dict]:
        name = f"{args.tensors}×{s}²"
        if name not in workloads:
            per_model = args.tensors * (s * s + s) * 4
            shard_size = args.input_shard_size or f"{max(1, per_model // 4 + s * 4 * 2)}B"  # about 4 shards a model
            workloads[name] = build_inputs(args.tensors, s, n_models, shard_size, args.rebuild)
            description = f"{args.tensors}×({s}×{s} + {s}) float32, base + {n_models} fine-tunes"
            records[name] = _workload_record(workloads[name], description)
            print(f"{description}: {workloads[name]['shards_per_model']} shards a model", flush=True)
        return name, workloads[name]

    for method in args.methods:
        workload(tsv_side if method == "tsv_merge" else side)
    print("measuring the import baseline", flush=True)
    base = baseline()
    rows = {}
    for method in args.methods:
        name, inputs = workload(tsv_side if method == "tsv_merge" else side)
        print(f"merging {name} with {method} …", flush=True)
        r = {"workload": name, **run_merge(method, inputs, args.max_shard_size)}
        for kind in ("rss", "anon", "file"):
            r[f"extra_{kind}_bytes"] = r[f"peak_{kind}_bytes"] - base[f"peak_{kind}_bytes"]
        for kind in ("rss", "anon"):
            r[f"extra_{kind}_ratio"] = r[f"extra_{kind}_bytes"] / inputs["inputs_bytes"]
            r[f"extra_{kind}_in_models"] = r[f"extra_{kind}_bytes"] / inputs["model_bytes"]
            r[f"verdict_{kind}"] = verdict(r[f"extra_{kind}_bytes"], inputs, args.allowance_tensors * (n_models + 1),
                                           parse_size(args.max_shard_size))
        rows[method] = r
        print(f"  peak RSS {_mib(r['peak_rss_bytes'])} MiB (+{_mib(r['extra_rss_bytes'])}), anon "
              f"+{_mib(r['extra_anon_bytes'])} MiB, file-backed +{_mib(r['extra_file_bytes'])} MiB, "
              f"{r['seconds']:.1f} s", flush=True)
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "merge3": merge3.__version__,
                    "python": platform.python_version(),
                    "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "command": "python -m merge3 merge CONFIG --out DIR --max-shard-size " + args.max_shard_size,
        "max_shard_size": args.max_shard_size,
        "notes": ("peak_rss: ru_maxrss of the merge process (exact; counts the input files' pages that safetensors "
                  "memory-maps, which are shared, clean page cache); peak_anon / peak_file: RssAnon / RssFile "
                  "polled from /proc/PID/status every 5 ms (private memory / mapped files). baseline: "
                  "python -c 'import merge3.methods, torch'. verdict: 'streams' if extra < min(one model, max shard size) + "
                  f"{args.allowance_tensors} × {n_models + 1} input models × largest tensor."),
        "workloads": records,
        "baseline": base,
        "methods": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.out)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
