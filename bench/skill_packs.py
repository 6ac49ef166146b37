"""Skill packs (TSV-C): bytes kept vs accuracy retained per task, on the digits and MiniLM zoos.

Each fine-tune is compressed with ``merge3.models.compress_models`` (``merge3 compress``) at several sizes — TSV-C's
default rank r/T per layer, fixed ranks, and energy thresholds — and the pack, loaded as the model it stands for,
answers every **test** item of its own task. Reported: the pack's size as a share of the dense task vector, and its
normalised accuracy (pack accuracy / fine-tune accuracy on the same items), per task and on average. Writes
bench/results/skill_packs.json and prints a table.

Usage::

    .venv/bin/python bench/skill_packs.py [--zoos digits minilm]
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
RESULTS = ROOT / "bench" / "results" / "skill_packs.json"
SETTINGS = {"digits": [{}, {"rank": 4}, {"rank": 16}, {"rank": 64}, {"energy": 0.5}, {"energy": 0.8},
                       {"energy": 0.9}, {"energy": 0.99}],
            "minilm": [{}, {"rank": 4}, {"rank": 16}, {"rank": 64}, {"energy": 0.5}, {"energy": 0.8},
                       {"energy": 0.9}]}


def main(argv=None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoos", nargs="+", default=["digits", "minilm"], choices=["digits", "minilm"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {"split": "test split of each zoo's bank, each pack on its own task", "zoos": {},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    for name in args.zoos:
        result["zoos"][name] = one_zoo(name)
    result["machine"]["load_average"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _table(result)
    return result


def _zoo(name: str):
    from merge3.zoo import build_digits_zoo, build_minilm_zoo

    if name == "digits":
        return build_digits_zoo(ROOT / "zoo" / "digits", ROOT / "item_banks", log=lambda *a: None)
    return build_minilm_zoo(ROOT / "zoo" / "minilm", ROOT / "item_banks", log=lambda *a: None)


def one_zoo(name: str) -> dict:
    from merge3.itembank import ItemBank, load_model_for, make_evaluator
    from merge3.models import compress_models

    zoo = _zoo(name)
    bank = ItemBank.load(zoo.bank, warn=False)
    tasks = list(zoo.finetuned)

    def own_task_test(model_path) -> dict:
        evaluator = make_evaluator(bank, tokenizer_from=model_path)
        module = load_model_for(bank, model_path)
        out = {}
        for task in tasks:
            rows = np.array([i for i in bank.task_indices[task] if i in set(bank.test_indices)])
            out[task] = float(np.mean(evaluator(module, rows)))
        return out

    fine_tuned = {t: own_task_test(p)[t] for t, p in zoo.finetuned.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, setting in enumerate(SETTINGS[name]):
            started = time.perf_counter()
            manifest = compress_models(zoo.base, {t: str(p) for t, p in zoo.finetuned.items()}, Path(tmp) / str(k),
                                       **setting)
            seconds = time.perf_counter() - started
            accuracy = {t: own_task_test(Path(tmp) / str(k) / t)[t] for t in tasks}
            kept = {t: manifest["tasks"][t]["bytes"] / manifest["tasks"][t]["dense_bytes"] for t in tasks}
            normalised = {t: accuracy[t] / fine_tuned[t] for t in tasks}
            ranks = sorted({r for t in tasks for r in manifest["tasks"][t]["ranks"].values()})
            rows.append({"setting": setting or {"rank": "r/T"}, "kept": kept, "accuracy": accuracy,
                         "normalised": normalised, "mean_kept": float(np.mean(list(kept.values()))),
                         "mean_normalised": float(np.mean(list(normalised.values()))),
                         "min_normalised": float(min(normalised.values())), "ranks": [ranks[0], ranks[-1]],
                         "compress_seconds": round(seconds, 2)})
            print(f"{name} {rows[-1]['setting']}: kept {rows[-1]['mean_kept']:.1%}, normalised accuracy "
                  f"{rows[-1]['mean_normalised']:.4f} (min {rows[-1]['min_normalised']:.4f})", flush=True)
    return {"tasks": tasks, "fine_tuned_test": fine_tuned, "rows": rows,
            "test_items_per_task": {t: int(sum(1 for i in bank.task_indices[t] if i in set(bank.test_indices)))
                                    for t in tasks}}


def _table(result: dict) -> None:
    for name, zoo in result["zoos"].items():
        print(f"\n{name}: fine-tunes on their own task (test) " +
              ", ".join(f"{t} {v:.3f}" for t, v in zoo["fine_tuned_test"].items()))
        print("| setting | ranks | size vs dense task vector | normalised accuracy, mean | worst task |")
        print("|---|---|---|---|---|")
        for r in zoo["rows"]:
            setting = ", ".join(f"{k} {v}" for k, v in r["setting"].items())
            print(f"| {setting} | {r['ranks'][0]}–{r['ranks'][1]} | {r['mean_kept']:.1%} | "
                  f"{r['mean_normalised']:.4f} | {r['min_normalised']:.4f} |")


if __name__ == "__main__":
    main()
