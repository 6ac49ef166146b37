"""CUDA checks (run on a GPU machine by ``bench/gpu_check.sh``; skipped with the reason anywhere else): in-place
candidate builds on CUDA equal the CPU result, and a causal-LM search with IRT fitness runs on CUDA end to end."""

import pytest
import torch

import merge3.methods as mm
from merge3.methods import GroupPlan

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


def test_candidate_builds_on_cuda_equal_the_cpu_result(tiny_gpt2):
    from transformers import GPT2LMHeadModel

    state = GPT2LMHeadModel.from_pretrained(tiny_gpt2).state_dict()
    base = {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}
    models = [{k: v + 0.02 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    groups = mm.layer_groups(base, "layer")
    names = list(groups)
    plans = [
        [GroupPlan(names[1], groups[names[1]], "ties", {"density": [0.2, 0.6], "weights": [1.0, 0.4, 0.7]}),
         GroupPlan(names[2], groups[names[2]], "dare", {"drop_rate": 0.5, "seed": 4, "weights": [0.5, 1.0, 0.2]}),
         GroupPlan("rest", ["*"], "tsv_merge", {"alpha": 0.9, "weights": [1.0, 0.5, 0.8]})],
        [GroupPlan("all", ["*"], "task_arithmetic", {"weights": [0.3, -0.5, 1.2]})],
        [GroupPlan("all", ["*"], "ties", {"density": 0.35, "trim": "model"})],
    ]
    cpu = mm.CandidateBuilder(base, models)
    cuda = mm.CandidateBuilder(base, models, device="cuda")
    for plan in plans:
        expected, got = cpu.build(plan), cuda.build(plan)
        for key, value in expected.items():
            assert got[key].device.type == "cuda"
            assert torch.allclose(got[key].cpu(), value, atol=1e-4, rtol=1e-4), key


def test_a_causal_lm_search_with_irt_fitness_runs_on_cuda(tmp_path):
    import merge3
    from merge3._api import verify
    from merge3.search import CalibrationSettings, calibrate_bank
    from test_lm_pipeline import fact_items
    from merge3.itembank import BankSpec, write_bank
    from _tiny_lm import build_tiny_lm

    for name, steps in (("base", 40), ("ft-a", 300), ("ft-b", 120)):
        build_tiny_lm(tmp_path / name, steps=steps, seed=0)
    spec = BankSpec(name="facts", tasks=["kinds", "things"], evaluator={"kind": "multiple_choice", "batch_size": 8})
    write_bank(tmp_path / "bank", spec, fact_items(), test_fraction=0.25, seed=0)
    base, endpoints = str(tmp_path / "base"), [str(tmp_path / "ft-a"), str(tmp_path / "ft-b")]
    calibrate_bank(tmp_path / "bank", base, endpoints, CalibrationSettings(random_merges=14, ns=[3], kind="2pl", dims=1,
                   methods=["task_arithmetic", "ties"]), device="cuda", log=lambda *a: None)
    space = {"name": "lm-cuda", "seed": 0, "device": "cuda", "models": {"base": base, "endpoints": endpoints},
             "bank": {"path": str(tmp_path / "bank"), "estimator": "cv-irt", "items_per_task": 3,
                      "fitness": {"items": "fresh", "promotion": {"top_k": 2, "factor": 2}}},
             "genome": {"granularity": "layer", "methods": ["task_arithmetic", "ties"]},
             "engine": {"population": 4, "generations": 2}, "executor": {"kind": "local"}}
    outcome = merge3.search(space, runs_dir=tmp_path / "runs", name="cuda", progress=False)
    assert all(r.error is None for r in outcome.run.records())
    assert verify(outcome.run.path, top=1, log=lambda *a: None)[0]["test"] is not None
