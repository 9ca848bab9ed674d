"""PEFT LoRA variants beyond plain LoRA, each against PEFT's own forward on tiny models.

One table drives every test: DoRA (magnitude vectors), rank_pattern / alpha_pattern (per-key
ranks and scales, with and without rsLoRA), layers_to_transform, and their combinations. The
adapters are written by PEFT itself (random A, B and, for DoRA, perturbed magnitudes), then read
by llgbm-flora and run through `functional_forward` (hooks) and `fused_hidden_states`.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from llgbm_flora import (
    LoraBatch,
    LoraError,
    LoraKeyMismatchError,
    adapter_from_data,
    adapter_layout,
    functional_forward,
    inspect_adapter,
    load_adapter,
    read_adapter_data,
    save_adapter,
)
from llgbm_flora.fused import fused_hidden_states
from llgbm_flora.testing import MODEL_BUILDERS, random_adapter, tiny_spec
from peft import LoraConfig, PeftModel, get_peft_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "dora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "dora_all_qwen2": dict(target_modules=ALL, use_dora=True, arch="qwen2"),
    "rank_alpha_pattern": dict(
        target_modules=ALL,
        rank_pattern={"q_proj": 2, r"model\.layers\.1\.self_attn\.v_proj": 6, "gate_proj": 8},
        alpha_pattern={"down_proj": 3, "up_proj": 12},
    ),
    "pattern_rslora": dict(
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
        rank_pattern={"k_proj": 8},
        alpha_pattern={"q_proj": 5},
        use_rslora=True,
    ),
    "layers_to_transform": dict(target_modules=ALL, layers_to_transform=[1]),
    "dora_pattern_layers": dict(
        target_modules=["q_proj", "gate_proj", "up_proj"],
        use_dora=True,
        rank_pattern={"up_proj": 2},
        layers_to_transform=[0],
        arch="mistral",
    ),
}


def _peft_adapter(case: str, path, seed: int):
    """Write the case's adapter with PEFT; returns (arch, directory)."""
    kw = dict(CASES[case])
    arch = kw.pop("arch", "llama")
    base = MODEL_BUILDERS[arch](seed=0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **kw)
    pm = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in name:
                # PEFT starts m at ||W + sBA||, which makes DoRA a plain LoRA; move it off.
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=gen))
    pm.save_pretrained(path)
    return arch, path


def _peft_hidden(arch: str, path, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last hidden state) from PEFT's own model with the adapter loaded."""
    pm = PeftModel.from_pretrained(MODEL_BUILDERS[arch](seed=0), path).eval()
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def _inputs(rows: int = 3, T: int = 8):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (rows, T), generator=gen)
    lengths = torch.tensor([T, T - 3, T - 1][:rows])
    mask = (torch.arange(T) < lengths[:, None]).long()
    return torch.where(mask.bool(), ids, 0), mask, lengths


@pytest.mark.parametrize("case", list(CASES))
def test_functional_and_fused_equal_peft(case, tmp_path):
    arch, path = _peft_adapter(case, tmp_path / "a", seed=1)
    model = MODEL_BUILDERS[arch](seed=0)
    adapter = load_adapter(path, model=model)
    spec = adapter.spec
    kw = CASES[case]
    assert spec.use_dora == bool(kw.get("use_dora"))
    assert spec.uniform == ("rank_pattern" not in kw and "alpha_pattern" not in kw)
    assert inspect_adapter(path, model=model) == spec  # header only: the same structure

    ids, mask, lengths = _inputs()
    ref_logits, ref_hidden = _peft_hidden(arch, path, ids, mask)
    base = model(input_ids=ids, attention_mask=mask).logits
    assert (ref_logits - base).abs().max() > 0.05  # the adapter matters
    with torch.no_grad():
        ours = functional_forward(model, adapter, input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref_logits[real], rtol=0, atol=2e-5)

    last = lengths - 1
    rows = torch.arange(len(ids))
    with torch.no_grad():
        for packed in (None, lengths):
            fused = fused_hidden_states(model, adapter, ids, lengths=packed, select=last)
            torch.testing.assert_close(fused, ref_hidden[rows, last], rtol=0, atol=2e-5)


@pytest.mark.parametrize("case", ["dora", "rank_alpha_pattern", "dora_pattern_layers"])
def test_batch_of_two_equals_each_alone(case, tmp_path):
    """A LoraBatch of two adapters of one structure: each row group gets its own adapter."""
    arch, p1 = _peft_adapter(case, tmp_path / "a1", seed=1)
    _, p2 = _peft_adapter(case, tmp_path / "a2", seed=2)
    model = MODEL_BUILDERS[arch](seed=0)
    a1, a2 = load_adapter(p1, model=model), load_adapter(p2, model=model)
    batch = LoraBatch.from_adapters([a1, a2])
    assert (batch.magnitude is not None) == a1.spec.use_dora
    ids, mask, lengths = _inputs()
    ids2, mask2 = ids.repeat(2, 1), mask.repeat(2, 1)
    with torch.no_grad():
        got = functional_forward(model.model, batch, input_ids=ids2, attention_mask=mask2)
        fused = fused_hidden_states(model, batch, ids2, lengths=lengths.repeat(2))
    real = mask.bool()
    for i, path in enumerate((p1, p2)):
        _, ref = _peft_hidden(arch, path, ids, mask)
        sl = slice(3 * i, 3 * (i + 1))
        torch.testing.assert_close(got.last_hidden_state[sl][real], ref[real], rtol=0, atol=2e-5)
        torch.testing.assert_close(fused[sl][real], ref[real], rtol=0, atol=2e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_exact_and_peft_loads_ours(case, tmp_path):
    arch, path = _peft_adapter(case, tmp_path / "a", seed=3)
    adapter = load_adapter(path)
    out = save_adapter(adapter, tmp_path / "ours")
    again = load_adapter(out)
    assert again.spec == adapter.spec
    keys = adapter.spec.keys()
    for k in keys:
        assert torch.equal(again.A[k], adapter.A[k]) and torch.equal(again.B[k], adapter.B[k])
        if adapter.magnitude is not None:
            assert torch.equal(again.magnitude[k], adapter.magnitude[k])
    ids, mask, _ = _inputs()
    ref, _ = _peft_hidden(arch, path, ids, mask)
    theirs, _ = _peft_hidden(arch, out, ids, mask)  # PEFT reads what we wrote, patterns included
    torch.testing.assert_close(theirs, ref, rtol=0, atol=1e-6)


def test_gradients_reach_dora_and_pattern_tensors(tmp_path):
    """Fused and hooked paths give the same gradients to A, B and the magnitudes (float64)."""
    _, path = _peft_adapter("dora_pattern_layers", tmp_path / "a", seed=4)
    model = MODEL_BUILDERS["mistral"](seed=0).double()
    adapter = load_adapter(path, model=model).to(dtype=torch.float64)
    ids, mask, lengths = _inputs()
    rows, last = torch.arange(3), lengths - 1

    def grads(fused: bool) -> list[torch.Tensor]:
        batch = LoraBatch.from_adapters([adapter])
        leaves = [*batch.A.values(), *batch.B.values(), *batch.magnitude.values()]
        for t in leaves:
            t.requires_grad_()
        if fused:
            h = fused_hidden_states(model, batch, ids, lengths=lengths, select=last)
        else:
            out = functional_forward(model.model, batch, input_ids=ids, attention_mask=mask)
            h = out.last_hidden_state[rows, last]
        (h * torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)).sum().backward()
        return [t.grad for t in leaves]

    # HF's RMSNorm computes in float32 even in a float64 model: agreement to ~1e-6 relative.
    for got, ref in zip(grads(True), grads(False), strict=True):
        assert ref is not None and ref.norm() > 0
        assert (got - ref).norm() / ref.norm() < 1e-5


def test_uniform_spec_unchanged():
    """A plain adapter: no pattern, no DoRA, the old repr, structure and scale."""
    model = MODEL_BUILDERS["llama"](seed=0)
    spec = tiny_spec(model, rank=4, alpha=6)
    assert spec.uniform and not spec.use_dora and spec.max_rank == 4
    assert "pattern" not in repr(spec) and "dora" not in repr(spec)
    assert spec.structure == (spec.target_modules, spec.layers, 4, 1.5, spec.shapes)
    keys = spec.keys()
    assert all(spec.scale_of(k) == 1.5 and spec.rank_of(k) == 4 for k in keys)
    # A pattern that only repeats the defaults is the same structure.
    same = spec.replace(rank_pattern=(((0, "q_proj"), 4),), alpha_pattern={(1, "v_proj"): 6})
    assert same == spec and same.uniform
    adapter = random_adapter(spec, seed=0)
    assert adapter.magnitude is None
    torch.testing.assert_close(
        adapter.delta_weight((0, "q_proj")),
        1.5 * adapter.B[(0, "q_proj")] @ adapter.A[(0, "q_proj")],
    )


def test_bad_pattern_and_dora_inputs_are_one_line(tmp_path):
    _, path = _peft_adapter("dora", tmp_path / "a", seed=5)
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())

    def with_config(**changes):
        d = copy.deepcopy(cfg)
        d.update(changes)
        cfg_file.write_text(json.dumps(d))

    with_config(rank_pattern={"q_proj": 3})
    with pytest.raises(LoraKeyMismatchError, match=r"r=3 via rank_pattern") as err:
        load_adapter(path)
    assert "\n" not in str(err.value)
    with_config(rank_pattern={"q_proj": 0})
    with pytest.raises(LoraError, match=r"rank_pattern\['q_proj'\] must be a positive int"):
        load_adapter(path)
    with_config(alpha_pattern={"(": 2})
    with pytest.raises(LoraError, match="is not a regex"):
        load_adapter(path)
    with_config(use_dora=False)  # magnitude tensors without DoRA are not silently dropped
    with pytest.raises(LoraKeyMismatchError, match="lora_magnitude_vector"):
        load_adapter(path)
    spec = tiny_spec(MODEL_BUILDERS["llama"](seed=0))
    with pytest.raises(LoraError, match="not one of the adapter's keys"):
        spec.replace(rank_pattern={(5, "q_proj"): 2})
    dora = random_adapter(spec, seed=0)
    with pytest.raises(LoraError, match="needs magnitude vectors"):
        type(dora)(spec.replace(use_dora=True), dora.A, dora.B)
    _, good = _peft_adapter("dora", tmp_path / "b", seed=6)
    with pytest.raises(LoraError, match="no base-independent delta-W"):
        load_adapter(good).delta_weight((0, "q_proj"))


@pytest.mark.parametrize("case", list(CASES))
def test_read_in_one_piece_equals_load_adapter(case, tmp_path):
    """peft_layout's path (one read of the data section, tensors cut from it) = load_adapter."""
    _, path = _peft_adapter(case, tmp_path / "a", seed=3)
    lay = adapter_layout(path)
    data = read_adapter_data(lay, torch.full((lay.nbytes + 16,), 0xAB, dtype=torch.uint8))
    got, ref = adapter_from_data(lay, data), load_adapter(path)
    assert lay.spec == ref.spec == inspect_adapter(path)
    for part in ("A", "B", "magnitude"):
        x, y = getattr(got, part), getattr(ref, part)
        assert (x is None) == (y is None) and (x is None or x.keys() == y.keys())
        for k in x or {}:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (part, k)
