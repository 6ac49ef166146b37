"""Per-candidate merge build time, against memory bandwidth and against a disk round trip.

For each method, one candidate is one merged model with fresh coefficients. We time
- ``builder``: ``CandidateBuilder.build`` into preallocated tensors (what the search does per candidate), after a
  one-off ``precompute`` (timed separately);
- ``pure``: the plain function (``merge_groups``), which recomputes everything each time;
and, with ``--mergekit``, ``mergekit``: mergekit's in-memory merge of the same kind of candidate; and compare with two
baselines on the same bytes:
- ``copy``: a plain tensor copy of the model (``dst.copy_(src)``): this machine's memory bandwidth, a floor;
- ``disk``: saving the merged state dict as safetensors and loading it back, which is what tools that merge to disk
  and reload per candidate (mergenetic, mergekit-evolve) pay on top of the merge itself.

Usage::

    .venv/bin/python bench/merge_speed.py                     # ~100M-parameter synthetic model, 3 fine-tunes
    .venv/bin/python bench/merge_speed.py --params 20e6 --repeats 2
    .venv/bin/python bench/merge_speed.py --mergekit --tsv-params 0      # + mergekit's merge of each candidate
    .venv/bin/python bench/merge_speed.py --zoo BASE_DIR MODEL_DIR...   # a real model family (e.g. the digits zoo)

TSV is timed on a smaller synthetic model (``--tsv-params``, 1024×1024 matrices by default), because its one-off
SVDs of 4096×4096 matrices take minutes on one thread; its per-candidate build is a weighted sum like TA's.
Writes bench/results/merge_speed.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import merge3  # noqa: E402
import merge3.methods as mm  # noqa: E402
from merge3.methods import GroupPlan  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "merge_speed.json"


@dataclass
class Workload:
    """A base, its fine-tuned models, and a name; any model family can be plugged in (see ``zoo_workload``)."""

    name: str
    base: dict[str, torch.Tensor]
    models: list[dict[str, torch.Tensor]]

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.base.values())

    @property
    def n_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.base.values())


def synthetic_workload(n_params: float, n_models: int = 3, side: int = 4096, seed: int = 0,
                       name: str | None = None) -> Workload:
    """A stack of ``side × side`` float32 layers (plus a bias each) totalling about ``n_params`` parameters;
    fine-tunes are the base plus small dense random task vectors."""
    g = torch.Generator().manual_seed(seed)
    n_layers = max(1, round(n_params / (side * side + side)))
    base = {}
    for i in range(n_layers):
        base[f"layers.{i}.weight"] = torch.randn(side, side, generator=g) * 0.02
        base[f"layers.{i}.bias"] = torch.zeros(side)
    models = []
    for _ in range(n_models):
        models.append({k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()})
    label = name or f"synthetic {n_layers}×{side}² ({n_layers * (side * side + side) / 1e6:.0f}M params, {n_models} models)"
    return Workload(label, base, models)


def zoo_workload(base_path: str, model_paths: Sequence[str], name: str | None = None) -> Workload:
    """Real models from disk (any format ``merge3.models.load_state_dict`` reads)."""
    from merge3.models import load_state_dict

    return Workload(name or f"models in {Path(base_path).parent}", load_state_dict(base_path),
                    [load_state_dict(p) for p in model_paths])


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls (after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_baseline(work: Workload, repeats: int) -> float:
    dest = {k: torch.empty_like(v) for k, v in work.base.items()}

    def copy():
        for k, v in work.base.items():
            dest[k].copy_(v)

    return _timed(copy, repeats)


def disk_baseline(work: Workload, repeats: int, folder: Path) -> float:
    path = folder / "candidate.safetensors"

    def round_trip():
        save_file(work.base, str(path))
        load_file(str(path))

    seconds = _timed(round_trip, repeats)
    path.unlink(missing_ok=True)
    return seconds


def method_plans(work: Workload, rng: torch.Generator) -> dict[str, Callable[[], list[GroupPlan]]]:
    """Per method, a function drawing a fresh candidate (random per-model weights and parameters) as a plan."""
    n = len(work.models)

    def weights():
        return (torch.rand(n, generator=rng) * 1.5).tolist()

    def draw(lo, hi):
        return float(lo + (hi - lo) * torch.rand(1, generator=rng))

    groups = mm.layer_groups(work.base, "layer")
    methods = ["task_arithmetic", "ties", "dare"]

    def per_layer():
        return [GroupPlan(g, keys, methods[i % 3], {"weights": weights(),
                                                   **({"density": draw(0.1, 0.9)} if methods[i % 3] == "ties" else {}),
                                                   **({"drop_rate": draw(0.1, 0.9)} if methods[i % 3] == "dare" else {})})
                for i, (g, keys) in enumerate(groups.items())]

    def whole(method, **params):
        return lambda: [GroupPlan("all", ["*"], method, {k: v() if callable(v) else v for k, v in params.items()})]

    return {
        "task_arithmetic": whole("task_arithmetic", weights=weights),
        "ties (tensor trim)": whole("ties", weights=weights, density=lambda: draw(0.1, 0.9)),
        "ties (model trim)": whole("ties", weights=weights, density=lambda: draw(0.1, 0.9), trim="model"),
        "dare linear": whole("dare", weights=weights, drop_rate=lambda: draw(0.1, 0.9)),
        "dare ties": whole("dare", weights=weights, drop_rate=lambda: draw(0.1, 0.9), combine="ties"),
        "ties (per-model density)": whole("ties", weights=weights, density=0.5,
                                          densities=lambda: [draw(0.1, 0.9) for _ in range(n)]),
        "della": whole("della", weights=weights, density=lambda: draw(0.3, 0.7), epsilon=0.1),
        "breadcrumbs": whole("breadcrumbs", weights=weights, density=lambda: draw(0.5, 0.95), gamma=0.01),
        "linear": whole("linear", weights=weights),
        "per-layer mix (ta/ties/dare)": per_layer,
    }


MERGEKIT_NAMES = {"task_arithmetic": "task_arithmetic", "ties": "ties", "linear": "linear", "della": "della",
                  "breadcrumbs": "breadcrumbs"}


def mergekit_seconds(work: Workload, plans: list[GroupPlan]) -> float | None:
    """One merge of the same candidate by mergekit's in-memory API (``merge_state_dicts``): what a merge-to-disk
    search (mergekit-evolve) computes per candidate before its save and reload. None where mergekit has no such
    merge (model-wide trim, per-layer mixes) or is not installed."""
    try:
        from mergekit.merge_methods import merge_state_dicts
    except ImportError:
        return None
    if len(plans) != 1 or plans[0].params.get("trim", "tensor") != "tensor":
        return None
    plan, n = plans[0], len(work.models)
    p = dict(plan.params)
    if plan.method == "dare":
        name = "dare_ties" if p.get("combine") == "ties" else "dare_linear"
        density = [1.0 - float(p["drop_rate"])] * n
    elif plan.method in MERGEKIT_NAMES:
        name = MERGEKIT_NAMES[plan.method]
        density = p.get("densities") or ([p["density"]] * n if "density" in p else None)
    else:
        return None
    per_model = {"weight": p["weights"], **({"density": density} if density is not None else {})}
    parameters = {k: {f"m{i}": float(x) for i, x in enumerate(v)} for k, v in per_model.items()}
    parameters |= {k: p[k] for k in ("epsilon", "gamma") if k in p}
    inputs = {"base": work.base, **{f"m{i}": m for i, m in enumerate(work.models)}}
    start = time.perf_counter()
    merge_state_dicts(inputs, name, base="base", parameters=parameters)
    return time.perf_counter() - start


def bench_workload(work: Workload, repeats: int, pure_repeats: int, folder: Path, methods: Sequence[str] | None = None,
                   log=print, with_mergekit: bool = False) -> dict:
    log(f"\n## {work.name}: {work.n_params / 1e6:.1f}M params, {work.n_bytes / 1e9:.2f} GB per model")
    copy_s = copy_baseline(work, repeats)
    disk_s = disk_baseline(work, repeats, folder)
    log(f"copy {copy_s * 1e3:.0f} ms ({work.n_bytes / copy_s / 1e9:.1f} GB/s), disk round trip {disk_s * 1e3:.0f} ms")
    rng = torch.Generator().manual_seed(0)
    plans = method_plans(work, rng)
    if methods is not None:
        plans = {k: v for k, v in plans.items() if k in methods}
    start = time.perf_counter()
    builder = mm.CandidateBuilder(work.base, work.models).precompute([])  # the task vectors, shared by all methods
    setup_s = time.perf_counter() - start
    log(f"task vectors precomputed in {setup_s:.1f} s")
    rows = {}
    out = builder.allocate()
    for label, make in plans.items():
        t0 = time.perf_counter()
        builder.precompute({p.method for p in make()}, seeds=[0])  # DARE's default seed is 0
        pre = time.perf_counter() - t0
        build_s = _timed(lambda: builder.build(make(), out), repeats)
        pure_s = _timed(lambda: mm.merge_groups(work.base, work.models, make()), pure_repeats)
        mergekit_s = mergekit_seconds(work, make()) if with_mergekit else None
        rows[label] = {
            "build_s": build_s, "pure_s": pure_s, "precompute_s": pre,
            "build_gbps": work.n_bytes / build_s / 1e9,
            "build_vs_copy": build_s / copy_s, "disk_vs_build": disk_s / build_s, "pure_vs_build": pure_s / build_s,
            "pure_and_disk_vs_build": (pure_s + disk_s) / build_s,
            "mergekit_s": mergekit_s,
            "mergekit_and_disk_vs_build": (mergekit_s + disk_s) / build_s if mergekit_s is not None else None,
            "cache_gb": sum(builder.cache_bytes().values()) / 1e9,
        }
        log(f"{label:32s} build {build_s * 1e3:8.0f} ms  pure {pure_s * 1e3:8.0f} ms  precompute {pre:6.1f} s  "
            f"cache {rows[label]['cache_gb']:.1f} GB" + (f"  mergekit {mergekit_s:.1f} s" if mergekit_s else ""))
        for kind in ("uniforms", "sorted", "sorted_global", "della_ranks"):  # keep memory bounded between methods
            builder.forget(kind)
    return {"name": work.name, "params": work.n_params, "bytes": work.n_bytes, "n_models": len(work.models),
            "task_vectors_s": setup_s, "copy_s": copy_s, "copy_gbps": work.n_bytes / copy_s / 1e9, "disk_roundtrip_s": disk_s, "methods": rows}


def bench_tsv(n_params: float, repeats: int, folder: Path, log=print) -> dict:
    work = synthetic_workload(n_params, side=1024, name=None)
    work.name = f"TSV: synthetic {len(work.base) // 2}×1024² ({work.n_params / 1e6:.0f}M params, 3 models)"
    log(f"\n## {work.name}")
    copy_s = copy_baseline(work, repeats)
    disk_s = disk_baseline(work, repeats, folder)
    t0 = time.perf_counter()
    builder = mm.CandidateBuilder(work.base, work.models).precompute(["tsv_merge"])
    pre = time.perf_counter() - t0
    rng = torch.Generator().manual_seed(0)

    def plan():
        return [GroupPlan("all", ["*"], "tsv_merge", {"weights": (torch.rand(3, generator=rng) * 1.5).tolist()})]

    out = builder.allocate()
    build_s = _timed(lambda: builder.build(plan(), out), repeats)
    pure_s = _timed(lambda: mm.merge_groups(work.base, work.models, plan()), 1)
    row = {"build_s": build_s, "pure_s": pure_s, "precompute_s": pre, "build_gbps": work.n_bytes / build_s / 1e9,
           "build_vs_copy": build_s / copy_s, "disk_vs_build": disk_s / build_s, "pure_vs_build": pure_s / build_s,
           "cache_gb": sum(builder.cache_bytes().values()) / 1e9}
    log(f"{'tsv_merge':32s} build {build_s * 1e3:8.0f} ms  pure {pure_s * 1e3:8.0f} ms  precompute {pre:6.1f} s")
    return {"name": work.name, "params": work.n_params, "bytes": work.n_bytes, "n_models": 3, "copy_s": copy_s,
            "copy_gbps": work.n_bytes / copy_s / 1e9, "disk_roundtrip_s": disk_s, "methods": {"tsv_merge": row}}


def markdown(results: dict) -> str:
    lines = []
    for w in results["workloads"]:
        lines += [f"\n**{w['name']}** — copy {w['copy_s'] * 1e3:.0f} ms ({w['copy_gbps']:.1f} GB/s), "
                  f"safetensors save+load {w['disk_roundtrip_s'] * 1e3:.0f} ms\n",
                  "| method | build (ms) | GB/s | × copy | disk round trip ÷ build | pure (ms) | (pure + disk) ÷ build "
                  "| mergekit (ms) | (mergekit + disk) ÷ build | one-off precompute (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, r in w["methods"].items():
            mergekit, vs_mergekit = r.get("mergekit_s"), r.get("mergekit_and_disk_vs_build")
            lines.append(f"| {label} | {r['build_s'] * 1e3:.0f} | {r['build_gbps']:.2f} | {r['build_vs_copy']:.1f} | "
                         f"{r['disk_vs_build']:.2f} | {r['pure_s'] * 1e3:.0f} | "
                         f"{(r['pure_s'] + w['disk_roundtrip_s']) / r['build_s']:.1f} | "
                         f"{'—' if mergekit is None else f'{mergekit * 1e3:.0f}'} | "
                         f"{'—' if mergekit is None else f'{vs_mergekit:.0f}'} | "
                         f"{r['precompute_s']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6, help="size of the synthetic model (parameters)")
    parser.add_argument("--tsv-params", type=float, default=4.2e6, help="size of the TSV synthetic model; 0 skips")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pure-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine shares 2 cores)")
    parser.add_argument("--zoo", nargs="+", metavar="PATH", help="base model path then fine-tuned model paths")
    parser.add_argument("--methods", nargs="+", help="only these rows (e.g. task_arithmetic 'ties (tensor trim)')")
    parser.add_argument("--mergekit", action="store_true",
                        help="also time mergekit's in-memory merge of each candidate (minutes at 100M parameters)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workloads = []
    with tempfile.TemporaryDirectory(prefix="merge3-bench-") as tmp:
        if args.zoo:
            workloads.append(bench_workload(zoo_workload(args.zoo[0], args.zoo[1:]), args.repeats, args.pure_repeats,
                                            Path(tmp), args.methods, with_mergekit=args.mergekit))
        if args.params > 0:
            workloads.append(bench_workload(synthetic_workload(args.params), args.repeats, args.pure_repeats, Path(tmp),
                                            args.methods, with_mergekit=args.mergekit))
        if args.tsv_params > 0:
            workloads.append(bench_tsv(args.tsv_params, args.repeats, Path(tmp)))
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__,
                    "merge3": merge3.__version__,
                    "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "disk_note": f"round trip through {tempfile.gettempdir()} (page cache warm: a lower bound on real disk cost)",
        "workloads": workloads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
