"""Merge methods: pure functions over state dicts, registered with their parameters.

>>> import torch, merge3.methods as mm
>>> base, ft = {"w": torch.zeros(2)}, [{"w": torch.ones(2)}, {"w": -torch.ones(2)}]
>>> mm.task_arithmetic(base, ft, weights=[1.0, 0.5])["w"].tolist()
[0.5, 0.5]
>>> {"ties", "dare", "tsv_merge", "task_arithmetic", "linear"} <= set(mm.list_methods())
True
"""

from merge3.methods._params import (
    ROW_BLOCKS,
    LayerValue,
    has_row_blocks,
    is_row_blocks,
    layer_index,
    layer_positions,
    mean_weight,
    resolve,
)
from merge3.methods._registry import (
    MERGES_REVISION,
    Bounds,
    Kernel,
    MergeMethod,
    PerModel,
    StateDict,
    get_method,
    list_methods,
    merge_method,
    registered,
)

from merge3.methods._arithmetic import analogy, linear, task_arithmetic
from merge3.methods._builder import CandidateBuilder
from merge3.methods._inputs import MergeInputs
from merge3.methods._groups import GroupPlan, layer_groups, merge_groups, plans_from_choices
from merge3.methods._mergekit import MergekitForm, mergekit_config, mergekit_methods
from merge3.methods._inspect import Inspection, inspect_models, write_heatmap, write_inspection
from merge3.methods._tsv import (TSVFactors, singular_task_interference, tsv_compress, tsv_compress_models,
                                 tsv_factors, tsv_merge)
from merge3.methods._ties_dare import dare, ties
from merge3.methods._breadcrumbs import breadcrumbs
from merge3.methods._della import della
from merge3.methods._yaml_merge import load_config, merge_from_config

__all__ = [
    "MERGES_REVISION",
    "ROW_BLOCKS",
    "Bounds",
    "C2M3Result",
    "CandidateBuilder",
    "GroupPlan",
    "Kernel",
    "MergeInputs",
    "MergekitForm",
    "TSVFactors",
    "Inspection",
    "analogy",
    "breadcrumbs",
    "dare",
    "della",
    "has_row_blocks",
    "inspect_models",
    "is_row_blocks",
    "layer_groups",
    "linear",
    "merge_groups",
    "plans_from_choices",
    "singular_task_interference",
    "task_arithmetic",
    "ties",
    "tsv_compress",
    "tsv_compress_models",
    "tsv_merge",
    "LayerValue",
    "MergeMethod",
    "PerModel",
    "PermutationSpec",
    "StateDict",
    "align_endpoints",
    "align_to_universe",
    "apply_permutations",
    "c2m3",
    "conv_bn_spec",
    "get_method",
    "infer_mlp_spec",
    "layer_index",
    "layer_positions",
    "tsv_factors",
    "mean_weight",
    "list_methods",
    "load_config",
    "merge_from_config",
    "mergekit_config",
    "mergekit_methods",
    "merge_method",
    "mlp_spec",
    "rebasin_average",
    "registered",
    "relative_permutation",
    "reset_bn_stats",
    "resolve",
    "weight_matching",
    "write_heatmap",
    "write_inspection",
]

from merge3.methods._c2m3 import C2M3Result, PermutationSpec, align_endpoints, align_to_universe, apply_permutations, c2m3, conv_bn_spec, infer_mlp_spec, mlp_spec, rebasin_average, relative_permutation, reset_bn_stats, weight_matching  # noqa: E402,E501
