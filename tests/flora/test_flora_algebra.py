"""Adapter algebra in delta-W space, each operation against a dense float64 reference."""

from __future__ import annotations

import pytest
import torch
from llgbm_flora import LoraAdapter, LoraBatch, LoraError, LoraSpec, algebra
from llgbm_flora.testing import random_adapter, random_batch

SHAPES = (("q_proj", 12, 12), ("v_proj", 12, 6), ("down_proj", 20, 12))


def spec(rank: int = 3, alpha: float = 6.0, **kw) -> LoraSpec:
    fields = {
        "base_model": "tiny",
        "target_modules": ("q_proj", "v_proj", "down_proj"),
        "layers": (0, 1),
        "rank": rank,
        "alpha": alpha,
        "shapes": SHAPES,
    }
    return LoraSpec(**{**fields, **kw})


KEYS = spec().keys()  # LoraSpec.keys(): the (layer, module) pairs, layer-major


def dense(x, key) -> torch.Tensor:
    """s * B @ A in float64, written out here (not through the code under test)."""
    return x.spec.scale * (x.B[key].double() @ x.A[key].double())


def f64(a: LoraAdapter) -> LoraAdapter:
    return a.to(dtype=torch.float64)


@pytest.fixture
def three() -> list[LoraAdapter]:
    """Adapters of different ranks and scales (rsLoRA too): sums must not care."""
    return [
        f64(random_adapter(spec(), seed=1, scale=0.3)),
        f64(random_adapter(spec(rank=2, alpha=1.0), seed=2, scale=0.3)),
        f64(random_adapter(spec(rank=4, alpha=4.0, use_rslora=True), seed=3, scale=0.3)),
    ]


def test_delta_weight_of_adapter_and_batch():
    b = random_batch(spec(), 2, seed=0).to(dtype=torch.float64)
    key = (1, "v_proj")
    assert algebra.delta_weight(b, key).shape == (2, 6, 12)
    torch.testing.assert_close(algebra.delta_weight(b, key)[1], dense(b[1], key))
    torch.testing.assert_close(algebra.delta_weights(b[0])[key], dense(b[0], key))
    assert list(algebra.delta_weights(b[0])) == KEYS


def test_weighted_sum_is_exact_and_mean_is_the_uniform_sum(three):
    w = [0.5, -1.25, 2.0]  # a negative weight: task arithmetic subtracts
    s = algebra.weighted_sum(three, w)
    assert s.spec.rank == 3 + 2 + 4 and s.spec.scale == 1.0
    for key in KEYS:
        ref = sum(wi * dense(a, key) for wi, a in zip(w, three))
        torch.testing.assert_close(dense(s, key), ref)
        torch.testing.assert_close(
            dense(algebra.mean(three), key), sum(dense(a, key) for a in three) / 3
        )
    batch = LoraBatch.from_adapters([f64(random_adapter(spec(), seed=i)) for i in range(4)])
    m_batch, m_list = algebra.mean(batch), algebra.mean([batch[i] for i in range(4)])
    for key in KEYS:
        torch.testing.assert_close(dense(m_batch, key), dense(m_list, key))
        torch.testing.assert_close(dense(m_batch, key), dense(batch, key).mean(0))


def test_weighted_sum_weights_are_differentiable(three):
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    total = algebra.sq_norms(algebra.weighted_sum(three, w)).sum()
    total.backward()
    # d/dw_i ||sum_j w_j X_j||^2 = 2 <X_i, sum_j w_j X_j>, densely.
    keys = KEYS
    wv = w.detach().tolist()
    for i in range(3):
        ref = sum(
            2 * (dense(three[i], k) * sum(wv[j] * dense(three[j], k) for j in range(3))).sum()
            for k in keys
        )
        assert float(w.grad[i]) == pytest.approx(float(ref), rel=1e-10)


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_refactor_is_the_truncated_svd_and_reports_the_dropped_values(three, rank):
    s = algebra.weighted_sum(three, [1.0, 0.5, -0.7])  # rank 9
    out = algebra.refactor(s, rank)
    assert out.adapter.spec.rank == rank and out.adapter.spec.scale == 1.0
    total_sq, dw_sq = 0.0, 0.0
    for key in KEYS:
        d = dense(s, key)
        u, sv, vh = torch.linalg.svd(d)
        k = min(rank, min(d.shape))
        best = (u[:, :k] * sv[:k]) @ vh[:k]  # Eckart-Young: the best rank-k approximation
        torch.testing.assert_close(dense(out.adapter, key), best)
        # Dropped: the singular values past k (those of a rank-<=9 matrix; zeros beyond).
        n_nonzero = min(9, *d.shape)
        torch.testing.assert_close(out.dropped[key][: n_nonzero - k], sv[k:n_nonzero])
        err = torch.linalg.matrix_norm(d - dense(out.adapter, key))
        assert out.error(key) == pytest.approx(float(err), rel=1e-9, abs=1e-12)
        total_sq += float(err) ** 2
        dw_sq += float(torch.linalg.matrix_norm(d)) ** 2
    assert out.total_error() == pytest.approx(total_sq**0.5, rel=1e-9)
    assert out.relative_error() == pytest.approx((total_sq / dw_sq) ** 0.5, rel=1e-9)


def test_refactor_without_rank_is_exact_and_pads_short_keys(three):
    s = algebra.weighted_sum(three, [1.0, 1.0, 1.0])  # rank 9; v_proj has min(in, out) = 6
    out = algebra.refactor(s)
    assert out.adapter.spec.rank == 9
    assert out.total_error() == pytest.approx(0.0, abs=1e-12)
    for key in KEYS:
        torch.testing.assert_close(dense(out.adapter, key), dense(s, key))
    v = (0, "v_proj")
    assert out.adapter.A[v].shape == (9, 12)
    # Past its 6 singular values the v_proj factors are zero padding.
    assert torch.count_nonzero(out.adapter.A[v][6:]) == 0
    assert torch.count_nonzero(out.adapter.B[v][:, 6:]) == 0


def test_refactor_keeps_dtype_and_rejects_bad_rank():
    a = random_adapter(spec(), seed=4)  # float32
    out = algebra.refactor(a, 2)
    assert out.adapter.A[(0, "q_proj")].dtype == torch.float32
    with pytest.raises(LoraError, match="rank must be a positive int"):
        algebra.refactor(a, 0)


def test_factor_dense_updates_matches_svd(three):
    ref = {k: dense(three[0], k) + dense(three[1], k) for k in KEYS}  # rank <= 5
    out = algebra.factor(spec(), ref, rank=5)
    for k in KEYS:
        torch.testing.assert_close(dense(out.adapter, k), ref[k])
    assert out.total_error() == pytest.approx(0.0, abs=1e-10)
    short = algebra.factor(spec(), ref, rank=2)
    for k in KEYS:
        sv = torch.linalg.svdvals(ref[k])
        assert short.error(k) == pytest.approx(float(sv[2:].pow(2).sum().sqrt()), rel=1e-9)
    with pytest.raises(LoraError, match="missing"):
        algebra.factor(spec(), {k: v for k, v in list(ref.items())[1:]})
    bad = dict(ref)
    bad[(0, "q_proj")] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(LoraError, match=r"expected \[12, 12\]"):
        algebra.factor(spec(), bad)


def test_norms_inner_and_gram_match_dense_without_forming_ba():
    x = random_batch(spec(), 3, seed=5).to(dtype=torch.float64)
    y = random_batch(spec(rank=2, alpha=7.0), 3, seed=6).to(dtype=torch.float64)
    keys = KEYS
    ref_inner = torch.stack(
        [torch.stack([(dense(x[i], k) * dense(y[i], k)).sum() for k in keys]) for i in range(3)]
    )
    torch.testing.assert_close(algebra.inner(x, y), ref_inner)
    ref_sq = torch.stack(
        [torch.stack([dense(x[i], k).pow(2).sum() for k in keys]) for i in range(3)]
    )
    torch.testing.assert_close(algebra.sq_norms(x), ref_sq)
    torch.testing.assert_close(algebra.sq_norms(x[1]), ref_sq[1])  # one adapter -> [n_keys]
    flat_x = torch.stack([torch.cat([dense(x[i], k).flatten() for k in keys]) for i in range(3)])
    flat_y = torch.stack([torch.cat([dense(y[i], k).flatten() for k in keys]) for i in range(3)])
    torch.testing.assert_close(algebra.gram(x, y), flat_x @ flat_y.T)
    torch.testing.assert_close(algebra.gram(x), flat_x @ flat_x.T)
    with pytest.raises(LoraError, match="rows are paired"):
        algebra.inner(x, algebra.take(y, [0, 1]))


def test_sq_norm_gradients_match_the_dense_path():
    x = random_batch(spec(), 2, seed=7).to(dtype=torch.float64)
    key = (0, "down_proj")
    b1 = x.B[key].clone().requires_grad_(True)
    B = dict(x.B)
    B[key] = b1
    algebra.sq_norms(LoraBatch(x.spec, x.A, B)).sum().backward()
    b2 = x.B[key].clone().requires_grad_(True)
    (x.spec.scale * (b2 @ x.A[key])).pow(2).sum().backward()
    torch.testing.assert_close(b1.grad, b2.grad)


def test_take_rows_with_repeats_and_concat():
    b = random_batch(spec(), 3, seed=8)
    t = algebra.take(b, [2, 0, 2, -1])
    assert len(t) == 4
    for j, i in enumerate([2, 0, 2, 2]):
        for k in KEYS:
            assert torch.equal(t.A[k][j], b.A[k][i]) and torch.equal(t.B[k][j], b.B[k][i])
    c = algebra.concat([b, algebra.take(b, [1]), b[0]])
    assert len(c) == 5
    assert torch.equal(c.A[(1, "v_proj")][3], b.A[(1, "v_proj")][1])
    assert torch.equal(c.B[(1, "v_proj")][4], b.B[(1, "v_proj")][0])
    with pytest.raises(LoraError, match="out of range"):
        algebra.take(b, [3])
    with pytest.raises(LoraError, match="no rows"):
        algebra.take(b, [])
    with pytest.raises(LoraError, match="refactor to one rank"):
        algebra.concat([b, random_batch(spec(rank=2), 1)])


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (spec(base_model="other"), "different base models"),
        (spec(layers=(0,)), "different layers"),
        (spec(target_modules=("q_proj", "v_proj"), shapes=SHAPES[:2]), "different target modules"),
        (spec(shapes=(("q_proj", 12, 12), ("v_proj", 12, 8), ("down_proj", 20, 12))), "shapes"),
    ],
)
def test_mixing_structures_or_bases_is_one_clear_error(other, message):
    a, b = random_adapter(spec(), seed=0), random_adapter(other, seed=1)
    with pytest.raises(LoraError, match=message) as info:
        algebra.weighted_sum([a, b], [1.0, 1.0])
    assert "\n" not in str(info.value)
    # An unknown base (empty name) combines with any.
    algebra.weighted_sum([a, random_adapter(spec(base_model=""), seed=2)], [1.0, 1.0])


def test_dora_and_rank_patterns_are_refused_in_one_line():
    key = KEYS[0]
    for bad, word in (
        (spec(use_dora=True), "DoRA"),
        (spec(rank_pattern={key: 5}), "rank_pattern"),
    ):
        with pytest.raises(LoraError, match=word):
            algebra.check_same_structure([bad], "mean")
    assert algebra.check_same_structure([spec()], "mean") == spec()
