"""peft_layout: a PEFT file read in one piece gives exactly the tensors load_adapter gives.

Our own adapters (fp32, bf16, fp16; PEFT-written variants: test_flora_peft_variants.py), read with adapter_layout + read_adapter_data, cut with adapter_from_data / batch_from_data; and
every way a file can be broken or change under the reader is refused.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from llgbm_flora import (
    LoraBatch,
    LoraFormatError,
    adapter_layout,
    batch_from_data,
    load_adapter,
    read_adapter_data,
    save_adapter,
)
from llgbm_flora import peft_layout as layout_mod
from llgbm_flora.testing import MODEL_BUILDERS, random_adapter, tiny_spec


def _read(path):
    lay = adapter_layout(path)
    data = torch.full((lay.nbytes + 16,), 0xAB, dtype=torch.uint8)  # poisoned, oversized
    return lay, read_adapter_data(lay, data)


def _same(a, b) -> None:
    assert a.spec == b.spec
    for part in ("A", "B", "magnitude"):
        x, y = getattr(a, part), getattr(b, part)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.keys() == y.keys()
            for k in x:
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (part, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_own_adapters_and_batches(dtype, tmp_path):
    model = MODEL_BUILDERS["qwen2"](seed=0)
    spec = tiny_spec(model)
    paths = [
        save_adapter(random_adapter(spec, seed=s, dtype=dtype), tmp_path / f"a{s}")
        for s in range(3)
    ]
    read = [_read(p) for p in paths]
    batch = batch_from_data([lay for lay, _ in read], [d for _, d in read])
    ref = LoraBatch.from_adapters([load_adapter(p) for p in paths])
    _same(batch, ref)
    assert all(v.dtype == dtype for v in batch.A.values())
    # A stays a view into the one stacked copy of the sections (no copy per key); B is copied.
    storages = {v.untyped_storage().data_ptr() for v in batch.A.values()}
    assert len(storages) == 1 and not any(v.is_contiguous() for v in batch.A.values())
    assert all(v.is_contiguous() for v in batch.B.values())


def test_batch_of_files_with_different_offsets(tmp_path):
    """Same structure, different header (metadata): byte offsets differ, tensors must not."""
    from safetensors.torch import load_file, save_file

    spec = tiny_spec(MODEL_BUILDERS["llama"](seed=0))
    p1 = save_adapter(random_adapter(spec, seed=1), tmp_path / "a1")
    p2 = save_adapter(random_adapter(spec, seed=2), tmp_path / "a2")
    st = p2 / "adapter_model.safetensors"
    save_file(load_file(st), st, metadata={"format": "pt", "note": "x" * 101})
    (l1, d1), (l2, d2) = _read(p1), _read(p2)
    assert l1.data_start != l2.data_start
    batch = batch_from_data([l1, l2], [d1, d2])
    _same(batch, LoraBatch.from_adapters([load_adapter(p1), load_adapter(p2)]))


def test_batch_refuses_other_structures(tmp_path):
    model = MODEL_BUILDERS["llama"](seed=0)
    p1 = save_adapter(random_adapter(tiny_spec(model, rank=4)), tmp_path / "a1")
    p2 = save_adapter(random_adapter(tiny_spec(model, rank=2)), tmp_path / "a2")
    (l1, d1), (l2, d2) = _read(p1), _read(p2)
    with pytest.raises(ValueError, match="differs in structure"):
        batch_from_data([l1, l2], [d1, d2])


def test_layout_is_memoised_on_config_and_header(tmp_path, monkeypatch):
    spec = tiny_spec(MODEL_BUILDERS["llama"](seed=0))
    paths = [save_adapter(random_adapter(spec, seed=s), tmp_path / f"a{s}") for s in range(3)]
    layout_mod._memo.clear()
    calls = []
    real = layout_mod._parse
    monkeypatch.setattr(layout_mod, "_parse", lambda *a: calls.append(1) or real(*a))
    layouts = [adapter_layout(p) for p in paths]
    assert len(calls) == 1  # one trainer, one header shape: parsed once
    assert [lay.file.parent for lay in layouts] == paths
    cfg = json.loads((paths[2] / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 3.0
    (paths[2] / "adapter_config.json").write_text(json.dumps(cfg))
    assert adapter_layout(paths[2]).spec.alpha == 3.0 and len(calls) == 2


def _rewrite_header(st, edit) -> None:
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    st.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def _first_tensor(h):
    return next(k for k in h if k != "__metadata__")


BROKEN = {
    "truncated data": lambda st: st.write_bytes(st.read_bytes()[:-5]),
    "extra bytes": lambda st: st.write_bytes(st.read_bytes() + b"\0\0"),
    "short file": lambda st: st.write_bytes(b"\1\2\3"),
    "header length past the end": lambda st: st.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"),
    "header not json": lambda st: st.write_bytes(struct.pack("<Q", 3) + b"{x}"),
    "offsets do not fit the shape": lambda st: _rewrite_header(
        st, lambda h: h[_first_tensor(h)].update(shape=[1])
    ),
    "unknown dtype": lambda st: _rewrite_header(
        st, lambda h: h[_first_tensor(h)].update(dtype="F8_E4M3")
    ),
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_broken_files_are_refused(how, tmp_path):
    spec = tiny_spec(MODEL_BUILDERS["llama"](seed=0))
    path = save_adapter(random_adapter(spec), tmp_path / "a")
    BROKEN[how](path / "adapter_model.safetensors")
    with pytest.raises(LoraFormatError, match="corrupt or unreadable safetensors"):
        adapter_layout(path)


def test_file_changed_after_its_layout_was_read(tmp_path):
    spec = tiny_spec(MODEL_BUILDERS["llama"](seed=0))
    path = save_adapter(random_adapter(spec), tmp_path / "a")
    lay = adapter_layout(path)
    st = path / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:-4])
    with pytest.raises(LoraFormatError, match="changed on disk"):
        read_adapter_data(lay, torch.empty(lay.nbytes, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        read_adapter_data(lay, torch.empty(lay.nbytes, dtype=torch.float32))


def test_bin_adapters_have_no_layout(tmp_path):
    spec = tiny_spec(MODEL_BUILDERS["llama"](seed=0))
    path = save_adapter(random_adapter(spec), tmp_path / "a")
    (path / "adapter_model.safetensors").unlink()
    assert adapter_layout(path) is None
