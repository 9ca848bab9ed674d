"""compute_deltas against independent paths: a hand-merged fresh model, PEFT, batching, autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llgbm_delta import (
    DeltaCache,
    DeltaSpec,
    base_activation,
    compute_deltas,
    delta_for_lora,
    generic_probes,
    model_fingerprint,
    run_deltas,
)
from llgbm_delta.spec import DEFAULT_SPEC
from llgbm_flora import LoraBatch, load_adapter

from .conftest import merged_reference_model, reference_vector


def _reference_deltas(base_dir, tok, adapter_dirs, spec=DEFAULT_SPEC) -> np.ndarray:
    texts = generic_probes().texts
    kw = {"layer": spec.layer, "token": spec.token}
    v0 = reference_vector(merged_reference_model(base_dir, None), tok, texts, **kw)
    rows = [
        reference_vector(merged_reference_model(base_dir, d), tok, texts, **kw) - v0
        for d in adapter_dirs
    ]
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("method", ["flora", "peft"])
def test_equals_from_scratch_reference(base_dir, tok, adapter_dirs, method):
    got = compute_deltas(
        base_dir, adapter_dirs, progress=False, method=method, adapters_per_batch=2
    )
    ref = _reference_deltas(base_dir, tok, adapter_dirs)
    assert got.dtype == np.float32 and got.shape == (len(adapter_dirs), 64)
    assert np.abs(ref).max() > 0.1  # the adapters really move the activation
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_mean_token_rule_equals_reference(base_dir, tok, adapter_dirs):
    spec = DeltaSpec(token="mean")
    got = compute_deltas(base_dir, adapter_dirs[:2], spec=spec, progress=False)
    np.testing.assert_allclose(
        got, _reference_deltas(base_dir, tok, adapter_dirs[:2], spec), atol=1e-5
    )


def test_zero_b_adapter_gives_zero_delta(base_dir, zero_adapter_dir):
    for method in ("flora", "peft"):
        got = compute_deltas(base_dir, [zero_adapter_dir], progress=False, method=method)
        assert np.abs(got).max() <= 1e-6, method


def test_batch_equals_each_alone(model, tok, adapter_dirs):
    together = compute_deltas((model, tok), adapter_dirs, progress=False, adapters_per_batch=8)
    alone = np.concatenate(
        [compute_deltas((model, tok), [d], progress=False) for d in adapter_dirs]
    )
    np.testing.assert_allclose(together, alone, rtol=0, atol=2e-6)
    chunked = compute_deltas(
        (model, tok), adapter_dirs, progress=False, adapters_per_batch=8, adapter_chunk_size=1
    )
    np.testing.assert_allclose(chunked, alone, rtol=0, atol=2e-6)


def test_order_is_input_order_and_given_model_untouched(model, tok, adapter_dirs):
    before = model_fingerprint(model)
    order = [4, 0, 3, 1]
    got = compute_deltas((model, tok), [adapter_dirs[i] for i in order], progress=False)
    ref = compute_deltas((model, tok), adapter_dirs, progress=False, method="peft")
    np.testing.assert_allclose(got, ref[order], atol=1e-5)
    assert model_fingerprint(model) == before
    # The PEFT path unloaded its layers: the caller's model is plain again.
    assert not any("lora" in name for name, _ in model.named_modules())


def test_lora_adapter_objects_accepted(model, tok, adapter_dirs):
    objs = [load_adapter(d) for d in adapter_dirs[:2]]
    r = run_deltas((model, tok), objs, progress=False)
    assert r.names == ["adapter[0]", "adapter[1]"]
    np.testing.assert_allclose(
        r.deltas, compute_deltas((model, tok), adapter_dirs[:2], progress=False), atol=0
    )


def test_differentiable_path_equals_cached_teacher_delta(model, tok, adapter_dirs, tmp_path):
    dirs = [adapter_dirs[i] for i in (0, 1, 2)]  # one structure, so they stack into a LoraBatch
    cache = DeltaCache(tmp_path / "cache")
    result = run_deltas((model, tok), dirs, cache=cache, progress=False)
    cached = np.stack([cache.get(k) for k in result.keys])

    model.requires_grad_(False)  # a frozen base, as in training
    lora = LoraBatch.from_adapters([load_adapter(d) for d in dirs])
    for t in [*lora.A.values(), *lora.B.values()]:
        t.requires_grad_(True)
    base = base_activation(model, tok, generic_probes())
    d = delta_for_lora(model, tok, lora, generic_probes(), base=base)  # [3, H]
    assert d.shape == (3, 64) and d.dtype == torch.float32 and d.requires_grad
    np.testing.assert_allclose(d.detach().numpy(), cached, rtol=0, atol=1e-6)

    d.pow(2).sum().backward()
    keys = lora.spec.keys()
    for key in keys:
        assert lora.A[key].grad is not None and lora.A[key].grad.abs().sum() > 0, key
        assert lora.B[key].grad is not None and lora.B[key].grad.abs().sum() > 0, key


def test_gradients_equal_peft_autograd(model, tok, adapter_dirs):
    """Gradients of <delta, w> wrt A and B: flora's path vs autograd through a PeftModel."""
    from llgbm_delta import activations, encode_probes
    from peft import PeftModel

    model.requires_grad_(False)
    batch = encode_probes(tok, generic_probes())
    base = base_activation(model, tok, batch)
    w = torch.randn(64, generator=torch.Generator().manual_seed(0))

    lora = LoraBatch.from_adapters([load_adapter(adapter_dirs[0])])
    for t in [*lora.A.values(), *lora.B.values()]:
        t.requires_grad_(True)
    (delta_for_lora(model, tok, lora, batch, base=base)[0] * w).sum().backward()

    peft_model = PeftModel.from_pretrained(model, str(adapter_dirs[0]), is_trainable=True)
    peft_delta = activations(peft_model.get_base_model(), batch)[0] - base
    (peft_delta * w).sum().backward()
    params = dict(peft_model.named_parameters())
    keys = lora.spec.keys()
    for layer, module in keys:
        sub = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        stem = f"base_model.model.model.layers.{layer}.{sub}.{module}"
        ga = params[f"{stem}.lora_A.default.weight"].grad
        gb = params[f"{stem}.lora_B.default.weight"].grad
        assert gb.abs().max() > 1e-4
        torch.testing.assert_close(lora.A[(layer, module)].grad[0], ga, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(lora.B[(layer, module)].grad[0], gb, rtol=1e-3, atol=1e-5)


def test_a_leaking_adapter_is_caught(model, tok, adapter_dirs, monkeypatch):
    """If anything changed the base while deltas were computed, the run fails loudly."""
    import llgbm_delta.compute as compute
    from llgbm_delta import BaseModelError

    original = compute.delta_for_lora

    def leaky(model, *args, **kwargs):
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.add_(0.05)  # an adapter merged in place
        return original(model, *args, **kwargs)

    monkeypatch.setattr(compute, "delta_for_lora", leaky)
    with pytest.raises(BaseModelError, match="base activation drifted"):
        compute_deltas((model, tok), adapter_dirs[:2], progress=False)
