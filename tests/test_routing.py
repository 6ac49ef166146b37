"""MASS-style routing over skill packs on the digits zoo: each input goes to the task whose TSV subspace explains
its representation best; the routed model is an ordinary module that `merge3 eval` scores, and it beats TSV-Merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge3 import Merge3Error
from merge3.cli import main
from merge3.itembank import ItemBank, load_model_for, make_evaluator
from merge3.methods import tsv_merge
from merge3.models import build_routed, compress_models, load_model, load_state_dict


@pytest.fixture(scope="module")
def routed(digits_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    compress_models(digits_zoo.base, {t: str(p) for t, p in digits_zoo.finetuned.items()}, root / "packs")
    build_routed({t: root / "packs" / t for t in digits_zoo.finetuned}, root / "routed", layer="layers.1")
    return root


def test_inputs_go_to_their_own_task_where_the_domains_separate(digits_zoo, routed):
    bank = ItemBank.load(digits_zoo.bank, warn=False)
    model = load_model(routed / "routed")
    rows = bank.test_indices
    x = torch.tensor(np.stack(bank.items["input"].to_numpy()[rows]), dtype=torch.float32)
    chosen = np.array(model.tasks)[model.route(x).numpy()]
    own = {t: float(np.mean(chosen[bank.task_of[rows] == t] == t)) for t in bank.tasks}
    assert own["permuted"] > 0.95 and own["inverted"] > 0.95 and own["rot90"] > 0.9  # pixel maps unlike the rest


def test_the_routed_model_beats_tsv_merge_on_test_items(digits_zoo, routed):
    bank = ItemBank.load(digits_zoo.bank, warn=False)
    evaluate = make_evaluator(bank)
    test = bank.test_indices
    routed_acc = bank.per_task_accuracy(evaluate(load_model_for(bank, routed / "routed"), test), test)
    base = load_state_dict(digits_zoo.base)
    fts = [load_state_dict(p) for p in digits_zoo.finetuned.values()]
    search = bank.search_indices
    module = load_model(digits_zoo.base)

    def mean_acc(state, rows):
        module.load_state_dict(state)
        return float(np.mean(evaluate(module, rows)))
    alpha = max((0.5, 1.0, 1.5, 2.0), key=lambda a: mean_acc(tsv_merge(base, fts, alpha=a), search))
    tsv_acc = mean_acc(tsv_merge(base, fts, alpha=alpha), test)
    assert np.mean(list(routed_acc.values())) > tsv_acc + 0.1


def test_merge3_eval_scores_a_routed_folder(digits_zoo, routed, capsys):
    assert main(["eval", str(routed / "routed"), "--bank", str(digits_zoo.bank)]) == 0
    assert "mean" in capsys.readouterr().out


def test_top_k_routing_runs_each_input_with_its_k_best_tasks_added(digits_zoo, routed, tmp_path):
    from merge3.methods import tsv_compress

    tasks = list(digits_zoo.finetuned)
    bank = ItemBank.load(digits_zoo.bank, warn=False)
    x = torch.tensor(np.stack(bank.items["input"].to_numpy()[bank.test_indices[::37]]), dtype=torch.float32)
    build_routed({t: routed / "packs" / t for t in tasks}, tmp_path / "top2", layer="layers.1", top_k=2)
    top2 = load_model(tmp_path / "top2")
    with torch.no_grad():
        out = top2(x)
    routes = top2.last_routes
    assert routes.shape == (len(x), 2) and bool((routes[:, 0] < routes[:, 1]).all())
    top1 = load_model(routed / "routed")
    assert bool((top1.route(x)[:, None] == routes).any(-1).all())  # the best task is always among the two
    base, fts = load_state_dict(digits_zoo.base), [load_state_dict(p) for p in digits_zoo.finetuned.values()]
    module = load_model(digits_zoo.base)
    for pair in routes.unique(dim=0).tolist():  # θ₀ + τ_a + τ_b with the packs' task vectors (rank r/T)
        rows = (routes == torch.tensor(pair)).all(-1)
        module.load_state_dict(tsv_compress(base, fts, weights=[1.0 if t in pair else 0.0 for t in range(len(tasks))]))
        with torch.no_grad():
            assert torch.allclose(out[rows], module(x[rows]), atol=1e-4), pair
    build_routed({t: routed / "packs" / t for t in tasks}, tmp_path / "all", layer="layers.1", top_k=len(tasks))
    every = load_model(tmp_path / "all")
    module.load_state_dict(tsv_compress(base, fts))
    with torch.no_grad():
        assert torch.allclose(every(x), module(x), atol=1e-4)


def test_bad_routes_are_refused(digits_zoo, routed, tmp_path):
    packs = {t: routed / "packs" / t for t in ("upright", "rot90")}
    with pytest.raises(Merge3Error, match="at least two skill packs"):
        build_routed({"upright": packs["upright"]}, tmp_path / "r")
    with pytest.raises(Merge3Error, match="no factors for 'layers.9.weight'"):
        build_routed(packs, tmp_path / "r", layer="layers.9")
    assert main(["route", str(digits_zoo.base), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    for bad in (0, 3):
        with pytest.raises(Merge3Error, match=f"top_k = {bad} must be an integer from 1 to the number of tasks"):
            build_routed(packs, tmp_path / "r", top_k=bad)
    assert main(["route", *map(str, packs.values()), "--out", str(tmp_path / "r"), "--top-k", "5"]) == 2
    assert not (tmp_path / "r").exists()


def test_routing_is_refused_for_generation_and_models_without_linear_layers(routed, tiny_lm, tmp_path):
    with pytest.raises(Merge3Error, match="not to generation with causal LMs"):
        load_model(routed / "routed", hf_class="AutoModelForCausalLM")
    from merge3.models import open_lazy, save_state_dict

    base = load_model(tiny_lm, hf_class="AutoModelForCausalLM")
    stored = set(open_lazy(tiny_lm))
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        save_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()
                         if k in stored and v.is_floating_point()}, tmp_path / f"ft{i}", copy_from=tiny_lm)
    compress_models(tiny_lm, {f"t{i}": tmp_path / f"ft{i}" for i in range(2)}, tmp_path / "packs", rank=2)
    with pytest.raises(Merge3Error, match="nothing to route on"):  # GPT-2's projections are Conv1D, not Linear
        build_routed({f"t{i}": tmp_path / "packs" / f"t{i}" for i in range(2)}, tmp_path / "routed")
    assert not (tmp_path / "routed").exists()
