"""C2M3 (cycle-consistent multi-model merging) and Git Re-Basin weight matching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from merge3._errors import Merge3Error
from merge3.methods import get_method
from merge3.methods._c2m3 import (
    _frank_wolfe,
    _gradients,
    _hard_objective,
    _line_search,
    _prepare,
    _segment_objective,
    _sinkhorn,
    align_to_universe,
    apply_permutations,
    average_state_dicts,
    c2m3,
    conv_bn_spec,
    infer_mlp_spec,
    mlp_spec,
    rebasin_average,
    relative_permutation,
    reset_bn_stats,
    weight_matching,
)
from merge3.methods._permutation_spec import PermutationSpec

# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _random_mlp(sizes: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    sd = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        sd[f"{2 * i}.weight"] = torch.randn(b, a, generator=gen) / a**0.5
        sd[f"{2 * i}.bias"] = torch.randn(b, generator=gen) * 0.1
    return sd


def _forward(module: nn.Module, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    module.load_state_dict(sd)
    module.eval()
    with torch.no_grad():
        return module(x)


def _random_perms(spec: PermutationSpec, sd, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {g: torch.randperm(n, generator=gen) for g, n in spec.sizes(sd).items()}


def _matrix(index: torch.Tensor) -> torch.Tensor:
    """Universe → model matrix of a model → universe index map q: P[q[u], u] = 1."""
    n = len(index)
    p = torch.zeros(n, n)
    p[index, torch.arange(n)] = 1
    return p


def _true_relative(t_a: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
    """Copies made with new[i] = base[t[i]]: unit i of a is unit j of b iff t_a[i] == t_b[j]."""
    return (t_a[:, None] == t_b[None, :]).float()


SIZES = [12, 32, 24, 5]


# ---------------------------------------------------------------------------------------------------------------------
# permuted copies


@pytest.mark.parametrize("init", ["sinkhorn", "identity"])
def test_c2m3_recovers_permutations_of_three_copies_and_keeps_the_function(init):
    gen = torch.Generator().manual_seed(1)
    base = _random_mlp(SIZES, gen)
    spec = infer_mlp_spec(base)
    true = [_random_perms(spec, base, gen) for _ in range(3)]
    models = [apply_permutations(base, spec, t) for t in true]

    result = c2m3(models, spec, init=init)

    for a, b in itertools.permutations(range(3), 2):
        for g in spec.groups:
            p_ab = _matrix(result.permutations[a][g]) @ _matrix(result.permutations[b][g]).T
            assert torch.equal(p_ab, _true_relative(true[a][g], true[b][g])), (a, b, g)
    x = torch.randn(64, SIZES[0], generator=gen)
    net = _mlp(SIZES)
    torch.testing.assert_close(_forward(net, result.merged, x), _forward(net, base, x))
    # the merge is the universe-ordered model: every aligned copy is identical
    aligned = align_to_universe(models, spec, result.permutations)
    assert all(torch.equal(aligned[m][k], aligned[0][k]) for m in range(3) for k in base)


def test_pairwise_maps_from_the_universe_are_cycle_consistent():
    gen = torch.Generator().manual_seed(2)
    models = [_random_mlp(SIZES, gen) for _ in range(4)]  # unrelated models: nothing to recover, maps non-trivial
    spec = infer_mlp_spec(models[0])
    perms = c2m3(models, spec).permutations
    rel = {(a, b): relative_permutation(perms[a], perms[b]) for a, b in itertools.permutations(range(4), 2)}
    assert any(not torch.equal(p["P_0"], torch.arange(32)) for p in rel.values())
    for a, b, c in itertools.permutations(range(4), 3):
        for g in spec.groups:
            # as matrices P_ab P_bc = P_ac; as index maps (new[i] = old[p[i]]): first c→b, then b→a
            assert torch.equal(_matrix_rel(rel[a, b][g]) @ _matrix_rel(rel[b, c][g]), _matrix_rel(rel[a, c][g]))
            assert torch.equal(rel[b, c][g][rel[a, b][g]], rel[a, c][g])


def _matrix_rel(p: torch.Tensor) -> torch.Tensor:
    """Matrix M with (M W)[i] = W[p[i]]."""
    m = torch.zeros(len(p), len(p))
    m[torch.arange(len(p)), p] = 1
    return m


@pytest.mark.parametrize("init", ["sinkhorn", "identity"])
def test_two_permuted_copies_are_recovered_exactly(init):
    gen = torch.Generator().manual_seed(3)
    base = _random_mlp(SIZES, gen)
    spec = infer_mlp_spec(base)
    true = [_random_perms(spec, base, gen) for _ in range(2)]
    models = [apply_permutations(base, spec, t) for t in true]

    result = c2m3(models, spec, init=init)  # N = 2: model 0 pinned, the universe is its unit order

    assert all(torch.equal(result.merged[k], models[0][k]) for k in base)
    one_onto_zero = relative_permutation(result.permutations[0], result.permutations[1])
    for g in spec.groups:
        assert torch.equal(_matrix_rel(one_onto_zero[g]), _true_relative(true[0][g], true[1][g]))


def test_the_official_symmetric_algorithm_stalls_for_two_models():
    """Why N = 2 pins model 0: without it Frank–Wolfe ends at a soft mixture far from the exact optimum."""
    gen = torch.Generator().manual_seed(3)
    base = _random_mlp(SIZES, gen)
    spec = infer_mlp_spec(base)
    models = [apply_permutations(base, spec, _random_perms(spec, base, gen)) for _ in range(2)]
    optimum = _hard_objective([models[0], models[0]], spec)

    official = c2m3(models, spec, anchor=False)
    pinned = c2m3(models, spec)

    assert max(official.history["objective"]) < optimum - 1e-3
    assert official.objective < optimum - 1e-3
    assert pinned.objective == pytest.approx(optimum)


@pytest.mark.parametrize("n_models", [4, 5])
def test_more_copies_are_recovered_with_the_defaults(n_models):
    gen = torch.Generator().manual_seed(4)
    base = _random_mlp(SIZES, gen)
    spec = infer_mlp_spec(base)
    models = [apply_permutations(base, spec, _random_perms(spec, base, gen)) for _ in range(n_models)]
    result = c2m3(models, spec)
    assert result.objective == pytest.approx(_hard_objective([base] * n_models, spec))


def test_weight_matching_recovers_the_permutation():
    gen = torch.Generator().manual_seed(5)
    base = _random_mlp([10, 40, 40, 30, 4], gen)
    spec = infer_mlp_spec(base)
    true = _random_perms(spec, base, gen)
    permuted = apply_permutations(base, spec, true)

    found = weight_matching(base, permuted, spec)

    for g in spec.groups:
        assert torch.equal(found[g], torch.argsort(true[g]))  # new[i] = permuted[p[i]] = base[true[p[i]]] = base[i]
    assert all(torch.equal(v, base[k]) for k, v in apply_permutations(permuted, spec, found).items())
    assert all(torch.equal(v, base[k]) for k, v in rebasin_average([base, permuted], spec=spec).items())


# ---------------------------------------------------------------------------------------------------------------------
# a CNN with BatchNorm


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


CNN_SPEC = conv_bn_spec([("0", "1"), ("3", "4")], head="8")


def _random_cnn(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = _cnn().train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics, so a wrong permutation of them shows
            net(torch.randn(16, 1, 8, 8) * 2 + 1)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_cnn_with_batchnorm_copies_are_aligned_and_merge_to_the_same_function():
    gen = torch.Generator().manual_seed(6)
    base = _random_cnn(0)
    true = [_random_perms(CNN_SPEC, base, gen) for _ in range(3)]
    models = [apply_permutations(base, CNN_SPEC, t) for t in true]
    x = torch.randn(20, 1, 8, 8, generator=gen)
    net = _cnn()
    assert not torch.allclose(_forward(net, base, x), _forward(net, average_state_dicts(models), x), atol=1e-3)

    result = c2m3(models, CNN_SPEC)

    torch.testing.assert_close(_forward(net, result.merged, x), _forward(net, base, x))
    assert result.merged["1.num_batches_tracked"] == base["1.num_batches_tracked"]
    found = weight_matching(models[0], models[1], CNN_SPEC)
    assert all(torch.equal(v, models[0][k]) for k, v in apply_permutations(models[1], CNN_SPEC, found).items())


def test_reset_bn_stats_recomputes_running_statistics_from_data():
    gen = torch.Generator().manual_seed(7)
    net = _cnn()
    net.load_state_dict(_random_cnn(1))
    net.eval()
    batches = [torch.randn(32, 1, 8, 8, generator=gen) for _ in range(4)]
    weight_before = net[0].weight.clone()

    reset_bn_stats(net, [(b, torch.zeros(32)) for b in batches])

    with torch.no_grad():
        acts = [net[0](b) for b in batches]
    mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)  # cumulative average of batch statistics
    var = torch.stack([a.var((0, 2, 3), unbiased=True) for a in acts]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean)
    torch.testing.assert_close(net[1].running_var, var)
    assert not net.training and net[1].momentum == 0.1
    assert torch.equal(net[0].weight, weight_before)
    with pytest.raises(Merge3Error, match="no batches"):
        reset_bn_stats(net, [])


# ---------------------------------------------------------------------------------------------------------------------
# the optimisation itself: O(N) objective, exact segment polynomial and gradients against the paper's formula


def _paper_objective(models, maps, sizes):
    """Σ_{a<b} Σ_layers ⟨W_a, P^a_out P^b_outᵀ W_b P^b_in P^a_inᵀ⟩ + ⟨b_a, P^a_out P^b_outᵀ b_b⟩, as in the paper."""
    n_layers = len(sizes) - 1
    total = 0.0
    for a, b in itertools.combinations(range(len(models)), 2):
        for i in range(n_layers):
            eye_in, eye_out = torch.eye(sizes[i], dtype=torch.float64), torch.eye(sizes[i + 1], dtype=torch.float64)
            pa_in = maps[a][f"P_{2 * i - 2}"] if i > 0 else eye_in
            pb_in = maps[b][f"P_{2 * i - 2}"] if i > 0 else eye_in
            pa_out = maps[a][f"P_{2 * i}"] if i < n_layers - 1 else eye_out
            pb_out = maps[b][f"P_{2 * i}"] if i < n_layers - 1 else eye_out
            wa, wb = models[a][f"{2 * i}.weight"].double(), models[b][f"{2 * i}.weight"].double()
            ba, bb = models[a][f"{2 * i}.bias"].double(), models[b][f"{2 * i}.bias"].double()
            total = total + (wa * (pa_out @ pb_out.T @ wb @ pb_in @ pa_in.T)).sum()
            if i < n_layers - 1:  # the output bias is never permuted: a constant the implementation leaves out
                total = total + (ba * (pa_out @ pb_out.T @ bb)).sum()
    return total


def test_objective_segment_and_gradients_match_the_paper_formula():
    gen = torch.Generator().manual_seed(8)
    models = [_random_mlp(SIZES, gen) for _ in range(3)]
    spec = infer_mlp_spec(models[0])
    sizes = spec.sizes(models[0])
    maps = [
        {g: _sinkhorn(torch.rand(n, n, generator=gen, dtype=torch.float64)) for g, n in sizes.items()}
        for _ in range(3)
    ]
    directions = [{g: torch.randperm(n, generator=gen) for g, n in sizes.items()} for _ in range(3)]
    tensors = _prepare(models, spec)
    for m in range(3):
        for t in tensors[m].values():
            t.update(maps[m])
    keys = list(tensors[0])
    totals = {k: sum(tensors[m][k].universe for m in range(3)) for k in keys}

    poly = _segment_objective(tensors, dict(enumerate(directions)), keys)
    for step in (0.0, 0.37, 1.0):
        moved = [
            {g: (1 - step) * p + step * _matrix(directions[m][g]).double() for g, p in maps[m].items()}
            for m in range(3)
        ]
        expected = _paper_objective(models, moved, SIZES).item()
        assert np.polynomial.polynomial.polyval(step, poly) == pytest.approx(expected, rel=1e-10)

    leaves = [{g: p.clone().requires_grad_(True) for g, p in per_model.items()} for per_model in maps]
    _paper_objective(models, leaves, SIZES).backward()
    for m in range(3):
        for g, grad in _gradients(tensors[m], totals).items():
            torch.testing.assert_close(grad, leaves[m][g].grad)


def test_line_search_never_lowers_the_objective_and_takes_full_steps():
    assert _line_search(np.array([0.0, 1.0])) == 1.0  # increasing: Brent alone stops short of 1
    assert _line_search(np.array([0.0, -1.0])) == 0.0
    assert _line_search(np.array([0.0, 1.0, -1.0])) == pytest.approx(0.5, abs=1e-3)


def test_history_is_monotone_and_stops_on_stalls():
    gen = torch.Generator().manual_seed(9)
    models = [_random_mlp(SIZES, gen) for _ in range(3)]
    spec = infer_mlp_spec(models[0])
    _, history = _frank_wolfe(models, spec, spec.sizes(models[0]), 200, "sinkhorn", 0, False)
    objective = history["objective"]
    assert all(b >= a - 1e-9 for a, b in zip(objective, objective[1:]))
    assert len(objective) < 200 and all(b - a < 1e-6 for a, b in zip(objective[-6:], objective[-5:]))
    assert len(history["step_size"]) == len(objective)


def test_seeded_and_deterministic():
    gen = torch.Generator().manual_seed(10)
    models = [_random_mlp(SIZES, gen) for _ in range(3)]
    a, b = c2m3(models, seed=3), c2m3(models, seed=3)
    assert a.history == b.history
    assert all(torch.equal(a.permutations[m][g], b.permutations[m][g]) for m in range(3) for g in a.permutations[m])


# ---------------------------------------------------------------------------------------------------------------------
# real data: three MLPs trained on digits from different seeds


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    train, test = train_test_split(np.arange(len(x)), test_size=0.5, stratify=data.target, random_state=0)
    return x[train], y[train], x[test], y[test]


DIGITS_SIZES = [64, 256, 256, 10]


def _train(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int = 15) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = _mlp(DIGITS_SIZES)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def digits_models():
    x_train, y_train, x_test, y_test = _digits()
    models = [_train(seed, x_train, y_train) for seed in range(3)]
    return models, x_test, y_test


def _accuracy(sd, x, y) -> float:
    return (_forward(_mlp(DIGITS_SIZES), sd, x).argmax(1) == y).float().mean().item()


def test_aligned_averaging_beats_naive_averaging_on_digits(digits_models):
    models, x, y = digits_models
    individual = [_accuracy(m, x, y) for m in models]
    naive = _accuracy(average_state_dicts(models), x, y)

    result = c2m3(models)  # spec inferred from the state dict
    merged = _accuracy(result.merged, x, y)

    assert min(individual) > 0.9
    assert naive < 0.7  # different seeds: averaging unaligned units destroys the function
    assert merged > naive + 0.25 and merged > min(individual) - 0.04, (individual, naive, merged)
    assert result.objective > _hard_objective(models, infer_mlp_spec(models[0]))


def test_two_model_merges_beat_naive_averaging_on_digits(digits_models):
    models, x, y = digits_models
    pair = models[:2]
    naive = _accuracy(average_state_dicts(pair), x, y)
    for merged in (c2m3(pair).merged, rebasin_average(pair)):
        assert _accuracy(merged, x, y) > naive + 0.2


# ---------------------------------------------------------------------------------------------------------------------
# merging, weights and the registry


def test_weights_per_model_and_per_layer():
    gen = torch.Generator().manual_seed(11)
    models = [_random_mlp(SIZES, gen) for _ in range(3)]
    result = c2m3(models, weights=[1.0, 0.0, 0.0])
    aligned = align_to_universe(models, infer_mlp_spec(models[0]), result.permutations)
    assert all(torch.equal(result.merged[k], aligned[0][k]) for k in aligned[0])

    mixed = average_state_dicts(aligned, weights=[{"0.*": 1.0, "*": 0.0}, {"0.*": 0.0, "*": 1.0}, 0.0])
    assert torch.equal(mixed["0.weight"], aligned[0]["0.weight"])
    assert torch.equal(mixed["2.weight"], aligned[1]["2.weight"])


def test_registered_methods():
    method = get_method("c2m3")
    assert method.inputs == ("models",)
    kinds = {name: p.kind for name, p in method.params.items()}
    assert kinds["max_iter"] == "int" and kinds["seed"] == "int" and kinds["weights"] == "per_model"
    assert method.params["init"].choices == ("sinkhorn", "identity")
    assert method.validate({}, n_models=3)["init"] == "sinkhorn"
    with pytest.raises(Merge3Error, match="init"):
        method.validate({"init": "random"})

    gen = torch.Generator().manual_seed(12)
    models = [_random_mlp(SIZES, gen) for _ in range(3)]
    merged = method(models, max_iter=50, init="identity", seed=1)
    expected = c2m3(models, max_iter=50, init="identity", seed=1).merged
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert get_method("rebasin_average").inputs == ("models",)


def test_single_model_is_returned_unchanged():
    gen = torch.Generator().manual_seed(13)
    model = _random_mlp(SIZES, gen)
    result = c2m3([model])
    assert all(torch.equal(result.merged[k], model[k]) for k in model)
    assert result.history["objective"] == []


# ---------------------------------------------------------------------------------------------------------------------
# specs and bad input


def test_mlp_specs():
    sd = _random_mlp(SIZES, torch.Generator().manual_seed(0))
    assert infer_mlp_spec(sd).axes_to_perm == mlp_spec(["0", "2", "4"]).axes_to_perm
    no_bias = {k: v for k, v in sd.items() if k.endswith("weight")}
    assert infer_mlp_spec(no_bias).axes_to_perm == mlp_spec(["0", "2", "4"], bias=False).axes_to_perm
    conv = r"tensor '0.weight' \(shape \(8, 1, 3, 3\)\) is not a linear layer's weight or bias"
    with pytest.raises(Merge3Error, match=conv):
        infer_mlp_spec(_random_cnn(0))
    broken = dict(sd, **{"2.weight": torch.zeros(24, 31)})
    with pytest.raises(Merge3Error, match="'2.weight' takes 31 inputs"):
        infer_mlp_spec(broken)


def test_mismatched_shapes_raise_one_clear_error():
    gen = torch.Generator().manual_seed(14)
    a = _random_mlp(SIZES, gen)
    b = _random_mlp([12, 32, 20, 5], gen)
    spec = infer_mlp_spec(a)
    msg = r"c2m3: model 1 has shapes that differ from model 0: '2.weight' 20×32 vs 24×32"
    with pytest.raises(Merge3Error, match=msg):
        c2m3([a, b], spec)
    with pytest.raises(Merge3Error, match="weight_matching: model 1 has shapes that differ from model 0: '2.weight'"):
        weight_matching(a, b, spec)
    with pytest.raises(Merge3Error, match="c2m3: model 1 does not match model 0: unexpected 'extra'"):
        c2m3([a, dict(a, extra=torch.zeros(1))], spec)


def test_bad_specs_raise_one_clear_error():
    gen = torch.Generator().manual_seed(15)
    models = [_random_mlp(SIZES, gen) for _ in range(2)]
    missing = PermutationSpec({**mlp_spec(["0", "2", "4"]).axes_to_perm, "5.weight": ("P_0", None)})
    with pytest.raises(Merge3Error, match="c2m3: permutation spec names tensor '5.weight', which is not in the models"):
        c2m3(models, missing)
    with pytest.raises(Merge3Error, match="names tensor '5.weight'"):
        weight_matching(models[0], models[1], missing)
    wrong_axes = PermutationSpec({"0.weight": ("P_0",)})
    with pytest.raises(Merge3Error, match="gives 1 axes for tensor '0.weight', which has shape"):
        c2m3(models, wrong_axes)
    inconsistent = PermutationSpec({"0.weight": ("P", None), "2.weight": ("P", None)})
    with pytest.raises(Merge3Error, match="sizes must agree"):
        c2m3(models, inconsistent)
    with pytest.raises(Merge3Error, match="3 weights for 2 models"):
        c2m3(models, weights=[1.0, 1.0, 1.0])
    with pytest.raises(Merge3Error, match="no permutation given for group 'P_0'"):
        apply_permutations(models[0], mlp_spec(["0", "2", "4"]), {})


def test_mlp_spec_is_inferred_from_keys_in_file_order():
    """Files store keys sorted: a bias before its weight, layer 10 before layer 2. The spec is the same."""
    gen = torch.Generator().manual_seed(5)
    sizes = [4] + [6] * 11 + [3]  # 12 layers: "22.weight" sorts before "4.weight"
    state = _random_mlp(sizes, gen)
    assert infer_mlp_spec(dict(sorted(state.items()))).axes_to_perm == infer_mlp_spec(state).axes_to_perm
    with pytest.raises(Merge3Error, match="takes 6 inputs but the previous layer '0' has 5 outputs"):
        infer_mlp_spec({**state, "0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(5)})


def test_merge_config_c2m3_on_saved_merge3_mlps(tmp_path):
    """``merge3 merge`` with c2m3 on MLP folders (read back with sorted keys) aligns and averages them."""
    from merge3.methods import merge_from_config
    from merge3.models import MLP, load_state_dict, save_model

    torch.manual_seed(0)
    first = MLP([6, 10, 4])
    spec = infer_mlp_spec(first.state_dict())
    save_model(first, tmp_path / "first")
    perm = {g: torch.randperm(n) for g, n in spec.sizes(first.state_dict()).items()}
    second = MLP([6, 10, 4])
    second.load_state_dict(apply_permutations(first.state_dict(), spec, perm))
    save_model(second, tmp_path / "second")
    (tmp_path / "m.yaml").write_text("merge_method: c2m3\nmodels:\n  - {model: first}\n  - {model: second}\n")
    merged = load_state_dict(merge_from_config(tmp_path / "m.yaml", tmp_path / "merged"))
    for key, value in first.state_dict().items():  # a permuted copy aligns exactly: the average is the model
        assert torch.allclose(merged[key], value, atol=1e-6), key
