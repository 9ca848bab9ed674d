"""functional_forward against PEFT and against itself: the equivalences the package promises."""

from __future__ import annotations

import copy

import pytest
import torch
from llgbm_flora import LoraAdapter, LoraBatch, LoraError, LoraKeyMismatchError, functional_forward
from llgbm_flora.testing import (
    MODEL_BUILDERS,
    assert_no_hooks,
    assert_state_unchanged,
    hook_snapshot,
    random_adapter,
    random_batch,
    state_snapshot,
    tiny_spec,
)
from peft import LoraConfig, get_peft_model
from torch import nn

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft_model_with(model: torch.nn.Module, adapter: LoraAdapter):
    """A PeftModel on a copy of `model` whose LoRA weights are set from `adapter` by walking
    PEFT's own modules (independent of this package's key naming)."""
    spec = adapter.spec
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora,
        layers_to_transform=list(spec.layers),
        lora_dropout=0.0,
    )
    pm = get_peft_model(copy.deepcopy(model), config)
    seen = set()
    for name, module in pm.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            key = (layer, parts[-1])
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(adapter.A[key])
                module.lora_B["default"].weight.copy_(adapter.B[key])
            seen.add(key)
    assert seen == set(spec.keys())
    return pm.eval()


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_matches_peft(model, inputs, merged):
    spec = tiny_spec(model, rank=4, alpha=8)
    adapter = random_adapter(spec, seed=1, scale=0.2)
    pm = peft_model_with(model, adapter)
    ref_model = pm.merge_and_unload() if merged else pm
    snap = state_snapshot(model)
    with torch.no_grad():
        ref = ref_model(**inputs).logits
        ours = functional_forward(model, adapter, **inputs).logits
        base = model(**inputs).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert_state_unchanged(model, snap)
    assert_no_hooks(model)


@pytest.mark.parametrize(
    ("alpha", "rank", "rslora", "targets"),
    [(16, 8, False, ALL), (5, 4, True, ("q_proj", "v_proj")), (1, 2, False, ("down_proj",))],
)
def test_scaling_matches_peft(alpha, rank, rslora, targets):
    model = MODEL_BUILDERS["llama"](seed=3)
    spec = tiny_spec(model, rank=rank, alpha=alpha, target_modules=targets, use_rslora=rslora)
    expected = alpha / (rank**0.5 if rslora else rank)
    assert spec.scale == pytest.approx(expected)
    adapter = random_adapter(spec, seed=2, scale=0.3)
    pm = peft_model_with(model, adapter)
    scalings = {
        m.scaling["default"] for m in pm.modules() if isinstance(getattr(m, "scaling", None), dict)
    }
    assert len(scalings) == 1 and scalings.pop() == pytest.approx(expected)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            functional_forward(model, adapter, input_ids=ids).logits,
            pm(input_ids=ids).logits,
            atol=1e-5,
            rtol=0,
        )


def test_subset_of_layers_matches_peft(inputs):
    model = MODEL_BUILDERS["qwen2"](seed=0, layers=3)
    spec = tiny_spec(model, layers=(1,), target_modules=("v_proj", "up_proj"))
    adapter = random_adapter(spec, seed=4, scale=0.3)
    with torch.no_grad():
        ours = functional_forward(model, adapter, **inputs).logits
        ref = peft_model_with(model, adapter)(**inputs).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_batched_equals_looped(model, inputs):
    spec = tiny_spec(model)
    batch = random_batch(spec, n=2, seed=5, scale=0.2)  # 2 adapters x 2 rows each
    snap = state_snapshot(model)
    with torch.no_grad():
        together = functional_forward(model, batch, **inputs).logits
        looped = torch.cat(
            [
                functional_forward(
                    model,
                    batch[i],
                    input_ids=inputs["input_ids"][2 * i : 2 * i + 2],
                    attention_mask=inputs["attention_mask"][2 * i : 2 * i + 2],
                ).logits
                for i in range(2)
            ]
        )
    torch.testing.assert_close(together, looped, atol=1e-5, rtol=0)
    assert not torch.allclose(
        together[:2], functional_forward(model, batch[1], **inputs).logits[:2]
    )
    assert_state_unchanged(model, snap)


def test_single_adapter_equals_batch_of_copies(inputs):
    model = MODEL_BUILDERS["llama"](seed=0)
    adapter = random_adapter(tiny_spec(model), seed=6, scale=0.2)
    batch = LoraBatch.from_adapters([adapter, adapter, adapter, adapter])
    with torch.no_grad():
        one = functional_forward(model, adapter, **inputs).logits
        four = functional_forward(model, batch, **inputs).logits
    torch.testing.assert_close(one, four, atol=1e-5, rtol=0)


def test_chunked_equals_unchunked_all_fields(model):
    spec = tiny_spec(model)
    batch = random_batch(spec, n=3, seed=7, scale=0.2)
    ids = torch.randint(3, 128, (6, 5), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids, "output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        full = functional_forward(model, batch, **kw)
        chunked = functional_forward(model, batch, adapter_chunk_size=2, **kw)
    assert full.keys() == chunked.keys()
    torch.testing.assert_close(chunked.logits, full.logits, atol=1e-5, rtol=0)
    assert len(chunked.hidden_states) == len(full.hidden_states) == 3
    for a, b in zip(chunked.hidden_states, full.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(chunked.attentions, full.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_backbone_equals_causal_lm_hidden_state(model, inputs):
    batch = random_batch(tiny_spec(model), n=2, seed=8)
    with torch.no_grad():
        full = functional_forward(model, batch, output_hidden_states=True, **inputs)
        backbone = functional_forward(model.get_decoder(), batch, **inputs)
    torch.testing.assert_close(backbone.last_hidden_state, full.hidden_states[-1], atol=0, rtol=0)


def test_gradients_flow_and_checkpointing_matches(model, inputs):
    spec = tiny_spec(model)
    batch = random_batch(spec, n=2, seed=9, scale=0.2)
    leaves = [t.requires_grad_() for t in [*batch.A.values(), *batch.B.values()]]
    snap = state_snapshot(model)
    model.train()  # checkpointing matters in training mode (dropout is 0 in these configs)

    def grads(**kw):
        out = functional_forward(model.get_decoder(), batch, **inputs, **kw)
        return torch.autograd.grad(out.last_hidden_state.square().mean(), leaves)

    plain = grads()
    assert all(g.abs().sum() > 0 for g in plain)  # every A and B receives gradient
    for kw in (
        {"gradient_checkpointing": True},
        {"gradient_checkpointing": True, "adapter_chunk_size": 1},
    ):
        for g, h in zip(plain, grads(**kw)):
            torch.testing.assert_close(g, h, atol=1e-7, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    assert_state_unchanged(model, snap)
    assert_no_hooks(model)


def test_checkpointing_replays_lora_in_backward():
    """The recompute during backward runs the layer again, and the LoRA must be on it then."""
    model = MODEL_BUILDERS["llama"](seed=0)
    batch = random_batch(tiny_spec(model), n=1, seed=10)
    batch.A[(0, "q_proj")].requires_grad_()
    calls = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda *a: calls.append(1)
    )
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    try:
        out = functional_forward(model, batch, gradient_checkpointing=True, input_ids=ids)
        assert len(calls) == 1
        out.logits.sum().backward()
        assert len(calls) == 2  # recomputed in backward
    finally:
        handle.remove()
    assert batch.A[(0, "q_proj")].grad.abs().sum() > 0
    assert_no_hooks(model)


def test_hf_gradient_checkpointing_is_refused():
    model = MODEL_BUILDERS["llama"](seed=0)
    model.gradient_checkpointing_enable()
    model.train()
    baseline = hook_snapshot(model)  # HF adds a hook of its own on the embeddings
    adapter = random_adapter(tiny_spec(model), seed=1)
    ids = torch.randint(3, 128, (1, 4))
    with pytest.raises(LoraError, match="gradient_checkpointing_disable"):
        functional_forward(model, adapter, input_ids=ids)
    assert_no_hooks(model, baseline)
    with torch.no_grad():  # no backward, so no recompute: allowed
        functional_forward(model, adapter, input_ids=ids)


class _ToyBlock(nn.Module):
    """A decoder block in pure float64 ops (HF models compute norms/softmax in fp32, which makes
    finite differences too noisy); q/k/v and gate/up read one tensor, as in Llama."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict(
            {m: nn.Linear(d, d) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
        )
        self.mlp = nn.ModuleDict(
            {
                "gate_proj": nn.Linear(d, 2 * d),
                "up_proj": nn.Linear(d, 2 * d),
                "down_proj": nn.Linear(2 * d, d),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        q, k, v = a["q_proj"](x), a["k_proj"](x), a["v_proj"](x)
        x = x + a["o_proj"](torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v)
        m = self.mlp
        return x + m["down_proj"](torch.tanh(m["gate_proj"](x)) * m["up_proj"](x))


class _ToyLM(nn.Module):
    def __init__(self, d: int = 6, n_layers: int = 2, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_ToyBlock(d) for _ in range(n_layers))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_gradcheck_float64(checkpointing):
    """Finite differences == autograd for every A and B (float64, 2 adapters x 2 rows each)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _ToyLM().double()
    spec = tiny_spec(model, rank=2, alpha=3)
    base = random_batch(spec, n=2, seed=11, scale=0.5, dtype=torch.float64)
    keys = spec.keys()
    ids = torch.randint(0, 11, (4, 3), generator=torch.Generator().manual_seed(3))

    def f(*tensors):
        A = dict(zip(keys, tensors[: len(keys)]))
        B = dict(zip(keys, tensors[len(keys) :]))
        batch = LoraBatch(spec, A, B)
        return functional_forward(model, batch, gradient_checkpointing=checkpointing, input_ids=ids)

    leaves = [t.clone().requires_grad_() for t in [*base.A.values(), *base.B.values()]]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    assert_no_hooks(model)


def test_gradients_match_peft(inputs):
    inputs = {
        **inputs,
        "attention_mask": inputs["attention_mask"].sort(dim=1, descending=True).values,
    }
    """Autograd through the functional path == autograd through PEFT's own LoRA layers (fp64)."""
    model = MODEL_BUILDERS["qwen2"](seed=0).double()
    spec = tiny_spec(model)
    adapter = random_adapter(spec, seed=12, scale=0.2, dtype=torch.float64)
    pm = peft_model_with(model, adapter)
    for t in [*adapter.A.values(), *adapter.B.values()]:
        t.requires_grad_()
    weights = torch.randn(128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (functional_forward(model, adapter, **inputs).logits @ weights).square().mean().backward()
    (pm(**inputs).logits @ weights).square().mean().backward()
    for name, module in pm.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            parts = name.split(".")
            key = (int(parts[parts.index("layers") + 1]), parts[-1])
            torch.testing.assert_close(
                adapter.A[key].grad, module.lora_A["default"].weight.grad, atol=1e-12, rtol=1e-9
            )
            torch.testing.assert_close(
                adapter.B[key].grad, module.lora_B["default"].weight.grad, atol=1e-12, rtol=1e-9
            )


def test_dtype_follows_activations():
    model = MODEL_BUILDERS["llama"](seed=0).to(torch.bfloat16)
    adapter = random_adapter(tiny_spec(model), seed=1, scale=0.2)  # fp32 tensors
    for t in [*adapter.A.values(), *adapter.B.values()]:
        t.requires_grad_()
    ids = torch.randint(3, 128, (2, 4))
    out = functional_forward(model, adapter, input_ids=ids)
    assert out.logits.dtype == torch.bfloat16
    out.logits.float().sum().backward()
    a = adapter.A[(0, "q_proj")]
    assert a.grad is not None and a.grad.dtype == torch.float32 and a.grad.abs().sum() > 0


def test_hooks_removed_after_exception(model, inputs):
    adapter = random_adapter(tiny_spec(model), seed=1)
    snap = state_snapshot(model)

    def boom(*_):
        raise RuntimeError("boom")

    handle = model.model.layers[1].mlp.register_forward_hook(boom)
    for kw in ({}, {"gradient_checkpointing": True}):
        with pytest.raises(RuntimeError, match="boom"):
            functional_forward(model, adapter, **inputs, **kw)
    handle.remove()
    assert_no_hooks(model)
    assert_state_unchanged(model, snap)


def test_bad_calls(model):
    spec = tiny_spec(model)
    batch = random_batch(spec, n=3, seed=1)
    ids = torch.randint(3, 128, (4, 5))
    with pytest.raises(LoraError, match="not a multiple of 3 adapters"):
        functional_forward(model, batch, input_ids=ids)
    with pytest.raises(LoraError, match="input_ids or inputs_embeds"):
        functional_forward(model, batch)
    with pytest.raises(LoraError, match="LoraAdapter or LoraBatch"):
        functional_forward(model, {"A": 1}, input_ids=ids)
    with pytest.raises(LoraError, match="labels"):
        functional_forward(model, batch, input_ids=ids[:3], labels=ids[:3], adapter_chunk_size=1)
    other = MODEL_BUILDERS["llama"](seed=0, hidden=48, heads=4, kv_heads=2)
    with pytest.raises(LoraKeyMismatchError, match="shape errors"):
        functional_forward(other, batch, input_ids=ids[:3])
    deep = tiny_spec(MODEL_BUILDERS["llama"](seed=0, layers=4))
    with pytest.raises(LoraKeyMismatchError, match=r"extra 14"):
        functional_forward(model, random_adapter(deep), input_ids=ids)
    assert_no_hooks(model)
