"""Model I/O and task vectors: the first stage of the pipeline.

>>> import tempfile, torch, merge3.models as mm
>>> out = mm.save_state_dict({"w": torch.ones(3)}, tempfile.mkdtemp() + "/m", max_shard_size="1KB")
>>> mm.load_state_dict(out)["w"].tolist()
[1.0, 1.0, 1.0]
"""

from merge3.models._arch import MLP, build_model, check_same_architecture, load_model, read_config, save_model
from merge3.models._io import (
    LazyStateDict,
    StateDict,
    atomic_dir,
    check_folder_name,
    check_not_a_link,
    copy_model_files,
    file_sha256,
    load_state_dict,
    open_lazy,
    parse_size,
    plan_shards,
    save_state_dict,
    state_dict_sha256,
    weight_files,
    file_in_the_way,
    plain,
    read_yaml_mapping,
    safe_load_yaml,
    no_link_fd,
    open_no_link,
    write_text_atomic,
)
from merge3.models._packs import PackStateDict, check_pack_base, compress_models, is_pack, pack_base, truncated_svd, weights_sha256
from merge3.models._routing import RoutedModel, build_routed, is_routed, load_routed
from merge3.models._tokenizers import check_same_tokenizer
from merge3.models._task_vectors import (
    apply_task_vector,
    check_compatible,
    check_finite,
    is_mergeable,
    task_vector,
    task_vectors,
)

__all__ = [
    "MLP",
    "LazyStateDict",
    "PackStateDict",
    "RoutedModel",
    "StateDict",
    "apply_task_vector",
    "atomic_dir",
    "build_model",
    "build_routed",
    "check_compatible",
    "check_finite",
    "check_pack_base",
    "compress_models",
    "check_same_architecture",
    "check_same_tokenizer",
    "copy_model_files",
    "file_sha256",
    "is_mergeable",
    "is_pack",
    "is_routed",
    "pack_base",
    "load_model",
    "load_routed",
    "load_state_dict",
    "open_lazy",
    "parse_size",
    "plan_shards",
    "read_config",
    "save_model",
    "save_state_dict",
    "state_dict_sha256",
    "task_vector",
    "task_vectors",
    "truncated_svd",
    "weight_files",
    "weights_sha256",
    "check_folder_name",
    "check_not_a_link",
    "file_in_the_way",
    "plain",
    "read_yaml_mapping",
    "safe_load_yaml",
    "no_link_fd",
    "open_no_link",
    "write_text_atomic",
]
