"""Federated merge rounds: simulated clients train the global model on their own (non-IID) data for a few steps,
send their models back (optionally as low-rank deltas), and the server aggregates them with a merge method —
task arithmetic with the FedAvg shares is FedAvg — or with a short merge3 search on its own item bank.

>>> from merge3.federated import FederatedConfig
>>> FederatedConfig.model_validate({"rounds": 3, "data": {"clients": ["upright", "rot90"]}}).aggregate.shares
'samples'
"""

from merge3.federated._clients import ClientUpdate, ClientWorker, client_seed, local_update, low_rank, send
from merge3.federated._config import (
    AggregationConfig,
    ClientsConfig,
    CompressionConfig,
    ExecutorConfig,
    FederatedConfig,
    LocalConfig,
    ModelConfig,
    SearchAggregation,
    load_federated,
    parse_federated,
)
from merge3.federated._rounds import FederatedRun, federate, resume_federation
from merge3.federated._server import client_shares, merge_clients, score

__all__ = [
    "AggregationConfig",
    "ClientUpdate",
    "ClientWorker",
    "ClientsConfig",
    "CompressionConfig",
    "ExecutorConfig",
    "FederatedConfig",
    "FederatedRun",
    "LocalConfig",
    "ModelConfig",
    "SearchAggregation",
    "client_seed",
    "client_shares",
    "federate",
    "load_federated",
    "local_update",
    "low_rank",
    "merge_clients",
    "parse_federated",
    "resume_federation",
    "score",
    "send",
]
