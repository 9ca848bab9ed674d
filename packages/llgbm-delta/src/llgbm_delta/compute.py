"""compute_deltas: delta activations of fine-tuned models on an HF causal LM, batched and cached.

    deltas = compute_deltas(model=model, tokenizer=tok, adapters=["a", "org/lora"], cache="c")
    deltas = compute_deltas("path/to/base", ["adapters/a", "ckpt/full"], cache=DeltaCache("c"))
    # float32 [2, hidden], in the order given

What can be embedded (`sources`): PEFT LoRA directories (plain, DoRA, rank_pattern /
alpha_pattern, layers_to_transform, rsLoRA), hub ids, full fine-tuned checkpoints (safetensors)
and LoraAdapter objects. The work is ordered so that nothing is wasted:

1. every adapter is located and validated (config, safetensors header, keys and shapes against a
   weightless copy of the base) before the base model is loaded: without `keep_going` the first
   bad one raises here, having cost nothing; with it, it is listed and skipped;
2. cache keys need the base fingerprint and the probe token hash, which the cache's memo keeps
   by the base files' identity, and each adapter's content hash, kept the same way: a fully
   cached run loads no model and no adapter tensors and runs no forward;
3. the base model loads at the first miss; misses go through `delta_for_lora` in batches of
   `adapters_per_batch` adapters of one structure (full checkpoints one at a time, through the
   same `activations`), and each finished batch is committed to the cache at once, so an
   interruption or a failing adapter loses at most the batches in flight. On an accelerator
   one forward is kept in flight: batch k+1 is launched before batch k's deltas are read back
   and committed, so the device does not wait for the host's read-back, commit and next cut.

`method="peft"` is the reference path (one PeftModel, load/set/delete adapter per adapter,
`disable_adapter()` for the base), kept to test the fast path against. Whenever a forward ran,
the base activation is recomputed at the end and the base weights re-fingerprinted: any drift
raises `BaseModelError`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from llgbm_flora import (
    AdapterLayout,
    LoraAdapter,
    LoraBatch,
    LoraError,
    adapter_from_data,
    adapter_layout,
    batch_from_data,
    load_adapter,
    read_adapter_data,
    save_adapter,
)
from torch import nn

from llgbm_delta.base import (
    Identity,
    RunBase,
    StaleMemo,
    base_argument,
    device_of,
    identity,
)
from llgbm_delta.cache import BaseInfo, DeltaCache, entry_key
from llgbm_delta.delta import ProbeBatch, activations, delta_for_lora, encode_probes
from llgbm_delta.errors import AdapterError, BaseModelError, DeltaError, DeltaWarning
from llgbm_delta.fingerprint import (
    adapter_content_hash,
    adapter_data_hash,
    checkpoint_content_hash,
    files_identity,
    model_fingerprint,
)
from llgbm_delta.probes import ProbeSet, resolve_probes
from llgbm_delta.sources import Source, load_checkpoint, resolve_source, validate_source
from llgbm_delta.spec import DEFAULT_SPEC, DeltaSpec

log = logging.getLogger(__name__)

METHODS = ("flora", "peft")
# The recomputed base activation must match the first one this closely (relative to its scale);
# on one device and one set of shapes it is bitwise equal in practice. Half-precision models get
# room for one rounding step, in case a kernel is not bitwise deterministic; the weight
# fingerprint, checked too, is exact.
DRIFT_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2}
DRIFT_TOL_DEFAULT = 1e-5
# Forwards launched but not yet read back and committed, at most (1: batch k is read back after
# batch k+1 was launched; 0: each batch is read back before the next one is cut).
IN_FLIGHT = 1


@dataclass
class DeltaFailure:
    """An adapter that could not be embedded, and why (one line)."""

    name: str
    error: str


@dataclass
class DeltaResult:
    """Everything `run_deltas` learned; `compute_deltas` returns only `deltas`."""

    deltas: np.ndarray  # [n, hidden] float32, input order; NaN rows for failures
    names: list[str]  # adapter label per row (path, hub id or "adapter[i]")
    keys: list[str | None]  # cache key per row (None without a cache or if loading failed)
    cached: list[bool]  # row came from the cache
    failures: list[DeltaFailure]
    base: BaseInfo
    probe_name: str
    probe_hash: str
    seconds: float = 0.0
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) recomputed
    forward: bool = True  # a model forward ran (False: every delta came from the cache)

    @property
    def n_computed(self) -> int:
        failed = {f.name for f in self.failures}
        return sum(1 for n, c in zip(self.names, self.cached) if not c and n not in failed)

    @property
    def n_cached(self) -> int:
        return sum(self.cached)

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    def counts_line(self) -> str:
        """`3 computed, 2 cached, 0 failed (1.23 s)`: the one-line summary of a run."""
        return (
            f"{self.n_computed} computed, {self.n_cached} cached, {self.n_failed} failed "
            f"({self.seconds:.2f} s)"
        )


def adapter_label(item: str | Path | LoraAdapter, i: int) -> str:
    return str(item) if isinstance(item, str | Path) else f"adapter[{i}]"


class _PeftRunner:
    """The reference path: one PeftModel; each adapter loaded, activated, then deleted."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.peft = None
        self.current: str | None = None
        self.count = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="llgbm-delta-peft-")

    def activation(self, src: Source, adapter: LoraAdapter | None, batch: ProbeBatch, spec):
        from peft import PeftModel

        path = src.path
        if src.kind == "memory":
            path = save_adapter(adapter, Path(self._tmp.name) / f"a{self.count}")
        name = f"a{self.count}"
        self.count += 1
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        else:
            self.peft.load_adapter(str(path), adapter_name=name)
        self.peft.set_adapter(name)
        if self.current is not None:
            self.peft.delete_adapter(self.current)
        self.current = name
        self.peft.eval()
        return activations(self.peft.get_base_model(), batch, spec)[0]  # [H]

    def base(self, batch: ProbeBatch, spec: DeltaSpec):
        if self.peft is None:
            return activations(self.model, batch, spec)[0]
        with self.peft.disable_adapter():
            return activations(self.peft.get_base_model(), batch, spec)[0]

    def close(self) -> None:
        if self.peft is not None:
            # Take every LoRA layer out again, so the caller's model is as it was given.
            self.peft.unload()
            self.peft = None
        self._tmp.cleanup()


def run_deltas(
    base: str | Path | tuple | None = None,
    adapters: Sequence[str | Path | LoraAdapter] | None = None,
    probes: ProbeSet | str | Path | None = None,
    cache: DeltaCache | str | Path | None = None,
    *,
    model: nn.Module | str | Path | None = None,
    tokenizer: object | None = None,
    spec: DeltaSpec = DEFAULT_SPEC,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    adapters_per_batch: int = 16,
    adapter_chunk_size: int | None = None,
    method: str = "flora",
    progress: bool = True,
    keep_going: bool = False,
    loader_threads: int | None = None,
    compile: bool | None = None,
) -> DeltaResult:
    """Deltas of `adapters` plus a report (cache hits, failures, timing); see compute_deltas."""
    base = base_argument(base, model, tokenizer)
    if adapters is None:
        raise DeltaError("no adapters given (adapters=[...])")
    if isinstance(adapters, str | Path | LoraAdapter):
        adapters = [adapters]
    if method not in METHODS:
        raise DeltaError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if adapters_per_batch < 1:
        raise DeltaError(f"adapters_per_batch must be >= 1, got {adapters_per_batch}")
    t0 = time.perf_counter()
    probe_set = resolve_probes(probes)
    if cache is not None and not isinstance(cache, DeltaCache):
        cache = DeltaCache(cache)
    run = _Run(
        base=RunBase(base, device, dtype, cache),
        adapters=list(adapters),
        probes=probe_set,
        cache=cache,
        spec=spec,
        adapters_per_batch=adapters_per_batch,
        adapter_chunk_size=adapter_chunk_size,
        method=method,
        progress=progress,
        keep_going=keep_going,
        loader_threads=loader_threads,
        compile=compile,
    )
    try:
        result = run.execute(trust_memo=True)
    except StaleMemo:
        log.warning("the delta cache's memo of %s was stale; recomputing it", run.base.name)
        result = run.execute(trust_memo=False)
    result.seconds = time.perf_counter() - t0
    return result


@dataclass
class _Run:
    """One run_deltas call: validation, keys, the batched forwards, commits per batch."""

    base: RunBase
    adapters: list
    probes: ProbeSet
    cache: DeltaCache | None
    spec: DeltaSpec
    adapters_per_batch: int
    adapter_chunk_size: int | None
    method: str
    progress: bool
    keep_going: bool
    loader_threads: int | None
    compile: bool | None

    def execute(self, trust_memo: bool) -> DeltaResult:
        n = len(self.adapters)
        cache = self.cache
        self.names = [adapter_label(a, i) for i, a in enumerate(self.adapters)]
        self.failures: list[DeltaFailure] = []
        self.pending: dict[object, list[tuple[int, LoraAdapter, str]]] = {}
        self.runner: _PeftRunner | None = None
        self.inflight: deque[tuple[list, _Readback]] = deque()
        self.base_v = None
        self.batch: ProbeBatch | None = None
        n_problems = len(cache.problems) if cache is not None else 0

        # 1. Locate and validate everything before any weights are read.
        sources: list[Source | None] = [None] * n
        for i, item in enumerate(self.adapters):
            try:
                sources[i] = validate_source(resolve_source(item, self.names[i]), self.base)
            except AdapterError as e:
                self._fail(i, e)
        # 2. What cache keys need from the base (no forward).
        ident, memo = identity(self.base, self.probes, cache, trust_memo)
        self.ident = ident
        if cache is not None:
            cache.bind(ident.info)
            cache.memo_put(memo)
        self._warn_context(ident)

        self.out = np.full((n, ident.info.hidden_size), np.nan, dtype=np.float32)
        self.keys: list[str | None] = [None] * n
        self.cached = [False] * n
        self.counts = {"computed": 0, "cached": 0, "failed": len(self.failures)}
        self.bar = _progress(n, self.progress, desc=f"deltas ({self.method})")
        if self.failures:
            self.bar.update(len(self.failures))  # refused by validation
        memo_new: dict[str, dict] = {}
        try:
            self._loop(sources, memo_new)
            if self.base_v is not None:
                with torch.inference_mode():
                    base_again = (
                        self.runner.base(self.batch, self.spec)
                        if self.runner
                        else activations(self.base.model, self.batch, self.spec)[0]
                    )
        finally:
            self.bar.set_postfix(self.counts, refresh=False)
            self.bar.close()
            if self.runner is not None:
                self.runner.close()
            if cache is not None and (memo_new or self.base.memo_new):
                cache.memo_put({**self.base.memo_new, **memo_new})
        if self.base_v is not None:
            _check_no_drift(self.base_v, base_again, ident.info.fingerprint, self.base.model)
        corrupt = cache.problems[n_problems:] if cache is not None else []
        return DeltaResult(
            deltas=self.out,
            names=self.names,
            keys=self.keys,
            cached=self.cached,
            failures=self.failures,
            base=ident.info,
            probe_name=self.probes.name,
            probe_hash=self.probes.hash,
            corrupt=list(corrupt),
            forward=self.base_v is not None,
        )

    # -- the loop ----------------------------------------------------------------------
    def _loop(self, sources: list[Source | None], memo_new: dict) -> None:
        try:
            self._loop_items(sources, memo_new)
            for group in list(self.pending.values()):
                self._flush(group)
            self.pending.clear()
            self._drain()
        except BaseException:
            self._drain(best_effort=True)  # commit the batches that finished, then re-raise
            raise

    def _loop_items(self, sources: list[Source | None], memo_new: dict) -> None:
        valid = [i for i, s in enumerate(sources) if s is not None]
        threads = self.loader_threads
        if threads is None:
            # Threads pay off when the forward runs on an accelerator and the CPU is free to load.
            threads = 1 if self.base.target_device().type == "cpu" else 8
        workers = min(threads, os.cpu_count() or 1) if self.method == "flora" else 1
        loader = _Loader(self.base.target_device() if self.method == "flora" else None)
        for i, adapter, h, key, hit, err in _prefetch(
            sources,
            valid,
            self._key_of,
            self.cache,
            memo_new,
            workers,
            2 * self.adapters_per_batch,
            loader,
        ):
            if err is not None:
                self._fail(i, err)
                self._tick("failed")
                continue
            self.keys[i] = key
            if hit is not None:
                self.out[i], self.cached[i] = hit, True
                self._tick("cached")
                continue
            self._ensure_forward()
            src = sources[i]
            if src.kind == "checkpoint":
                self._checkpoint(i, src, h)
            elif self.runner is not None:
                if isinstance(adapter, _Read):
                    adapter = adapter.adapter()
                with torch.inference_mode():
                    v = self.runner.activation(src, adapter, self.batch, self.spec)
                self._store([(i, adapter, h)], (v - self.base_v).cpu().numpy()[None])
            else:
                group = self.pending.setdefault(adapter.spec.structure, [])
                group.append((i, adapter, h))
                if len(group) >= self.adapters_per_batch:
                    self._flush(self.pending.pop(adapter.spec.structure))

    def _key_of(self, adapter_hash: str) -> str:
        return entry_key(
            base_fingerprint=self.ident.info.fingerprint,
            probe_hash=self.probes.hash,
            token_hash=self.ident.token_hash,
            spec_hash=self.spec.hash,
            adapter_hash=adapter_hash,
        )

    def _ensure_forward(self) -> None:
        """Load the base (first miss), check it is what the keys assumed, compute v(base)."""
        if self.base_v is not None:
            return
        model, tokenizer = self.base.load()
        dev = device_of(model)
        batch = self.ident.batch or encode_probes(tokenizer, self.probes, device=dev)
        if self.ident.from_memo and (
            batch.token_hash != self.ident.token_hash
            or model_fingerprint(model) != self.ident.info.fingerprint
        ):
            raise StaleMemo
        self.batch = batch
        self.use_compile = dev.type == "cuda" if self.compile is None else self.compile
        if self.method == "peft":
            self.runner = _PeftRunner(model)
        with torch.inference_mode():
            self.base_v = (
                self.runner.base(batch, self.spec)
                if self.runner
                else activations(model, batch, self.spec)[0]
            )

    def _flush(self, group: list[tuple[int, LoraAdapter, str]]) -> None:
        """Launch one forward for a group of adapters of one structure; its deltas are read back
        and committed once `IN_FLIGHT` later forwards are launched (or at the end)."""
        model, tokenizer = self.base.model, self.base.tokenizer
        try:
            with torch.inference_mode():
                lora = _batch([a for _, a, _ in group], device_of(model))
                d = delta_for_lora(
                    model,
                    tokenizer,
                    lora,
                    self.batch,
                    self.spec,
                    base=self.base_v,
                    adapter_chunk_size=self.adapter_chunk_size,
                    compile=self.use_compile,
                )  # [len(group), H]
                back = _Readback(d)
            del lora, d
        except (RuntimeError, ValueError) as e:
            self._fail_group(group, e)
            return
        self.inflight.append((group, back))
        depth = IN_FLIGHT if back.event is not None else 0  # on CPU the forward is done already
        while len(self.inflight) > depth:
            self._finish(*self.inflight.popleft())

    def _finish(self, group, back: _Readback) -> None:
        """Wait for one launched forward, then keep and commit its deltas."""
        try:
            d = back.numpy()
        except RuntimeError as e:  # an asynchronous device error surfaces here
            self._fail_group(group, e)
            return
        self._store(group, d)

    def _drain(self, best_effort: bool = False) -> None:
        """Read back and commit every forward in flight (`best_effort`: while another error
        propagates; a failure here is logged, never raised over it)."""
        while self.inflight:
            group, back = self.inflight.popleft()
            if not best_effort:
                self._finish(group, back)
                continue
            keep, self.keep_going = self.keep_going, True
            try:
                self._finish(group, back)
            except Exception as e:  # the error already propagating wins
                log.warning("could not commit a finished batch while stopping: %s", e)
            finally:
                self.keep_going = keep

    def _fail_group(self, group, e: Exception) -> None:
        for i, _, _ in group:
            self._fail(i, AdapterError(f"{self.names[i]}: delta computation failed ({e})"))
            self._tick("failed")

    def _checkpoint(self, i: int, src: Source, h: str) -> None:
        """A full fine-tuned model: v(checkpoint) - v(base), the same `activations`."""
        dtype = next(self.base.model.parameters()).dtype
        try:
            ft = load_checkpoint(src, dtype=dtype, device=device_of(self.base.model))
            with torch.inference_mode():
                v = activations(ft, self.batch, self.spec, compile=self.use_compile)[0]
            del ft
        except AdapterError as e:
            self._fail(i, e)
            self._tick("failed")
            return
        self._store([(i, None, h)], (v - self.base_v).cpu().numpy()[None])

    def _store(self, group, d: np.ndarray) -> None:
        """Keep and commit the finite rows of a finished batch, then report the others."""
        rows, bad = [], []
        for (i, _, h), row in zip(group, d):
            if np.isfinite(row).all():
                self.out[i] = row
                rows.append((self._meta(i, h), row))
            else:
                bad.append(i)
        if self.cache is not None and rows:
            self.cache.put_many(rows)  # committed now: a later interruption keeps these
        self._tick("computed", len(rows))
        for i in bad:
            self._fail(i, AdapterError(f"{self.names[i]}: delta is not finite (NaN/inf)"))
            self._tick("failed")

    def _meta(self, i: int, adapter_hash: str) -> dict:
        return {
            "base_fingerprint": self.ident.info.fingerprint,
            "probe_hash": self.probes.hash,
            "probe_name": self.probes.name,
            "token_hash": self.ident.token_hash,
            "spec": self.spec.to_dict(),
            "spec_hash": self.spec.hash,
            "adapter_hash": adapter_hash,
            "adapter_name": self.names[i],
        }

    def _fail(self, i: int, err: Exception) -> None:
        if not self.keep_going:
            self._commit_pending()
            raise err
        self.failures.append(DeltaFailure(self.names[i], str(err)))
        log.info("skipped: %s", err)

    def _commit_pending(self) -> None:
        """Before stopping on a bad adapter: compute and commit the batches already loaded
        and those in flight."""
        groups, self.pending = list(self.pending.values()), {}
        if self.base_v is None:
            return
        self.keep_going = True  # a failure inside these batches must not hide the first one
        try:
            for group in groups:
                self._flush(group)
            self._drain()
        finally:
            self.keep_going = False

    def _tick(self, what: str, k: int = 1) -> None:
        if k:
            self.counts[what] += k
            self.bar.set_postfix(self.counts, refresh=False)
            self.bar.update(k)

    def _warn_context(self, ident: Identity) -> None:
        limit, max_len = ident.context, ident.max_len
        if limit is not None and max_len > limit:
            warnings.warn(
                DeltaWarning(
                    f"probe set {self.probes.name!r}: the longest probe has {max_len} tokens, "
                    f"more than {self.base.name}'s context of {limit} (max_position_embeddings); "
                    "positions past it are outside what the model was trained on"
                ),
                stacklevel=4,
            )


class _Readback:
    """A batch's deltas on their way to the host: on CUDA an asynchronous copy into pinned
    memory and its event, so launching the next forward does not wait for this one."""

    def __init__(self, d: torch.Tensor):
        self.event = None
        if d.device.type == "cuda":
            self.host = torch.empty(d.shape, dtype=d.dtype, pin_memory=True)
            self.host.copy_(d, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(d.device))
        else:
            self.host = d.cpu()

    def numpy(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()  # releases the GIL: the loader threads keep reading
        return self.host.numpy()


@dataclass
class _Read:
    """A PEFT adapter read straight from its file: its layout and its data section (uint8),
    on the target device once `_Loader.to_device` ran (`ready`: the copy's CUDA event)."""

    layout: AdapterLayout
    data: torch.Tensor
    ready: object | None = None

    @property
    def spec(self):
        return self.layout.spec

    def wait(self) -> None:
        """Make the current stream wait for the copy to the device (no host sync)."""
        if self.ready is not None:
            current = torch.cuda.current_stream(self.data.device)
            current.wait_event(self.ready)
            self.data.record_stream(current)  # not reused before the forward has read it
            self.ready = None

    def adapter(self) -> LoraAdapter:
        self.wait()
        return adapter_from_data(self.layout, self.data)


class _Loader:
    """Reads PEFT adapters for the flora path: each file's data section in one `readinto`,
    into pinned memory when the forward runs on CUDA, then one asynchronous copy per adapter
    on a side stream, so reads, transfers and the forward passes overlap."""

    def __init__(self, device: torch.device | None):
        self.device = device
        self.cuda = device is not None and device.type == "cuda"
        self._stream = None  # made at the first copy: a fully cached run never touches CUDA
        self._lock = threading.Lock()

    def read(self, src: Source) -> _Read | LoraAdapter:
        try:
            layout = adapter_layout(src.path)
            if layout is None:  # adapter_model.bin: no header to place the tensors by
                return _load_lora(src)
            if layout.spec != src.spec:
                raise AdapterError(
                    f"{src.label}: the adapter changed on disk while deltas were computed"
                )
            host = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=self.cuda)
            return _Read(layout, read_adapter_data(layout, host))
        except LoraError as e:
            msg = str(e)
            raise AdapterError(msg if src.label in msg else f"{src.label}: {msg}") from e
        except (OSError, RuntimeError) as e:
            raise AdapterError(f"{src.label}: cannot load adapter ({e})") from e

    def to_device(self, item):
        """Start moving a read adapter to the device (asynchronously on CUDA)."""
        if not isinstance(item, _Read) or self.device is None:
            return item
        if not self.cuda:
            return _Read(item.layout, item.data.to(self.device))
        with self._lock:
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.device)
        stream = self._stream
        with torch.cuda.stream(stream):
            # Allocated on the copy stream: a block the forward's stream freed, and may still
            # be reading, is never handed to this copy (that raced: NaN deltas).
            dev = torch.empty(item.layout.nbytes, dtype=torch.uint8, device=self.device)
            dev.copy_(item.data, non_blocking=True)  # the pinned block is reused once done
            ready = torch.cuda.Event()
            ready.record(stream)
        return _Read(item.layout, dev, ready)


def _batch(items: list, device: torch.device) -> LoraBatch:
    """One LoraBatch on `device` from read adapters (stacked there) or LoraAdapters."""
    if all(isinstance(a, _Read) and a.data.device == device for a in items):
        for a in items:
            a.wait()
        try:
            return batch_from_data([a.layout for a in items], [a.data for a in items])
        except ValueError:
            pass  # stored dtypes differ between adapters: stack them as adapters below
    adapters = [a.adapter() if isinstance(a, _Read) else a for a in items]
    return LoraBatch.from_adapters(adapters).to(device=device)


def _prefetch(sources, valid, key_of, cache, memo_new, workers: int, window: int, loader):
    """Yield (i, adapter, content hash, key, cached delta, error) for `valid`, in order.

    Each item is hashed (from the memo when its files are unchanged), looked up in the cache,
    and loaded only if missing (a full checkpoint is loaded later, by the forward); a loaded
    PEFT adapter comes as a `_Read` already on its way to the device. Reading, hashing, lookups
    and the copies run `window` items ahead in `workers` threads (file reads, sha256 and CUDA
    copies release the GIL), overlapping each other and the forward passes.
    """

    def prepare(i: int):
        src = sources[i]
        try:
            adapter, h = _content(src, cache, memo_new, loader)
            key = hit = None
            if cache is not None:
                key = key_of(h)
                hit = cache.get(key)
            if hit is not None:
                return i, None, h, key, hit, None
            if adapter is None and src.kind == "lora":
                adapter = loader.read(src)
            return i, loader.to_device(adapter), h, key, None, None
        except AdapterError as e:
            return i, None, None, None, None, e

    if workers <= 1 or len(valid) <= 1:
        for i in valid:
            yield prepare(i)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llgbm-delta-load") as ex:
        ahead: deque = deque()
        nxt = 0
        try:
            while ahead or nxt < len(valid):
                while nxt < len(valid) and len(ahead) < window:
                    ahead.append(ex.submit(prepare, valid[nxt]))
                    nxt += 1
                yield ahead.popleft().result()
        finally:
            for f in ahead:
                f.cancel()


def _content(src: Source, cache, memo_new: dict, loader: _Loader):
    """(the adapter if it had to be loaded, its content hash); the hash from the memo if known.

    Without a cache no hash is needed (None), and only a LoRA's tensors are read. A PEFT file
    read for its hash is hashed straight from the bytes read (`adapter_data_hash`).
    """
    if cache is None:
        return (loader.read(src) if src.kind == "lora" else src.adapter), None
    if src.kind == "memory":
        return src.adapter, adapter_content_hash(src.adapter)
    try:
        memo_key = f"{src.kind}:{files_identity(src.identity_files())}"
    except OSError as e:
        raise AdapterError(f"{src.label}: cannot read ({e})") from e
    known = cache.memo_get(memo_key)
    if known is not None and isinstance(known.get("hash"), str):
        return None, known["hash"]
    if src.kind == "lora":
        adapter = loader.read(src)
        if isinstance(adapter, _Read):
            h = adapter_data_hash(adapter.layout, adapter.data)
        else:
            h = adapter_content_hash(adapter)
    else:
        adapter = None
        try:
            h = checkpoint_content_hash(src.config, src.weights)
        except (OSError, ValueError, KeyError) as e:
            raise AdapterError(f"{src.label}: cannot read checkpoint weights ({e})") from e
    memo_new[memo_key] = {"hash": h}
    return adapter, h


def _load_lora(src: Source) -> LoraAdapter:
    """The tensors of a validated PEFT directory; AdapterError if they no longer match."""
    try:
        adapter = load_adapter(src.path)
    except LoraError as e:
        msg = str(e)
        raise AdapterError(msg if src.label in msg else f"{src.label}: {msg}") from e
    except (OSError, RuntimeError) as e:
        raise AdapterError(f"{src.label}: cannot load adapter ({e})") from e
    if adapter.spec != src.spec:
        raise AdapterError(f"{src.label}: the adapter changed on disk while deltas were computed")
    return adapter


def _check_no_drift(first, again, fingerprint: str, model: nn.Module) -> None:
    tol = DRIFT_TOL.get(next(model.parameters()).dtype, DRIFT_TOL_DEFAULT)
    scale = float(first.abs().max()) + 1.0
    drift = float((first - again).abs().max())
    if not drift <= tol * scale:
        raise BaseModelError(
            f"base activation drifted by {drift:.3g} while computing deltas: an adapter leaked "
            "into the base model"
        )
    if model_fingerprint(model) != fingerprint:
        raise BaseModelError("base model weights changed while computing deltas")


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="adapter", disable=not enabled)


def compute_deltas(
    base: str | Path | tuple | None = None,
    adapters: Sequence[str | Path | LoraAdapter] | None = None,
    probes: ProbeSet | str | Path | None = None,
    cache: DeltaCache | str | Path | None = None,
    *,
    model: nn.Module | str | Path | None = None,
    tokenizer: object | None = None,
    spec: DeltaSpec = DEFAULT_SPEC,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    adapters_per_batch: int = 16,
    adapter_chunk_size: int | None = None,
    method: str = "flora",
    progress: bool = True,
    keep_going: bool = False,
    loader_threads: int | None = None,
    compile: bool | None = None,
) -> np.ndarray:
    """Delta activations of `adapters` on the base: float32 numpy [len(adapters), hidden].

    The base: `model=` and `tokenizer=` (an HF model and its tokenizer, as transformers and PEFT
    take them), `model=` an HF id or path alone, or the older positional `base` (an id/path or
    a (model, tokenizer) pair). adapters: PEFT adapter directories (LoRA, DoRA, rank/alpha
    patterns, layers_to_transform), hub ids (`org/name[@revision]`), full fine-tuned checkpoint
    directories (safetensors) or LoraAdapter objects, all for this base. probes: a ProbeSet,
    "generic" (default), a domain name, or a probe file. cache: a DeltaCache (or its directory)
    to read hits from and commit new deltas to, batch by batch.
    Every adapter is validated before the model loads. Without `keep_going` the first bad one
    raises AdapterError (batches already computed are committed first); with it, failed rows
    are NaN (use `run_deltas` for the list of failures).
    adapters_per_batch: adapters per forward (n adapters x P probes rows); adapter_chunk_size:
    flora's micro-batching inside that forward (memory); loader_threads: threads loading and
    hashing adapters ahead of the forward passes (default: 8 on an accelerator, 1 on CPU).
    compile: `torch.compile` the fused forward (default: on CUDA; the first batch of each size
    then takes seconds to compile, later ones run ~1.4x faster: docs/benchmarks.md).
    """
    return run_deltas(
        base,
        adapters,
        probes,
        cache,
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        device=device,
        dtype=dtype,
        adapters_per_batch=adapters_per_batch,
        adapter_chunk_size=adapter_chunk_size,
        method=method,
        progress=progress,
        keep_going=keep_going,
        loader_threads=loader_threads,
        compile=compile,
    ).deltas
