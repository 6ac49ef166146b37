"""Building a runnable module for a model folder: merge3's own small architectures or Hugging Face models.

A merge3-native folder has ``config.json`` with ``"merge3_architecture"``; anything else with a ``config.json`` is
loaded with Hugging Face ``from_pretrained`` on the local path (``local_files_only``: never a hub id).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from merge3._errors import Merge3Error
from merge3.models._io import load_state_dict, open_lazy, save_state_dict
from merge3.models._packs import is_pack, pack_base
from merge3.models._routing import is_routed, load_routed


class MLP(nn.Module):
    """Linear layers with ReLU between them; ``final_activation`` adds a ReLU after the last (an encoder).

    Keys are ``layers.{i}.weight`` / ``layers.{i}.bias``, one layer index per Linear, so per-layer merge coefficients
    and permutation specs read naturally.

    >>> MLP([64, 32, 10])(torch.zeros(1, 64)).shape
    torch.Size([1, 10])
    """

    def __init__(self, sizes: list[int], final_activation: bool = False):
        super().__init__()
        if len(sizes) < 2:
            raise Merge3Error(f"an MLP needs at least an input and an output size, got sizes={sizes}")
        self.sizes = list(sizes)
        self.final_activation = final_activation
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1 or self.final_activation:
                x = torch.relu(x)
        return x

    def config(self) -> dict:
        return {"merge3_architecture": "mlp", "sizes": self.sizes, "final_activation": self.final_activation}


def _mlp_from_config(config: dict) -> MLP:
    """An MLP for a config.json, its fields checked first: a hand-edited or hostile config must not reach torch
    (negative or fractional widths, a string, 10**30)."""
    sizes, final = config.get("sizes"), config.get("final_activation", False)
    widths_ok = isinstance(sizes, list) and len(sizes) >= 2 and all(
        isinstance(s, int) and not isinstance(s, bool) and 1 <= s < 2**31 for s in sizes)
    if not widths_ok:
        raise Merge3Error(f"'sizes' must list at least two layer widths, whole numbers from 1 to 2**31 - 1, "
                          f"got {json.dumps(sizes)[:80]}")
    if not isinstance(final, bool):
        raise Merge3Error(f"'final_activation' must be true or false, got {json.dumps(final)[:40]}")
    return MLP(sizes, final)


ARCHITECTURES = {"mlp": _mlp_from_config}


def read_config(path: str | os.PathLike) -> dict | None:
    """``config.json`` of a model folder, or None for a bare weight file."""
    path = Path(path)
    config = path / "config.json" if path.is_dir() else None
    if config is None or not config.exists():
        return None
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise Merge3Error(f"'{config}' is not valid JSON: {e}") from None


ARCHITECTURE_KEYS = ("merge3_architecture", "model_type", "architectures")
"""What says which architecture a config.json describes: merge3's own and Hugging Face's fields."""


def check_same_architecture(reference: str | os.PathLike, others: Sequence[str | os.PathLike],
                            names: Sequence[str] | None = None, reference_name: str | None = None) -> None:
    """Every model folder's ``config.json`` readable, and none naming another architecture than ``reference``'s.

    Weights can match in every shape and still belong to different architectures (a Llama and a Mistral of the
    same size): merging them is meaningless, so it is refused, as mergekit does. Bare weight files and folders
    without a config.json have nothing to compare and pass.

    >>> check_same_architecture("no-such-folder", ["nor-this"])  # no config.json anywhere: nothing to compare
    """
    names = list(names) if names is not None else [str(p) for p in others]
    ref = _config_object(reference)
    for path, name in zip(others, names):
        config = _config_object(path)
        if ref is None or config is None:
            continue
        for key in ARCHITECTURE_KEYS:
            if key in ref and key in config and ref[key] != config[key]:
                raise Merge3Error(f"'{name}' is not the same architecture as '{reference_name or reference}': "
                                  f"config.json '{key}' is {config[key]!r}, not {ref[key]!r}")


def _config_object(path) -> dict | None:
    config = read_config(path)
    if config is not None and not isinstance(config, dict):
        raise Merge3Error(f"'{Path(path) / 'config.json'}' is not a JSON object")
    return config


def build_model(config: dict) -> nn.Module:
    """A freshly initialised module for a merge3-native ``config`` (see ``ARCHITECTURES``)."""
    arch = config.get("merge3_architecture")
    if arch not in ARCHITECTURES:
        raise Merge3Error(f"unknown merge3_architecture '{arch}' (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch](config)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", hf_class: str = "AutoModel") -> nn.Module:
    """Load a runnable module from a local model folder, in eval mode.

    ``hf_class`` picks the transformers Auto class for HF folders (e.g. ``AutoModelForCausalLM``).
    """
    path = Path(path)
    if path.is_file():
        raise Merge3Error(f"'{path}' is a file: give the model folder that holds it and its config.json")
    if not path.is_dir():
        raise Merge3Error(f"model folder '{path}' does not exist (merge3 loads local folders only, never hub ids)")
    config = read_config(path)
    if config is None:
        raise Merge3Error(f"'{path}' has no config.json: cannot tell which architecture to build")
    if is_routed(path):
        return load_routed(path, hf_class, device)
    if is_pack(path):
        return _load_pack(path, device, hf_class)
    if "merge3_architecture" in config:
        try:
            with torch.device("meta"):  # shapes only: the weights below say whether the config fits before allocating
                module = build_model(config)
        except Merge3Error as e:
            raise Merge3Error(f"'{path / 'config.json'}': {e}") from None
        state = load_state_dict(path)
        expected = module.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if missing or unexpected:
            raise Merge3Error(f"weights in '{path}' do not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
        if wrong:
            k = wrong[0]
            raise Merge3Error(f"weights in '{path}' do not fit its config.json: '{k}' is "
                              f"{'×'.join(map(str, state[k].shape))}, the config makes it "
                              f"{'×'.join(map(str, expected[k].shape))}")
        module = module.to_empty(device="cpu")
        module.load_state_dict(state)
        return module.to(device).eval()
    import transformers

    auto = getattr(transformers, hf_class, None)
    if auto is None:
        raise Merge3Error(f"transformers has no class '{hf_class}'")
    transformers.utils.logging.disable_progress_bar()  # a bar per load would drown merge3's own lines
    try:
        module = auto.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise Merge3Error(f"cannot load Hugging Face model from '{path}': {str(e).splitlines()[0]}") from None
    return module.to(device).eval()


def _load_pack(path: Path, device, hf_class: str) -> nn.Module:
    """A skill pack as a module: its base's architecture, with the pack's tensors (the base plus its factors)."""
    module = load_model(pack_base(path), hf_class=hf_class)
    pack, state = open_lazy(path), module.state_dict()
    missing = [k for k in pack if k not in state]
    if missing:
        raise Merge3Error(f"skill pack '{path}': its base's module has no tensor '{missing[0]}'")
    with torch.no_grad():
        for key in pack:
            state[key].copy_(pack[key])
    return module.to(device).eval()


def save_model(module: nn.Module, out_dir: str | os.PathLike, **kwargs) -> Path:
    """Save a merge3-native module (config.json + sharded safetensors) or an HF model (its config + our shards)."""
    if isinstance(module, MLP):
        return save_state_dict(module.state_dict(), out_dir, config=module.config(), **kwargs)
    if hasattr(module, "config") and hasattr(module.config, "to_dict"):
        return save_state_dict(module.state_dict(), out_dir, config=module.config.to_dict(), **kwargs)
    raise Merge3Error(f"cannot save a {type(module).__name__}: not a merge3 or Hugging Face model")
