"""MASS-style routing over skill packs on the digits and MiniLM zoos: routed vs TSV-Merge vs the fine-tunes.

Each fine-tune is compressed to a skill pack (TSV-C's rank r/T per layer). A routed model sends every input to the
task whose pack's subspace (right singular vectors of one layer's delta) leaves the smallest residual of that
layer's input, then runs the base plus that task's components. The routing layer is chosen among the model's
linear layers by routing accuracy on the bank's **search** split; everything reported is on the **test** split:
per-task accuracy of the fine-tunes, TSV-Merge (α picked on the search split), the packs with the true task given
(an oracle router), the routed model (top 1, and top 2: base plus the two best tasks' components), and routing accuracy (share of items sent to their own task). Inference
overhead: seconds to answer every test item, routed vs one plain model. Writes bench/results/routing.json.

Usage::

    .venv/bin/python bench/routing.py [--zoos digits minilm] [--out FILE]
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
RESULTS = ROOT / "bench" / "results" / "routing.json"
ALPHAS = (0.5, 1.0, 1.5, 2.0)


def main(argv=None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoos", nargs="+", default=["digits", "minilm"], choices=["digits", "minilm"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {"split": "test split (routing layer and TSV-M α chosen on the search split)", "zoos": {},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    for name in args.zoos:
        result["zoos"][name] = one_zoo(name)
        print(json.dumps({k: v for k, v in result["zoos"][name].items() if k != "layers"}, indent=1), flush=True)
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


def _inputs(bank, rows, evaluator):
    """The model's inputs for ``rows`` as the evaluator would give them (images, or token ids with their mask)."""
    import torch

    if "input" in bank.items:
        return (torch.tensor(np.stack(bank.items["input"].to_numpy()[rows]), dtype=torch.float32),), {}
    width = int(evaluator.widths[rows].max())
    ids, mask = evaluator._batch(rows, width)  # noqa: SLF001  (bench: the evaluator's own padding)
    return (), {"input_ids": ids, "attention_mask": mask}


def one_zoo(name: str) -> dict:
    import torch

    from merge3.itembank import ItemBank, load_model_for, make_evaluator
    from merge3.methods import tsv_merge
    from merge3.models import build_routed, compress_models, load_model, load_state_dict

    zoo = _zoo(name)
    bank = ItemBank.load(zoo.bank, warn=False)
    tasks = list(zoo.finetuned)
    evaluate = make_evaluator(bank, tokenizer_from=zoo.base)
    search, test = bank.search_indices, bank.test_indices

    def per_task(module, rows) -> dict:
        return bank.per_task_accuracy(evaluate(module, rows), rows)

    base_module = load_model_for(bank, zoo.base)
    base_sd, fts = load_state_dict(zoo.base), [load_state_dict(p) for p in zoo.finetuned.values()]

    def with_state(state):
        base_module.load_state_dict(state, strict=False)
        return base_module
    own = {t: per_task(load_model_for(bank, p), test)[t] for t, p in zoo.finetuned.items()}
    alpha = max(ALPHAS, key=lambda a: np.mean(list(per_task(with_state(tsv_merge(base_sd, fts, alpha=a)), search)
                                                    .values())))
    tsv = per_task(with_state(tsv_merge(base_sd, fts, alpha=alpha)), test)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        compress_models(zoo.base, {t: str(p) for t, p in zoo.finetuned.items()}, tmp / "packs")
        oracle = {t: per_task(load_model_for(bank, tmp / "packs" / t), test)[t] for t in tasks}
        layers = _candidate_layers(load_model(zoo.base, hf_class="AutoModel") if name == "minilm"
                                   else load_model(zoo.base))
        accuracy_by_layer = {}
        for layer in layers:
            build_routed({t: tmp / "packs" / t for t in tasks}, tmp / f"routed-{layer}", layer=layer)
            routed = load_model_for(bank, tmp / f"routed-{layer}")
            accuracy_by_layer[layer] = _routing_accuracy(routed, bank, search, evaluate)
            print(f"{name}: routing layer {layer}: search-split routing accuracy "
                  f"{np.mean(list(accuracy_by_layer[layer].values())):.3f}", flush=True)
        layer = max(layers, key=lambda k: np.mean(list(accuracy_by_layer[k].values())))
        routed = load_model_for(bank, tmp / f"routed-{layer}")
        routed_acc = per_task(routed, test)
        routing_test = _routing_accuracy(routed, bank, test, evaluate)
        build_routed({t: tmp / "packs" / t for t in tasks}, tmp / "routed-top2", layer=layer, top_k=2)
        top2 = per_task(load_model_for(bank, tmp / "routed-top2"), test)
        timings = {}
        for label, module in (("one model", base_module), ("routed", routed)):
            started = time.perf_counter()
            evaluate(module, test)
            timings[label] = time.perf_counter() - started
    del torch
    return {"tasks": tasks, "fine_tuned": own, "tsv_merge": tsv, "tsv_alpha": alpha, "oracle_route_packs": oracle,
            "routed": routed_acc, "routed_top2": top2, "routing_layer": layer, "routing_accuracy_test": routing_test,
            "layers": {k: v for k, v in accuracy_by_layer.items()}, "seconds_all_test_items": timings,
            "overhead": timings["routed"] / timings["one model"], "test_items": int(len(test))}


def _candidate_layers(module) -> list[str]:
    """The linear layers a router may read: every one of an MLP; the first of each transformer block (the query)."""
    from torch import nn

    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    blocks = [n for n in names if n.endswith("attention.self.query")]
    return blocks or names


def _routing_accuracy(routed, bank, rows, evaluate) -> dict:
    """Per task, the share of its items the router sends to it (in the evaluator's batches)."""
    out = {}
    for task in bank.tasks:
        mine = np.array([r for r in rows if bank.task_of[r] == task])
        chosen = []
        for start in range(0, len(mine), 64):
            args, kwargs = _inputs(bank, mine[start:start + 64], evaluate)
            chosen += [routed.tasks[i] for i in routed.route(*args, **kwargs).tolist()]
        out[task] = float(np.mean(np.array(chosen) == task))
    return out


def _table(result: dict) -> None:
    for name, z in result["zoos"].items():
        print(f"\n{name}: routing layer {z['routing_layer']} (chosen on the search split); TSV-M α = {z['tsv_alpha']}; "
              f"routed inference {z['overhead']:.1f}× one model's time")
        print("| task | fine-tune | TSV-Merge | pack, true task given | routed | routed, top 2 | routing accuracy |")
        print("|---|---|---|---|---|---|---|")
        for t in z["tasks"]:
            print(f"| {t} | {z['fine_tuned'][t]:.3f} | {z['tsv_merge'][t]:.3f} | {z['oracle_route_packs'][t]:.3f} | "
                  f"{z['routed'][t]:.3f} | {z['routed_top2'][t]:.3f} | {z['routing_accuracy_test'][t]:.3f} |")
        mean = lambda d: np.mean(list(d.values()))  # noqa: E731
        print(f"| mean | {mean(z['fine_tuned']):.3f} | {mean(z['tsv_merge']):.3f} | "
              f"{mean(z['oracle_route_packs']):.3f} | {mean(z['routed']):.3f} | {mean(z['routed_top2']):.3f} | "
              f"{mean(z['routing_accuracy_test']):.3f} |")


if __name__ == "__main__":
    main()
