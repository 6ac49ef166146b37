"""The server: aggregates the clients' models with a merge method (or a short merge3 search on its own item bank)
and scores the new global model on every item of its bank, per split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from merge3.federated._clients import ClientUpdate, StateDict, new_model
from merge3.itembank import ItemBank, make_evaluator
from merge3.methods import get_method, layer_groups, merge_groups, plans_from_choices
from merge3.models import MLP, check_finite, plain, save_state_dict


def client_shares(updates: Sequence[ClientUpdate], shares: str) -> list[float]:
    """FedAvg's weights: each client's share of the training samples (``uniform``: 1/K each)."""
    if shares == "uniform":
        return [1.0 / len(updates)] * len(updates)
    total = sum(u.samples for u in updates)
    return [u.samples / total for u in updates]


def merge_clients(aggregate, global_model: StateDict | None, updates: Sequence[ClientUpdate]) -> tuple[StateDict, dict]:
    """One merge method over the clients' models, every client weighted by its share unless ``params`` sets the
    weights: task arithmetic is then θ_g + Σ p_k (θ_k − θ_g) = Σ p_k θ_k, which is FedAvg."""
    method = get_method(aggregate.method)
    params = dict(aggregate.params)
    if "weights" in method.params and params.get("weights") is None:
        params["weights"] = client_shares(updates, aggregate.shares)
    models = [u.model for u in updates]
    with torch.no_grad():
        if method.same_task:
            merged = method(models=models, **params)  # aligned, then averaged
        else:
            merged = method(global_model, models, **params)
    return merged, {"method": aggregate.method, "params": plain(params)}


def search_clients(aggregate, global_folder: Path, global_model: StateDict, updates: Sequence[ClientUpdate],
                   sizes: Sequence[int], bank_path: Path, folder: Path, seed: int) -> tuple[StateDict, dict]:
    """A merge3 search over the clients' deltas, on the search split of the server's bank (never its test split),
    recorded as an ordinary run in ``folder/search``; the new global model is its best candidate."""
    from merge3._api import search  # the application layer: a round's search is an ordinary merge3 run

    cfg = aggregate.search
    config = MLP(list(sizes)).config()
    endpoints = []
    for update in updates:
        path = folder / "clients" / update.name
        save_state_dict(update.model, path, config=config, overwrite=True)
        endpoints.append(str(path))
    space = {
        "name": folder.name, "seed": seed, "device": "cpu",
        "models": {"base": str(global_folder), "endpoints": endpoints, "names": [u.name for u in updates]},
        "bank": {"path": str(bank_path), "items_per_task": cfg.items_per_task,
                 "estimator": "naive" if cfg.items_per_task else "full"},
        "genome": {"granularity": cfg.granularity, "methods": cfg.methods,
                   "weights": {"low": cfg.weights[0], "high": cfg.weights[1]}},
        "objectives": ["mean"],
        "engine": {"name": cfg.engine, "population": cfg.population, "generations": cfg.generations},
        "executor": {"kind": "local"},
    }
    outcome = search(space, runs_dir=folder, name="search", progress=_Silent())
    best = outcome.best
    groups = layer_groups(global_model, cfg.granularity)
    with torch.no_grad():
        merged = merge_groups(global_model, [u.model for u in updates], plans_from_choices(groups, best.plan))
    every_rung = outcome.run.records(every_rung=True)
    return merged, {"search": {"run": str(outcome.run.path), "best_search_estimate": best.mean,
                               "plan": plain(best.plan),
                               "candidates": len(outcome.run.records()),
                               "items_answered": int(sum(r.items_evaluated for r in every_rung))}}


class _Silent:
    """A progress sink that shows nothing: a round's search logs its generations in its own run's log.txt."""

    def advance(self, record) -> None:
        pass

    def generation(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


class ServerWorker:
    """The server of a run: aggregates a round's client models and scores the new global model on its bank, in
    process or as a Ray actor (``RayServer``)."""

    def __init__(self, config, bank_path: Path, threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.config, self.bank_path = config, Path(bank_path)
        self.bank = ItemBank.load(self.bank_path)

    def round(self, global_model: StateDict | None, updates: Sequence[ClientUpdate], seed: int, global_folder: Path,
              search_folder: Path) -> tuple[StateDict, dict, dict]:
        """(new global model, how it was aggregated, its scores per split)."""
        cfg = self.config
        if cfg.aggregate.search is not None:
            merged, aggregator = search_clients(cfg.aggregate, global_folder, global_model, updates, cfg.model.sizes,
                                                self.bank_path, search_folder, seed)
        else:
            merged, aggregator = merge_clients(cfg.aggregate, global_model, updates)
        merged = {k: v.contiguous() for k, v in merged.items()}
        return merged, aggregator, score(self.bank, merged, cfg.model.sizes)

    def close(self) -> None:
        pass


class RayServer:
    """The server as a Ray actor pinned to the driver's node (its search writes into the run folder there); it
    takes no CPU from the clients' pool, since it works only while they wait."""

    def __init__(self, config, bank_path: Path):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = ray.remote(num_cpus=0)(ServerWorker).options(scheduling_strategy=here).remote(
            config, bank_path, threads=1)

    def round(self, *args) -> tuple[StateDict, dict, dict]:
        import ray

        return ray.get(self.actor.round.remote(*args))

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


def score(bank: ItemBank, model: StateDict, sizes: Sequence[int]) -> dict:
    """Per-task accuracy of a global model on every item of the bank's search and test splits, and their means."""
    check_finite(model, "the aggregated global model")
    module = new_model(sizes, 0)
    module.load_state_dict(model)
    module.eval()
    correct = make_evaluator(bank)(module)
    splits = bank.per_split_accuracy(correct, np.arange(len(bank)))
    out = {}
    for split, per_task in splits.items():
        out[split] = per_task
        out[f"{split}_mean"] = None if not per_task else float(np.mean(list(per_task.values())))
    return out
