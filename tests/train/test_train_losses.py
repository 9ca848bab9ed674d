"""Weight tokens (DnD normalisation), weight and delta losses, and their trivial baselines."""

import pytest
import torch
from llgbm_flora import LoraBatch, LoraSpec
from llgbm_flora.testing import random_batch
from llgbm_train.losses import LossError, delta_loss, weight_loss
from llgbm_train.weight_tokens import WeightTokenError, WeightTokenizer

# A Llama-like layout by hand: hidden 32, 2 layers, 4 heads / 2 kv heads, intermediate 64.
SHAPES = (
    ("q_proj", 32, 32),
    ("k_proj", 32, 16),
    ("v_proj", 32, 16),
    ("o_proj", 32, 32),
    ("gate_proj", 32, 64),
    ("up_proj", 32, 64),
    ("down_proj", 64, 32),
)


def make_spec(rank: int = 4) -> LoraSpec:
    return LoraSpec(
        base_model="tiny",
        target_modules=tuple(m for m, _, _ in SHAPES),
        layers=(0, 1),
        rank=rank,
        alpha=8.0,
        shapes=SHAPES,
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: one thread is faster, and two spinning threads on a shared 2-core box
    # are several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def spec() -> LoraSpec:
    torch.manual_seed(0)
    return make_spec()


def zero_like(batch: LoraBatch) -> LoraBatch:
    return LoraBatch(
        batch.spec,
        {k: torch.zeros_like(v) for k, v in batch.A.items()},
        {k: torch.zeros_like(v) for k, v in batch.B.items()},
    )


def shifted(batch: LoraBatch, seed: int) -> LoraBatch:
    """Teachers with a per-matrix offset, so slab means are not ~0."""
    g = torch.Generator().manual_seed(seed)
    return LoraBatch(
        batch.spec,
        {k: v + torch.randn((), generator=g) for k, v in batch.A.items()},
        {k: v * 3 + torch.randn((), generator=g) for k, v in batch.B.items()},
    )


@pytest.mark.parametrize("width", [8, 24, 128])
def test_tokens_round_trip_exact(spec, width):
    teachers = shifted(random_batch(spec, 5, seed=1), seed=2)
    tok = WeightTokenizer(spec, slab_width=width).fit(teachers)
    other = random_batch(spec, 3, seed=3)
    tokens = tok.encode(other)
    assert tokens.shape == (3, tok.n_tokens, 4, width)
    back = tok.decode(tokens)
    keys = spec.keys()
    for k in keys:
        torch.testing.assert_close(back.A[k], other.A[k], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(back.B[k], other.B[k], atol=1e-6, rtol=1e-6)


def test_token_count_and_padding(spec):
    tok = WeightTokenizer(spec, slab_width=24)
    # per layer: A slabs ceil(in/24), B slabs ceil(out/24)
    per_layer = sum(-(-i // 24) + -(-o // 24) for _, i, o in SHAPES)
    assert tok.n_tokens == 2 * per_layer
    tokens = tok.fit(random_batch(spec, 4, seed=0)).encode(random_batch(spec, 2, seed=1))
    pad = ~tok.valid  # [n_tokens, w]
    assert pad.any()
    assert torch.all(tokens.permute(0, 2, 1, 3)[:, :, pad] == 0)


def test_normalisation_statistics(spec):
    teachers = shifted(random_batch(spec, 6, seed=4), seed=5)
    tok = WeightTokenizer(spec, slab_width=24).fit(teachers)
    assert tok.fitted
    t = tok.encode(teachers)  # [6, n_tokens, r, w]
    valid = tok.valid[None, :, None, :].expand_as(t)
    count = valid.sum(dim=(0, 2, 3))
    mean = (t * valid).sum(dim=(0, 2, 3)) / count
    var = ((t * valid) ** 2).sum(dim=(0, 2, 3)) / count - mean**2
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-4, rtol=0)
    # The first token is layer 0 q_proj A's first 24 columns: check its statistics by hand.
    a = teachers.A[(0, "q_proj")][:, :, :24]
    assert float(tok.mean[0]) == pytest.approx(float(a.mean()), rel=1e-5)
    assert float(tok.std[0]) == pytest.approx(float(a.std(unbiased=False)), rel=1e-5)
    # The last token is layer 1 down_proj B's tail: out 32 -> columns 24..31 of B^T.
    b = teachers.B[(1, "down_proj")].transpose(1, 2)[:, :, 24:]
    assert float(tok.mean[-1]) == pytest.approx(float(b.mean()), rel=1e-5)
    assert float(tok.std[-1]) == pytest.approx(float(b.std(unbiased=False)), rel=1e-5)


def test_constant_slab_keeps_unit_std(spec):
    teachers = random_batch(spec, 3, seed=0)
    teachers.B[(0, "q_proj")].zero_()
    tok = WeightTokenizer(spec, slab_width=32).fit(teachers)
    seg = next(s for s in tok.segments if s.key == (0, "q_proj") and s.side == "B")
    assert float(tok.std[seg.offset]) == 1.0
    assert torch.isfinite(tok.encode(teachers)).all()


def test_decode_is_differentiable_and_state_round_trips(spec):
    tok = WeightTokenizer(spec, slab_width=16).fit(shifted(random_batch(spec, 4, seed=6), 7))
    tokens = torch.randn(2, *tok.token_shape, requires_grad=True)
    lora = tok.decode(tokens)
    sum(v.sum() for v in lora.B.values()).backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0

    fresh = WeightTokenizer(spec, slab_width=16)
    assert not fresh.fitted
    fresh.load_state_dict(tok.state_dict())
    assert fresh.fitted
    x = random_batch(spec, 2, seed=8)
    torch.testing.assert_close(fresh.encode(x), tok.encode(x))
    with pytest.raises(WeightTokenError, match="tokens"):
        WeightTokenizer(spec, slab_width=8).load_state_dict(tok.state_dict())


def test_tokenizer_rejects_other_specs(spec):
    tok = WeightTokenizer(spec, slab_width=16)
    other = make_spec(rank=2)
    with pytest.raises(WeightTokenError, match="shape"):
        tok.encode(random_batch(other, 1, seed=0))
    with pytest.raises(WeightTokenError, match="tokens"):
        tok.decode(torch.zeros(1, tok.n_tokens + 1, 4, 16))
    sub = make_spec().replace(target_modules=("q_proj",), shapes=(SHAPES[0],))
    with pytest.raises(WeightTokenError, match="keys differ"):
        tok.encode(random_batch(sub, 1, seed=0))


def dense_delta_w_mse(pred: LoraBatch, target: LoraBatch) -> torch.Tensor:
    total, numel = 0.0, 0
    keys = target.spec.keys()
    for k in keys:
        dp = pred.spec.scale * pred.B[k] @ pred.A[k]  # [n, out, in]
        dt = target.spec.scale * target.B[k] @ target.A[k]
        total = total + ((dp - dt) ** 2).sum()
        numel += dt[0].numel()
    return total / (len(target) * numel)


def test_delta_w_loss_matches_dense_formula_and_gradient(spec):
    target = random_batch(spec, 3, seed=1, scale=0.5)
    pred = random_batch(spec, 3, seed=2, scale=0.5)
    for t in (*pred.A.values(), *pred.B.values()):
        t.requires_grad_(True)
    out = weight_loss(pred, target, space="delta_w")
    dense = dense_delta_w_mse(pred, target)
    torch.testing.assert_close(out.value, dense, rtol=1e-4, atol=1e-7)
    key = (1, "down_proj")
    (g_fast,) = torch.autograd.grad(out.value, pred.A[key])
    (g_dense,) = torch.autograd.grad(dense, pred.A[key])
    torch.testing.assert_close(g_fast, g_dense, rtol=1e-4, atol=1e-7)
    # different ranks still compare the products
    low = random_batch(make_spec(rank=2), 3, seed=3, scale=0.5)
    torch.testing.assert_close(
        weight_loss(low, target, space="delta_w").value,
        dense_delta_w_mse(low, target),
        rtol=1e-4,
        atol=1e-7,
    )


@pytest.mark.parametrize("space", ["token", "delta_w"])
def test_weight_loss_baseline_is_the_zero_lora(spec, space):
    target = shifted(random_batch(spec, 3, seed=1), seed=9)
    tok = WeightTokenizer(spec, slab_width=24).fit(target)
    zero = weight_loss(zero_like(target), target, tokenizer=tok, space=space)
    assert zero.baseline > 0
    assert float(zero.value) == pytest.approx(zero.baseline, rel=1e-5)
    perfect = weight_loss(target, target, tokenizer=tok, space=space)
    assert float(perfect.value) == pytest.approx(0.0, abs=1e-5 * zero.baseline)
    assert perfect.baseline == pytest.approx(zero.baseline)


def test_token_loss_is_masked_mse_and_token_weights_apply(spec):
    target = random_batch(spec, 2, seed=1)
    pred = random_batch(spec, 2, seed=2)
    tok = WeightTokenizer(spec, slab_width=24).fit(target)
    p, t = tok.encode(pred), tok.encode(target)
    valid = tok.valid[None, :, None, :].expand_as(p)
    expected = ((p - t) ** 2)[valid].mean()
    got = weight_loss(pred, target, tokenizer=tok)
    torch.testing.assert_close(got.value, expected)
    w = torch.zeros(tok.n_tokens)
    w[0] = 1.0  # only the first token counts
    only_first = weight_loss(pred, target, tokenizer=tok, token_weights=w)
    torch.testing.assert_close(only_first.value, ((p[:, 0] - t[:, 0]) ** 2)[:, :, :24].mean())
    with pytest.raises(LossError, match="token_weights"):
        weight_loss(pred, target, tokenizer=tok, token_weights=torch.ones(3))
    with pytest.raises(LossError, match="token_weights"):
        weight_loss(pred, target, space="delta_w", token_weights=w)
    with pytest.raises(LossError, match="WeightTokenizer"):
        weight_loss(pred, target)
    with pytest.raises(LossError, match="space"):
        weight_loss(pred, target, space="l1")


def test_delta_loss_kinds_and_baselines():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 16, generator=g)
    pred = torch.randn(4, 16, generator=g)
    mse = delta_loss(pred, target, kind="mse")
    torch.testing.assert_close(mse.value, ((pred - target) ** 2).mean())
    assert mse.baseline == pytest.approx(float((target**2).mean()))
    zero = delta_loss(torch.zeros_like(target), target, kind="mse")
    assert float(zero.value) == pytest.approx(zero.baseline)

    cos = delta_loss(pred, target, kind="cosine")
    expected = 1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1).mean()
    torch.testing.assert_close(cos.value, expected)
    assert cos.baseline == 1.0
    assert float(delta_loss(2.5 * target, target, kind="cosine").value) == pytest.approx(
        0, abs=1e-6
    )

    comb = delta_loss(pred, target, kind="combined", cos_weight=0.3)
    torch.testing.assert_close(comb.value, mse.value + 0.3 * cos.value)
    assert comb.baseline == pytest.approx(mse.baseline + 0.3)

    with pytest.raises(LossError, match="kind"):
        delta_loss(pred, target, kind="l1")
    with pytest.raises(LossError, match=r"\[n, hidden\]"):
        delta_loss(pred, target[:2], kind="mse")
