"""DeltaCache: hits, invalidation, moves, corruption, binding to one base, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil

import numpy as np
import pytest
import torch
from llgbm_delta import BaseInfo, CacheError, DeltaCache, entry_key, model_fingerprint, run_deltas
from llgbm_delta.testing import make_peft_adapter
from transformers import AutoModelForCausalLM

BASE = BaseInfo(fingerprint="f" * 64, name="base", hidden_size=8, dtype="float32")


def _meta(i: int, base: str = "f" * 64) -> dict:
    return {
        "base_fingerprint": base,
        "probe_hash": "p" * 64,
        "probe_name": "generic",
        "token_hash": "t" * 64,
        "spec": {"layer": -1, "token": "last"},
        "spec_hash": "s" * 64,
        "adapter_hash": f"{i:064x}",
        "adapter_name": f"adapter_{i:03d}",
    }


def _key(i: int) -> str:
    m = _meta(i)
    return entry_key(
        base_fingerprint=m["base_fingerprint"],
        probe_hash=m["probe_hash"],
        token_hash=m["token_hash"],
        spec_hash=m["spec_hash"],
        adapter_hash=m["adapter_hash"],
    )


def _vec(i: int) -> np.ndarray:
    return np.arange(8, dtype=np.float32) + i


def test_put_get_roundtrip_and_manifest(tmp_path):
    cache = DeltaCache(tmp_path / "c")
    cache.bind(BASE)
    em = cache.put(_meta(1), _vec(1))
    assert em.key == _key(1)
    np.testing.assert_array_equal(cache.get(_key(1)), _vec(1))
    assert cache.get(_key(2)) is None
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["base"]["fingerprint"] == "f" * 64
    assert manifest["entries"][_key(1)]["adapter_name"] == "adapter_001"
    assert [e.adapter_name for e in cache.entries()] == ["adapter_001"]


def test_binding_to_another_base_is_refused(tmp_path):
    cache = DeltaCache(tmp_path / "c")
    cache.bind(BASE)
    cache.bind(BASE)  # same base: fine
    other = BaseInfo(fingerprint="e" * 64, name="other", hidden_size=8, dtype="float32")
    with pytest.raises(CacheError, match=r"was written for base 'base'.*not 'other'"):
        cache.bind(other)


def test_cache_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CacheError, match="not a directory"):
        DeltaCache(tmp_path / "f").bind(BASE)


@pytest.mark.parametrize(
    "damage", ["truncate", "flip_data", "flip_header", "edit_name", "empty", "rename"]
)
def test_corrupt_entry_detected_never_returned(tmp_path, damage, caplog):
    cache = DeltaCache(tmp_path / "c")
    cache.put(_meta(1), _vec(1))
    cache.put(_meta(2), _vec(2))
    path = cache.entry_path(_key(1))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 5])
    elif damage == "flip_data":
        data[-3] ^= 0xFF  # inside the float32 payload
        path.write_bytes(bytes(data))
    elif damage == "flip_header":
        data[20] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "edit_name":  # a metadata field outside the key, same length
        path.write_bytes(bytes(data).replace(b"adapter_001", b"adapter_009"))
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # another entry's file under this key's name
        shutil.copy(cache.entry_path(_key(2)), path)
    assert cache.get(_key(1)) is None
    assert not path.exists() and len(list((tmp_path / "c" / "corrupt").iterdir())) == 1
    assert cache.problems and cache.problems[0][0] == _key(1)
    assert "corrupt" in caplog.text
    np.testing.assert_array_equal(cache.get(_key(2)), _vec(2))


def test_non_finite_delta_is_refused(tmp_path):
    with pytest.raises(CacheError, match="non-finite"):
        DeltaCache(tmp_path / "c").put(_meta(1), np.full(8, np.nan, np.float32))


def test_export_npz(tmp_path):
    cache = DeltaCache(tmp_path / "c")
    cache.bind(BASE)
    cache.put_many([(_meta(i), _vec(i)) for i in (3, 1, 2)])
    out = cache.export(tmp_path / "out" / "deltas.npz")
    with np.load(out) as z:
        assert z["adapter_names"].tolist() == ["adapter_001", "adapter_002", "adapter_003"]
        np.testing.assert_array_equal(z["deltas"], np.stack([_vec(1), _vec(2), _vec(3)]))
        assert z["deltas"].dtype == np.float32
        assert z["keys"].tolist() == [_key(1), _key(2), _key(3)]
        meta = json.loads(str(z["metadata"]))
        assert meta["base"]["fingerprint"] == "f" * 64
    assert not list(out.parent.glob(".*tmp"))


def test_rebuild_manifest_from_entries(tmp_path):
    cache = DeltaCache(tmp_path / "c")
    cache.put_many([(_meta(i), _vec(i)) for i in range(3)])
    cache.manifest_path.write_text(
        json.dumps({"format": "llgbm-delta-cache", "version": 1, "base": None, "entries": {}})
    )
    assert cache.rebuild_manifest() == 3
    assert len(json.loads(cache.manifest_path.read_text())["entries"]) == 3


def test_unreadable_manifest_is_clear(tmp_path):
    cache = DeltaCache(tmp_path / "c")
    cache.put(_meta(1), _vec(1))
    cache.manifest_path.write_text("{oops")
    with pytest.raises(CacheError, match=r"manifest\.json: not valid JSON"):
        cache.base_info()


def _writer(root: str, ids: list[int], start) -> None:
    start.wait()
    cache = DeltaCache(root)
    for i in ids:
        cache.put(_meta(i), _vec(i))


def _reader(root: str, ids: list[int], start, bad) -> None:
    start.wait()
    cache = DeltaCache(root)
    for _ in range(5):
        for i in ids:
            v = cache.get(_key(i))
            if v is not None and not np.array_equal(v, _vec(i)):
                bad.value += 1
    bad.value += len(cache.problems)


def test_concurrent_writers_two_processes(tmp_path):
    root = str(tmp_path / "c")
    ctx = mp.get_context("fork")  # children only touch numpy and files
    start = ctx.Event()
    bad = ctx.Value("i", 0)
    a, b = list(range(0, 80)), list(range(40, 120))  # 40 entries written by both
    procs = [
        ctx.Process(target=_writer, args=(root, a, start)),
        ctx.Process(target=_writer, args=(root, b[::-1], start)),
        ctx.Process(target=_reader, args=(root, list(range(120)), start, bad)),
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert bad.value == 0
    cache = DeltaCache(root)
    assert cache.verify() == []
    assert len(cache.entries()) == 120
    manifest = json.loads(cache.manifest_path.read_text())
    assert set(manifest["entries"]) == {_key(i) for i in range(120)}
    for i in range(120):
        np.testing.assert_array_equal(cache.get(_key(i)), _vec(i))
    leftovers = [p.name for p in (tmp_path / "c").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


# -- through compute: content keys ---------------------------------------------------------


def test_hit_move_and_invalidation(model, tok, adapter_dirs, tmp_path):
    cache = DeltaCache(tmp_path / "cache")
    src = shutil.copytree(adapter_dirs[0], tmp_path / "a0")
    first = run_deltas((model, tok), [src], cache=cache, progress=False)
    assert first.cached == [False]

    again = run_deltas((model, tok), [src], cache=cache, progress=False)
    assert again.cached == [True] and again.keys == first.keys
    np.testing.assert_array_equal(again.deltas, first.deltas)

    moved = src.rename(tmp_path / "elsewhere")
    after_move = run_deltas((model, tok), [moved], cache=cache, progress=False)
    assert after_move.cached == [True] and after_move.keys == first.keys

    # New weights in the same directory: a different entry, computed afresh.
    shutil.rmtree(moved)
    make_peft_adapter(model, moved, seed=999)
    changed = run_deltas((model, tok), [moved], cache=cache, progress=False)
    assert changed.cached == [False] and changed.keys != first.keys
    assert not np.allclose(changed.deltas, first.deltas)
    assert len(cache.entries()) == 2


def test_corrupt_entry_is_recomputed_to_the_same_value(model, tok, adapter_dirs, tmp_path):
    cache = DeltaCache(tmp_path / "cache")
    first = run_deltas((model, tok), adapter_dirs[:2], cache=cache, progress=False)
    path = cache.entry_path(first.keys[0])
    path.write_bytes(path.read_bytes()[:-7])
    again = run_deltas((model, tok), adapter_dirs[:2], cache=cache, progress=False)
    assert again.cached == [False, True]
    assert [k for k, _ in again.corrupt] == [first.keys[0]]
    np.testing.assert_allclose(again.deltas, first.deltas, rtol=0, atol=1e-6)
    assert cache.get(first.keys[0]) is not None


def test_cache_from_another_base_is_refused(model, tok, adapter_dirs, tmp_path, base_dir):
    cache = DeltaCache(tmp_path / "cache")
    run_deltas((model, tok), adapter_dirs[:1], cache=cache, progress=False)
    other = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    assert model_fingerprint(other) != model_fingerprint(model)
    with pytest.raises(CacheError, match="use one cache directory per base model"):
        run_deltas((other, tok), adapter_dirs[:1], cache=cache, progress=False)


def test_fingerprint_sampled_mode_sees_changes(model, monkeypatch):
    import llgbm_delta.fingerprint as fp

    full = model_fingerprint(model)
    monkeypatch.setattr(fp, "FULL_HASH_MAX_BYTES", 0)
    sampled = model_fingerprint(model)
    assert sampled != full and sampled == model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3  # one element, off-sample
    changed = model_fingerprint(model)
    assert changed != sampled
    half = model.to(torch.bfloat16)
    assert model_fingerprint(half) not in (changed, sampled)
    assert model_fingerprint(half) == model_fingerprint(half)


@pytest.mark.parametrize("dora", [False, True])
def test_hash_from_the_read_bytes_is_the_content_hash(base_dir, adapter_dirs, tmp_path, dora):
    """compute_deltas hashes the bytes it read (adapter_data_hash); the cache keys must be the
    ones adapter_content_hash gives for the loaded tensors, so existing caches keep hitting."""
    from llgbm_delta.fingerprint import adapter_content_hash, adapter_data_hash
    from llgbm_flora import adapter_layout, load_adapter, read_adapter_data

    dirs = list(adapter_dirs)
    if dora:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        dirs = [make_peft_adapter(model, tmp_path / "dora", seed=7, use_dora=True)]
    hashes = set()
    for d in dirs:
        lay = adapter_layout(d)
        data = read_adapter_data(lay, torch.empty(lay.nbytes, dtype=torch.uint8))
        assert lay.spec.use_dora == dora
        h = adapter_data_hash(lay, data)
        assert h == adapter_content_hash(load_adapter(d))
        hashes.add(h)
    assert len(hashes) == len(dirs)
