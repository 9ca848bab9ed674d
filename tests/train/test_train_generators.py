"""Generators: output structure, gradient flow, batched == looped, and bad arguments."""

import pytest
import torch
from llgbm_flora import LoraSpec
from llgbm_flora.testing import random_batch
from llgbm_train.generators import (
    DnDGenerator,
    GeneratorError,
    T2LGenerator,
    build_generator,
)
from llgbm_train.weight_tokens import WeightTokenError, WeightTokenizer

SHAPES = (
    ("q_proj", 32, 32),
    ("k_proj", 32, 16),
    ("v_proj", 32, 16),
    ("o_proj", 32, 32),
    ("gate_proj", 32, 64),
    ("up_proj", 32, 64),
    ("down_proj", 64, 32),
)
N_PROMPTS, MAX_TOKENS, COND_DIM = 3, 8, 16

CASES = {
    "dnd": {"kind": "dnd", "tokens": True, "kw": {"n_blocks": 3, "kernel": 3}},
    "dnd-channels": {
        "kind": "dnd",
        "tokens": True,
        "kw": {"n_blocks": 2, "kernel": 3, "channels": [40], "max_group_channels": 8},
    },
    "t2l-raw": {"kind": "t2l", "tokens": False, "kw": {"hidden": 32, "emb_dim": 8}},
    "t2l-tokens": {"kind": "t2l", "tokens": True, "kw": {"hidden": 32, "emb_dim": 8}},
    "t2l-factored": {
        "kind": "t2l",
        "tokens": False,
        "kw": {"hidden": 32, "emb_dim": 8, "head_rank": 4},
    },
}


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
    return LoraSpec(
        base_model="tiny",
        target_modules=tuple(m for m, _, _ in SHAPES),
        layers=(0, 1),
        rank=4,
        alpha=8.0,
        shapes=SHAPES,
    )


def make(spec, case):
    tok = None
    if case["tokens"]:
        tok = WeightTokenizer(spec, slab_width=16).fit(random_batch(spec, 4, seed=1))
    return build_generator(
        case["kind"],
        spec=spec,
        cond_dim=COND_DIM,
        n_prompts=N_PROMPTS,
        max_tokens=MAX_TOKENS,
        weight_tokenizer=tok,
        **case["kw"],
    )


def condition(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(b, N_PROMPTS, MAX_TOKENS, COND_DIM, generator=g)
    mask = torch.ones(b, N_PROMPTS, MAX_TOKENS, dtype=torch.bool)
    mask[:, :, 5:] = False  # padded tokens
    return cond, mask


@pytest.mark.parametrize("name", list(CASES))
def test_generator_output_structure_and_gradients(spec, name):
    gen = make(spec, CASES[name])
    cond, mask = condition(2)
    cond.requires_grad_(True)
    lora = gen(cond, mask)
    assert len(lora) == 2 and lora.spec == spec
    keys = spec.keys()
    for key in keys:
        d_in, d_out = spec.in_out(key[1])
        assert lora.A[key].shape == (2, 4, d_in)
        assert lora.B[key].shape == (2, d_out, 4)
        # a usable LoRA from the start: both factors non-zero
        assert lora.A[key].abs().max() > 0 and lora.B[key].abs().max() > 0
    loss = sum((lora.spec.scale * lora.B[k] @ lora.A[k]).pow(2).sum() for k in keys)
    loss.backward()
    missing = [n for n, p in gen.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    # different conditions give different adapters
    other = gen(*condition(2, seed=1))
    assert not torch.allclose(other.A[(1, "down_proj")], lora.A[(1, "down_proj")])


@pytest.mark.parametrize("name", list(CASES))
def test_generator_batched_equals_looped_and_ignores_padding(spec, name):
    gen = make(spec, CASES[name])
    cond, mask = condition(3)
    with torch.no_grad():
        batched = gen(cond, mask)
        for i in range(3):
            single = gen(cond[i : i + 1], mask[i : i + 1])
            for key in [(0, "q_proj"), (1, "down_proj")]:
                torch.testing.assert_close(single.A[key][0], batched.A[key][i])
                torch.testing.assert_close(single.B[key][0], batched.B[key][i])
        noisy = cond.clone()
        noisy[~mask] = 100.0  # what sits under the mask must not matter
        again = gen(noisy, mask)
    torch.testing.assert_close(again.B[(0, "v_proj")], batched.B[(0, "v_proj")])


def test_dnd_shape_schedule(spec):
    gen = make(spec, CASES["dnd-channels"])
    assert isinstance(gen, DnDGenerator)
    n_tokens = gen.tokenizer.n_tokens
    assert gen.shapes[0] == (N_PROMPTS, MAX_TOKENS, COND_DIM)
    assert gen.shapes[1][0] == 40
    assert gen.shapes[-1] == (n_tokens, 4, 16)
    assert gen.tokens(*condition(1)).shape == (1, n_tokens, 4, 16)
    with pytest.raises(GeneratorError, match="n_prompts=3"):
        gen(torch.zeros(1, 2, MAX_TOKENS, COND_DIM), torch.ones(1, 2, MAX_TOKENS, dtype=torch.bool))
    with pytest.raises(GeneratorError, match="mask"):
        gen(torch.zeros(1, 3, MAX_TOKENS, COND_DIM), torch.ones(1, 3, 2, dtype=torch.bool))


def test_dnd_default_schedule_reaches_n_tokens_before_the_last_block(spec):
    gen = make(spec, CASES["dnd"])
    n_tokens = gen.tokenizer.n_tokens
    assert [s[0] for s in gen.shapes] == [N_PROMPTS, 14, n_tokens, n_tokens]
    assert [s[1] for s in gen.shapes] == [MAX_TOKENS, 6, 5, 4]
    assert all(s[2] == 16 for s in gen.shapes)


def test_t2l_raw_init_matches_peft_scales(spec):
    gen = make(spec, CASES["t2l-raw"])
    assert isinstance(gen, T2LGenerator)
    with torch.no_grad():
        lora = gen(*condition(1))
    a, b = lora.A[(0, "down_proj")], lora.B[(0, "down_proj")]
    bound = 1 / 64**0.5
    assert 0.3 * bound < a.abs().max() < 1.5 * bound
    assert 0 < b.abs().max() < 0.05 * bound


def test_build_generator_bad_arguments(spec):
    kw = {"spec": spec, "cond_dim": COND_DIM, "n_prompts": N_PROMPTS, "max_tokens": MAX_TOKENS}
    with pytest.raises(GeneratorError, match="kind"):
        build_generator("gan", weight_tokenizer=None, **kw)
    with pytest.raises(GeneratorError, match="weight_tokenizer"):
        build_generator("dnd", weight_tokenizer=None, **kw)
    with pytest.raises(GeneratorError, match=r"unknown option.*depth"):
        build_generator("t2l", weight_tokenizer=None, depth=3, **kw)
    tok = WeightTokenizer(spec, slab_width=16)
    with pytest.raises(GeneratorError, match="kernel"):
        build_generator("dnd", weight_tokenizer=tok, kernel=4, **kw)
    with pytest.raises(GeneratorError, match="channels"):
        build_generator("dnd", weight_tokenizer=tok, n_blocks=3, channels=[5], **kw)
    other = WeightTokenizer(spec.replace(rank=2), slab_width=16)
    with pytest.raises(GeneratorError, match="different LoRA spec"):
        build_generator("t2l", weight_tokenizer=other, **kw)


def test_t2l_condition_standardisation_separates_near_parallel_conditions(spec):
    """Conditions sharing one large common vector: standardised, their pooled states are
    zero-mean, unit-std over the fit set; the fit lives in the state dict; off is identity."""
    gen = make(spec, CASES["t2l-raw"])
    g = torch.Generator().manual_seed(3)
    common = 50.0 * torch.randn(COND_DIM, generator=g)
    cond = common + 0.1 * torch.randn(12, N_PROMPTS, MAX_TOKENS, COND_DIM, generator=g)
    mask = torch.ones(12, N_PROMPTS, MAX_TOKENS, dtype=torch.bool)
    pooled = gen.pool(cond, mask)
    cos = torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0)
    assert cos > 0.999  # nearly parallel, as a frozen encoder's task conditions are
    before = gen(cond[:2], mask[:2])
    gen.fit_condition(pooled)
    z = (pooled - gen.cond_shift) / gen.cond_scale
    torch.testing.assert_close(z.mean(0), torch.zeros(COND_DIM), atol=2e-3, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(COND_DIM), atol=2e-3, rtol=0)
    assert torch.nn.functional.cosine_similarity(z[0], z[1], dim=0) < 0.9
    after = gen(cond[:2], mask[:2])
    assert not torch.allclose(after.A[(0, "q_proj")], before.A[(0, "q_proj")])
    # The fit travels with checkpoints: a fresh generator loading the state dict agrees.
    fresh = make(spec, CASES["t2l-raw"])
    fresh.load_state_dict(gen.state_dict())
    again = fresh(cond[:2], mask[:2])
    torch.testing.assert_close(again.A[(1, "down_proj")], after.A[(1, "down_proj")])
    off = make(spec, {**CASES["t2l-raw"], "kw": {**CASES["t2l-raw"]["kw"], "standardize": False}})
    off.fit_condition(pooled)  # a no-op when off
    assert off.cond_shift.abs().max() == 0 and (off.cond_scale == 1).all()
    with pytest.raises(GeneratorError, match="fit_condition"):
        gen.fit_condition(pooled[:1])


def test_within_whitening_separates_tasks_the_per_feature_scaling_confuses(spec):
    """Two tasks differ along one direction of small total variance, while a noisy input
    direction varies more than anything else: after per-feature scaling a nearest-centroid read
    confuses them; after within-task whitening the within-task scatter is the identity (up to the
    shrinkage) and the tasks separate. The fit travels in the state dict; an old state dict
    without cond_whiten loads as the identity."""
    from llgbm_train.generators.t2l import WITHIN_SHRINKAGE, within_whitening

    g = torch.Generator().manual_seed(5)
    per_task, n_tasks = 24, 2
    groups = torch.arange(n_tasks).repeat_interleave(per_task)
    # Mixed coordinates: the task signal (0.3 apart) and the input noise (std 3) share features.
    basis = torch.linalg.qr(torch.randn(COND_DIM, COND_DIM, generator=g))[0]
    latent = 0.05 * torch.randn(len(groups), COND_DIM, generator=g)
    latent[:, 0] += 3.0 * torch.randn(len(groups), generator=g)  # input noise
    latent[:, 1] += 0.3 * groups.float()  # the task
    pooled = latent @ basis.T

    shift, w = within_whitening(pooled, groups)
    z = (pooled - shift) @ w
    means = torch.stack([z[groups == k].mean(0) for k in range(n_tasks)])
    within = z - means[groups]
    scatter = within.T @ within / (len(groups) - n_tasks)
    eigs = torch.linalg.eigvalsh(scatter)
    # Each within-task variance v becomes v / (v + ridge): the noise direction's 9 is 1, no
    # longer 3,600x the task direction's.
    raw_within = pooled - torch.stack([pooled[groups == k].mean(0) for k in range(n_tasks)])[groups]
    raw = torch.linalg.eigvalsh(raw_within.T @ raw_within / (len(groups) - n_tasks))
    ridge = WITHIN_SHRINKAGE * float(raw.mean())
    torch.testing.assert_close(eigs, raw / (raw + ridge), atol=1e-4, rtol=1e-3)

    def read_right(x):
        cen = torch.stack([x[groups == k].mean(0) for k in range(n_tasks)])
        return float((torch.cdist(x, cen).argmin(1) == groups).float().mean())

    s = (pooled - pooled.mean(0)) / pooled.std(0)
    assert read_right(s) < 0.8  # the per-feature scaling: noise dominates
    assert read_right(z) == 1.0

    gen = make(
        spec, {**CASES["t2l-raw"], "kw": {**CASES["t2l-raw"]["kw"], "standardize": "within"}}
    )
    with pytest.raises(GeneratorError, match="needs each condition's task"):
        gen.fit_condition(pooled)
    gen.fit_condition(pooled, groups)
    torch.testing.assert_close(gen.cond_whiten, w)
    cond = pooled[:2, None, None].expand(2, N_PROMPTS, MAX_TOKENS, COND_DIM).contiguous()
    mask = torch.ones(2, N_PROMPTS, MAX_TOKENS, dtype=torch.bool)
    out = gen(cond, mask)
    fresh = make(
        spec, {**CASES["t2l-raw"], "kw": {**CASES["t2l-raw"]["kw"], "standardize": "within"}}
    )
    fresh.load_state_dict(gen.state_dict())
    torch.testing.assert_close(fresh(cond, mask).A[(0, "q_proj")], out.A[(0, "q_proj")])
    # A checkpoint from before the within mode: no cond_whiten, read as the identity.
    feat = make(spec, CASES["t2l-raw"])
    old = {k: v for k, v in feat.state_dict().items() if k != "cond_whiten"}
    feat.load_state_dict(old)
    assert torch.equal(feat.cond_whiten, torch.eye(COND_DIM))
    with pytest.raises(GeneratorError, match="one condition"):
        within_whitening(pooled[:2], torch.tensor([0, 1]))
    with pytest.raises(GeneratorError, match="standardize"):
        make(spec, {**CASES["t2l-raw"], "kw": {**CASES["t2l-raw"]["kw"], "standardize": "lda"}})


@pytest.mark.parametrize("width", [16, 24])  # 24: slabs with padding
def test_decode_module_equals_decode_with_its_gradients(spec, width):
    """T2L decodes one module type at a time; the values and gradients are decode's own."""
    tok = WeightTokenizer(spec, slab_width=width).fit(random_batch(spec, 4, seed=1))
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, *tok.token_shape, generator=g).requires_grad_()
    weights = random_batch(spec, 2, seed=4)
    ref = tok.decode(tokens)
    keys = spec.keys()
    want = sum((ref.A[k] * weights.A[k]).sum() + (ref.B[k] * weights.B[k]).sum() for k in keys)
    (g_ref,) = torch.autograd.grad(want, tokens)
    got = 0.0
    for m in spec.target_modules:
        mine = tok.module_keys(m)
        assert mine == [k for k in keys if k[1] == m]
        ids = torch.tensor(
            [
                [
                    i
                    for s in tok.segments
                    if s.key == k
                    for i in range(s.offset, s.offset + s.n_slabs)
                ]
                for k in mine
            ]
        )  # [L, n_tok]: each key's A slabs, then its B slabs
        a, b = tok.decode_module(m, tokens[:, ids])
        for j, k in enumerate(mine):
            torch.testing.assert_close(a[:, j], ref.A[k], rtol=0, atol=0)
            torch.testing.assert_close(b[:, j], ref.B[k], rtol=0, atol=0)
            got = got + (a[:, j] * weights.A[k]).sum() + (b[:, j] * weights.B[k]).sum()
    (g_got,) = torch.autograd.grad(got, tokens)
    torch.testing.assert_close(g_got, g_ref)
    with pytest.raises(WeightTokenError, match="q_proj tokens: shape"):
        tok.decode_module("q_proj", tokens)
