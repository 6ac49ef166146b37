"""Clients: a few optimiser steps on local data from the global model, and what they send back (optionally as
low-rank factors). Training runs in process or on Ray actors; both give the same bytes for a seed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from merge3.models import MLP, truncated_svd
from merge3.zoo import ClientData

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """What one client returns after a round: its model (as the server reconstructs it from what was sent), how many
    samples it trained on, its mean loss over the last local steps and the bytes it sent."""

    name: str
    model: StateDict
    samples: int
    loss: float
    sent_bytes: int
    dense_bytes: int


def client_seed(seed: int, round_: int, client: int) -> int:
    """The seed of one client's round (its initialisation when ``init: independent``, its batches): a function of
    the run's seed, the round and the client only, so a resumed run repeats exactly what was lost."""
    return int(np.random.SeedSequence([seed, round_, client]).generate_state(1)[0])


def new_model(sizes: Sequence[int], seed: int) -> MLP:
    """An MLP initialised from ``seed`` without touching the global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(list(sizes))


def local_update(global_model: Mapping[str, torch.Tensor] | None, sizes: Sequence[int], data: ClientData, local,
                 seed: int) -> tuple[StateDict, float]:
    """``local.steps`` steps of ``local.optimizer`` on the client's data from ``global_model`` (a fresh optimiser
    every round, as FedAvg; ``None``: from the client's own initialisation). Returns the weights and the mean loss
    of the last ten steps.

    >>> from merge3.federated import LocalConfig
    >>> from merge3.zoo import digits_clients
    >>> client = digits_clients(["upright"], samples_per_client=50)[0]
    >>> weights, loss = local_update(None, [64, 16, 10], client, LocalConfig(steps=3), seed=0)
    >>> sorted(weights)[:2], loss > 0
    (['layers.0.bias', 'layers.0.weight'], True)
    """
    model = new_model(sizes, seed)
    if global_model is not None:
        model.load_state_dict(global_model)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    opt = (torch.optim.Adam if local.optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=local.lr)
    batches = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(local.steps):
        idx = torch.randint(len(x), (min(local.batch_size, len(x)),), generator=batches)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, float(np.mean(losses[-10:]))


def low_rank(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> tuple[torch.Tensor, int]:
    """What the server rebuilds from a 2-D delta sent as its truncated SVD factors (``rank`` triplets, or the fewest
    keeping ``energy`` of its squared norm; float32 factors, as sent), and that rank.

    >>> d = torch.diag(torch.tensor([3., 1., 0.]))
    >>> kept, k = low_rank(d, energy=0.9)
    >>> k, kept.diagonal().tolist()
    (1, [3.0, 0.0, 0.0])
    """
    u, s, vh = truncated_svd(delta, rank, energy)
    return ((u * s) @ vh).to(delta.dtype), len(s)


def send(global_model: Mapping[str, torch.Tensor] | None, model: StateDict, compress) -> tuple[StateDict, int, int]:
    """What the server receives from a client: the model rebuilt from the sent delta, the bytes sent and the bytes
    a dense delta would take. Without compression (or without a global model to take a delta from) the weights go
    dense; with it, a 2-D delta goes as factors U·s (m × k) and Vᵀ (k × n) when that is smaller."""
    dense = sum(v.numel() * v.element_size() for v in model.values())
    if compress is None or global_model is None:
        return model, dense, dense
    received, sent = {}, 0
    for key, value in model.items():
        delta = value - global_model[key]
        if delta.ndim == 2 and delta.is_floating_point():
            m, n = delta.shape
            kept, k = low_rank(delta, compress.rank, compress.energy)
            if k * (m + n) < m * n:
                received[key] = global_model[key] + kept
                sent += k * (m + n) * delta.element_size()
                continue
        received[key] = value
        sent += value.numel() * value.element_size()
    return received, sent, dense


class ClientWorker:
    """Holds every client's data and trains whichever client it is asked for (in process, or as a Ray actor)."""

    def __init__(self, clients: Sequence[ClientData], sizes: Sequence[int], local, compress, seed: int,
                 threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.clients, self.sizes = list(clients), list(sizes)
        self.local, self.compress, self.seed = local, compress, seed

    def train(self, global_model: StateDict | None, round_: int, index: int) -> ClientUpdate:
        data = self.clients[index]
        weights, loss = local_update(global_model, self.sizes, data, self.local, client_seed(self.seed, round_, index))
        received, sent, dense = send(global_model, weights, self.compress)
        return ClientUpdate(data.name, received, len(data.x), loss, sent, dense)


class LocalClients:
    """Every client trained one after another in this process."""

    def __init__(self, worker: ClientWorker):
        self.worker = worker

    def round(self, global_model: StateDict | None, round_: int) -> list[ClientUpdate]:
        return [self.worker.train(global_model, round_, k) for k in range(len(self.worker.clients))]

    def close(self) -> None:
        pass


class RayClients:
    """Clients trained on a pool of Ray actors (one CPU and one torch thread each); the global model goes into the
    object store once per round."""

    def __init__(self, worker_args: tuple, actors: int, address: str | None, temp_dir, log=print):
        import ray

        from merge3.runtime import init_ray

        self._owns_ray, _ = init_ray(address, temp_dir)
        remote = ray.remote(num_cpus=1)(ClientWorker)
        n = min(actors, len(worker_args[0]))
        self.actors = [remote.remote(*worker_args, threads=1) for _ in range(n)]
        self.n_clients = len(worker_args[0])
        log(f"clients: {self.n_clients} on {n} Ray actor(s)")

    def round(self, global_model: StateDict | None, round_: int) -> list[ClientUpdate]:
        import ray

        ref = ray.put(global_model)
        futures = [self.actors[k % len(self.actors)].train.remote(ref, round_, k) for k in range(self.n_clients)]
        return ray.get(futures)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._owns_ray:
            ray.shutdown()
