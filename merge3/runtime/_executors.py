"""Executors: run candidate evaluations in process or on a pool of Ray actors.

Both take a *workload factory*: a picklable object whose ``load_inputs()`` reads the large shared inputs (base and
endpoint weights) once on the driver, and whose ``build(inputs)`` makes the resident workload on a worker (models on
its device, precomputed merge factors, evaluator). A workload answers ``evaluate(plan) -> CandidateResult``.

The Ray executor puts the inputs into the object store once (``ray.put``), keeps every actor busy while candidates
wait (each actor gets the next candidate the moment it returns one), and retries a candidate on a fresh actor when
its actor dies.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from merge3._errors import Merge3Error
from merge3.runtime._result import CandidateResult


class Workload(Protocol):
    def evaluate(self, request: Any) -> CandidateResult: ...


class WorkloadFactory(Protocol):
    def load_inputs(self) -> Any: ...

    def build(self, inputs: Any) -> Workload: ...


def describe_error(error: BaseException, worker: str, workload: Any = None) -> str:
    """One line for evaluations.jsonl; out-of-memory names the worker, the model size and the device memory."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
        size = getattr(workload, "model_bytes", None)
        device = getattr(workload, "device", None)
        total = None
        if device is not None and str(device).startswith("cuda"):
            total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return (f"OutOfMemoryError on {worker}: model {_gib(size)} on {device or 'its device'} with "
                f"{_gib(total)} of memory; use fewer actors per GPU or a smaller dtype")
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".strip()


def _gib(n: int | None) -> str:
    return "unknown size" if n is None else f"{n / 2**30:.2f} GiB"


def safe_evaluate(workload: Workload, request: Any, worker: str) -> CandidateResult:
    """Evaluate, turning any exception into a failed result so that the search goes on."""
    try:
        result = workload.evaluate(request)
    except Exception as e:  # a failed candidate is data, not a crash of the search
        result = CandidateResult(error=describe_error(e, worker, workload), details={"traceback": traceback.format_exc(limit=5)})
    result.worker = worker
    return result


class LocalExecutor:
    """In-process, one worker: for debugging and the smallest jobs."""

    def __init__(self, factory: WorkloadFactory):
        self.workload = factory.build(factory.load_inputs())
        self.name = f"local:{os.getpid()}"

    def submit(self, requests: Sequence[Any]) -> Iterator[tuple[int, CandidateResult]]:
        for i, request in enumerate(requests):
            yield i, safe_evaluate(self.workload, request, self.name)

    def workers(self) -> list[str]:
        return [self.name]

    def close(self) -> None:
        self.workload = None


def init_ray(address: str | None = None, temp_dir: str | os.PathLike | None = None,
             num_cpus: int | None = None) -> tuple[bool, str | None]:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a local Ray writing only under ``temp_dir``.

    Returns whether this call initialised Ray (and so should shut it down), and the temp dir a local Ray was given
    (a short link when ``temp_dir`` is too long for Ray's sockets; None when connecting to a cluster).
    """
    import ray

    if ray.is_initialized():
        return False, None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    if address:
        ray.init(address=address, **kwargs)
        return True, None
    ray_dir = short_temp_dir(temp_dir) if temp_dir is not None else None
    if ray_dir is not None:
        kwargs["_temp_dir"] = ray_dir
    ray.init(num_cpus=num_cpus, **kwargs)
    return True, ray_dir


_UNIX_SOCKET_ROOM = 44  # Ray adds ~62 characters of session and socket names; AF_UNIX paths stop at 107


def short_temp_dir(path: str | os.PathLike) -> str:
    """A path for Ray's temp dir that keeps its Unix socket paths legal.

    Ray's files go under ``path`` (inside the run). When that path is too long for Ray's sockets, a short symbolic
    link in the system temp folder points to it; the link is the only thing written outside the run.
    """
    import hashlib
    import tempfile

    real = Path(path).resolve()
    real.mkdir(parents=True, exist_ok=True)
    if len(str(real)) <= _UNIX_SOCKET_ROOM:
        return str(real)
    link = Path(tempfile.gettempdir()) / f"merge3-ray-{hashlib.sha1(str(real).encode()).hexdigest()[:10]}"
    if link.is_symlink() and link.resolve() != real:
        link.unlink()
    if not link.exists():
        link.symlink_to(real, target_is_directory=True)
    return str(link)


class _ActorBody:
    """The Ray actor: builds its workload once, then evaluates plans one at a time."""

    def __init__(self, factory: WorkloadFactory, inputs: Any, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.name = f"{socket.gethostname()}/node-{ray_node_id()[:8]}/pid-{os.getpid()}"
        self.workload = factory.build(inputs)

    def evaluate(self, request: Any) -> CandidateResult:
        return safe_evaluate(self.workload, request, self.name)

    def identity(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "node": ray_node_id()}


def ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class RayExecutor:
    """A pool of Ray actors holding the models resident; same results as ``LocalExecutor`` for the same seed.

    ``num_gpus`` per actor may be fractional (several actors share a GPU); with no GPU the actors run on CPU with
    ``threads`` torch threads each.
    """

    def __init__(self, factory: WorkloadFactory, actors: int = 2, num_gpus: float = 0.0, threads: int = 1,
                 address: str | None = None, temp_dir: str | os.PathLike | None = None, max_retries: int = 2,
                 log=lambda message: None):
        import ray

        self.started_ray, ray_dir = init_ray(address, temp_dir, num_cpus=None)
        self.temp_link = ray_dir if ray_dir is not None and Path(ray_dir).is_symlink() else None
        self.log, self.max_retries = log, max_retries
        self.factory, self.num_gpus, self.threads = factory, num_gpus, threads
        self._remote = ray.remote(_ActorBody).options(num_cpus=threads, num_gpus=num_gpus, max_restarts=0)
        self.inputs_ref = ray.put(factory.load_inputs())  # once: every actor reads the same object-store copy
        self.actors = [self._new_actor() for _ in range(actors)]
        self.identities = {id(a): ident for a, ident in zip(self.actors, ray.get([a.identity.remote() for a in self.actors]))}
        self.retries = 0

    def _new_actor(self):
        return self._remote.remote(self.factory, self.inputs_ref, self.threads)

    def workers(self) -> list[str]:
        return [ident["name"] for ident in self.identities.values()]

    def actor_pids(self) -> list[int]:
        return [self.identities[id(a)]["pid"] for a in self.actors]

    def submit(self, requests: Sequence[Any]) -> Iterator[tuple[int, CandidateResult]]:
        import ray
        from ray.exceptions import RayActorError

        pending = deque((i, 0) for i in range(len(requests)))
        idle = deque(self.actors)
        in_flight: dict[Any, tuple[Any, int, int]] = {}
        while pending or in_flight:
            while pending and idle:
                actor = idle.popleft()
                i, attempts = pending.popleft()
                in_flight[actor.evaluate.remote(requests[i])] = (actor, i, attempts)
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, i, attempts = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as e:
                replacement = self._replace(actor)
                idle.append(replacement)
                if attempts < self.max_retries:
                    self.retries += 1
                    self.log(f"actor {self.identities.get(id(actor), {}).get('name', '?')} died; retrying candidate {i}")
                    pending.appendleft((i, attempts + 1))
                    continue
                result = CandidateResult(error=f"ActorDiedError: gave up after {attempts + 1} attempts ({str(e).splitlines()[0]})")
            else:
                idle.append(actor)
            yield i, result

    def _replace(self, dead):
        import ray

        fresh = self._new_actor()
        self.identities[id(fresh)] = ray.get(fresh.identity.remote())
        self.actors = [fresh if a is dead else a for a in self.actors]
        return fresh

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.started_ray:
            ray.shutdown()
            if self.temp_link is not None:
                Path(self.temp_link).unlink(missing_ok=True)


def make_executor(kind: str, factory: WorkloadFactory, *, actors: int = 1, num_gpus: float = 0.0, threads: int = 1,
                  address: str | None = None, temp_dir: str | os.PathLike | None = None, max_retries: int = 2, log=print):
    if kind == "local":
        return LocalExecutor(factory)
    if kind == "ray":
        return RayExecutor(factory, actors, num_gpus, threads, address, temp_dir, max_retries, log)
    raise Merge3Error(f"executor.kind: unknown executor '{kind}' (local or ray)")


class SyntheticFactory:
    """A fast synthetic workload (no models): the score of task t falls with the distance of every group's weight
    for endpoint t from ``targets[t]``. For trying engines and executors; ``delay`` simulates evaluation time."""

    def __init__(self, tasks: Sequence[str], targets: Sequence[float], delay: float = 0.0, items_per_task: int = 5):
        self.tasks, self.targets, self.delay, self.items_per_task = list(tasks), list(targets), delay, items_per_task

    def load_inputs(self) -> dict:
        return {"targets": self.targets}

    def build(self, inputs: dict) -> _SyntheticWorkload:
        return _SyntheticWorkload(self, inputs["targets"])


class _SyntheticWorkload:
    def __init__(self, factory: SyntheticFactory, targets: Sequence[float]):
        self.factory, self.targets = factory, targets

    def evaluate(self, plan) -> CandidateResult:
        plan = getattr(plan, "plan", plan)  # an EvalRequest or a bare plan
        started = time.perf_counter()
        if self.factory.delay:
            time.sleep(self.factory.delay)
        scores = {}
        for t, (task, target) in enumerate(zip(self.factory.tasks, self.targets)):
            err = sum((g["params"]["weights"][t] - target) ** 2 for g in plan) / len(plan)
            if any(g["params"].get("poison") for g in plan):
                raise FloatingPointError("merged weights contain NaN")
            scores[task] = max(0.0, 1.0 - err)
        return CandidateResult(scores=scores, items_evaluated=self.factory.items_per_task * len(self.factory.tasks),
                               eval_seconds=time.perf_counter() - started)
