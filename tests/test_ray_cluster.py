"""A real two-node Ray cluster on loopback: `ray start --head` + `ray start --address`, a search through RAY_ADDRESS."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_search_e2e import space_dict

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args, env, log):
    return subprocess.Popen([RAY, "start", "--block", "--num-cpus", "1", "--disable-usage-stats", *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_node(proc, temp_dir):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def leftover_processes(temp_dir) -> list[str]:
    out = subprocess.run(["pgrep", "-af", str(temp_dir)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.mark.slow
def test_search_runs_on_a_two_node_cluster_and_both_nodes_work(digits_zoo, tmp_path):
    temp_dir = Path(tempfile.mkdtemp(prefix="m3ray-"))  # short: Ray's socket paths must stay under 107 characters
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MERGE3_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "head.log", "w") as head_log, open(tmp_path / "worker.log", "w") as worker_log:
        head = start_node(["--head", "--port", str(port), "--temp-dir", str(temp_dir), "--include-dashboard", "false",
                           "--node-ip-address", "127.0.0.1"], env, head_log)
        worker = None
        try:
            address = f"127.0.0.1:{port}"
            deadline = time.time() + 90
            while time.time() < deadline:
                if subprocess.run([RAY, "status", "--address", address], env=env, capture_output=True).returncode == 0:
                    break
                time.sleep(1)
            worker = start_node(["--address", address, "--node-ip-address", "127.0.0.1"], env, worker_log)
            space = space_dict(digits_zoo, engine={"population": 6, "generations": 2},
                               executor={"kind": "ray", "actors": 2})
            path = tmp_path / "space.yaml"
            path.write_text(yaml.safe_dump(space))
            out = subprocess.run([sys.executable, "-m", "merge3", "search", str(path), "--runs-dir", str(tmp_path),
                                  "--name", "cluster", "--quiet"], env={**env, "RAY_ADDRESS": address},
                                 capture_output=True, text=True, timeout=400)
            assert out.returncode == 0, out.stderr[-2000:]
            records = [json.loads(line) for line in (tmp_path / "cluster" / "evaluations.jsonl").read_text().splitlines()]
            nodes = {r["worker"].split("/")[1] for r in records}
            # generation 0 is all 12 recipes (more than the population of 6), then one generation of 6
            assert len(records) == 12 + 6 and all(r["error"] is None for r in records)
            assert len(nodes) == 2, f"both nodes should have evaluated candidates, got {nodes}"
        finally:
            if worker is not None:
                stop_node(worker, temp_dir)
            stop_node(head, temp_dir)
    deadline = time.time() + 30
    while leftover_processes(temp_dir) and time.time() < deadline:
        time.sleep(1)
    assert not leftover_processes(temp_dir), "the cluster should stop cleanly"
    shutil.rmtree(temp_dir, ignore_errors=True)
