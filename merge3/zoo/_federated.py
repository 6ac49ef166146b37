"""Simulated federated clients on the digits data: each client holds its own training images, seen through its own
input domain (non-IID by construction), and the server holds an item bank of the held-out images under every client
domain, split into the items its aggregation may look at (search) and the items the report is scored on (test).

Training images are dealt to clients in disjoint, digit-stratified shards: no two clients hold the same image, and
no held-out image is in any shard.

>>> clients = digits_clients(["upright", "rot90"], seed=0)
>>> [(c.name, len(c.x) > 400, c.x.shape[1]) for c in clients]
[('upright', True, 64), ('rot90', True, 64)]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from merge3._errors import Merge3Error
from merge3.itembank import ItemBank
from merge3.zoo._digits import DigitsRecipe, domain_transform, load_split, write_domain_bank

@dataclass(frozen=True)
class ClientData:
    """One client's local training set (inputs already in its domain)."""

    name: str
    domain: str
    x: np.ndarray
    y: np.ndarray


def digits_clients(domains: list[str], seed: int = 0, samples_per_client: int | None = None) -> list[ClientData]:
    """One client per domain, each with a disjoint digit-stratified shard of the training images (``samples_per_client``
    caps a shard; by default the images are dealt out evenly)."""
    if not domains:
        raise Merge3Error("federated data: need at least one client")
    if len(set(domains)) != len(domains):
        raise Merge3Error(f"federated data: clients repeat a domain: {domains}")
    x_tr, y_tr, *_ = load_split(seed)
    order = np.random.default_rng(seed + 777).permutation(len(x_tr))
    order = order[np.argsort(y_tr[order], kind="stable")]  # grouped by digit, shuffled within a digit
    shards = [order[k::len(domains)] for k in range(len(domains))]  # round-robin: every shard has every digit
    out = []
    for domain, shard in zip(domains, shards):
        if samples_per_client is not None:
            if samples_per_client < 10:
                raise Merge3Error(f"federated data: samples_per_client = {samples_per_client} is below one per digit")
            shard = shard[np.random.default_rng(seed + 778).permutation(len(shard))[:samples_per_client]]
        shard = np.sort(shard)
        x = np.ascontiguousarray(domain_transform(domain, seed)(x_tr[shard]), dtype=np.float32)
        out.append(ClientData(name=domain, domain=domain, x=x, y=y_tr[shard].astype(np.int64)))
    return out


def write_federated_bank(path: str | Path, domains: list[str], seed: int = 0) -> ItemBank:
    """The server's item bank: every held-out image under every client domain, one task per client, answered by a
    classifier that outputs the ten digits' logits (the federated model itself; no per-task heads)."""
    return write_domain_bank(
        path, {d: d for d in domains}, DigitsRecipe(seed=seed), name="digits-federated",
        description="Held-out UCI digits under each federated client's domain; the model outputs logits.",
        source={"dataset": "sklearn.datasets.load_digits (UCI ML hand-written digits, 8×8)",
                "held_out": "stratified 50/50 (training images are dealt to clients)", "seed": seed})
