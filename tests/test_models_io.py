import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

import merge3.models as mm
from merge3 import Merge3Error


def tiny_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.weight": torch.randn(8, 4, generator=g),
        "layers.0.bias": torch.randn(8, generator=g),
        "layers.1.weight": torch.randn(3, 8, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(7, dtype=torch.int64),
    }


def assert_same(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_single_safetensors_file_round_trip(tmp_path):
    sd = tiny_state()
    save_file(sd, str(tmp_path / "m.safetensors"))
    assert_same(mm.load_state_dict(tmp_path / "m.safetensors"), sd)


def test_sharded_folder_round_trip_and_index(tmp_path):
    sd = tiny_state()
    out = mm.save_state_dict(sd, tmp_path / "out", max_shard_size=40)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert_same(mm.load_state_dict(out), sd)


def test_lazy_access_reads_shapes_without_loading(tmp_path):
    out = mm.save_state_dict(tiny_state(), tmp_path / "out", max_shard_size=100)
    lazy = mm.open_lazy(out)
    assert lazy.shape("layers.1.weight") == (3, 8)
    assert lazy.dtype("layers.1.weight") == torch.bfloat16
    assert torch.equal(lazy["layers.0.bias"], tiny_state()["layers.0.bias"])
    assert len(lazy) == 4


def test_torch_file_loads_with_weights_only(tmp_path):
    sd = tiny_state()
    torch.save(sd, tmp_path / "m.pt")
    assert_same(mm.load_state_dict(tmp_path / "m.pt"), sd)
    torch.save({"state_dict": sd}, tmp_path / "ckpt.bin")
    assert_same(mm.load_state_dict(tmp_path / "ckpt.bin"), sd)


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(Merge3Error, match="refusing to load"):
        mm.load_state_dict(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_hf_folder_round_trip_with_config_and_tokenizer_copied(tmp_path, tiny_gpt2):
    from transformers import GPT2LMHeadModel

    shutil.copytree(tiny_gpt2, tmp_path / "hf")
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    sd = mm.load_state_dict(tmp_path / "hf")
    out = mm.save_state_dict(sd, tmp_path / "copy", max_shard_size="20KB", copy_from=tmp_path / "hf")
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    reloaded = mm.load_model(out, hf_class="AutoModelForCausalLM")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(reloaded(ids).logits, model.eval()(ids).logits, atol=1e-6)


def test_merge3_native_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = mm.MLP([4, 8, 3])
    mm.save_model(model, tmp_path / "mlp")
    again = mm.load_model(tmp_path / "mlp")
    x = torch.randn(5, 4)
    assert torch.equal(again(x), model.eval()(x))


def test_missing_path_and_hub_id_are_clear_errors(tmp_path):
    with pytest.raises(Merge3Error, match="does not exist"):
        mm.load_state_dict(tmp_path / "nope")
    with pytest.raises(Merge3Error, match="local folders only"):
        mm.load_model("gpt2")


def test_save_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path):
    out = mm.save_state_dict(tiny_state(), tmp_path / "out")
    with pytest.raises(Merge3Error, match="already exists"):
        mm.save_state_dict(tiny_state(1), out)
    assert_same(mm.load_state_dict(out), tiny_state())
    bad = {"w": torch.ones(2), "x": "not a tensor"}
    with pytest.raises(Exception):
        mm.save_state_dict(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_task_vector_skips_integer_buffers():
    base, ft = tiny_state(0), tiny_state(1)
    tv = mm.task_vector(base, ft)
    assert "steps" not in tv
    assert torch.allclose(tv["layers.0.weight"], ft["layers.0.weight"] - base["layers.0.weight"])
    back = mm.apply_task_vector(base, tv)
    assert torch.allclose(back["layers.0.weight"], ft["layers.0.weight"])
    assert back["steps"] == base["steps"] and back["layers.1.weight"].dtype == torch.bfloat16


def test_shape_mismatch_names_model_and_keys():
    base = tiny_state()
    other = dict(base, **{"layers.0.weight": torch.zeros(9, 4)})
    with pytest.raises(Merge3Error, match=r"ft-a has shapes .*'layers.0.weight' 9×4 vs 8×4"):
        mm.check_compatible(base, [base, other], names=["ft-b", "ft-a"])


def test_missing_keys_and_dtype_mismatch():
    base = tiny_state()
    with pytest.raises(Merge3Error, match="missing 'steps'"):
        mm.check_compatible(base, [{k: v for k, v in base.items() if k != "steps"}])
    with pytest.raises(Merge3Error, match="dtype torch.float16"):
        mm.check_compatible(base, [dict(base, **{"layers.0.bias": base["layers.0.bias"].half()})])


def test_vocab_size_mismatch_is_a_clear_error():
    base = {"transformer.wte.weight": torch.zeros(100, 8), "lm_head.weight": torch.zeros(100, 8)}
    other = {"transformer.wte.weight": torch.zeros(104, 8), "lm_head.weight": torch.zeros(104, 8)}
    with pytest.raises(Merge3Error, match="different vocabulary size.*104 rows vs 100"):
        mm.check_compatible(base, [other], names=["chat-ft"])


def test_nan_weights_are_refused_with_key_named():
    sd = tiny_state()
    sd["layers.0.bias"][2] = float("nan")
    with pytest.raises(Merge3Error, match="'layers.0.bias'"):
        mm.check_finite(sd, "ft-a")


def test_lazy_check_compatible_reads_only_metadata(tmp_path):
    a = mm.save_state_dict(tiny_state(), tmp_path / "a")
    b = mm.save_state_dict(dict(tiny_state(), **{"layers.0.bias": torch.zeros(5)}), tmp_path / "b")
    with pytest.raises(Merge3Error, match="'layers.0.bias' 5 vs 8"):
        mm.check_compatible(mm.open_lazy(a), [mm.open_lazy(b)], names=["b"])


def test_state_dict_hash_changes_with_any_byte():
    a, b = tiny_state(), tiny_state()
    assert mm.state_dict_sha256(a) == mm.state_dict_sha256(b)
    b["layers.0.bias"][0] += 1e-6
    assert mm.state_dict_sha256(a) != mm.state_dict_sha256(b)


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """Temp files and folders are private (0600/0700) while written; the finished ones follow the umask."""
    import os
    import stat

    mask = os.umask(0o022)
    try:
        with mm.atomic_dir(tmp_path / "out") as tmp:
            mm.write_text_atomic(tmp / "a.json", "{}")
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
        assert stat.S_IMODE((tmp_path / "out" / "a.json").stat().st_mode) == 0o644
    finally:
        os.umask(mask)


def test_an_output_that_cannot_be_made_is_one_error_naming_the_users_path(tmp_path, monkeypatch):
    """A read-only or full disk: the error names the output the user gave, not the temporary name beside it."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(Merge3Error, match=f"output '{tmp_path / 'out'}' cannot be written in '{tmp_path}': "
                                          "Operation not permitted"):
        with mm.atomic_dir(tmp_path / "out"):
            pass
    with pytest.raises(Merge3Error, match="output '.*board.csv' cannot be written"):
        mm.write_text_atomic(tmp_path / "board.csv", "x")
    assert list(tmp_path.iterdir()) == []


def test_folder_names_from_users_stay_inside_their_folder():
    for good in ("ft-rot90", "news_topic", "a.b", "7"):
        assert mm.check_folder_name(good, "--names") == good
    for bad in ("", ".", "..", "../x", "a/b", "a\\b", ".hidden", "-x", "a b", "x\0"):
        with pytest.raises(Merge3Error, match="is not a plain folder name"):
            mm.check_folder_name(bad, "--names")


def test_yaml_reads_exponent_numbers_as_numbers_and_stays_safe(tmp_path):
    """``1e-3`` is a number (YAML 1.2, and what Python users write), not the string PyYAML's 1.1 rules make of it;
    object-building tags are still refused."""
    f = tmp_path / "c.yaml"
    f.write_text("weight: 5e-1\nlow: -1E-3\nbig: 2e30\nname: 1e\nversion: 1.10\nn: 7\n")
    assert mm.read_yaml_mapping(f, "config") == {"weight": 0.5, "low": -0.001, "big": 2e30, "name": "1e",
                                                  "version": 1.1, "n": 7}
    f.write_text("merge_method: ties\nmodels: []\nmerge_method: linear\n")
    with pytest.raises(Merge3Error, match="not valid YAML: key 'merge_method' is given twice"):
        mm.read_yaml_mapping(f, "config")
    f.write_text("defaults: &d {density: 0.5, weight: 1}\nmodel: {<<: *d, weight: 2}\n")
    assert mm.read_yaml_mapping(f, "config")["model"] == {"density": 0.5, "weight": 2}, "a merge key may be overridden"
    f.write_text("x: !!python/object/apply:os.system ['echo PWNED']\n")
    with pytest.raises(Merge3Error, match="not valid YAML"):
        mm.read_yaml_mapping(f, "config")
    import yaml

    assert yaml.safe_load("w: 5e-1") == {"w": "5e-1"}, "PyYAML's own SafeLoader is left as it was"
