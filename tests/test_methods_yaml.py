"""merge3's YAML merges: agreement with mergekit-yaml on the same tiny HF models, output folder contents, config
errors. The mergekit comparisons run its CLI in a subprocess (a few seconds each)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import merge3.methods as mm
from merge3 import Merge3Error
from merge3.methods._yaml_merge import load_config, merge_from_config, merge_params
from merge3.models import file_sha256, load_state_dict

MERGEKIT_YAML = Path(sys.executable).with_name("mergekit-yaml")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, tiny_gpt2):
    """The shared tiny GPT-2 as base and two 'fine-tunes' of it, saved as Hugging Face folders (config + safetensors)."""
    from transformers import GPT2LMHeadModel

    root = tmp_path_factory.mktemp("hf")
    shutil.copytree(tiny_gpt2, root / "base")
    for seed in (1, 2):
        model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(root / f"m{seed}")
    return root


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text.replace("ROOT", str(folder)))
    return path


def _run_mergekit(config: Path, out: Path) -> dict[str, torch.Tensor]:
    if not MERGEKIT_YAML.exists():
        pytest.skip("mergekit is not installed (pip install -e .[test])")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(MERGEKIT_YAML), str(config), str(out)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return load_state_dict(out)


CONFIGS = {
    "ties": """merge_method: ties
base_model: ROOT/base
models:
  - model: ROOT/m1
    parameters: {weight: [1.0, 0.3], density: 0.4}
  - model: ROOT/m2
    parameters: {weight: 0.5, density: 0.4}
parameters: {lambda: 1.2}
dtype: float32
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: ROOT/base
models:
  - model: ROOT/m1
    parameters:
      weight: [{filter: attn, value: 0.2}, {value: 1.0}]
  - model: ROOT/m2
    parameters: {weight: -0.5}
parameters: {lambda: 0.8}
dtype: float32
""",
    "dare_ties": """merge_method: dare_ties
base_model: ROOT/base
models:
  - model: ROOT/m1
    parameters: {weight: 0.7, density: 1.0}
  - model: ROOT/m2
    parameters: {weight: 0.6, density: 1.0}
dtype: float32
""",
    "dare_ties_shared_density": """merge_method: dare_ties
base_model: ROOT/base
models:
  - model: ROOT/m1
    parameters: {weight: 0.7}
  - model: ROOT/m2
    parameters: {weight: 0.6}
parameters: {density: 1.0}
dtype: float32
""",
    "ties_per_model_density": """merge_method: ties
base_model: ROOT/base
models:
  - model: ROOT/m1
    parameters: {weight: 1.0, density: [0.2, 0.6]}
  - model: ROOT/m2
    parameters: {weight: 0.8, density: 0.7}
parameters: {lambda: 0.9}
dtype: float32
""",
    "breadcrumbs_ties": """merge_method: breadcrumbs_ties
base_model: ROOT/base
models:
  - model: ROOT/m1
    parameters: {weight: 1.0, density: 0.8, gamma: 0.05}
  - model: ROOT/m2
    parameters: {weight: 0.6, density: 0.6, gamma: 0.05}
parameters: {lambda: 1.1, normalize: true}
dtype: float32
""",
    "breadcrumbs": """merge_method: breadcrumbs
base_model: ROOT/base
models:
  - model: ROOT/m1
    parameters: {weight: 0.7, density: 0.9}
  - model: ROOT/m2
    parameters: {weight: 0.5, density: 0.9}
parameters: {rescale: true}
dtype: float32
""",
    "linear": """merge_method: linear
models:
  - model: ROOT/m1
    parameters: {weight: 1.0}
  - model: ROOT/m2
    parameters: {weight: 3.0}
dtype: bfloat16
""",
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_yaml_merge_matches_mergekit_yaml(hf_models, tmp_path, method):
    """Same config, same models: merge3's output equals mergekit's to 1e-6 (DARE only at density 1: mergekit draws
    its masks from torch's global RNG)."""
    config = _write(hf_models, f"{method}.yaml", CONFIGS[method])
    ours = load_state_dict(merge_from_config(config, tmp_path / "ours"))
    theirs = _run_mergekit(config, tmp_path / "theirs")
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        # mergekit computes in `dtype`; merge3 computes in float32 and casts at the end: equal up to bf16 rounding
        atol, rtol = (1e-6, 0.0) if value.dtype == torch.float32 else (2e-3, 1e-2)
        assert torch.allclose(ours[key].float(), value.float(), atol=atol, rtol=rtol), key


def test_dare_shared_density_is_each_models_density(hf_models, tmp_path):
    """mergekit's global ``parameters: {density}`` for DARE is merge3's drop_rate = 1 − density, as a per-model one."""
    shared = _write(hf_models, "dare_shared.yaml", """merge_method: dare_ties
base_model: base
models:
  - {model: m1, parameters: {weight: 1.0}}
  - {model: m2, parameters: {weight: 0.5}}
parameters: {density: 0.3}
seed: 4
""")
    each = _write(hf_models, "dare_each.yaml", """merge_method: dare_ties
base_model: base
models:
  - {model: m1, parameters: {weight: 1.0, density: 0.3}}
  - {model: m2, parameters: {weight: 0.5, density: 0.3}}
seed: 4
""")
    a, b = (load_state_dict(merge_from_config(c, tmp_path / c.stem)) for c in (shared, each))
    base, m1, m2 = (load_state_dict(hf_models / n) for n in ("base", "m1", "m2"))
    expected = mm.dare(base, [m1, m2], drop_rate=0.7, weights=[1.0, 0.5], seed=4, combine="ties", normalize=False)
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], base[k]) for k in a)
    assert all(torch.allclose(a[k], expected[k]) for k in expected)


def test_yaml_merge_equals_the_python_function(hf_models, tmp_path):
    config = _write(hf_models, "ties_model.yaml", """merge_method: ties
base_model: base
models:
  - {model: m1, parameters: {weight: 1.0}}
  - {model: m2, parameters: {weight: 0.5}}
parameters: {density: 0.3, trim: model, lambda: 1.1}
""")
    ours = load_state_dict(merge_from_config(config, tmp_path / "out", max_shard_size="20KB"))
    base, m1, m2 = (load_state_dict(hf_models / n) for n in ("base", "m1", "m2"))
    expected = mm.ties(base, [m1, m2], density=0.3, trim="model", scale=1.1, weights=[1.0, 0.5])
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key


def test_output_folder_has_shards_index_configs_card_and_manifest(hf_models, tmp_path):
    config = _write(hf_models, "ta.yaml", """merge_method: task_arithmetic
base_model: base
models:
  - {model: m1, parameters: {weight: 0.5}}
  - {model: m2, parameters: {weight: 0.5}}
dtype: bfloat16
""")
    out = merge_from_config(config, tmp_path / "merged", max_shard_size="20KB")
    files = {p.name for p in out.iterdir()}
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert {"model.safetensors.index.json", "config.json", "tokenizer_config.json", "README.md",
            "merge3-manifest.json"} <= files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    manifest = json.loads((out / "merge3-manifest.json").read_text())
    assert manifest["method"] == "task_arithmetic" and manifest["parameters"]["weights"] == [0.5, 0.5]
    assert manifest["merge3_version"] and manifest["dtype"] == "bfloat16"
    recorded = manifest["models"][0]["files"][0]
    assert recorded["sha256"] == file_sha256(hf_models / "m1" / recorded["name"])
    assert "task_arithmetic" in (out / "README.md").read_text()
    assert all(t.dtype == torch.bfloat16 for t in load_state_dict(out).values())


def test_refuses_a_non_empty_output_and_leaves_nothing_on_failure(hf_models, tmp_path):
    config = _write(hf_models, "ta2.yaml", "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: m1\n")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(Merge3Error, match="already exists and is not empty"):
        merge_from_config(config, tmp_path / "busy")
    merge_from_config(config, tmp_path / "fresh")  # a good merge creates the folder …
    assert (tmp_path / "fresh" / "merge3-manifest.json").exists()
    failing = _write(hf_models, "fails.yaml", "merge_method: ties\nbase_model: base\nmodels:\n  - model: m1\n"
                                              "parameters: {density: [0.1, 0.9], trim: model}\n")
    with pytest.raises(Merge3Error, match="trim='model' needs one density"):
        merge_from_config(failing, tmp_path / "failed")  # … a merge failing midway leaves nothing behind
    assert not (tmp_path / "failed").exists() and not list(tmp_path.glob(".*tmp-*"))


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nmodels:\n  - model: m1\nparameters: {density: 0.5}\n",
     r"field 'base_model': ties needs a base model"),
    ("merge_method: slerp\nbase_model: base\nmodels:\n  - model: m1\n", r"'slerp' is not supported"),
    ("merge_method: ties\nbase_model: base\nmodels:\n  - {model: m1, parameters: {density: 1.5}}\n",
     r"field 'parameters': ties: parameter 'density' = 1.5 is out of range"),
    ("merge_method: tsv_merge\nbase_model: base\nmodels:\n  - {model: m1, parameters: {density: 0.5}}\n",
     r"field 'models.0.parameters.density': tsv_merge takes weight per model"),
    ("merge_method: ties\nbase_model: base\nmodels:\n  - {model: m1, parameters: {gamma: 1}}\n",
     r"field 'models.0.parameters.gamma'"),
    ("merge_method: ties\nbase_model: base\nmodels: []\n", r"field 'models'"),
    ("merge_method: ties\nbase_model: base\nslices: []\nmodels:\n  - model: m1\n", r"field 'slices': Extra inputs"),
    ("merge_method: ties\nbase_model: base\nmodels:\n  - model: m1\ndtype: int8\n", r"field 'dtype'"),
    ("merge_method: task_arithmetic\nbase_model: nowhere\nmodels:\n  - model: m1\n",
     r"field 'base_model': 'nowhere' does not exist"),
    ("merge_method: dare_linear\nbase_model: base\nmodels:\n  - {model: m1, parameters: {density: 0.0}}\n",
     r"field 'models.0.parameters.density': 0.0 is out of range \[0.01, 1\] \(dare keeps this fraction"),
    ("merge_method: dare_ties\nbase_model: base\nparameters: {density: 1.0e-30}\nmodels:\n  - {model: m1}\n",
     r"field 'parameters.density': 1e-30 is out of range \[0.01, 1\]"),
    ("merge_method: breadcrumbs\nbase_model: base\nmodels:\n  - {model: m1, parameters: {gamma: 0.1}}\n"
     "  - {model: m2, parameters: {gamma: 0.2}}\n", r"models\[\*\].parameters.gamma: merge3's breadcrumbs takes one gamma"),
    ("merge_method: della\nbase_model: base\nmodels:\n  - {model: m1, parameters: {density: 0.9, epsilon: 0.2}}\n",
     r"della: density ± epsilon must lie inside \(0, 1\)"),
    ("merge_method: ties\nbase_model: base\nmodels:\n  - {model: m1, parameters: {density: 0.5}}\n"
     "  - {model: m2, parameters: {density: 1.2}}\n", r"ties: parameter 'densities' = 1.2 is out of range"),
])
def test_config_errors_name_the_field(hf_models, tmp_path, text, message):
    config = _write(hf_models, "err.yaml", text)
    with pytest.raises(Merge3Error, match=message):
        merge_from_config(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_analogy_yaml_equals_the_function(hf_models, tmp_path):
    config = _write(hf_models, "analogy.yaml", """merge_method: analogy
base_model: base
models:
  - {model: m2, parameters: {role: b}}
  - {model: m1, parameters: {role: a}}
  - {model: base, parameters: {role: c}}
parameters: {scale: 0.7}
""")
    ours = load_state_dict(merge_from_config(config, tmp_path / "out"))
    base, m1, m2 = (load_state_dict(hf_models / n) for n in ("base", "m1", "m2"))
    expected = mm.analogy(base, [m1, m2, base], scale=0.7)  # a = m1, b = m2, c = base
    for key in expected:
        assert torch.allclose(ours[key].float(), expected[key].float(), atol=1e-6), key
    missing = _write(hf_models, "analogy-missing.yaml", "merge_method: analogy\nbase_model: base\nmodels:\n"
                     "  - {model: m1, parameters: {role: a}}\n  - {model: m2}\n  - {model: base, parameters: {role: c}}\n")
    with pytest.raises(Merge3Error, match=r"field 'models.1.parameters.role' is missing: analogy needs a role"):
        merge_from_config(missing, tmp_path / "missing")
    twice = _write(hf_models, "analogy-twice.yaml", "merge_method: analogy\nbase_model: base\nmodels:\n"
                   "  - {model: m1, parameters: {role: a}}\n  - {model: m2, parameters: {role: a}}\n"
                   "  - {model: base, parameters: {role: c}}\n")
    with pytest.raises(Merge3Error, match=r"roles must name a, b and c once each"):
        merge_from_config(twice, tmp_path / "twice")
    assert not (tmp_path / "missing").exists() and not (tmp_path / "twice").exists()


def test_mergekit_names_are_translated():
    from merge3.methods._yaml_merge import MergeConfig

    config = MergeConfig.model_validate({
        "merge_method": "dare_linear", "base_model": "b", "seed": 3,
        "models": [{"model": "x", "parameters": {"weight": 0.5, "density": [0.9, 0.5]}},
                   {"model": "y", "parameters": {"weight": 1.0, "density": [0.9, 0.5]}}],
        "parameters": {"lambda": 2.0, "int8_mask": True}})
    method, params = merge_params(config)
    assert method == "dare" and params["combine"] == "linear" and params["seed"] == 3
    assert params["drop_rate"] == pytest.approx([0.1, 0.5]) and params["scale"] == 2.0
    assert params["weights"] == [0.5, 1.0]
    assert load_config  # the loader is public too


# --- inspect --------------------------------------------------------------------------------------------------------

def test_inspect_reports_interference_from_paths(hf_models, tmp_path):
    paths = [hf_models / "m1", hf_models / "m2"]
    report = mm.inspect_models(hf_models / "base", paths)
    assert list(report.cosine.index) == ["m1", "m2"]
    assert report.cosine.loc["m1", "m1"] == pytest.approx(1.0)
    assert abs(report.cosine.loc["m1", "m2"]) < 0.1  # independent random task vectors are nearly orthogonal
    assert 0.4 < report.sign_conflicts.loc["m1", "m2"] < 0.6  # … and disagree in sign half of the time
    assert {"transformer.h.0", "transformer.h.2"} <= set(report.layer_norms.index)
    assert (report.interference["sti"] > 0).all() and len(report.interference) > 0
    files = mm.write_inspection(report, tmp_path / "inspect")
    assert {p.name for p in files} >= {"cosine.png", "sign_conflicts.png", "layer_norms.png", "cosine.csv"}
    assert (tmp_path / "inspect" / "cosine.png").read_bytes()[:4] == b"\x89PNG"
    assert "cosine" in report.summary()


def test_inspect_on_identical_and_opposite_tasks():
    base = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    tau = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    same, opposite = tau, {k: -v for k, v in tau.items()}
    report = mm.inspect_models(base, [same, opposite, same], names=["a", "neg", "a2"])
    assert report.cosine.loc["a", "neg"] == pytest.approx(-1.0)
    assert report.cosine.loc["a", "a2"] == pytest.approx(1.0)
    assert report.sign_conflicts.loc["a", "neg"] == 1.0 and report.sign_conflicts.loc["a", "a2"] == 0.0
    with pytest.raises(Merge3Error, match="names for"):
        mm.inspect_models(base, [same], names=["x", "y"])


def test_mergekit_defaults_apply_when_a_parameter_is_left_out():
    from merge3.methods._yaml_merge import MergeConfig

    config = MergeConfig.model_validate({"merge_method": "ties", "base_model": "b",
                                         "models": [{"model": "x"}, {"model": "y", "parameters": {"weight": 2}}]})
    method, params = merge_params(config)
    assert method == "ties" and params["density"] == 1.0 and params["weights"] == [1.0, 2]
    native = MergeConfig.model_validate({"merge_method": "tsv_merge", "base_model": "b", "models": [{"model": "x"}],
                                         "parameters": {"alpha": 0.5}})
    assert merge_params(native) == ("tsv_merge", {"alpha": 0.5, "weights": None})


# --- a search's per-group plan as mergekit YAML (what `merge3 export` writes as mergekit.yaml) ------------------------
GROUP_PLANS = {
    "task_arithmetic": lambda g: {"weights": [0.2 + 0.3 * g, 1.0 - 0.2 * g], "scale": 0.9},
    "ties": lambda g: {"weights": [1.0, 0.5 + 0.2 * g], "density": 0.3 + 0.1 * g, "scale": 0.8 + 0.3 * g},
    "dare": lambda g: {"weights": [0.7 - 0.1 * g, 0.4], "drop_rate": 0.0},
    "ties per model": lambda g: {"weights": [1.0, 0.6], "densities": [0.3 + 0.1 * g, 0.8 - 0.1 * g], "scale": 1.1},
    "breadcrumbs": lambda g: {"weights": [0.9, 0.3 + 0.2 * g], "density": 0.9 - 0.1 * g, "gamma": 0.02,
                              "scale": 0.8},
    "breadcrumbs ties": lambda g: {"weights": [0.9, 0.5], "densities": [0.8, 0.6 + 0.1 * g], "combine": "ties",
                                   "normalize": True, "scale": 1.0 + 0.2 * g},
}


@pytest.mark.parametrize("label", list(GROUP_PLANS))
def test_exported_mergekit_yaml_reproduces_a_per_group_plan(hf_models, tmp_path, label):
    """Different values per layer group become mergekit filter lists; mergekit-yaml and merge3 merge both rebuild
    exactly what merge_groups built."""
    import yaml

    base = load_state_dict(hf_models / "base")
    models = [load_state_dict(hf_models / m) for m in ("m1", "m2")]
    groups = mm.layer_groups(base)
    method = label.split()[0]
    plan = [{"group": name, "method": method, "params": GROUP_PLANS[label](g)} for g, name in enumerate(groups)]
    expected = mm.merge_groups(base, models, mm.plans_from_choices(groups, plan))
    config, why_not = mm.mergekit_config(plan, groups, str(hf_models / "base"),
                                         [str(hf_models / "m1"), str(hf_models / "m2")], "float32")
    per_model = [v for m in config["models"] for v in m["parameters"].values()]
    assert why_not == "" and any(isinstance(v, list) for v in per_model), "per-group values become filter lists"
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    ours = load_state_dict(merge_from_config(path, tmp_path / "ours"))
    theirs = _run_mergekit(path, tmp_path / "theirs")
    for key, value in expected.items():
        if value.is_floating_point():
            assert torch.allclose(ours[key], value, atol=1e-6), key
            assert torch.allclose(theirs[key], value, atol=1e-6), key


def test_plans_mergekit_cannot_express_say_why():
    groups = {"a": ["a.w"], "b": ["b.w"]}
    mixed = [{"group": "a", "method": "ties", "params": {"density": 0.5}},
             {"group": "b", "method": "task_arithmetic", "params": {}}]
    assert "different methods" in mm.mergekit_config(mixed, groups, "base", ["m"])[1]
    tsv = [{"group": "a", "method": "tsv_merge", "params": {}}]
    assert "tsv_merge has no mergekit equivalent" in mm.mergekit_config(tsv, groups, "base", ["m"])[1]
