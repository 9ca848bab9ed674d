"""LoraSpec / LoraAdapter / LoraBatch: validation, ordering, indexing and the LoRA maths."""

from __future__ import annotations

import math

import pytest
import torch
from llgbm_flora import LoraAdapter, LoraBatch, LoraError, LoraKeyMismatchError, LoraSpec
from llgbm_flora.testing import MODEL_BUILDERS, random_adapter, random_batch, tiny_spec


def spec(**kw) -> LoraSpec:
    fields = {
        "base_model": "m",
        "target_modules": ("v_proj", "q_proj"),
        "layers": (1, 0),
        "rank": 2,
        "alpha": 4,
        "shapes": (("v_proj", 8, 4), ("q_proj", 8, 8)),
    }
    return LoraSpec(**{**fields, **kw})


def test_orders_are_canonical_and_keys_layer_major():
    s = spec()
    assert s.target_modules == ("q_proj", "v_proj") and s.layers == (0, 1)
    assert s.keys() == [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "v_proj")]
    assert s == spec(target_modules=("q_proj", "v_proj"), layers=(0, 1))
    assert s.in_out("v_proj") == (8, 4)
    assert s.num_params() == 2 * (2 * (8 + 8) + 2 * (8 + 4))
    assert s.scale == 2.0 and spec(use_rslora=True).scale == pytest.approx(4 / math.sqrt(2))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"rank": 0}, "rank must be a positive int"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"target_modules": ()}, "must not be empty"),
        ({"target_modules": "q_proj"}, "not a string"),
        ({"target_modules": ("self_attn.q_proj",), "shapes": ()}, "not a short module name"),
        ({"target_modules": ("q_proj", "q_proj"), "shapes": ()}, "duplicates"),
        ({"layers": (0, 0)}, "layers has duplicates"),
        ({"layers": (-1,)}, "non-negative ints"),
        ({"shapes": (("q_proj", 8, 8),)}, "each target module once"),
        ({"module_paths": (("q_proj", "model.layers.0.q_proj"),)}, "lacks '{layer}'"),
        ({"model_layers": 1}, "does not cover layers"),
    ],
)
def test_spec_validation(kw, message):
    with pytest.raises(LoraError, match=message):
        spec(**kw)


def test_in_out_unknown_module():
    with pytest.raises(LoraError, match="no shape for module 'o_proj'"):
        spec().in_out("o_proj")


def test_adapter_validation():
    s = spec()
    good = random_adapter(s, seed=0)
    A = dict(good.A)
    del A[(1, "v_proj")]
    with pytest.raises(LoraKeyMismatchError, match=r"missing 1: \(1, 'v_proj'\)"):
        LoraAdapter(s, A, good.B)
    with pytest.raises(LoraKeyMismatchError, match=r"extra 1: \(2, 'q_proj'\)"):
        LoraAdapter(s, {**good.A, (2, "q_proj"): torch.zeros(2, 8)}, good.B)
    with pytest.raises(
        LoraKeyMismatchError, match=r"\(0, 'q_proj'\) A\(3, 8\) B\(8, 2\) rank != 2"
    ):
        LoraAdapter(s, {**good.A, (0, "q_proj"): torch.zeros(3, 8)}, good.B)
    with pytest.raises(LoraKeyMismatchError, match=r"!= in/out \(8, 4\)"):
        LoraAdapter(s, good.A, {**good.B, (0, "v_proj"): torch.zeros(5, 2)})
    with pytest.raises(LoraKeyMismatchError, match=r"need \[n, r, in\]"):
        LoraBatch(s, good.A, good.B)


def test_batch_indexing_and_stacking():
    s = spec()
    batch = random_batch(s, n=3, seed=1)
    assert len(batch) == 3
    one = batch[1]
    assert isinstance(one, LoraAdapter)
    assert torch.equal(one.A[(0, "q_proj")], batch.A[(0, "q_proj")][1])
    assert torch.equal(batch[-1].B[(1, "v_proj")], batch.B[(1, "v_proj")][2])
    tail = batch[1:]
    assert isinstance(tail, LoraBatch) and len(tail) == 2
    with pytest.raises(IndexError):
        batch[3]
    again = LoraBatch.from_adapters([batch[i] for i in range(3)])
    for k in s.keys():  # noqa: SIM118 (LoraSpec.keys is a method returning a list)
        assert torch.equal(again.A[k], batch.A[k]) and torch.equal(again.B[k], batch.B[k])
    half = batch.to(dtype=torch.bfloat16)
    assert half.A[(0, "q_proj")].dtype == torch.bfloat16 and len(half) == 3
    # adapters differing only in base_model can share a batch; a different scale cannot
    renamed = LoraAdapter(s.replace(base_model="other"), one.A, one.B)
    assert len(LoraBatch.from_adapters([one, renamed])) == 2
    scaled = LoraAdapter(s.replace(alpha=8), one.A, one.B)
    with pytest.raises(LoraError, match="different structure or scale"):
        LoraBatch.from_adapters([one, scaled])
    with pytest.raises(LoraError, match="empty list"):
        LoraBatch.from_adapters([])
    with pytest.raises(LoraKeyMismatchError, match="adapter counts differ"):
        LoraBatch(s, batch.A, {**batch.B, (0, "q_proj"): batch.B[(0, "q_proj")][:2]})


def test_delta_weight_is_the_lora_update():
    model = MODEL_BUILDERS["llama"](seed=0)
    s = tiny_spec(model, rank=3, alpha=5, target_modules=("up_proj",))
    adapter = random_adapter(s, seed=2)
    key = (1, "up_proj")
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    expected = s.scale * (x @ adapter.A[key].T) @ adapter.B[key].T
    torch.testing.assert_close(x @ adapter.delta_weight(key).T, expected)
    assert adapter.delta_weight(key).shape == (64, 32)


def test_for_model_discovers_shapes_and_paths(family):
    model = MODEL_BUILDERS[family](seed=0, hidden=48, layers=3, heads=6, kv_heads=3)
    s = tiny_spec(model, rank=4)
    assert s.layers == (0, 1, 2) and s.model_layers == 3
    assert dict((m, (i, o)) for m, i, o in s.shapes) == {
        "q_proj": (48, 48),
        "k_proj": (48, 24),
        "v_proj": (48, 24),
        "o_proj": (48, 48),
        "gate_proj": (48, 96),
        "up_proj": (48, 96),
        "down_proj": (96, 48),
    }
    assert s.path_template("up_proj") == "model.layers.{layer}.mlp.up_proj"
    with pytest.raises(LoraKeyMismatchError, match="missing 1: qq_proj"):
        tiny_spec(model, target_modules=("q_proj", "qq_proj"))
    with pytest.raises(LoraKeyMismatchError, match=r"missing 7: \(5, 'q_proj'\)"):
        tiny_spec(model, layers=(0, 5))
