"""Skill packs: a pack rebuilds its fine-tune from its factors (exactly at full rank, as TSV-C at r/T), is accepted
wherever an endpoint is (YAML merges, searches) with the same results as the dense model it stands for, and is
refused against any other base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge3 import Merge3Error
from merge3.methods import merge_from_config, tsv_compress_models
from merge3.models import MLP, compress_models, load_state_dict, open_lazy, save_model, save_state_dict


@pytest.fixture
def models(tmp_path):
    torch.manual_seed(0)
    base = MLP([12, 20, 16, 4])
    save_model(base, tmp_path / "base")
    paths = {}
    for i in range(3):
        ft = MLP([12, 20, 16, 4])
        ft.load_state_dict({k: v + 0.1 * torch.randn(v.shape) for k, v in base.state_dict().items()})
        save_model(ft, tmp_path / f"ft{i}")
        paths[f"t{i}"] = str(tmp_path / f"ft{i}")
    return tmp_path, paths


def close(a: dict, b: dict, atol=1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


def test_a_full_rank_pack_rebuilds_its_model_and_r_over_t_is_tsv_c(models):
    root, paths = models
    compress_models(root / "base", paths, root / "full", energy=1.0)  # every triplet of every layer
    for name, path in paths.items():
        assert close(load_state_dict(root / "full" / name), load_state_dict(path))
    manifest = compress_models(root / "base", paths, root / "tsvc")
    expected = tsv_compress_models(load_state_dict(root / "base"), [load_state_dict(p) for p in paths.values()])
    for name, dense in zip(paths, expected):
        assert close(load_state_dict(root / "tsvc" / name), dense)
    info = manifest["tasks"]["t0"]
    assert info["ranks"] == {"layers.0.weight": 4, "layers.1.weight": 5, "layers.2.weight": 1}  # min(m, n) // 3
    # rank 12: no factors smaller than the matrices themselves, so every delta is kept whole (and exact)
    assert compress_models(root / "base", paths, root / "r12", rank=12)["tasks"]["t0"]["ranks"] == {}
    assert close(load_state_dict(root / "r12" / "t0"), load_state_dict(paths["t0"]))
    assert info["bytes"] < info["dense_bytes"]
    on_disk = json.loads((root / "tsvc" / "manifest.json").read_text())
    assert on_disk["base"]["sha256"] == manifest["base"]["sha256"] and set(on_disk["tasks"]) == set(paths)


def test_energy_keeps_the_fewest_triplets_that_hold_it(models):
    root, paths = models
    info = compress_models(root / "base", paths, root / "e", energy=0.5)["tasks"]["t1"]
    delta = load_state_dict(paths["t1"])["layers.0.weight"] - load_state_dict(root / "base")["layers.0.weight"]
    s = torch.linalg.svdvals(delta.double())
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    k = info["ranks"]["layers.0.weight"]
    assert share[k - 1] >= 0.5 - 1e-9 and (k == 1 or share[k - 2] < 0.5)


def test_a_pack_merges_like_the_model_it_stands_for(models):
    root, paths = models
    compress_models(root / "base", paths, root / "p", rank=3)
    for name in paths:
        save_state_dict(load_state_dict(root / "p" / name), root / f"dense-{name}",
                        config=json.loads((root / "base" / "config.json").read_text()))
    for kind in ("p/", "dense-"):
        models_yaml = "".join(f"  - {{model: {root}/{kind}{n}, parameters: {{weight: 0.4}}}}\n" for n in paths)
        (root / f"{kind[0]}.yaml").write_text(f"merge_method: task_arithmetic\nbase_model: {root}/base\nmodels:\n"
                                              + models_yaml)
        merge_from_config(root / f"{kind[0]}.yaml", root / f"merged-{kind[0]}")
    assert close(load_state_dict(root / "merged-p"), load_state_dict(root / "merged-d"), atol=1e-6)


def test_packs_as_search_endpoints_give_the_search_of_the_dense_models(digits_zoo, tmp_path):
    import merge3

    names = ["upright", "rot90"]
    fts = {n: str(digits_zoo.finetuned[n]) for n in names}
    compress_models(digits_zoo.base, fts, tmp_path / "packs", rank=16)
    for n in names:
        save_model_from = load_state_dict(tmp_path / "packs" / n)
        save_state_dict(save_model_from, tmp_path / f"dense-{n}",
                        config=json.loads((digits_zoo.base / "config.json").read_text()))
    scores = {}
    for kind, endpoints in (("packs", [tmp_path / "packs" / n for n in names]),
                            ("dense", [tmp_path / f"dense-{n}" for n in names])):
        space = {"name": kind, "seed": 0, "device": "cpu",
                 "models": {"base": str(digits_zoo.base), "endpoints": [str(p) for p in endpoints], "names": names},
                 "bank": {"path": str(digits_zoo.bank), "estimator": "full", "items_per_task": None},
                 "genome": {"granularity": "model", "methods": ["task_arithmetic"]},
                 "engine": {"population": 4, "generations": 1}, "executor": {"kind": "local"}}
        outcome = merge3.search(space, runs_dir=tmp_path / "runs", name=kind, progress=False)
        scores[kind] = [r.scores for r in outcome.run.records()]
    assert scores["packs"] == scores["dense"]


def test_a_pack_is_refused_when_its_base_changed_or_differs_or_a_layer_is_missing(models):
    root, paths = models
    compress_models(root / "base", paths, root / "p", rank=2)
    torch.manual_seed(5)
    save_model(MLP([12, 20, 16, 4]), root / "other")
    (root / "m.yaml").write_text(f"merge_method: task_arithmetic\nbase_model: {root}/other\nmodels:\n"
                                 f"  - {{model: {root}/p/t0, parameters: {{weight: 1.0}}}}\n")
    with pytest.raises(Merge3Error, match="was made from another base than"):
        merge_from_config(root / "m.yaml", root / "out")
    factors = root / "p" / "t1" / "factors.safetensors"
    tensors = load_file(str(factors))
    save_file({k: v for k, v in tensors.items() if not k.startswith("layers.1.bias")}, str(factors))
    with pytest.raises(Merge3Error, match="missing layer 'layers.1.bias'"):
        open_lazy(root / "p" / "t1")
    base = load_state_dict(root / "base")
    save_state_dict({**base, "layers.0.bias": base["layers.0.bias"] + 1}, root / "base", overwrite=True,
                    config=json.loads((root / "base" / "config.json").read_text()))
    with pytest.raises(Merge3Error, match="has changed since the pack was made"):
        open_lazy(root / "p" / "t0")
    assert not (root / "out").exists()


def test_bad_ranks_and_outputs_are_refused_before_anything_is_written(models):
    root, paths = models
    with pytest.raises(Merge3Error, match=r"--rank 17 is above the rank of every layer \(the largest: 'layers.1.weight', rank 16"):
        compress_models(root / "base", paths, root / "x", rank=17)
    with pytest.raises(Merge3Error, match="a rank must be a positive integer"):
        compress_models(root / "base", paths, root / "x", rank=0)
    with pytest.raises(Merge3Error, match=r"outside \(0, 1\]"):
        compress_models(root / "base", paths, root / "x", energy=1.5)
    assert not (root / "x").exists()
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(Merge3Error, match="already exists and is not empty"):
        compress_models(root / "base", paths, root / "mine", rank=2)
    assert [p.name for p in (root / "mine").iterdir()] == ["notes.txt"]


def test_a_pack_of_a_hugging_face_model_loads_as_that_model(tiny_lm, tmp_path):
    from merge3.models import load_model

    base = load_model(tiny_lm, hf_class="AutoModelForCausalLM")
    g = torch.Generator().manual_seed(1)
    stored = set(open_lazy(tiny_lm))  # tied weights (lm_head) are stored once
    tuned = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in base.state_dict().items() if k in stored}
    save_state_dict(tuned, tmp_path / "ft", copy_from=tiny_lm)
    compress_models(tiny_lm, {"ft": tmp_path / "ft"}, tmp_path / "packs", energy=1.0)
    ids = torch.tensor([[1, 2, 3, 4]])
    dense = load_model(tmp_path / "ft", hf_class="AutoModelForCausalLM")
    packed = load_model(tmp_path / "packs" / "ft", hf_class="AutoModelForCausalLM")
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, packed(ids).logits, atol=1e-4)
