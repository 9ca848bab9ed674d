"""Merges in delta-W space, each against a dense reference computed here by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from llgbm_compose import ComposeError, merges
from llgbm_compose.merges import dare_dense, ties_dense
from llgbm_flora import LoraAdapter, LoraSpec, functional_forward, load_adapter
from llgbm_flora.testing import random_adapter, tiny_llama, tiny_spec

SHAPES = (("q_proj", 10, 10), ("down_proj", 14, 10))


def spec(**kw) -> LoraSpec:
    fields = {
        "base_model": "tiny",
        "target_modules": ("q_proj", "down_proj"),
        "layers": (0, 1),
        "rank": 3,
        "alpha": 6.0,
        "shapes": SHAPES,
    }
    return LoraSpec(**{**fields, **kw})


KEYS = spec().keys()  # LoraSpec.keys(): (layer, module) pairs


def dense(a: LoraAdapter, key) -> torch.Tensor:
    return a.spec.scale * (a.B[key].double() @ a.A[key].double())


def best_rank(d: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(d)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.fixture
def pair() -> list[LoraAdapter]:
    return [random_adapter(spec(), seed=i, scale=0.4).to(dtype=torch.float64) for i in (1, 2)]


def test_average_is_the_mean_of_delta_w_then_the_best_rank_r(pair):
    exact = merges.average(pair, rank="exact")
    m = merges.average(pair)  # default: the inputs' rank, 3
    assert m.rank == 3 and exact.error == pytest.approx(0.0, abs=1e-10)
    sq = 0.0
    for k in KEYS:
        mean = (dense(pair[0], k) + dense(pair[1], k)) / 2
        torch.testing.assert_close(dense(exact.adapter, k), mean)
        torch.testing.assert_close(dense(m.adapter, k), best_rank(mean, 3))
        sq += float(torch.linalg.svdvals(mean)[3:].pow(2).sum())
    # The reported error is the root sum of squares of the dropped singular values.
    assert m.error == pytest.approx(sq**0.5, rel=1e-9)


def test_task_arithmetic_adds_subtracts_and_scales(pair):
    third = random_adapter(spec(rank=2, alpha=1.0), seed=3, scale=0.4).to(dtype=torch.float64)
    m = merges.task_arithmetic([*pair, third], [1.0, -1.0, 0.5], rank="exact")
    for k in KEYS:
        ref = dense(pair[0], k) - dense(pair[1], k) + 0.5 * dense(third, k)
        torch.testing.assert_close(dense(m.adapter, k), ref)
    scaled = merges.task_arithmetic([pair[0]], [-2.0], rank="exact")
    torch.testing.assert_close(dense(scaled.adapter, KEYS[0]), -2 * dense(pair[0], KEYS[0]))


def test_ties_on_a_crafted_case():
    t = torch.tensor(
        [[3.0, -1.0, 0.5, 2.0], [-2.0, -2.0, 1.0, 0.1], [1.0, -3.0, -4.0, 0.2]],
        dtype=torch.float64,
    )
    # density 0.5 keeps 2 of 4 per vector: [3,0,0,2], [-2,-2,0,0], [0,-3,-4,0].
    # Sum [1,-5,-4,2] elects signs [+,-,-,+]; the disjoint mean averages only agreeing entries.
    torch.testing.assert_close(
        ties_dense(t, 0.5), torch.tensor([3.0, -2.5, -4.0, 2.0], dtype=torch.float64)
    )
    # A sign that loses the election is dropped, even where its vector was the only one kept.
    u = torch.tensor([[5.0, 1.0], [-1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(ties_dense(u, 1.0, lam=2.0), torch.tensor([10.0, -2.0]).double())


def _ties_reference(stack: np.ndarray, density: float) -> np.ndarray:
    """TIES written out with numpy, entry by entry."""
    n = stack.shape[0]
    flat = stack.reshape(n, -1)
    keep = int(np.ceil(density * flat.shape[1]))
    trimmed = np.zeros_like(flat)
    for i in range(n):
        top = np.argsort(-np.abs(flat[i]), kind="stable")[:keep]
        trimmed[i, top] = flat[i, top]
    out = np.zeros(flat.shape[1])
    for j in range(flat.shape[1]):
        sign = np.sign(trimmed[:, j].sum())
        agree = [v for v in trimmed[:, j] if v != 0 and np.sign(v) == sign]
        out[j] = np.mean(agree) if agree else 0.0
    return out.reshape(stack.shape[1:])


def test_ties_merge_matches_the_numpy_reference(pair):
    third = random_adapter(spec(), seed=9, scale=0.4).to(dtype=torch.float64)
    m = merges.ties([*pair, third], density=0.3, rank="exact")
    for k in KEYS:
        stack = np.stack([dense(a, k).numpy() for a in (*pair, third)])
        np.testing.assert_allclose(
            dense(m.adapter, k).numpy(), _ties_reference(stack, 0.3), atol=1e-10
        )


def test_dare_is_seeded_rescaled_and_unbiased(pair):
    a = pair[0]
    x = dense(a, KEYS[0])
    one = dense(merges.dare([a], drop=0.5, seed=0, rank="exact").adapter, KEYS[0])
    # Each entry is dropped or kept at 1 / (1 - p) times its value.
    kept = (one - 2 * x).abs() < 1e-9
    assert torch.all(kept | (one.abs() < 1e-9))
    assert 0.35 < kept.double().mean() < 0.65
    again = dense(merges.dare([a], drop=0.5, seed=0, rank="exact").adapter, KEYS[0])
    other = dense(merges.dare([a], drop=0.5, seed=1, rank="exact").adapter, KEYS[0])
    torch.testing.assert_close(one, again)
    assert not torch.allclose(one, other)
    # Expectation: the mean over seeds approaches the input (relative error ~ 1/sqrt(seeds)).
    seeds = 300
    mean = (
        sum(
            dense(merges.dare([a], drop=0.5, seed=s, rank="exact").adapter, KEYS[0])
            for s in range(seeds)
        )
        / seeds
    )
    single_err = float((one - x).norm() / x.norm())
    mean_err = float((mean - x).norm() / x.norm())
    assert single_err > 0.7  # one draw is far from the input ...
    assert mean_err < 0.12  # ... the average of many is close (expected ~ 1/sqrt(300) = 0.06)


def test_dare_matches_a_dense_reference(pair):
    """DARE written out: per key, per adapter (in that order) a uniform draw from the seeded
    generator, entries below the drop rate zeroed, survivors / (1 - p), weighted sum."""
    drop, seed, w = 0.4, 7, [0.7, 0.3]
    m = merges.dare(pair, drop=drop, seed=seed, weights=w, rank="exact")
    g = torch.Generator().manual_seed(seed)
    for k in KEYS:
        ref = 0
        for a, wi in zip(pair, w):
            x = dense(a, k)
            keep = torch.rand(x.shape, generator=g, dtype=torch.float64) >= drop
            ref = ref + wi * torch.where(keep, x / (1 - drop), torch.zeros_like(x))
        torch.testing.assert_close(dense(m.adapter, k), ref)


def test_dare_masks_are_independent_per_adapter(pair):
    a = pair[0]
    m = merges.dare([a, a], drop=0.5, seed=0, weights=[0.5, 0.5], rank="exact")
    x, y = dense(a, KEYS[0]), dense(m.adapter, KEYS[0])
    half = ((y - x).abs() < 1e-9) & (x.abs() > 1e-12)  # kept by exactly one of the two masks
    assert half.any()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(dare_dense(x, 0.0, g), x)


def test_rank_cut_error_is_the_dropped_singular_values(pair):
    for method, kw in (("ties", {"density": 0.5}), ("dare", {"drop": 0.3, "seed": 4})):
        exact = merges.merge(method, pair, rank="exact", **kw)
        cut = merges.merge(method, pair, rank=2, **kw)
        sq = sum(
            float(torch.linalg.svdvals(dense(exact.adapter, k))[2:].pow(2).sum()) for k in KEYS
        )
        assert cut.error == pytest.approx(sq**0.5, rel=1e-8)
        for k in KEYS:
            torch.testing.assert_close(dense(cut.adapter, k), best_rank(dense(exact.adapter, k), 2))


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (spec(base_model="another-base"), "different base models"),
        (spec(shapes=(("q_proj", 10, 10), ("down_proj", 14, 12))), "different module shapes"),
        (spec(layers=(0,)), "different layers"),
    ],
)
def test_bad_inputs_are_one_clear_line(pair, other, message):
    b = random_adapter(other, seed=5)
    for method in ("average", "ties", "dare"):
        with pytest.raises(ComposeError, match=message) as info:
            merges.merge(method, [pair[0].to(dtype=torch.float32), b])
        assert "\n" not in str(info.value)
    with pytest.raises(ComposeError, match="weights for 2 adapters"):
        merges.task_arithmetic(pair, [1.0])
    with pytest.raises(ComposeError, match="unknown merge method"):
        merges.merge("slerp", pair)
    with pytest.raises(ComposeError, match="density"):
        merges.ties(pair, density=0)
    with pytest.raises(ComposeError, match="no adapters"):
        merges.average([])


def test_saved_merge_is_a_peft_adapter(tmp_path):
    from peft import PeftModel

    model = tiny_llama(seed=0)
    s = tiny_spec(model, rank=4, target_modules=("q_proj", "v_proj"))
    m = merges.ties([random_adapter(s, seed=i) for i in range(3)], density=0.4)
    out = m.save(tmp_path / "merged")
    assert json.loads((out / "merge.json").read_text())["method"] == "ties"
    back = load_adapter(out)
    for k in s.keys():  # noqa: SIM118 (LoraSpec.keys)
        torch.testing.assert_close(back.A[k], m.adapter.A[k])
    peft_model = PeftModel.from_pretrained(tiny_llama(seed=0), str(out))
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_out = peft_model(input_ids=ids).logits
        functional = functional_forward(model, m.adapter, input_ids=ids).logits
        base_out = model(input_ids=ids).logits
    torch.testing.assert_close(merged_out, functional, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged_out, base_out)  # the merge changes what the model computes


def test_delta_w_gram_of_mixed_ranks_matches_dense():
    from llgbm_compose.clustering import delta_w_gram

    adapters = [
        random_adapter(spec(), seed=1),
        random_adapter(spec(rank=2, alpha=5.0), seed=2),
        random_adapter(spec(), seed=3),
    ]
    flat = np.stack(
        [np.concatenate([dense(a, k).flatten().numpy() for k in KEYS]) for a in adapters]
    )
    np.testing.assert_allclose(delta_w_gram(adapters), flat @ flat.T, rtol=1e-5)
    same = [adapters[0], adapters[2]]
    np.testing.assert_allclose(delta_w_gram(same), flat[[0, 2]] @ flat[[0, 2]].T, rtol=1e-5)
