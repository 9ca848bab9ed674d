"""The one delta definition: which hidden state, which token, padding, spec validation."""

from __future__ import annotations

import pytest
import torch
from llgbm_delta import (
    DeltaSpec,
    DeltaSpecError,
    activations,
    base_activation,
    encode_probes,
    generic_probes,
    last_token_index,
    pool_tokens,
)
from llgbm_delta.delta import backbone_of
from llgbm_flora import LoraBatch, load_adapter

from .conftest import reference_vector


def test_last_hidden_state_is_hidden_states_minus_one_post_norm(model, tok):
    enc = tok(generic_probes().texts[0], return_tensors="pt")
    with torch.no_grad():
        full = model(**enc, output_hidden_states=True)
        backbone = backbone_of(model)(**enc)
        pre_norm = full.hidden_states[-2]
    assert backbone_of(model) is model.model
    torch.testing.assert_close(full.hidden_states[-1], backbone.last_hidden_state, rtol=0, atol=0)
    # It is the normed state: RMSNorm of the last layer's output, not that output itself.
    assert not torch.allclose(full.hidden_states[-1], pre_norm)


def test_last_token_index_any_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 1]


def test_pool_mean_ignores_padding_even_nan():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    hidden[0, 2] = float("nan")  # a padded position
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    pooled = pool_tokens(hidden, mask, "mean")
    torch.testing.assert_close(pooled, torch.tensor([[1.0, 2.0], [9.0, 10.0]]))
    last = pool_tokens(hidden, mask, "last")
    torch.testing.assert_close(last, torch.tensor([[2.0, 3.0], [10.0, 11.0]]))


def test_encode_probes_pads_both_sides(tok):
    probes = generic_probes()
    right = encode_probes(tok, probes, padding_side="right")
    left = encode_probes(tok, probes, padding_side="left")
    lengths = [len(tok(t)["input_ids"]) for t in probes.texts]
    assert right.attention_mask.sum(1).tolist() == lengths == left.attention_mask.sum(1).tolist()
    assert len(set(lengths)) > 1  # the probes really need padding
    for i, n in enumerate(lengths):
        assert right.input_ids[i, :n].tolist() == left.input_ids[i, -n:].tolist()
        assert right.position_ids[i, :n].tolist() == list(range(n))
        assert left.position_ids[i, -n:].tolist() == list(range(n))
    assert right.token_hash == left.token_hash


@pytest.mark.parametrize("token", ["last", "mean"])
def test_left_and_right_padding_give_equal_deltas(model, tok, adapter_dirs, token):
    """Both paths agree under both paddings: the fused (packed) forward, and the hooked HF
    forward padded (unpad=False) or in unpadded groups."""
    spec = DeltaSpec(token=token)
    lora = LoraBatch.from_adapters([load_adapter(p) for p in adapter_dirs[:3]])
    out = {}
    with torch.no_grad():
        for side in ("left", "right"):
            batch = encode_probes(tok, generic_probes(), padding_side=side)
            for unpad in (False, True):
                kw = {"unpad": unpad, "fused": False}
                v = activations(model, batch, spec, lora, **kw)
                out[side, "hooks", unpad] = v - activations(model, batch, spec, **kw)
            v = activations(model, batch, spec, lora, fused=True)
            out[side, "fused"] = v - activations(model, batch, spec, fused=True)
            # The default takes the fused path for this Llama model.
            assert torch.equal(activations(model, batch, spec, lora), v)
    ref = out["right", "hooks", True]
    assert ref.abs().max() > 1e-2
    for key, value in out.items():
        torch.testing.assert_close(value, ref, rtol=0, atol=1e-5, msg=str(key))


def test_fused_path_refuses_what_it_cannot_compute(model, tok):
    batch = encode_probes(tok, generic_probes())
    with pytest.raises(DeltaSpecError, match="computes the last layer only"):
        activations(model, batch, DeltaSpec(layer=1), fused=True)
    # Left to the default, another layer silently takes the hooked path (tested equal below).
    activations(model, batch, DeltaSpec(layer=1))


def test_right_padded_view_of_left_padding(tok):
    left = encode_probes(tok, generic_probes(), padding_side="left")
    right = encode_probes(tok, generic_probes(), padding_side="right")
    ids, lengths = left.right_padded()
    assert lengths.tolist() == right.attention_mask.sum(1).tolist()
    real = right.attention_mask.bool()
    assert torch.equal(ids[real], right.input_ids[real])


def test_length_groups_strip_padding(tok):
    right = encode_probes(tok, generic_probes(), padding_side="right")
    left = encode_probes(tok, generic_probes(), padding_side="left")
    groups_r, groups_l = right.length_groups(), left.length_groups()
    assert [i for i, _ in groups_r] == [i for i, _ in groups_l]
    assert sorted(i for idx, _ in groups_r for i in idx) == list(range(5))
    for (idx, g), (_, h) in zip(groups_r, groups_l):
        assert torch.equal(g.input_ids, h.input_ids) and bool(g.attention_mask.all())
        for j, i in enumerate(idx):
            assert g.input_ids[j].tolist() == tok(generic_probes().texts[i])["input_ids"]


@pytest.mark.parametrize(("layer", "token"), [(-1, "last"), (-1, "mean"), (1, "last"), (0, "mean")])
def test_base_activation_matches_hand_reading(model, tok, layer, token):
    spec = DeltaSpec(layer=layer, token=token)
    v = base_activation(model, tok, generic_probes(), spec)
    ref = reference_vector(model, tok, generic_probes().texts, layer=layer, token=token)
    assert v.dtype == torch.float32 and v.shape == (model.config.hidden_size,)
    torch.testing.assert_close(v.double(), ref, rtol=0, atol=1e-5)


def test_layer_out_of_range_is_clear(model, tok):
    with pytest.raises(DeltaSpecError, match="out of range: the model has 3 hidden states"):
        base_activation(model, tok, generic_probes(), DeltaSpec(layer=7))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"token": "first"}, "DeltaSpec.token must be one of last, mean"), ({"layer": "1"}, "layer")],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(DeltaSpecError, match=message):
        DeltaSpec(**kwargs)


def test_spec_hash_distinguishes_fields():
    hashes = {DeltaSpec().hash, DeltaSpec(token="mean").hash, DeltaSpec(layer=3).hash}
    assert len(hashes) == 3
    assert DeltaSpec().hash == DeltaSpec(layer=-1, token="last").hash
