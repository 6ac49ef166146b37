"""Federated rounds: FedAvg is task arithmetic with the sample shares, a run is deterministic for a seed and
resumable at every round boundary (a kill anywhere → the same final model), low-rank deltas cost fewer bytes, the
server's search sees only its search split, and Ray clients train exactly what local ones do."""

from __future__ import annotations

import json

import pytest
import torch

from merge3 import Merge3Error
from merge3.federated import (
    ClientUpdate,
    CompressionConfig,
    FederatedConfig,
    FederatedRun,
    federate,
    low_rank,
    merge_clients,
    resume_federation,
    send,
)
from merge3.models import load_state_dict

CLIENTS = ["upright", "rot90", "inverted"]


def config(**over) -> dict:
    base = {"name": "fed", "seed": 3, "rounds": 3, "data": {"clients": CLIENTS, "samples_per_client": 80},
            "model": {"sizes": [64, 32, 10]}, "local": {"steps": 10, "batch_size": 16, "lr": 0.01}}
    return {**base, **over}


def quiet(*_):
    pass


def same_models(a, b) -> bool:
    sa, sb = load_state_dict(a), load_state_dict(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def rounds_without_timings(run: FederatedRun) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in run.rounds()]


def update(name, model, samples):
    return ClientUpdate(name, model, samples, 0.0, 0, 0)


def test_task_arithmetic_with_sample_shares_is_fedavg(rng):
    cfg = FederatedConfig.model_validate(config())
    global_model = {"w": torch.randn(4, 3, generator=rng), "b": torch.randn(4, generator=rng)}
    clients = [{k: v + torch.randn(v.shape, generator=rng) for k, v in global_model.items()} for _ in range(3)]
    samples = [10, 30, 60]
    merged, info = merge_clients(cfg.aggregate, global_model, [update(str(i), m, n) for i, (m, n) in
                                                                enumerate(zip(clients, samples))])
    fedavg = {k: sum(n / 100 * m[k] for m, n in zip(clients, samples)) for k in global_model}
    assert all(torch.allclose(merged[k], fedavg[k], atol=1e-6) for k in fedavg)
    assert info["params"]["weights"] == [0.1, 0.3, 0.6]


def test_low_rank_deltas_are_exact_at_their_rank_and_cost_fewer_bytes(rng):
    u, v = torch.randn(40, 3, generator=rng), torch.randn(3, 50, generator=rng)
    global_model = {"w": torch.randn(40, 50, generator=rng), "b": torch.zeros(40)}
    model = {"w": global_model["w"] + u @ v, "b": torch.ones(40)}
    received, sent, dense = send(global_model, model, CompressionConfig(rank=3))
    assert torch.allclose(received["w"], model["w"], atol=1e-4) and torch.equal(received["b"], model["b"])
    assert sent == 4 * (3 * (40 + 50) + 40) and dense == 4 * (40 * 50 + 40)
    kept, rank = low_rank(u @ v, energy=1.0)
    assert rank == 3 and torch.allclose(kept, u @ v, atol=1e-4)
    _, sent_rank1, _ = send(global_model, model, CompressionConfig(rank=1))
    assert sent_rank1 < sent
    whole, same, _ = send(global_model, model, CompressionConfig(rank=40))  # no cheaper than dense: sent dense
    assert torch.equal(whole["w"], model["w"]) and same == dense


def test_a_run_is_deterministic_and_records_every_round(tmp_path):
    a = federate(config(), runs_dir=tmp_path, name="a", log=quiet)
    b = federate(config(), runs_dir=tmp_path, name="b", log=quiet)
    assert same_models(a.final_model(), b.final_model())
    assert rounds_without_timings(a) == rounds_without_timings(b)
    rounds = a.rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and a.meta["status"] == "finished"
    assert rounds[-1]["test_mean"] > rounds[0]["test_mean"] + 0.15  # it learns, scored on the test split
    assert set(rounds[-1]["test"]) == set(CLIENTS)
    assert rounds[1]["bytes"]["upload"] == rounds[1]["bytes"]["upload_dense"] == 3 * 4 * (64 * 32 + 32 + 32 * 10 + 10)
    other_seed = federate(config(seed=4), runs_dir=tmp_path, name="c", log=quiet)
    assert not same_models(a.final_model(), other_seed.final_model())


@pytest.mark.parametrize("where", ["before-round", "after-the-model-before-its-record", "torn-record"])
def test_a_run_killed_anywhere_resumes_to_the_same_final_model(where, tmp_path, monkeypatch):
    whole = federate(config(), runs_dir=tmp_path, name="whole", log=quiet)
    import merge3.federated._rounds as rounds

    if where == "before-round":
        real = rounds._one_round

        def kill_at_round_3(run, cfg, clients, server, model, round_, log):
            if round_ == 3:
                raise KeyboardInterrupt
            return real(run, cfg, clients, server, model, round_, log)
        monkeypatch.setattr(rounds, "_one_round", kill_at_round_3)
    else:
        real_append = FederatedRun.append_round

        def kill_at_record_2(self, record):
            if record["round"] == 2:
                if where == "torn-record":
                    with open(self.path / rounds.ROUNDS, "a") as f:
                        f.write(json.dumps(record)[:40])
                raise KeyboardInterrupt
            real_append(self, record)
        monkeypatch.setattr(FederatedRun, "append_round", kill_at_record_2)
    with pytest.raises(KeyboardInterrupt):
        federate(config(), runs_dir=tmp_path, name="killed", log=quiet)
    monkeypatch.undo()
    killed = FederatedRun.open(tmp_path / "killed")
    assert killed.meta["status"] == "interrupted"
    assert [r["round"] for r in killed.rounds()] == ([0, 1, 2] if where == "before-round" else [0, 1])
    resumed = resume_federation(tmp_path / "killed", log=quiet)
    assert same_models(whole.final_model(), resumed.final_model())
    assert rounds_without_timings(whole) == rounds_without_timings(resumed)
    with pytest.raises(Merge3Error, match="already finished"):
        resume_federation(tmp_path / "killed", log=quiet)


def test_compressed_clients_send_less_and_still_learn(tmp_path):
    dense = federate(config(), runs_dir=tmp_path, name="dense", log=quiet).rounds()
    low = federate(config(compress={"rank": 2}), runs_dir=tmp_path, name="low", log=quiet).rounds()
    assert low[1]["bytes"]["upload"] < dense[1]["bytes"]["upload"] / 5
    assert low[1]["bytes"]["upload_dense"] == dense[1]["bytes"]["upload_dense"]
    assert low[-1]["test_mean"] > low[0]["test_mean"] + 0.1


def test_the_server_search_sees_only_its_search_split(tmp_path):
    search = {"methods": ["task_arithmetic"], "granularity": "model", "population": 4, "generations": 2}
    run = federate(config(rounds=1, aggregate={"search": search}), runs_dir=tmp_path, name="s", log=quiet)
    info = run.rounds()[1]["aggregator"]["search"]
    from merge3.runs import Run

    search_run = Run.open(info["run"])
    assert search_run.meta["status"] == "finished" and info["candidates"] >= 4
    from merge3.itembank import ItemBank

    bank = ItemBank.load(run.path / "bank")
    assert info["items_answered"] <= info["candidates"] * len(bank.search_indices)  # never a test item
    assert run.rounds()[1]["test_mean"] is not None


def test_independent_inits_are_aligned_by_c2m3(tmp_path):
    run = federate(config(rounds=2, local={"steps": 60, "batch_size": 16, "lr": 0.01},
                          model={"sizes": [64, 32, 10], "init": "independent"},
                          aggregate={"method": "c2m3", "params": {"max_iter": 20}}), runs_dir=tmp_path, name="c",
                   log=quiet)
    first, second = run.rounds()
    assert (first["round"], second["round"]) == (1, 2) and first["bytes"]["download"] == 0  # nothing broadcast first
    assert 0.15 < first["test_mean"] < second["test_mean"]  # chance is 0.1
    with pytest.raises(Merge3Error, match="same-task method"):
        federate(config(model={"sizes": [64, 32, 10], "init": "independent"}), runs_dir=tmp_path, log=quiet)


def test_ray_clients_and_server_compute_what_local_ones_do(ray_session, tmp_path):
    import os

    search = {"methods": ["task_arithmetic"], "granularity": "model", "population": 4, "generations": 1}
    local = federate(config(rounds=2, aggregate={"search": search}), runs_dir=tmp_path, name="local", log=quiet)
    on_ray = federate(config(rounds=2, aggregate={"search": search}, executor={"kind": "ray", "actors": 2}),
                      runs_dir=tmp_path, name="ray", log=quiet)
    assert same_models(local.final_model(), on_ray.final_model())
    strip = lambda rounds: [{**r, "aggregator": {"search": {**r["aggregator"]["search"], "run": None}}}  # noqa: E731
                            for r in rounds[1:]]
    assert strip(rounds_without_timings(local)) == strip(rounds_without_timings(on_ray))
    from merge3.runs import Run

    server_search = Run.open(on_ray.rounds()[1]["aggregator"]["search"]["run"])
    assert server_search.meta["workers"] != [f"local:{os.getpid()}"]  # the server ran on an actor


def test_sigkill_mid_run_then_cli_resume_gives_the_uninterrupted_final_model(tmp_path):
    import signal

    import yaml
    from _runs import cli, wait_for_lines

    cfg = config(rounds=12, local={"steps": 40, "batch_size": 16, "lr": 0.01})
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(cfg))
    whole = federate(cfg, runs_dir=tmp_path / "runs", name="whole", log=quiet)
    proc = cli("federate", tmp_path / "f.yaml", "--runs-dir", tmp_path / "runs", "--name", "killed", wait=False)
    wait_for_lines(tmp_path / "runs" / "killed" / "rounds.jsonl", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = FederatedRun.open(tmp_path / "runs" / "killed").rounds()
    assert 3 <= len(done) < 13  # killed mid-run
    resumed = cli("federate", "--resume", tmp_path / "runs" / "killed")
    assert resumed.returncode == 0, resumed.stderr
    run = FederatedRun.open(tmp_path / "runs" / "killed")
    assert same_models(whole.final_model(), run.final_model())
    assert rounds_without_timings(whole) == rounds_without_timings(run)
