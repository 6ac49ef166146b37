"""Merge methods: agreement with mergekit and with the official algorithms, invariants, per-layer values, group
plans, the candidate builder, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import merge3.methods as mm
from merge3 import Merge3Error
from merge3.methods import GroupPlan
from merge3.methods import tsv_factors


def _gpt2_state(folder) -> dict[str, torch.Tensor]:
    """The shared tiny GPT-2's parameters (its tied head included) plus an integer buffer."""
    from transformers import GPT2LMHeadModel

    state = {k: v.clone() for k, v in GPT2LMHeadModel.from_pretrained(folder).state_dict().items()}
    state["step_counter"] = torch.tensor([7], dtype=torch.int64)  # an integer buffer: must keep the base value
    return state


def _finetune(base: dict, seed: int, sparsity: float = 0.0, scale: float = 0.05) -> dict:
    """A 'fine-tuned' copy: base plus a random task vector (some entries exactly unchanged when sparsity > 0)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone() + (seed if k == "step_counter" else 0)
            continue
        delta = torch.randn(v.shape, generator=g) * scale
        if sparsity:
            delta *= torch.rand(v.shape, generator=g) >= sparsity
        out[k] = v + delta
    return out


@pytest.fixture(scope="module")
def gpt2_models(tiny_gpt2):
    base = _gpt2_state(tiny_gpt2)
    return base, [_finetune(base, s) for s in (1, 2, 3)]


def _close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k].float() - b[k].float()).abs().max())


def _mergekit(method: str, base, models, **params):
    merge_state_dicts = pytest.importorskip("mergekit.merge_methods").merge_state_dicts
    floats = [k for k, v in base.items() if v.is_floating_point()]  # mergekit refuses differing integer buffers
    inputs = {"base": {k: base[k] for k in floats}, **{f"m{i}": {k: m[k] for k in floats} for i, m in enumerate(models)}}
    per_model = {k: v for k, v in params.items() if k in ("weight", "density")}
    shared = {k: v for k, v in params.items() if k not in per_model}
    parameters = {k: {f"m{i}": x for i, x in enumerate(v)} for k, v in per_model.items()} | shared
    merged = merge_state_dicts(inputs, method, base="base", parameters=parameters)
    return {k: merged.get(k, base[k]) for k in base}


# --- agreement with mergekit (its in-memory API on the same tiny GPT-2 state dicts) ----------------------------------

def test_task_arithmetic_matches_mergekit(gpt2_models):
    base, models = gpt2_models
    ours = mm.task_arithmetic(base, models, scale=0.7, weights=[1.0, -0.5, 0.3])
    theirs = _mergekit("task_arithmetic", base, models, weight=[1.0, -0.5, 0.3], **{"lambda": 0.7})
    _close(ours, theirs)
    assert ours["step_counter"].item() == 7


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_ties_matches_mergekit(gpt2_models, density):
    base, models = gpt2_models
    weights = [1.0, 0.6, 0.3]
    ours = mm.ties(base, models, density=density, weights=weights, scale=1.3)
    theirs = _mergekit("ties", base, models, weight=weights, density=[density] * 3, **{"lambda": 1.3})
    _close(ours, theirs)


def test_ties_unnormalized_matches_mergekit(gpt2_models):
    base, models = gpt2_models
    ours = mm.ties(base, models, density=0.4, normalize=False)
    theirs = _mergekit("ties", base, models, weight=[1.0] * 3, density=[0.4] * 3, normalize=False)
    _close(ours, theirs)


def test_dare_without_drops_matches_mergekit(gpt2_models):
    """mergekit's DARE draws its masks from torch's global RNG, so outputs agree only at drop rate 0 (keep rate 1);
    the masks themselves are compared statistically in test_dare_mask_statistics_match_mergekit."""
    base, models = gpt2_models
    weights = [0.8, 0.5, 1.1]
    _close(mm.dare(base, models, drop_rate=0.0, weights=weights),
           _mergekit("dare_linear", base, models, weight=weights, density=[1.0] * 3))
    _close(mm.dare(base, models, drop_rate=0.0, weights=weights, combine="ties", normalize=False),
           _mergekit("dare_ties", base, models, weight=weights, density=[1.0] * 3))


def test_linear_matches_mergekit(gpt2_models):
    _, models = gpt2_models
    merge_state_dicts = pytest.importorskip("mergekit.merge_methods").merge_state_dicts
    floats = [k for k, v in models[0].items() if v.is_floating_point()]
    theirs = merge_state_dicts([{k: m[k] for k in floats} for m in models], "linear",
                               parameters={"weight": [1.0, 2.0, 0.5]})
    ours = mm.linear(models, weights=[1.0, 2.0, 0.5])
    _close({k: ours[k] for k in floats}, theirs)
    assert torch.equal(ours["step_counter"], models[0]["step_counter"])  # base-free: the first model's buffer


def test_dare_mask_statistics_match_mergekit():
    pytest.importorskip("mergekit")
    from mergekit.sparsify import RescaleNorm, bernoulli

    base = {"w": torch.zeros(200_000)}
    delta = torch.randn(200_000, generator=torch.Generator().manual_seed(0)).abs() + 0.1
    ours = mm.dare(base, [{"w": delta}], drop_rate=0.3, seed=5)["w"]
    torch.manual_seed(123)  # not 0: the global stream would then replay the draws that made `delta`
    theirs = bernoulli(delta, density=0.7, rescale_norm=RescaleNorm.l1)
    for merged in (ours, theirs):
        kept = merged != 0
        assert abs(kept.float().mean().item() - 0.7) < 0.005
        assert abs((merged[kept] / delta[kept]).mean().item() - 1 / 0.7) < 0.02
    assert torch.allclose(ours[ours != 0], delta[ours != 0] / 0.7)  # ours rescales exactly by 1/(1-p)


def _mergekit_per_key(method: str, base, models, draws=None, **params):
    """mergekit's merge of one tensor at a time, so that a random mask (torch.bernoulli of the keep probabilities)
    can be replaced by merge3's own draws for that tensor: ``draws(key, task)`` → uniforms, mask = u < p."""
    merge_state_dicts = pytest.importorskip("mergekit.merge_methods").merge_state_dicts
    out = {}
    for key, value in base.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        calls = iter(range(len(models)))
        real_bernoulli = torch.bernoulli

        def bernoulli(probs, *args, key=key, calls=calls, **kwargs):
            if draws is None:
                return real_bernoulli(probs, *args, **kwargs)
            return (draws(key, next(calls)).reshape(probs.shape) < probs).to(probs.dtype)

        per_model = {k: v for k, v in params.items() if k in ("weight", "density", "gamma", "epsilon")}
        shared = {k: v for k, v in params.items() if k not in per_model}
        parameters = {k: {f"m{i}": x for i, x in enumerate(v)} for k, v in per_model.items()} | shared
        inputs = {"base": {key: value}, **{f"m{i}": {key: m[key]} for i, m in enumerate(models)}}
        torch.bernoulli = bernoulli
        try:
            out[key] = merge_state_dicts(inputs, method, base="base", parameters=parameters)[key]
        finally:
            torch.bernoulli = real_bernoulli
    return out


def _merge3_draws(base, models, seed):
    inputs = mm.MergeInputs(base, models)
    from merge3.methods._sparsify import uniforms  # the test replays merge3's own draws inside mergekit

    return lambda key, task: uniforms(inputs, key, seed)[task]


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_ties_per_model_densities_match_mergekit(gpt2_models, density):
    base, models = gpt2_models
    densities = [density, 0.3, 1.0]
    ours = mm.ties(base, models, density=0.5, densities=densities, weights=[1.0, 0.7, 0.4], scale=0.9)
    theirs = _mergekit("ties", base, models, weight=[1.0, 0.7, 0.4], density=densities, **{"lambda": 0.9})
    _close(ours, theirs)
    shared = mm.ties(base, models, density=0.3, weights=[1.0, 0.7, 0.4])
    _close(mm.ties(base, models, densities=[0.3] * 3, weights=[1.0, 0.7, 0.4]), shared)


@pytest.mark.parametrize("combine,name", [("linear", "breadcrumbs"), ("ties", "breadcrumbs_ties")])
def test_breadcrumbs_matches_mergekit(gpt2_models, combine, name):
    base, models = gpt2_models
    weights, densities = [1.0, 0.6, 0.8], [0.7, 0.9, 0.5]
    ours = mm.breadcrumbs(base, models, density=0.7, densities=densities, gamma=0.05, weights=weights, scale=1.2,
                          combine=combine)
    theirs = _mergekit_per_key(name, base, models, weight=weights, density=densities, gamma=[0.05] * 3,
                               **{"lambda": 1.2})
    _close(ours, theirs)
    rescaled = mm.breadcrumbs(base, models, density=0.8, gamma=0.02, combine=combine, normalize=True, rescale=True)
    _close(rescaled, _mergekit_per_key(name, base, models, weight=[1.0] * 3, density=[0.8] * 3, gamma=[0.02] * 3,
                                       normalize=True, rescale=True), atol=2e-6)


@pytest.mark.parametrize("combine,name", [("ties", "della"), ("linear", "della_linear")])
def test_della_matches_mergekit_with_the_same_draws(gpt2_models, combine, name):
    """mergekit draws DELLA's masks with torch.bernoulli; given merge3's draws instead, the merges agree exactly,
    so the keep probabilities, the L1 rescale, the sign election and the normalisation are all mergekit's."""
    base, models = gpt2_models
    weights, densities = [1.0, 0.5, 0.8], [0.4, 0.6, 0.5]
    ours = mm.della(base, models, density=0.5, densities=densities, epsilon=0.1, weights=weights, scale=1.1,
                    combine=combine, seed=4)
    theirs = _mergekit_per_key(name, base, models, draws=_merge3_draws(base, models, 4), weight=weights,
                               density=densities, epsilon=[0.1] * 3, **{"lambda": 1.1})
    _close(ours, theirs, atol=2e-6)
    plain = mm.della(base, models, density=0.3, epsilon=0.2, combine=combine, normalize=False, rescale=False, seed=1)
    _close(plain, _mergekit_per_key(name, base, models, draws=_merge3_draws(base, models, 1), weight=[1.0] * 3,
                                    density=[0.3] * 3, epsilon=[0.2] * 3, normalize=False, rescale=False), atol=2e-6)


def test_della_keeps_large_entries_more_often_and_is_seeded():
    base = {"w": torch.zeros(50, 400)}
    tau = {"w": torch.randn(50, 400, generator=torch.Generator().manual_seed(0))}
    merged = mm.della(base, [tau], density=0.5, epsilon=0.3, rescale=False, seed=2)["w"]
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    order = tau["w"].abs().argsort(dim=1)
    smallest, largest = kept.gather(1, order[:, :40]).float().mean(), kept.gather(1, order[:, -40:]).float().mean()
    assert smallest < 0.25 < 0.75 < largest  # p ≈ 0.2 … 0.8 across the ranks
    assert torch.equal(merged, mm.della(base, [tau], density=0.5, epsilon=0.3, rescale=False, seed=2)["w"])
    assert not torch.equal(merged, mm.della(base, [tau], density=0.5, epsilon=0.3, rescale=False, seed=3)["w"])
    with pytest.raises(Merge3Error, match=r"della: density ± epsilon must lie inside \(0, 1\)"):
        mm.della(base, [tau], density=0.9, epsilon=0.2)


def test_dare_per_model_drop_rates_drop_each_model_at_its_own_rate():
    base = {"w": torch.zeros(100_000)}
    ones = [{"w": torch.ones(100_000)}, {"w": 2 * torch.ones(100_000)}]
    merged = mm.dare(base, ones, drop_rate=0.5, drop_rates=[0.2, 0.8], weights=[1.0, 0.0], seed=1)["w"]
    assert abs((merged == 0).float().mean().item() - 0.2) < 0.01 and merged.max().item() == pytest.approx(1 / 0.8)
    other = mm.dare(base, ones, drop_rate=0.5, drop_rates=[0.2, 0.8], weights=[0.0, 1.0], seed=1)["w"]
    assert abs((other == 0).float().mean().item() - 0.8) < 0.01 and other.max().item() == pytest.approx(2 / 0.2)
    same = mm.dare(base, ones, drop_rate=0.4, seed=1)["w"]
    assert torch.equal(same, mm.dare(base, ones, drop_rate=0.9, drop_rates=[0.4, 0.4], seed=1)["w"])


# --- the official algorithms, re-derived in numpy from reference.md -------------------------------------------------

def _official_ties(base, models, density):
    """TIES as the official code: global trim per task over the flattened model, elect, disjoint mean."""
    keys = [k for k in base if base[k].is_floating_point()]
    flat = np.stack([np.concatenate([(m[k] - base[k]).numpy().ravel() for k in keys]) for m in models])
    d = flat.shape[1]
    kth = d - int(d * density)
    thr = np.sort(np.abs(flat), axis=1)[:, kth - 1 : kth]
    trimmed = flat * (np.abs(flat) >= thr)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = 1.0 if np.sign(sign.sum()) > 0 else -1.0
    keep = np.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    merged = selected.sum(0) / np.clip((selected != 0).sum(0), 1, None)
    out, offset = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = base[k] + torch.from_numpy(merged[offset : offset + n].reshape(base[k].shape)).float()
        offset += n
    return out


def test_ties_model_trim_matches_official_code(gpt2_models):
    base, models = gpt2_models
    ours = mm.ties(base, models, density=0.3, trim="model")
    official = _official_ties(base, models, 0.3)
    for k, v in official.items():
        assert torch.allclose(ours[k], v, atol=1e-6), k


def test_ties_model_trim_keeps_one_more_than_int_d_k():
    base = {"a": torch.zeros(6), "b": torch.zeros(4)}
    ft = {"a": torch.tensor([1., 2, 3, 4, 5, 6]), "b": torch.tensor([-7., 8, -9, 10])}
    merged = mm.ties(base, [ft], density=0.25, trim="model")  # D = 10 → int(2.5) + 1 = 3 entries survive
    assert merged["a"].count_nonzero() + merged["b"].count_nonzero() == 3
    assert merged["b"].tolist() == [0.0, 8.0, -9.0, 10.0]


def test_ties_tie_break_follows_the_majority_sign():
    base = {"w": torch.zeros(4)}
    a = {"w": torch.tensor([1.0, -2.0, -3.0, -1.0])}
    b = {"w": torch.tensor([-1.0, -1.0, -1.0, -1.0])}  # entry 0 sums to exactly 0; the others elect −
    assert mm.ties(base, [a, b], density=1.0)["w"].tolist() == [-1.0, -1.5, -2.0, -1.0]


def _official_tsv(base, models):
    """TSV-M from reference.md with numpy SVDs: per 2-D key keep int(r/T) triplets per task, orthogonalise, rebuild."""
    out = {}
    t = len(models)
    for k, v in base.items():
        deltas = [(m[k] - v).double().numpy() for m in models]
        if v.dim() != 2:
            out[k] = v + torch.from_numpy(np.mean(deltas, axis=0)).float()
            continue
        r = min(v.shape)
        kk = int(r * (1 / t))
        u_cat, s_cat, v_cat = np.zeros((v.shape[0], r)), np.zeros(r), np.zeros((r, v.shape[1]))
        for i, d in enumerate(deltas):
            u, s, vh = np.linalg.svd(d, full_matrices=False)
            u_cat[:, i * kk : (i + 1) * kk], s_cat[i * kk : (i + 1) * kk], v_cat[i * kk : (i + 1) * kk] = u[:, :kk], s[:kk], vh[:kk]
        p, _, q = np.linalg.svd(u_cat, full_matrices=False)
        p2, _, q2 = np.linalg.svd(v_cat, full_matrices=False)
        out[k] = v + torch.from_numpy((p @ q) @ np.diag(s_cat) @ (p2 @ q2)).float()
    return out


def test_tsv_merge_matches_reference_algorithm():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(12, 9, generator=g), "b": torch.randn(9, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    ours = mm.tsv_merge(base, models, alpha=0.8)
    official = _official_tsv(base, models)
    for k in base:
        assert torch.allclose(ours[k], base[k] + 0.8 * (official[k] - base[k]), atol=1e-5), k


# --- invariants -----------------------------------------------------------------------------------------------------

def test_ties_with_density_one_and_one_model_is_task_arithmetic(gpt2_models):
    base, models = gpt2_models
    _close(mm.ties(base, models[:1], density=1.0, scale=0.6), mm.task_arithmetic(base, models[:1], scale=0.6), 1e-7)


def test_dare_with_no_drops_is_task_arithmetic(gpt2_models):
    base, models = gpt2_models
    _close(mm.dare(base, models, drop_rate=0.0, seed=3, scale=0.9, weights=[0.2, 0.5, 1.0]),
           mm.task_arithmetic(base, models, scale=0.9, weights=[0.2, 0.5, 1.0]), 1e-7)


def test_dare_masks_are_seeded_and_reproducible():
    base = {"w": torch.zeros(50_000), "v": torch.zeros(10)}
    ft = {"w": torch.ones(50_000), "v": torch.ones(10)}
    first = mm.dare(base, [ft], drop_rate=0.6, seed=11)["w"]
    assert torch.equal(first, mm.dare(base, [ft], drop_rate=0.6, seed=11)["w"])
    assert not torch.equal(first, mm.dare(base, [ft], drop_rate=0.6, seed=12)["w"])
    assert abs((first == 0).float().mean().item() - 0.6) < 0.01
    assert torch.allclose(first.unique(), torch.tensor([0.0, 2.5]))
    # a key's mask does not depend on the other keys merged with it
    alone = mm.dare({"w": base["w"]}, [{"w": ft["w"]}], drop_rate=0.6, seed=11)["w"]
    assert torch.equal(first, alone)


def test_tsv_with_one_task_at_full_rank_is_task_arithmetic(gpt2_models):
    base, models = gpt2_models
    _close(mm.tsv_merge(base, models[:1], alpha=0.5), mm.task_arithmetic(base, models[:1], scale=0.5), 1e-5)


def _orthogonal_tasks(m=10, n=8, rank=2, tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank * tasks, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, rank * tasks, generator=g)).Q
    deltas = [u[:, t * rank : (t + 1) * rank] @ torch.diag(torch.rand(rank, generator=g) + 1) @ v[:, t * rank : (t + 1) * rank].T
              for t in range(tasks)]
    return {"w": torch.zeros(m, n)}, [{"w": d} for d in deltas]


def test_tsv_on_orthogonal_low_rank_tasks_is_the_plain_sum():
    base, models = _orthogonal_tasks()
    merged = mm.tsv_merge(base, models)["w"]
    assert torch.allclose(merged, sum(m["w"] for m in models), atol=1e-5)
    stacked = torch.stack([m["w"] for m in models])
    assert mm.singular_task_interference(stacked) < 1e-4
    assert mm.singular_task_interference(torch.randn(3, 10, 8)) > 1.0


def test_tsv_factors_are_orthonormal():
    deltas = torch.randn(4, 16, 12, generator=torch.Generator().manual_seed(1))
    f = tsv_factors(deltas)
    r = f.u_perp.shape[1]
    assert torch.allclose(f.u_perp.T @ f.u_perp, torch.eye(r), atol=1e-5)
    assert torch.allclose(f.vh_perp @ f.vh_perp.T, torch.eye(r), atol=1e-5)
    assert (f.owner == -1).sum() == 0 and torch.equal(f.owner, torch.arange(4).repeat_interleave(3))


def test_tsv_skips_text_projection_and_averages_non_matrices():
    g = torch.Generator().manual_seed(2)
    base = {"text_projection": torch.zeros(4, 4), "bias": torch.zeros(4)}
    models = [{k: torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    merged = mm.tsv_merge(base, models)
    for k in base:
        assert torch.allclose(merged[k], (models[0][k] + models[1][k]) / 2)


def test_tsv_compress_truncates_each_task_matrix():
    base, models = _orthogonal_tasks(rank=3, tasks=2)  # r = 8, T = 2 → rank 4 ≥ 3: lossless
    for out, m in zip(mm.tsv_compress_models(base, models), models):
        assert torch.allclose(out["w"], m["w"], atol=1e-5)
    low = mm.tsv_compress_models(base, models, rank_fraction=0.125)[0]["w"]  # rank 1
    assert torch.linalg.matrix_rank(low) == 1
    with pytest.raises(Merge3Error, match="rank_fraction"):
        mm.tsv_compress_models(base, models, rank_fraction=1.5)


def test_tsv_compress_method_is_task_arithmetic_on_the_compressed_task_vectors(gpt2_models):
    base, models = gpt2_models
    compressed = mm.tsv_compress_models(base, models, rank_fraction=0.25)
    for t in range(3):  # one-hot weights: that task's compressed model
        one_hot = [1.0 if i == t else 0.0 for i in range(3)]
        _close(mm.tsv_compress(base, models, rank_fraction=0.25, weights=one_hot), compressed[t], atol=1e-5)
    merged = mm.tsv_compress(base, models, rank_fraction=0.25, weights=[0.5, 1.0, 0.2], scale=0.8)
    for key, value in merged.items():
        if value.is_floating_point():
            expected = base[key] + 0.8 * sum(w * (c[key] - base[key]) for w, c in zip([0.5, 1.0, 0.2], compressed))
            assert torch.allclose(value, expected, atol=1e-5), key
    assert mm.get_method("tsv_compress").params["rank_fraction"].bounds.search == (0.02, 0.5)
    with pytest.raises(Merge3Error, match="rank_fraction"):
        mm.tsv_compress(base, models, rank_fraction=1.5)


def test_analogy_and_negation():
    z = {"w": torch.zeros(2)}
    a, b, c = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([0.0, 5.0])}
    assert mm.analogy(z, [a, b, c])["w"].tolist() == [1.0, 6.0]
    assert mm.analogy(z, [b, c, a], roles=["b", "c", "a"], scale=0.5)["w"].tolist() == [0.5, 3.0]
    assert mm.task_arithmetic(z, [a], weights=[-1.0])["w"].tolist() == [-1.0, 0.0]
    with pytest.raises(Merge3Error, match=r"analogy: roles must name a, b and c once each, got \['a', 'a', 'c'\]"):
        mm.analogy(z, [a, b, c], roles=["a", "a", "c"])
    with pytest.raises(Merge3Error, match="analogy: needs exactly three models"):
        mm.analogy(z, [a, b])
    per_layer = mm.merge_groups({"l.0.w": z["w"], "l.1.w": z["w"]},
                                [{"l.0.w": m["w"], "l.1.w": m["w"]} for m in (a, b, c)],
                                [GroupPlan("l0", ["l.0.*"], "analogy", {"scale": 1.0}),
                                 GroupPlan("l1", ["l.1.*"], "analogy", {"scale": 2.0})])
    assert per_layer["l.0.w"].tolist() == [1.0, 6.0] and per_layer["l.1.w"].tolist() == [2.0, 12.0]


def test_merges_compute_in_float32_and_keep_the_base_dtype():
    base = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    ft = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)}
    for merged in (mm.task_arithmetic(base, [ft], scale=0.5), mm.ties(base, [ft], density=1.0),
                   mm.tsv_merge(base, [ft]), mm.dare(base, [ft], drop_rate=0.0)):
        assert merged["w"].dtype == torch.bfloat16
    assert mm.task_arithmetic(base, [ft], scale=0.5)["w"].tolist() == [0.5, 1.0, 1.5]


# --- per-layer values and groups ------------------------------------------------------------------------------------

def _layered(n_layers=3):
    base = {f"layers.{i}.{part}.weight": torch.zeros(2) for i in range(n_layers) for part in ("attn", "mlp")}
    return base, [{k: torch.ones(2) for k in base}]


def test_per_layer_gradient_is_interpolated_over_depth():
    base, models = _layered()
    merged = mm.task_arithmetic(base, models, scale=[0.0, 1.0])
    assert [merged[f"layers.{i}.mlp.weight"][0].item() for i in range(3)] == [0.0, 0.5, 1.0]
    weighted = mm.ties(base, models, density=1.0, weights=[[0.0, 2.0]])
    assert weighted["layers.1.attn.weight"][0].item() == pytest.approx(1.0)  # disjoint mean divides by the weight


def test_per_layer_pattern_mapping_first_match_wins():
    base, models = _layered()
    merged = mm.task_arithmetic(base, models, scale={"attn": 0.25, "layers.2.*": 2.0, "*": 1.0})
    assert merged["layers.2.attn.weight"][0].item() == 0.25
    assert merged["layers.2.mlp.weight"][0].item() == 2.0
    assert merged["layers.0.mlp.weight"][0].item() == 1.0


def test_merge_groups_uses_each_groups_method(gpt2_models):
    base, models = gpt2_models
    groups = mm.layer_groups(base, "layer")
    assert list(groups) == ["input", "transformer.h.0", "transformer.h.1", "transformer.h.2", "output"]
    assert "step_counter" not in groups["output"]
    plans = [GroupPlan("transformer.h.0", groups["transformer.h.0"], "ties", {"density": 0.3}),
             GroupPlan("rest", ["*"], "task_arithmetic", {"scale": 0.5})]
    merged = mm.merge_groups(base, models, plans)
    ties, ta = mm.ties(base, models, density=0.3), mm.task_arithmetic(base, models, scale=0.5)
    for k in base:
        expected = ties[k] if k in groups["transformer.h.0"] else ta[k]
        assert torch.equal(merged[k], expected), k


def test_per_layer_values_use_the_depth_in_the_whole_model():
    base, models = _layered()
    plans = [GroupPlan("late", ["layers.2.*"], "task_arithmetic", {"scale": [0.0, 1.0]}),
             GroupPlan("rest", ["*"], "task_arithmetic", {"scale": 0.0})]
    assert mm.merge_groups(base, models, plans)["layers.2.mlp.weight"][0].item() == 1.0


def test_layer_groups_granularities():
    keys = ["embed.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.q_proj.weight",
            "model.layers.10.mlp.up_proj.weight", "norm.weight", "lm_head.weight"]
    assert list(mm.layer_groups(keys, "model")) == ["model"]
    assert list(mm.layer_groups(keys, "layer")) == ["input", "model.layers.0", "model.layers.1", "model.layers.10",
                                                    "output"]
    assert list(mm.layer_groups(keys, "block", block_size=2)) == ["input", "model.layers.0-1", "model.layers.10",
                                                                  "output"]
    split = mm.layer_groups(keys, "attn_mlp")
    assert split["model.layers.0.attn"] == ["model.layers.0.self_attn.q_proj.weight"]
    assert split["model.layers.0.other"] == ["model.layers.0.input_layernorm.weight"]
    assert split["output"] == ["norm.weight", "lm_head.weight"]


def test_plans_from_genome_choices():
    from merge3.search import Genome

    base, models = _layered(2)
    groups = mm.layer_groups(base)
    genome = Genome(list(groups), ["ties", "task_arithmetic"], n_models=1)
    plans = mm.plans_from_choices(groups, genome.decode(genome.midpoint()))
    assert [p.method for p in plans] == ["ties", "ties"]
    assert mm.merge_groups(base, models, plans)["layers.1.mlp.weight"].shape == (2,)


# --- the candidate builder ------------------------------------------------------------------------------------------

def _builder_plans(groups):
    names = list(groups)
    return [
        [GroupPlan(names[1], groups[names[1]], "ties", {"density": [0.2, 0.6], "weights": [1.0, 0.4, 0.7]}),
         GroupPlan(names[2], groups[names[2]], "dare", {"drop_rate": 0.5, "seed": 4, "weights": [0.5, 1.0, 0.2]}),
         GroupPlan("rest", ["*"], "tsv_merge", {"alpha": 0.9, "weights": [1.0, 0.5, 0.8]})],
        [GroupPlan(names[1], groups[names[1]], "dare", {"drop_rate": 0.3, "combine": "ties", "density": 0.5}),
         GroupPlan(names[2], groups[names[2]], "ties", {"density": 0.4, "trim": "model"}),
         GroupPlan("rest", ["*"], "task_arithmetic", {"scale": {"ln": 0.1, "*": 0.8}, "weights": [1.0, -0.5, 0.5]})],
        [GroupPlan("all", ["*"], "linear", {"weights": [0.2, 0.3, 0.5]})],
        [GroupPlan("all", ["*"], "ties", {"density": 0.35, "trim": "model", "normalize": False})],
        [GroupPlan(names[1], groups[names[1]], "della", {"density": 0.5, "epsilon": 0.1, "densities": [0.3, 0.5, 0.7],
                                                          "weights": [1.0, 0.6, 0.9], "seed": 2}),
         GroupPlan(names[2], groups[names[2]], "della", {"density": 0.4, "combine": "linear", "rescale": False}),
         GroupPlan("rest", ["*"], "breadcrumbs", {"density": 0.8, "gamma": 0.05, "densities": [0.9, 0.7, 0.8],
                                                  "combine": "ties", "rescale": True})],
        [GroupPlan("all", ["*"], "ties", {"densities": [0.2, 0.9, 0.5], "trim": "model"})],
        [GroupPlan(names[1], groups[names[1]], "tsv_compress", {"rank_fraction": [0.1, 0.6], "weights": [1.0, 0.3, 0.8]}),
         GroupPlan("rest", ["*"], "tsv_compress", {"scale": 0.7})],
        [GroupPlan(names[1], groups[names[1]], "ties", {"density": 0.5, "densities": [0.2, 1.0, 0.0]}),
         GroupPlan("rest", ["*"], "dare", {"drop_rate": 0.5, "drop_rates": [0.1, 0.6, 0.0], "combine": "ties"})],
    ]


def test_builder_equals_pure_functions_for_every_method(gpt2_models):
    base, models = gpt2_models
    groups = mm.layer_groups(base, "layer")
    builder = mm.CandidateBuilder(base, models)
    out = builder.allocate()
    for plans in _builder_plans(groups) * 2:  # twice: cached values must not be altered by a build
        built = builder.build(plans, out)
        assert built is out
        _close(dict(built), mm.merge_groups(base, models, plans), atol=2e-6)


def test_builder_writes_into_module_parameters(gpt2_models, tiny_gpt2):
    from transformers import GPT2LMHeadModel

    base, models = gpt2_models
    module = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    floats = {k: v for k, v in base.items() if k != "step_counter"}
    builder = mm.CandidateBuilder(floats, [{k: m[k] for k in floats} for m in models])
    plans = [GroupPlan("all", ["*"], "ties", {"density": 0.5})]
    builder.build(plans, module.state_dict())
    expected = mm.ties(floats, [{k: m[k] for k in floats} for m in models], density=0.5)
    assert torch.equal(module.transformer.h[1].mlp.c_fc.weight.detach(), expected["transformer.h.1.mlp.c_fc.weight"])


def test_builder_precompute_and_cache_accounting(gpt2_models):
    base, models = gpt2_models
    builder = mm.CandidateBuilder(base, models).precompute(["ties", "dare", "tsv_merge"], seeds=[0])
    sizes = builder.cache_bytes()
    assert {"deltas", "sorted", "uniforms", "tsv_components"} <= set(sizes)
    floats = sum(v.numel() * 4 for v in base.values() if v.is_floating_point())
    assert sizes["deltas"] == 3 * floats
    builder.forget("uniforms")
    assert "uniforms" not in builder.cache_bytes()


# --- bad input ------------------------------------------------------------------------------------------------------

def test_bad_input_gives_one_clear_error():
    base = {"w": torch.zeros(2, 3)}
    good, wrong = {"w": torch.ones(2, 3)}, {"w": torch.ones(3, 2)}
    cases = [
        (lambda: mm.ties(base, [good, wrong], density=0.5), r"model 1 has shapes that differ.*'w' 3×2 vs 2×3"),
        (lambda: mm.ties(base, [{"v": torch.ones(2)}], density=0.5), r"model 0 does not match base: missing 'w'"),
        (lambda: mm.ties(base, [good], density=1.5), r"ties: parameter 'density' = 1.5 is out of range \[0.0, 1.0\]"),
        (lambda: mm.ties(base, [good], density=[0.2, -0.1]), r"'density' = -0.1 is out of range"),
        (lambda: mm.dare(base, [good], drop_rate=1.0), r"dare: parameter 'drop_rate' = 1.0 is out of range"),
        (lambda: mm.dare(base, [good], drop_rate=0.1, combine="max"), r"'combine' = 'max' is not one of"),
        (lambda: mm.task_arithmetic(base, [good], weights=[1.0, 2.0]), r"'weights' has 2 values for 1 models"),
        (lambda: mm.ties(base, [good], density=0.5, bogus=1), r"unexpected keyword|unknown parameter"),
        (lambda: mm.get_method("slerp9"), r"unknown merge method 'slerp9'"),
        (lambda: mm.merge_groups(base, [good], [GroupPlan("g", ["*"], "nope")]), r"unknown merge method 'nope'"),
        (lambda: mm.merge_groups(None, [good], [GroupPlan("g", ["*"], "ties", {"density": 0.5})]),
         r"group 'g': ties needs a base model"),
        (lambda: mm.merge_groups(base, [good], [GroupPlan("g", ["x"], "linear")]), r"tensor 'w' is in no group"),
        (lambda: mm.ties(*_layered(), density=[0.1, 0.9], trim="model"), r"trim='model' needs one density"),
        (lambda: mm.task_arithmetic(base, []), r"need at least one model"),
        (lambda: mm.layer_groups(["a"], "row"), r"unknown granularity 'row'"),
    ]
    for i, (call, message) in enumerate(cases):
        with pytest.raises((Merge3Error, TypeError), match=message):
            call()
            pytest.fail(f"case {i} did not raise")


# --- row-block weights ----------------------------------------------------------------------------------------------

_ROW_BLOCK_METHODS = [
    ("task_arithmetic", {"scale": 0.8}),
    ("task_arithmetic", {"normalize": True}),
    ("ties", {"density": 0.4}),
    ("ties", {"density": 0.4, "normalize": False}),
    ("dare", {"drop_rate": 0.5, "seed": 3}),
    ("dare", {"drop_rate": 0.3, "combine": "ties", "density": 0.6}),
    ("tsv_merge", {"alpha": 1.2}),
    ("tsv_compress", {"rank_fraction": 0.5}),
    ("dare", {"drop_rate": 0.3, "combine": "ties"}),
    ("linear", {}),
    ("della", {"density": 0.5, "epsilon": 0.1, "seed": 2}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05, "combine": "ties"}),
]


@pytest.mark.parametrize("method,params", _ROW_BLOCK_METHODS)
def test_row_block_weights_equal_scalar_weights_block_by_block(gpt2_models, method, params):
    """Block j of every tensor's rows must be exactly what the same method gives with block j's weights as scalars."""
    base, models = gpt2_models
    blocks = [[0.2, 1.0, 0.6], [1.1, 0.0, 0.5], [0.4, 0.7, 1.3]]  # per model, per block
    weights = [{"row_blocks": b} for b in blocks]
    builder = mm.CandidateBuilder(base, models)
    by_rows = mm.merge_groups(base, models, [GroupPlan("all", ["*"], method, {**params, "weights": weights})])
    _close(dict(builder.build([GroupPlan("all", ["*"], method, {**params, "weights": weights})])), by_rows, atol=2e-6)
    for j in range(3):
        scalar = mm.merge_groups(base, models, [GroupPlan("all", ["*"], method,
                                                          {**params, "weights": [b[j] for b in blocks]})])
        for key, value in by_rows.items():
            if not value.is_floating_point() or value.dim() == 0:
                continue
            rows = torch.tensor_split(torch.arange(value.shape[0]), 3)[j]
            assert torch.allclose(value[rows], scalar[key][rows], atol=2e-6), (method, key, j)


def test_row_block_sizes_and_scalars():
    from merge3.methods._params import block_sizes, row_weights

    assert block_sizes(10, 3) == [4, 3, 3] and block_sizes(2, 4) == [1, 1, 0, 0]
    assert row_weights({"row_blocks": [1.0, 3.0]}, (), "cpu") == 2.0
    with pytest.raises(Merge3Error, match="per row block"):
        mm.merge_groups(None, [{"w": torch.ones(2)}] * 2,
                        [GroupPlan("all", ["*"], "c2m3", {"weights": [{"row_blocks": [1.0]}] * 2})])


def test_tsv_is_unique_when_task_blocks_are_dependent():
    """Rows no task updated (dead units) make the concatenated singular vectors dependent; the orthogonalisation
    must then not depend on which null-space basis LAPACK returns: float32 and float64 give the same merge."""
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(4, 64, 64, generator=g, dtype=torch.float64)
    deltas[:, :12] = 0.0  # 12 dead rows: 4 tasks × 16 kept triplets = 64 columns in a 52-dimensional span
    merged = [tsv_factors(deltas.to(dtype)).weighted(torch.ones(4, dtype=dtype)).double()
              for dtype in (torch.float64, torch.float32)]
    assert torch.allclose(merged[0], merged[1], atol=1e-4)
    assert merged[0][:12].abs().max() < 1e-6  # nothing leaks into the rows no task touched


def _reference_ties(inputs, key, weights, thresholds=None, draws=None, drops=(), rescales=(), normalize=True):
    """TIES / DARE-ties one pass per step, over whole tensors: what the fused sweep must equal bit for bit."""
    from merge3.methods._sparsify import elect_and_merge, trim_into
    deltas = inputs.deltas(key).clone()
    if draws is not None:
        deltas = torch.ge(draws, torch.tensor(drops).reshape(-1, *[1] * (deltas.dim() - 1))).float().mul_(deltas)
        for t, r in enumerate(rescales):
            deltas[t].mul_(r)
    work = trim_into(torch.empty_like(deltas), deltas, thresholds, weights)
    out = torch.empty(deltas.shape[1:])
    elect_and_merge(inputs, work, weights, normalize, out)
    return out.mul_(0.7).add_(inputs.anchor32(key))


@pytest.mark.parametrize("sweep", ["torch", "numba"])
@pytest.mark.parametrize("majority", [1.0, -1.0])
@pytest.mark.parametrize("case", ["plain", "trim", "drop", "row blocks", "sum", "floats"])
def test_fused_ties_sweep_is_bit_identical_to_the_step_by_step_merge(monkeypatch, sweep, majority, case):
    """Both fused sweeps: torch's in chunks of 7 entries (so every tensor spans many) and numba's compiled loop over
    rows; small integers (so sums cancel exactly and tie-break by the tensor's majority sign, which the sweep only
    knows at its end)."""
    from merge3.methods import _fused_cpu, _sparsify
    from merge3.methods._inputs import MergeInputs
    from merge3.methods._params import row_weights
    if sweep == "numba" and not _fused_cpu.available():
        pytest.skip("numba is not installed (the torch sweep runs instead)")
    monkeypatch.setenv(_fused_cpu.ENV_DISABLE, "1" if sweep == "torch" else "0")
    monkeypatch.setattr(_sparsify, "CHUNK_ELEMENTS", 7)
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.zeros(9, 5), "b": torch.zeros(13), "s": torch.zeros(()), "c": torch.zeros(4, 3, 2)}
    models = [{k: torch.randint(-2, 3, v.shape, generator=g).float() for k, v in base.items()} for _ in range(3)]
    if case == "floats":  # rounding: the same operations in the same order
        models = [{k: torch.randn(v.shape, generator=g) / 3 for k, v in base.items()} for _ in range(3)]
    models[0]["w"] += majority * 3  # the majority of elected signs
    models[0]["b"] += majority * 3
    for key in base:
        inputs = MergeInputs(base, models)
        shape = tuple(base[key].shape)
        weights = [0.3, 0.7, 1.1] if case == "floats" else [1.0, 1.0, 2.0] if case != "row blocks" or not shape else [
            row_weights({"row_blocks": [1.0, 2.0, 0.5]}, shape, "cpu"), 1.0, 0.5]
        kwargs = {}
        if case == "trim":
            kwargs["thresholds"] = torch.tensor([2.0, 0.0, 1.0])
        if case in ("drop", "floats"):
            kwargs.update(draws=torch.rand((3, *shape), generator=g), drop_rates=[0.3, 0.5, 0.0], rescales=[1 / 0.7, 2.0, 1.0])
        normalize = case != "sum"
        expected = _reference_ties(inputs, key, weights, kwargs.get("thresholds"), kwargs.get("draws"),
                                   kwargs.get("drop_rates", ()), kwargs.get("rescales", ()), normalize)
        out = torch.full(shape, float("nan"))
        _sparsify.ties_merge_into(inputs, key, out, weights, normalize=normalize, scale=0.7, **kwargs)
        assert torch.equal(out, expected), (key, case)


def test_ties_without_numba_runs_the_torch_sweep(monkeypatch):
    """numba missing (the import failed once): nothing is compiled, TIES and DARE-ties give the same merge."""
    from merge3.methods import _fused_cpu
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    merges = lambda: (mm.ties(base, models, density=0.6), mm.dare(base, models, drop_rate=0.5, combine="ties", seed=2))
    expected = merges()
    monkeypatch.setattr(_fused_cpu, "_kernel", False)
    assert not _fused_cpu.available()
    for got, want in zip(merges(), expected):
        assert all(torch.equal(got[k], want[k]) for k in base)


@pytest.mark.parametrize("sweep", ["torch", "numba"])
def test_chunked_tie_vote_counts_the_same_signs_as_the_whole_tensor(monkeypatch, sweep):
    from merge3.methods import _fused_cpu, _sparsify
    from merge3.methods._inputs import MergeInputs
    from merge3.methods._params import row_weights
    if sweep == "numba" and not _fused_cpu.available():
        pytest.skip("numba is not installed (the torch sweep runs instead)")
    monkeypatch.setenv(_fused_cpu.ENV_DISABLE, "1" if sweep == "torch" else "0")
    monkeypatch.setattr(_sparsify, "CHUNK_ELEMENTS", 5)
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.zeros(11, 3), "s": torch.zeros(())}
    models = [{k: torch.randint(-2, 3, v.shape, generator=g).float() for k, v in base.items()} for _ in range(3)]
    for key, weights in (("w", [row_weights({"row_blocks": [1.0, 0.5]}, (11, 3), "cpu"), 1.0, 2.0]),
                         ("w", [1.0, 1.0, 1.0]), ("s", [0.5, 1.0, 1.0])):
        inputs, thresholds = MergeInputs(base, models), torch.tensor([2.0, 0.0, 1.0])
        deltas = inputs.deltas(key)
        trimmed = [w * d * (d.abs() >= thr) if thr > 0 else w * d for w, d, thr in zip(weights, deltas, thresholds)]
        expected = float(torch.sign(sum(trimmed)).sum())
        assert _sparsify.elected_sign_sum(inputs, key, weights, thresholds) == expected
