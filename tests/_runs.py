"""Helpers for tests that run the CLI in a subprocess and compare runs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ENV = {**os.environ, "MERGE3_THREADS": "1", "RAY_AUTH_MODE": "disabled"}


def cli(*args, wait=True):
    """``python -m merge3 ARGS`` (finished, with captured output; or a running Popen when not ``wait``)."""
    cmd = [sys.executable, "-m", "merge3", *map(str, args)]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)


def strip(records):
    """What must agree between two runs of the same search: who was evaluated, with which genome and result."""
    return sorted((r.generation, r.index, r.rung, json.dumps(r.genome, sort_keys=True),
                   tuple(r.objectives)) for r in records)


def wait_for_lines(file: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until a running search has written ``n`` lines to ``file`` (it must still be running)."""
    deadline = time.time() + timeout
    while time.time() < deadline and (not file.exists() or file.read_text().count("\n") < n):
        assert proc.poll() is None, "the search ended before it was interrupted"
        time.sleep(0.02)
    assert file.read_text().count("\n") >= n
