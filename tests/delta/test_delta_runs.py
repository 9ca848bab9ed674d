"""Runs that waste nothing: validation first, a commit per batch, no forward when all is cached.

Also the API around a run: `model=`/`tokenizer=` keywords, progress counted in computed
adapters, the counts line, read-only caches, probes longer than the model's context.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import llgbm_delta.compute as compute
import numpy as np
import pytest
import torch
from llgbm_delta import (
    AdapterError,
    CacheError,
    DeltaCache,
    DeltaError,
    DeltaWarning,
    compute_deltas,
    run_deltas,
)
from llgbm_delta.testing import make_peft_adapter
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def _nan_adapter(src: Path, out: Path) -> Path:
    """A copy of `src` whose tensors hold a NaN: loads fine, its delta is not finite."""
    import shutil

    shutil.copytree(src, out)
    f = out / "adapter_model.safetensors"
    tensors = load_file(f)
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, f)
    return out


def _forward_counter(model) -> list[int]:
    """Counts calls of any submodule (the fused path calls embed_tokens and rotary_emb too)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    for m in model.modules():
        m.register_forward_pre_hook(hook)
    return calls


# -- validation first ---------------------------------------------------------------------------


def test_bad_fifth_adapter_fails_before_the_model_loads(
    base_dir, adapter_dirs, tmp_path, monkeypatch
):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "use_dora": true}')
    import llgbm_delta.base as base_mod

    calls = []
    real = base_mod.load_base
    monkeypatch.setattr(base_mod, "load_base", lambda *a, **k: calls.append(1) or real(*a, **k))
    dirs = [*adapter_dirs[:4], bad]
    with pytest.raises(AdapterError, match=str(bad)):
        compute_deltas(base_dir, dirs, cache=tmp_path / "c", progress=False)
    assert calls == []  # refused from the config and headers alone
    r = run_deltas(base_dir, dirs, cache=tmp_path / "c", progress=False, keep_going=True)
    assert r.n_computed == 4 and [f.name for f in r.failures] == [str(bad)]
    assert len(DeltaCache(tmp_path / "c").entries()) == 4


@pytest.mark.parametrize("in_flight", [False, True], ids=["serial", "in_flight"])
def test_failure_mid_run_commits_the_batches_already_loaded(
    base_dir, adapter_dirs, tmp_path, monkeypatch, request, in_flight
):
    """An adapter that breaks after validation (here: its file changes under us) stops the run,
    but the adapters queued before it are computed and committed first. In flight: batches of
    one, read back as on CUDA, so batch 1 is still in flight when adapter 2 fails."""
    batch = 8
    if in_flight:
        request.getfixturevalue("deferred")
        batch = 1
    real = compute.read_adapter_data

    def flaky(layout, out):
        if layout.file.parent == adapter_dirs[2]:
            raise OSError("input/output error")
        return real(layout, out)

    monkeypatch.setattr(compute, "read_adapter_data", flaky)
    cache = DeltaCache(tmp_path / "c")
    with pytest.raises(AdapterError, match="input/output error"):
        compute_deltas(
            base_dir, adapter_dirs[:4], cache=cache, adapters_per_batch=batch, progress=False
        )
    names = sorted(e.adapter_name for e in cache.entries())
    assert names == sorted(map(str, adapter_dirs[:2]))
    monkeypatch.setattr(compute, "read_adapter_data", real)
    r = run_deltas(base_dir, adapter_dirs[:4], cache=cache, progress=False)
    assert r.cached == [True, True, False, False]


def test_non_finite_delta_keeps_the_rest_of_its_batch(model, tok, adapter_dirs, tmp_path):
    nan = _nan_adapter(adapter_dirs[1], tmp_path / "nan")
    cache = DeltaCache(tmp_path / "c")
    dirs = [adapter_dirs[0], nan, adapter_dirs[2]]
    with pytest.raises(AdapterError, match="not finite"):
        compute_deltas((model, tok), dirs, cache=cache, adapters_per_batch=3, progress=False)
    assert sorted(e.adapter_name for e in cache.entries()) == sorted(
        [str(adapter_dirs[0]), str(adapter_dirs[2])]
    )


_KILLED_RUN = """
import sys, time
import llgbm_delta.compute as compute
real = compute.delta_for_lora
batches = []

def slow(*args, **kwargs):
    batches.append(1)
    if len(batches) > 1:
        time.sleep(600)  # the test kills this process here, after the first commit
    return real(*args, **kwargs)

compute.delta_for_lora = slow
compute.compute_deltas(sys.argv[1], sys.argv[3:], cache=sys.argv[2], adapters_per_batch=2,
                       progress=False)
"""


def test_killed_run_keeps_its_finished_batches(base_dir, adapter_dirs, tmp_path):
    import json

    cache_dir = tmp_path / "cache"
    args = [str(base_dir), str(cache_dir), *map(str, adapter_dirs)]
    log = tmp_path / "stderr.txt"

    def indexed() -> int:
        try:
            return len(json.loads((cache_dir / "manifest.json").read_text())["entries"])
        except (OSError, ValueError, KeyError):
            return 0

    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_RUN, *args],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 180
            while indexed() < 2:  # the first batch: entry files written, then indexed
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "the first batch was never committed"
                time.sleep(0.2)
            assert proc.poll() is None  # still running: stuck in the second batch
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    cache = DeltaCache(cache_dir)
    assert cache.verify() == []
    entries = cache.entries()
    assert sorted(e.adapter_name for e in entries) == sorted(map(str, adapter_dirs[:2]))
    fresh = compute_deltas(base_dir, adapter_dirs[:2], progress=False)
    by_name = {e.adapter_name: cache.get(e.key) for e in entries}
    for d, want in zip(adapter_dirs[:2], fresh):
        np.testing.assert_allclose(by_name[str(d)], want, rtol=0, atol=1e-6)
    rerun = run_deltas(base_dir, adapter_dirs, cache=cache, progress=False)
    assert rerun.cached == [True, True, False, False, False]
    assert not [p for p in cache_dir.rglob("*.tmp")]


# -- one forward in flight (as on CUDA) --------------------------------------------------------------


class _Pending:
    """Stands in for the CUDA event of a deferred read-back; `fail` makes waiting raise."""

    fail = False

    def synchronize(self):
        if _Pending.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.fixture
def deferred(monkeypatch):
    """Read-backs deferred as on CUDA (one forward in flight), on the CPU; logs launches and
    commits in order."""
    events: list[tuple[str, int]] = []
    real_forward, real_store = compute.delta_for_lora, compute._Run._store

    class Deferred(compute._Readback):
        def __init__(self, d):
            super().__init__(d)
            self.event = _Pending()

    def forward(*a, **k):
        out = real_forward(*a, **k)
        events.append(("launch", out.shape[0]))
        return out

    def store(self, group, d):
        events.append(("commit", len(group)))
        return real_store(self, group, d)

    monkeypatch.setattr(compute, "_Readback", Deferred)
    monkeypatch.setattr(compute, "delta_for_lora", forward)
    monkeypatch.setattr(compute._Run, "_store", store)
    monkeypatch.setattr(_Pending, "fail", False)
    return events


def test_one_forward_in_flight_commits_each_batch_after_the_next_launch(
    model, tok, adapter_dirs, tmp_path, deferred
):
    same = [d for i, d in enumerate(adapter_dirs) if i != 3]  # one structure: batches of 1
    serial = compute_deltas((model, tok), same, progress=False)
    deferred.clear()
    cache = DeltaCache(tmp_path / "c")
    r = run_deltas((model, tok), same, cache=cache, adapters_per_batch=1, progress=False)
    launches_then_commits = ["launch", "launch", "commit", "launch", "commit", "launch"]
    assert [e for e, _ in deferred] == [*launches_then_commits, "commit", "commit"]
    np.testing.assert_array_equal(r.deltas, serial)
    assert r.n_computed == 4 and len(cache.entries()) == 4


def test_device_error_at_read_back_fails_only_that_batch(
    model, tok, adapter_dirs, monkeypatch, deferred
):
    """An asynchronous device error surfaces when a batch is waited for: with keep_going only
    that batch fails; without, the run stops with it."""
    same = [d for i, d in enumerate(adapter_dirs) if i != 3]
    real = compute._Run._finish
    calls = []

    def finish(self, group, back):
        calls.append(1)
        _Pending.fail = len(calls) == 2  # the second batch's wait raises
        return real(self, group, back)

    monkeypatch.setattr(compute._Run, "_finish", finish)
    r = run_deltas((model, tok), same, adapters_per_batch=2, progress=False, keep_going=True)
    assert [f.name for f in r.failures] == [str(d) for d in same[2:]]
    assert np.isfinite(r.deltas[:2]).all() and np.isnan(r.deltas[2:]).all()
    calls.clear()
    with pytest.raises(AdapterError, match="illegal memory access"):
        compute_deltas((model, tok), same, adapters_per_batch=2, progress=False)


# -- nothing to do: no forward --------------------------------------------------------------------


def test_fully_cached_path_base_loads_no_model_and_no_tensors(
    base_dir, adapter_dirs, tmp_path, monkeypatch
):
    cache = tmp_path / "c"
    first = run_deltas(base_dir, adapter_dirs, cache=cache, progress=False)
    assert first.forward and first.n_computed == len(adapter_dirs)

    def forbidden(*a, **k):
        raise AssertionError("loaded although every delta is cached")

    from transformers import AutoConfig

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", forbidden)  # no meta copy either
    monkeypatch.setattr(AutoConfig, "from_pretrained", forbidden)
    monkeypatch.setattr(compute, "load_adapter", forbidden)
    monkeypatch.setattr(compute, "read_adapter_data", forbidden)
    monkeypatch.setattr(compute, "activations", forbidden)
    again = run_deltas(base_dir, adapter_dirs, cache=DeltaCache(cache), progress=False)
    assert not again.forward and again.cached == [True] * len(adapter_dirs)
    np.testing.assert_array_equal(again.deltas, first.deltas)
    assert again.base == first.base


def test_fully_cached_model_object_runs_no_forward(model, tok, adapter_dirs, tmp_path):
    cache = tmp_path / "c"
    first = compute_deltas(model=model, tokenizer=tok, adapters=adapter_dirs, cache=cache)
    calls = _forward_counter(model)
    again = run_deltas(model=model, tokenizer=tok, adapters=adapter_dirs, cache=cache)
    assert calls == [0] and not again.forward
    np.testing.assert_array_equal(again.deltas, first)
    # One miss: the model runs again (and the others still come from the cache).
    extra = make_peft_adapter(model, tmp_path / "extra", seed=77)
    third = run_deltas(model=model, tokenizer=tok, adapters=[*adapter_dirs, extra], cache=cache)
    assert calls[0] > 0 and third.forward and third.cached == [True] * len(adapter_dirs) + [False]


def test_memo_follows_the_files(base_dir, adapter_dirs, tok, tmp_path):
    """Replacing the base's weights or an adapter's tensors invalidates what the memo knew."""
    import shutil

    base = shutil.copytree(base_dir, tmp_path / "base")
    cache = DeltaCache(tmp_path / "c")
    a0 = shutil.copytree(adapter_dirs[0], tmp_path / "a0")
    first = run_deltas(base, [a0], cache=cache, progress=False)
    shutil.rmtree(a0)
    shutil.copytree(adapter_dirs[1], a0)  # other tensors at the same path
    second = run_deltas(base, [a0], cache=cache, progress=False)
    assert second.cached == [False] and second.keys != first.keys

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.1)
    model.save_pretrained(base)  # other base weights, same directory
    with pytest.raises(CacheError, match="use one cache directory per base model"):
        run_deltas(base, [a0], cache=cache, progress=False)


# -- read-only caches ---------------------------------------------------------------------------


def _tree(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_complete_cache_is_read_without_writing(base_dir, adapter_dirs, tmp_path):
    cache = tmp_path / "c"
    first = compute_deltas(base_dir, adapter_dirs, cache=cache, progress=False)
    (cache / ".lock").unlink()
    before = _tree(cache)
    again = compute_deltas(base_dir, adapter_dirs, cache=cache, progress=False)
    np.testing.assert_array_equal(again, first)
    assert _tree(cache) == before and not (cache / ".lock").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_read_only_cache_serves_hits_and_refuses_writes_in_one_line(
    base_dir, adapter_dirs, tmp_path
):
    cache = tmp_path / "c"
    first = compute_deltas(base_dir, adapter_dirs[:2], cache=cache, progress=False)
    paths = [cache, *cache.rglob("*")]
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        np.testing.assert_array_equal(
            compute_deltas(base_dir, adapter_dirs[:2], cache=cache, progress=False), first
        )
        with pytest.raises(CacheError, match="cannot write"):
            compute_deltas(base_dir, adapter_dirs[:3], cache=cache, progress=False)
    finally:
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_refused_cache_write_is_a_cache_error(model, tok, adapter_dirs, tmp_path, monkeypatch):
    import llgbm_delta.cache as cache_mod

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache_mod, "write_bytes", refuse)
    with pytest.raises(CacheError) as err:
        compute_deltas((model, tok), adapter_dirs[:1], cache=tmp_path / "c", progress=False)
    assert "cannot write: Permission denied" in str(err.value) and "\n" not in str(err.value)


# -- the API around a run -----------------------------------------------------------------------


def test_model_and_tokenizer_keywords(model, tok, base_dir, adapter_dirs):
    old = compute_deltas((model, tok), adapter_dirs[:2], progress=False)
    new = compute_deltas(model=model, tokenizer=tok, adapters=adapter_dirs[:2], progress=False)
    by_path = compute_deltas(model=str(base_dir), adapters=adapter_dirs[:2], progress=False)
    np.testing.assert_array_equal(new, old)
    np.testing.assert_allclose(by_path, old, rtol=0, atol=1e-6)
    for kwargs, msg in [
        (dict(base=base_dir, model=model, tokenizer=tok), "not both"),
        (dict(model=model), "pass both"),
        (dict(model=str(base_dir), tokenizer=tok), "only with a model object"),
        (dict(), "no base model"),
    ]:
        with pytest.raises(DeltaError, match=msg):
            compute_deltas(adapters=adapter_dirs[:1], progress=False, **kwargs)


class _Bar:
    """Records what the progress bar was told, and when, next to the forward passes."""

    events: list

    def __init__(self, total, enabled, desc):
        self.n = 0
        self.postfix = {}

    def update(self, k):
        self.n += k
        _Bar.events.append(("update", k))

    def set_postfix(self, d, refresh=True):
        self.postfix = dict(d)

    def close(self):
        _Bar.events.append(("close", dict(self.postfix)))


def test_progress_counts_computed_adapters(model, tok, adapter_dirs, tmp_path, monkeypatch):
    _Bar.events = []
    monkeypatch.setattr(compute, "_progress", _Bar)
    real = compute.delta_for_lora

    def forward(*a, **k):
        out = real(*a, **k)
        _Bar.events.append(("forward", out.shape[0]))
        return out

    monkeypatch.setattr(compute, "delta_for_lora", forward)
    same = [d for i, d in enumerate(adapter_dirs) if i != 3]  # one structure: batches of 2
    cache = tmp_path / "c"
    compute_deltas((model, tok), same[:1], cache=cache)
    _Bar.events = []
    r = run_deltas((model, tok), same, cache=cache, adapters_per_batch=2)
    # The cached one counts at once; the others only after their batch's forward.
    assert _Bar.events == [
        ("update", 1),
        ("forward", 2),
        ("update", 2),
        ("forward", 1),
        ("update", 1),
        ("close", {"computed": 3, "cached": 1, "failed": 0}),
    ]
    assert r.counts_line().startswith("3 computed, 1 cached, 0 failed (")


def test_probes_longer_than_the_context_warn(model, tok, adapter_dirs):
    model.config.max_position_embeddings = 16  # the generic probes are 34-39 tokens
    with pytest.warns(DeltaWarning, match=r"longest probe has 3\d tokens, more than .* of 16"):
        compute_deltas((model, tok), adapter_dirs[:1], progress=False)
