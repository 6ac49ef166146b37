"""A per-layer-group merge plan as an equivalent mergekit config, when mergekit can express it.

mergekit has one ``merge_method`` per config, so every group must use the same method and it must be one mergekit
has (task arithmetic, TIES, DARE); per-group values become mergekit's conditional parameters
``[{filter: <tensor name>, value: v}, …]`` with one entry per tensor (exact names, longest first, because mergekit
matches a filter as a substring and the first match wins).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from merge3.methods._params import has_row_blocks

_DARE = {"linear": "dare_linear", "ties": "dare_ties"}


def _per_tensor(values: Mapping[str, float], groups: Mapping[str, Sequence[str]]) -> Any:
    """One number when every group agrees, else mergekit's filter list over every tensor name."""
    distinct = set(values.values())
    if len(distinct) == 1:
        return distinct.pop()
    keys = sorted(((key, values[group]) for group, keys in groups.items() for key in keys),
                  key=lambda kv: (-len(kv[0]), kv[0]))
    return [{"filter": key, "value": value} for key, value in keys] + [{"value": keys[-1][1]}]


def _mergekit_method(choice: Mapping[str, Any]) -> str | None:
    method = choice["method"]
    if method in ("task_arithmetic", "ties"):
        return method
    if method == "dare":
        return _DARE[choice["params"].get("combine", "linear")]
    return None


def mergekit_config(plan: Sequence[Mapping[str, Any]], groups: Mapping[str, Sequence[str]], base: str,
                    endpoints: Sequence[str], dtype: str | None = None) -> tuple[dict | None, str]:
    """``(config, "")`` for mergekit-yaml, or ``(None, reason)`` when the plan has no mergekit equivalent.

    >>> plan = [{"group": "l.0", "method": "task_arithmetic", "params": {"weights": [0.5, 1.0]}},
    ...         {"group": "l.1", "method": "task_arithmetic", "params": {"weights": [0.5, 0.2]}}]
    >>> config, _ = mergekit_config(plan, {"l.0": ["l.0.w"], "l.1": ["l.1.w"]}, "base", ["a", "b"])
    >>> config["models"][0]["parameters"], config["models"][1]["parameters"]["weight"][0]
    ({'weight': 0.5}, {'filter': 'l.0.w', 'value': 1.0})
    """
    if any(has_row_blocks(c["params"]) for c in plan):
        return None, "row-block weights (one per block of output rows) have no mergekit equivalent"
    methods = {_mergekit_method(c) for c in plan}
    if None in methods:
        other = sorted({c["method"] for c in plan if _mergekit_method(c) is None})
        return None, f"{', '.join(other)} has no mergekit equivalent"
    if len(methods) > 1:
        return None, f"the layer groups use different methods ({', '.join(sorted(methods))}); mergekit takes one"
    method = methods.pop()
    plan = [c for c in plan if c["group"] in groups]
    for choice in plan:
        p = choice["params"]
        # merge3-only options: TIES's global trim, DARE's extra TIES trim after the drop, DARE without rescaling
        if p.get("trim", "tensor") != "tensor" or float(p.get("density", 1.0)) != 1.0 and method.startswith("dare") \
                or not p.get("rescale", True):
            return None, f"group {choice['group']} uses merge3-only options of {choice['method']}"

    def value(choice, name, default):
        return float(choice["params"].get(name, default))

    def param(fn) -> Any:
        return _per_tensor({c["group"]: fn(c) for c in plan}, groups)

    # TIES's disjoint mean normalises the weights away, so its scale must stay lambda
    scale_in_weights = method in ("task_arithmetic", "dare_linear")
    models = []
    for i, path in enumerate(endpoints):
        def weight(c, i=i):
            w = float(c["params"].get("weights", [1.0] * len(endpoints))[i])
            return w * value(c, "scale", 1.0) if scale_in_weights else w

        parameters: dict[str, Any] = {"weight": param(weight)}
        if method == "ties":
            parameters["density"] = param(lambda c: value(c, "density", 1.0))
        elif method.startswith("dare"):
            parameters["density"] = param(lambda c: 1.0 - value(c, "drop_rate", 0.0))
        models.append({"model": path, "parameters": parameters})
    config: dict[str, Any] = {"merge_method": method, "base_model": base, "models": models}
    shared: dict[str, Any] = {}
    if not scale_in_weights:
        shared["lambda"] = param(lambda c: value(c, "scale", 1.0))
    normalize = {bool(c["params"]["normalize"]) for c in plan if "normalize" in c["params"]}
    if len(normalize) > 1:
        return None, "the layer groups differ in 'normalize'; mergekit takes one"
    if normalize:
        shared["normalize"] = normalize.pop()
    elif method == "dare_ties":
        shared["normalize"] = True  # merge3's DARE-ties default, which mergekit's does not share
    if shared:
        config["parameters"] = shared
    if dtype is not None:
        config["dtype"] = dtype
    return config, ""


__all__ = ["mergekit_config"]
