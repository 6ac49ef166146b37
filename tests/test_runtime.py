"""Executors: local and Ray give the same search; actors that die are replaced; failures are data."""

import os
import signal
import threading

import pytest

from merge3.runtime import LocalExecutor, RayExecutor, SyntheticFactory
from merge3.search import Genome, Objectives, Search, make_engine

import _synthetic  # noqa: F401

TASKS = ["a", "b"]
FACTORY = SyntheticFactory(TASKS, [0.8, 0.4])


def run_search(executor, seed=0):
    genome = Genome(["g0", "g1"], ["_synthetic_sharp", "_synthetic_soft"], n_models=2)
    objectives = Objectives(["mean"], TASKS)
    engine = make_engine("pymoo", genome.variables, 1, 8, 3, seed)
    return Search(genome, engine, executor, objectives).run()


def plans(n, poison=()):
    return [[{"group": "g0", "method": "m", "params": {"weights": [0.5, 0.5], "poison": i in poison}}] for i in range(n)]


def test_local_and_ray_executors_give_the_same_search(ray_session):
    local = run_search(LocalExecutor(FACTORY))
    ray_executor = RayExecutor(FACTORY, actors=2)
    try:
        remote = run_search(ray_executor)
    finally:
        ray_executor.close()
    strip = lambda rs: [(r.generation, r.index, r.genome, r.objectives) for r in rs]  # noqa: E731
    assert strip(local.records) == strip(remote.records)
    workers = {r.worker for r in remote.records}
    assert len(workers) == 2, "both actors should have evaluated candidates"


def test_a_failing_evaluation_is_recorded_and_the_rest_go_on():
    results = dict(LocalExecutor(FACTORY).submit(plans(4, poison={2})))
    assert results[2].error.startswith("FloatingPointError: merged weights contain NaN")
    assert all(results[i].ok for i in (0, 1, 3))


def test_an_actor_killed_mid_evaluation_is_replaced_and_its_candidate_retried(ray_session):
    executor = RayExecutor(SyntheticFactory(TASKS, [0.8, 0.4], delay=1.0), actors=2, max_retries=2)
    try:
        victim = executor.actor_pids()[0]
        killer = threading.Timer(0.4, lambda: os.kill(victim, signal.SIGKILL))
        killer.start()
        results = list(executor.submit(plans(5)))
        killer.join()
        assert sorted(i for i, _ in results) == [0, 1, 2, 3, 4], "each candidate exactly once"
        assert all(r.ok for _, r in results)
        assert executor.retries >= 1 and victim not in executor.actor_pids()
        assert all(r.worker.endswith(f"/pid-{victim}") is False for _, r in results)
    finally:
        executor.close()


def test_retries_are_bounded(ray_session):
    executor = RayExecutor(SyntheticFactory(TASKS, [0.8, 0.4], delay=0.6), actors=1, max_retries=0)
    try:
        victim = executor.actor_pids()[0]
        threading.Timer(0.3, lambda: os.kill(victim, signal.SIGKILL)).start()
        results = dict(executor.submit(plans(2)))
        assert results[0].error.startswith("ActorDiedError: gave up after 1 attempts")
        assert results[1].ok  # the replacement actor carries on
    finally:
        executor.close()


def test_out_of_memory_names_the_worker_model_size_and_device():
    from merge3.runtime import safe_evaluate

    class Oom:
        model_bytes, device = 3 * 2**30, "cpu"

        def evaluate(self, plan):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    result = safe_evaluate(Oom(), [], "node-1:actor-7")
    assert result.error.startswith("OutOfMemoryError on node-1:actor-7: model 3.00 GiB on cpu")


def test_long_run_paths_get_a_short_ray_temp_dir(tmp_path):
    from merge3.runtime import short_temp_dir

    deep = tmp_path / ("x" * 80) / "ray"
    short = short_temp_dir(deep)
    assert len(short) <= 44 and os.path.realpath(short) == str(deep.resolve())
    assert short_temp_dir(deep) == short  # stable for the same run
    os.unlink(short)


def test_a_ray_started_under_a_long_run_path_removes_its_link_on_close(tmp_path):
    """In a subprocess: one process can hold one Ray, and this one holds the session's."""
    import subprocess
    import sys

    deep = tmp_path / ("y" * 80) / "ray"
    script = f"""
import os, pathlib
from merge3.runtime import RayExecutor, SyntheticFactory
executor = RayExecutor(SyntheticFactory(["a", "b"], [0.8, 0.4]), actors=1, temp_dir={str(deep)!r})
link = executor.temp_link
assert link is not None and os.path.realpath(link) == {str(deep.resolve())!r}, link
plan = [{{"group": "g0", "method": "m", "params": {{"weights": [0.5, 0.5]}}}}]
assert dict(executor.submit([plan]))[0].ok
executor.close()
assert not os.path.lexists(link)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    assert any(p.name.startswith("session_") for p in deep.iterdir()), "Ray's files live under the run"
