"""Executors that build candidate merges in place and evaluate them: in process, or on Ray actors.

>>> from merge3.runtime import EvalRequest, LocalExecutor, SyntheticFactory
>>> executor = LocalExecutor(SyntheticFactory(["t"], [0.5]))
>>> plan = [{"group": "all", "method": "task_arithmetic", "params": {"weights": [0.5]}}]
>>> dict(executor.submit([EvalRequest(plan)]))[0].scores
{'t': 1.0}
"""

from merge3.runtime._executors import (
    LocalExecutor,
    RayExecutor,
    SyntheticFactory,
    describe_error,
    init_ray,
    make_executor,
    safe_evaluate,
    short_temp_dir,
)
from merge3.runtime._result import CandidateResult, EvalRequest
from merge3.runtime._workload import MergeWorkload, MergeWorkloadFactory, resolve_device

__all__ = ["CandidateResult", "EvalRequest", "LocalExecutor", "MergeWorkload", "MergeWorkloadFactory", "RayExecutor",
           "SyntheticFactory", "describe_error", "init_ray", "make_executor", "resolve_device", "safe_evaluate",
           "short_temp_dir"]
