"""The fused Llama-family forward equals the hooked HF forward: values, gradients, layouts."""

from __future__ import annotations

import pytest
import torch
from llgbm_flora import LoraError, functional_forward
from llgbm_flora.fused import fused_hidden_states, fused_unsupported
from llgbm_flora.testing import (
    MODEL_BUILDERS,
    assert_no_hooks,
    assert_state_unchanged,
    random_batch,
    state_snapshot,
    tiny_llama,
    tiny_spec,
)

ARCHS = sorted(MODEL_BUILDERS)


def _inputs(P: int = 3, T: int = 9, n: int = 2, seed: int = 0):
    """n adapters x P right-padded rows of different lengths. -> ids, mask, lengths ([n*P, ...])."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, T - 4, T - 2][:P])
    ids = torch.randint(3, 100, (P, T), generator=gen)
    mask = (torch.arange(T) < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, 0)
    return ids.repeat(n, 1), mask.repeat(n, 1), lengths.repeat(n)


def _reference(model, batch, ids, mask):
    return functional_forward(model.model, batch, input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("packed", [False, True])
def test_fused_equals_hooked_hf_forward(arch, packed):
    model = MODEL_BUILDERS[arch](seed=0)
    batch = random_batch(tiny_spec(model, rank=4), n=2, seed=1, scale=0.3)
    ids, mask, lengths = _inputs()
    ref = _reference(model, batch, ids, mask).last_hidden_state  # [6, 9, 32]
    before = state_snapshot(model)
    kw = {"lengths": lengths if packed else None}
    last = lengths - 1
    got_last = fused_hidden_states(model, batch, ids, select=last, **kw)  # [6, 32]
    got_all = fused_hidden_states(model, batch, ids, **kw)  # [6, 9, 32]
    rows = torch.arange(6)
    assert (
        ref[rows, last] - fused_hidden_states(model, None, ids, select=last, **kw)
    ).abs().max() > 0.05
    torch.testing.assert_close(got_last, ref[rows, last], rtol=0, atol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(got_all[real], ref[real], rtol=0, atol=1e-5)
    other = torch.tensor([0, 3, 6, 8, 2, 1])  # any real token, not only the last
    torch.testing.assert_close(
        fused_hidden_states(model, batch, ids, select=other, **kw),
        ref[rows, other],
        rtol=0,
        atol=1e-5,
    )
    assert_state_unchanged(model, before)
    assert_no_hooks(model)


def test_fused_base_model_equals_hf_without_adapters():
    model = tiny_llama(seed=3)
    ids, mask, lengths = _inputs()
    ref = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = fused_hidden_states(model, None, ids, lengths=lengths, select=lengths - 1)
    torch.testing.assert_close(got, ref[torch.arange(6), lengths - 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("targets", "layers"),
    [
        (("v_proj",), None),
        (("q_proj", "v_proj"), None),
        (("q_proj",), (1,)),
        (("k_proj", "down_proj"), None),
        (("gate_proj",), (0,)),
        (("o_proj", "up_proj"), None),
    ],
)
def test_fused_partial_targets_and_layers(targets, layers):
    model = MODEL_BUILDERS["qwen2"](seed=0)
    spec = tiny_spec(model, rank=4, target_modules=targets, layers=layers)
    batch = random_batch(spec, n=2, seed=2, scale=0.3)
    ids, mask, lengths = _inputs()
    ref = _reference(model, batch, ids, mask).last_hidden_state
    got = fused_hidden_states(model, batch, ids, lengths=lengths, select=lengths - 1)
    torch.testing.assert_close(got, ref[torch.arange(6), lengths - 1], rtol=0, atol=1e-5)


def test_rows_that_differ_between_adapters_stay_padded_and_correct():
    model = tiny_llama(seed=0)
    batch = random_batch(tiny_spec(model, rank=4), n=2, seed=1, scale=0.3)
    ids, mask, lengths = _inputs()
    lengths = lengths.clone()
    lengths[3:] = torch.tensor([5, 9, 7])  # adapter 1's rows have other lengths than adapter 0's
    mask = (torch.arange(9) < lengths[:, None]).long()
    ref = _reference(model, batch, ids, mask).last_hidden_state
    got = fused_hidden_states(model, batch, ids, lengths=lengths, select=lengths - 1)
    torch.testing.assert_close(got, ref[torch.arange(6), lengths - 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_gradients_equal_hooked_gradients(checkpointing):
    model = MODEL_BUILDERS["mistral"](seed=0).double()
    ids, mask, lengths = _inputs()
    last = lengths - 1

    def grads(fused: bool):
        batch = random_batch(tiny_spec(model, rank=4), n=2, seed=4, scale=0.3, dtype=torch.float64)
        tensors = [*batch.A.values(), *batch.B.values()]
        for t in tensors:
            t.requires_grad_(True)
        if fused:
            h = fused_hidden_states(
                model,
                batch,
                ids,
                lengths=lengths,
                select=last,
                gradient_checkpointing=checkpointing,
            )
        else:
            h = _reference(model, batch, ids, mask).last_hidden_state[torch.arange(6), last]
        (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum().backward()
        return [t.grad for t in tensors]

    # HF's RMSNorm computes in float32 even in a float64 model, so the two paths agree to
    # float32 rounding (~1e-6 relative), not to float64's; a wrong gradient is off by O(1).
    for got, ref in zip(grads(True), grads(False), strict=True):
        assert ref.norm() > 1.0
        assert (got - ref).norm() / ref.norm() < 1e-5


def test_unsupported_models_are_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    assert "model type 'gpt2'" in fused_unsupported(gpt2)
    with pytest.raises(LoraError, match="gpt2"):
        fused_hidden_states(gpt2, None, torch.ones(1, 3, dtype=torch.long))

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj"]))
    assert "not a plain nn.Linear" in fused_unsupported(wrapped.get_base_model())

    mistral = MODEL_BUILDERS["mistral"](seed=0)
    mistral.config.sliding_window = 4
    assert "sliding window" in fused_unsupported(mistral, seq_len=9)
    assert fused_unsupported(mistral, seq_len=4) is None


def test_row_count_must_match_adapters():
    model = tiny_llama(seed=0)
    batch = random_batch(tiny_spec(model, rank=4), n=2, seed=1)
    with pytest.raises(LoraError, match="not a multiple of 2 adapters"):
        fused_hidden_states(model, batch, torch.ones(3, 4, dtype=torch.long))


@pytest.mark.slow
def test_compiled_layer_equals_eager():
    """torch.compile of the layer function (CPU inductor here) gives the eager values."""
    model = MODEL_BUILDERS["qwen2"](seed=0)
    batch = random_batch(tiny_spec(model, rank=4), n=2, seed=1, scale=0.3)
    ids, _, lengths = _inputs()
    kw = {"lengths": lengths, "select": lengths - 1}
    eager = fused_hidden_states(model, batch, ids, **kw)
    with torch.no_grad():
        compiled = fused_hidden_states(model, batch, ids, compile=True, **kw)
    torch.testing.assert_close(compiled, eager.detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_select_outside_a_row_is_refused(packed):
    model = tiny_llama(seed=0)
    ids, _, lengths = _inputs()
    bad = lengths.clone()  # one past the last real token: in packed rows, the next row's token
    with pytest.raises(LoraError, match="inside the row's real tokens"):
        fused_hidden_states(
            model, None, ids, lengths=lengths if packed else None, select=bad + (0 if packed else 9)
        )
    with pytest.raises(LoraError, match="one index per row"):
        fused_hidden_states(model, None, ids, lengths=lengths, select=lengths[:2] - 1)
