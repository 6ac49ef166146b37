"""Federated rounds in a run folder, resumable at any round boundary.

::

    runs/<name>/
      federated.yaml        the validated config
      federation.json       status, rounds finished, merge3 version, timings
      bank/                 the server's item bank (held-out images under every client domain; search/test split)
      global/round-NNNN/    the global model after round N (round-0000: the shared initialisation), atomic
      rounds.jsonl          one line per finished round, appended (fsynced) only once its global model is in place
      search/round-NNNN/    the server's merge3 search of round N (``aggregate.search``)
      log.txt, .lock        the log; the lock held by the one process writing the run

A run killed at any point resumes after its last finished round; everything a round does is a function of the seed,
the round and the previous global model, so the resumed run ends with the same model as one never interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from merge3 import __version__
from merge3._errors import Merge3Error
from merge3.federated._clients import ClientWorker, LocalClients, RayClients, client_seed, new_model
from merge3.federated._config import FederatedConfig, load_federated, parse_federated
from merge3.federated._server import RayServer, ServerWorker, score
from merge3.itembank import ItemBank
from merge3.models import MLP, check_not_a_link, load_model, load_state_dict, open_no_link, plain, save_state_dict, write_text_atomic
from merge3.runs import RunLock, new_run_folder
from merge3.zoo import digits_clients, write_federated_bank

CONFIG, META, ROUNDS = "federated.yaml", "federation.json", "rounds.jsonl"


@dataclass
class FederatedRun:
    """A federated run folder: its config, the record of every finished round and the global models.

    >>> run = FederatedRun("runs/fed-s0")  # doctest: +SKIP
    >>> run.rounds()[-1]["test_mean"], run.final_model()  # doctest: +SKIP
    """

    path: Path

    def __post_init__(self):
        self.path = Path(self.path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> FederatedRun:
        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / META).is_file():
            raise Merge3Error(f"'{path}' is not a merge3 federated run folder (no {CONFIG}/{META})")
        return cls(path)

    @property
    def config(self) -> FederatedConfig:
        return load_federated(self.path / CONFIG)

    @property
    def meta(self) -> dict:
        try:
            meta = json.loads((self.path / META).read_text())
        except (OSError, ValueError) as e:
            raise Merge3Error(f"{self.path / META}: cannot be read ({e})") from None
        if not isinstance(meta, dict):
            raise Merge3Error(f"{self.path / META}: not a federation record (a JSON object)")
        return meta

    def write_meta(self, **updates) -> None:
        meta = self.meta if (self.path / META).exists() else {}
        write_text_atomic(self.path / META, json.dumps(plain({**meta, **updates}), indent=2) + "\n")

    def log(self, message: str) -> None:
        with open_no_link(self.path / "log.txt", what="the run's log") as f:
            f.write(f"{_now()} {message}\n")

    def global_folder(self, round_: int) -> Path:
        return self.path / "global" / f"round-{round_:04d}"

    def rounds(self) -> list[dict]:
        """The finished rounds, in order: consecutive records whose global model is in place (a last line torn by a
        kill, and anything after it, is not a finished round)."""
        file = self.path / ROUNDS
        out: list[dict] = []
        for line in file.read_text().splitlines() if file.exists() else []:
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not isinstance(record, dict) or type(record.get("round")) is not int:
                break  # not a round record: a torn or edited tail
            consecutive = not out or record["round"] == out[-1]["round"] + 1
            if not consecutive or not self.global_folder(record["round"]).is_dir():
                break
            out.append(record)
        return out

    def repair(self) -> list[dict]:
        """Drop whatever follows the last finished round from ``rounds.jsonl`` (before a resume appends to it)."""
        done = self.rounds()
        text = "".join(json.dumps(r) + "\n" for r in done)
        file = self.path / ROUNDS
        if file.exists() and file.read_text() != text:
            write_text_atomic(file, text)
            self.log(f"rounds.jsonl: kept the {len(done)} finished round(s), dropped a torn or orphan tail")
        return done

    def final_model(self) -> Path:
        done = self.rounds()
        if not done:
            raise Merge3Error(f"federated run '{self.path}' has no finished round")
        return self.global_folder(done[-1]["round"])

    def append_round(self, record: dict) -> None:
        with open_no_link(self.path / ROUNDS, what="the run's rounds") as f:
            f.write(json.dumps(plain(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def federate(config: FederatedConfig | dict | str | os.PathLike, *, runs_dir: str | os.PathLike = "runs",
             name: str | None = None, log=print) -> FederatedRun:
    """Run a federated simulation in a new folder ``runs_dir/<name>`` and return it.

    >>> run = federate({"rounds": 2, "data": {"clients": ["upright", "rot90"]}}, runs_dir="/tmp/fed")  # doctest: +SKIP
    >>> [r["test_mean"] for r in run.rounds()]  # doctest: +SKIP
    """
    config = _as_config(config)
    name = name or f"{config.name}-s{config.seed}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    initial = _initial_model(config)  # a bad init folder fails before anything is created
    path, _ = new_run_folder(runs_dir, name, "merge3 federate --resume")
    run = FederatedRun(path)
    lock = RunLock(path).acquire()
    try:
        write_text_atomic(path / CONFIG, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        run.write_meta(status="running", created=_now(), merge3_version=__version__, name=name, rounds_done=0)
        write_federated_bank(path / "bank", config.data.clients, config.seed)
        if initial is not None:
            save_state_dict(initial, run.global_folder(0), config=MLP(config.model.sizes).config())
            bank = ItemBank.load(path / "bank")
            run.append_round({"round": 0, **score(bank, initial, config.model.sizes), "aggregator": "initialisation",
                              "bytes": {"upload": 0, "upload_dense": 0, "download": 0}, "clients": []})
    except BaseException:
        lock.release()
        shutil.rmtree(path, ignore_errors=True)  # nothing was trained yet: no half-made run is left
        raise
    log(f"federated run {path}: {len(config.data.clients)} clients, {config.rounds} rounds")
    return _drive(run, config, lock, log)


def resume_federation(run_dir: str | os.PathLike, *, log=print) -> FederatedRun:
    """Continue a federated run after its last finished round (``merge3 federate --resume RUN``)."""
    run = FederatedRun.open(run_dir)
    lock = RunLock(run.path).acquire()
    try:
        check_not_a_link(run.path / ROUNDS, "the run's rounds")  # appended to: never through a link
        check_not_a_link(run.path / "log.txt", "the run's log")
        config = run.config
        if run.meta.get("status") == "finished":
            raise Merge3Error(f"federated run '{run.path}' has already finished")
    except BaseException:
        lock.release()
        raise
    done = run.rounds()
    if not done and config.model.init != "independent":
        lock.release()
        raise Merge3Error(f"federated run '{run.path}': {ROUNDS} holds no finished round, not even round 0 (the "
                          "initial model): it was emptied or edited, so the run cannot continue; start a new one")
    log(f"resuming federated run {run.path} after round {done[-1]['round'] if done else 'none'}")
    run.write_meta(status="running", resumed=run.meta.get("resumed", 0) + 1)
    return _drive(run, config, lock, log)


def _as_config(config) -> FederatedConfig:
    if isinstance(config, FederatedConfig):
        return config
    if isinstance(config, dict):
        return parse_federated(config)
    return load_federated(config)


def _initial_model(config: FederatedConfig) -> dict | None:
    init = config.model.init
    if init == "independent":
        return None
    if init == "shared":
        return new_model(config.model.sizes, client_seed(config.seed, 0, 0)).state_dict()
    module = load_model(init)
    if not isinstance(module, MLP) or module.sizes != list(config.model.sizes):
        got = getattr(module, "sizes", type(module).__name__)
        raise Merge3Error(f"federated config: field 'model.init': '{init}' is not an MLP of sizes "
                          f"{list(config.model.sizes)} (got {got})")
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _drive(run: FederatedRun, config: FederatedConfig, lock: RunLock, log) -> FederatedRun:
    try:
        _rounds(run, config, log)
    except BaseException as e:
        run.write_meta(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=str(e)[:500])
        run.log(f"stopped: {type(e).__name__}: {e}")
        raise
    finally:
        lock.release()
    run.write_meta(status="finished", finished=_now())
    return run


def _clients(config: FederatedConfig, run: FederatedRun, log):
    clients = digits_clients(config.data.clients, config.seed, config.data.samples_per_client)
    args = (clients, config.model.sizes, config.local, config.compress, config.seed)
    if config.executor.kind == "ray":
        return RayClients(args, config.executor.actors, config.executor.address, run.path / "ray", log)
    return LocalClients(ClientWorker(*args))


def _rounds(run: FederatedRun, config: FederatedConfig, log) -> None:
    done = run.repair()
    start = done[-1]["round"] + 1 if done else 1
    if start > config.rounds:
        return
    global_model = load_state_dict(run.global_folder(start - 1)) if done else None
    clients = _clients(config, run, log)  # on Ray, this starts (or joins) Ray
    try:
        server = (RayServer if config.executor.kind == "ray" else ServerWorker)(config, run.path / "bank")
        try:
            for round_ in range(start, config.rounds + 1):
                global_model = _one_round(run, config, clients, server, global_model, round_, log)
        finally:
            server.close()
    finally:
        clients.close()


def _one_round(run, config, clients, server, global_model, round_: int, log) -> dict:
    started = time.perf_counter()
    search_folder = run.path / "search" / f"round-{round_:04d}"
    for leftover in (run.global_folder(round_), search_folder):
        shutil.rmtree(leftover, ignore_errors=True)  # a round that was killed before its record: redone
    updates = clients.round(global_model, round_)
    trained = time.perf_counter()
    merged, aggregator, scores = server.round(global_model, updates, config.seed * 100003 + round_,
                                              run.global_folder(round_ - 1), search_folder)
    save_state_dict(merged, run.global_folder(round_), config=MLP(config.model.sizes).config())
    model_bytes = sum(v.numel() * v.element_size() for v in merged.values())
    record = {
        "round": round_, **scores, "aggregator": aggregator,
        "bytes": {"upload": sum(u.sent_bytes for u in updates), "upload_dense": sum(u.dense_bytes for u in updates),
                  "download": model_bytes * len(updates) if global_model is not None else 0},
        "clients": [{"name": u.name, "samples": u.samples, "loss": u.loss, "sent_bytes": u.sent_bytes}
                    for u in updates],
        "seconds": {"clients": trained - started, "server": time.perf_counter() - trained},
    }
    run.append_round(record)
    run.write_meta(rounds_done=round_)
    test = f"test {scores['test_mean']:.4f}" if scores.get("test_mean") is not None else "no test split"
    message = (f"round {round_}: search split {scores['search_mean']:.4f}, {test}, "
               f"{record['bytes']['upload'] / 2**20:.2f} MiB up")
    run.log(message)
    log(message)
    return merged


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


__all__ = ["FederatedRun", "federate", "resume_federation"]
