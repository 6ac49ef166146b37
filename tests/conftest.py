"""Shared fixtures. Tests run on CPU with one torch thread: on 2 cores, two busy threads slow 10-20x."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def digits_zoo(tmp_path_factory):
    """The real digits zoo (full recipe, seed 0), built once per test session (~25 s on one core)."""
    from merge3.zoo import build_digits_zoo

    root = tmp_path_factory.mktemp("digits")
    return build_digits_zoo(root / "zoo" / "digits", root / "item_banks", seed=0, log=lambda *a: None)


@pytest.fixture(scope="session")
def calibrated_zoo(digits_zoo):
    """The digits bank calibrated quickly (fixed D, 40 random merges): enough to exercise the cheap-fitness path."""
    from merge3.search import CalibrationSettings, calibrate_bank

    settings = CalibrationSettings(random_merges=40, ns=[20], dims=5, subset_methods=["random", "anchor-irt"])
    calibrate_bank(digits_zoo.bank, str(digits_zoo.base), [str(p) for p in digits_zoo.finetuned.values()], settings,
                   names=list(digits_zoo.finetuned), log=lambda *a: None)
    return digits_zoo


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """The folder of an untrained tiny GPT-2 (tests/_tiny_lm.py), built once: treat it as read-only."""
    from _tiny_lm import build_tiny_gpt2

    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    build_tiny_gpt2(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """The folder of the tiny word-level GPT-2 that knows eight "x is a y" facts (tests/_tiny_lm.py), built once."""
    from _tiny_lm import build_tiny_lm

    folder = tmp_path_factory.mktemp("lm") / "tiny-gpt2"
    build_tiny_lm(folder)
    return folder


@pytest.fixture
def objective_module(tmp_path, monkeypatch):
    """A user's objective module, importable as ``my_objectives`` (its folder on sys.path, as PYTHONPATH would)."""
    (tmp_path / "my_objectives.py").write_text("def best_task(result):\n    return max(result.scores.values())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_objectives"


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole test session (3 CPUs), shut down at its end."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), logging_level="WARNING")
    yield ray
    ray.shutdown()
