"""compute_deltas: teacher deltas for PEFT adapters on an HF causal LM, batched and cached.

    deltas = compute_deltas("path/to/base", ["adapters/a", "adapters/b"], cache=DeltaCache("c"))
    # float32 [2, hidden], in the order given

The base activation is computed once; adapters are loaded with llgbm-flora, hashed by content,
looked up in the cache, and the misses go through `delta_for_lora` in batches of
`adapters_per_batch` (n adapters x P probes rows in one forward). `method="peft"` is the
reference path (one PeftModel, load/set/delete adapter per adapter, `disable_adapter()` for the
base), kept to test the fast path against. Either way the base activation is recomputed at the
end and the base weights re-fingerprinted: any drift raises `BaseModelError`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from llgbm_flora import LoraAdapter, LoraBatch, LoraError, check_fits, load_adapter, save_adapter
from torch import nn

from llgbm_delta.cache import BaseInfo, DeltaCache, entry_key
from llgbm_delta.delta import ProbeBatch, activations, delta_for_lora, encode_probes
from llgbm_delta.errors import AdapterError, BaseModelError, DeltaError
from llgbm_delta.fingerprint import adapter_content_hash, model_fingerprint
from llgbm_delta.probes import ProbeSet, resolve_probes
from llgbm_delta.spec import DEFAULT_SPEC, DeltaSpec

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
METHODS = ("flora", "peft")
# The recomputed base activation must match the first one this closely (relative to its scale);
# on one device and one set of shapes it is bitwise equal in practice. Half-precision models get
# room for one rounding step, in case a kernel is not bitwise deterministic; the weight
# fingerprint, checked too, is exact.
DRIFT_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2}
DRIFT_TOL_DEFAULT = 1e-5


@dataclass
class DeltaFailure:
    """An adapter that could not be embedded, and why (one line)."""

    name: str
    error: str


@dataclass
class DeltaResult:
    """Everything `run_deltas` learned; `compute_deltas` returns only `deltas`."""

    deltas: np.ndarray  # [n, hidden] float32, input order; NaN rows for failures
    names: list[str]  # adapter label per row (path or "adapter[i]")
    keys: list[str | None]  # cache key per row (None without a cache or if loading failed)
    cached: list[bool]  # row came from the cache
    failures: list[DeltaFailure]
    base: BaseInfo
    probe_name: str
    probe_hash: str
    seconds: float = 0.0
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) recomputed

    @property
    def n_computed(self) -> int:
        failed = {f.name for f in self.failures}
        return sum(1 for n, c in zip(self.names, self.cached) if not c and n not in failed)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DeltaError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_base(
    base: str | Path | tuple, *, device: str | torch.device | None = None, dtype=None
) -> tuple[nn.Module, object, str]:
    """(model, tokenizer, name) from an HF id/path or a (model, tokenizer) pair.

    A path or id loads in float32 unless `dtype` says otherwise, on `device` (default: CUDA if
    available). A given model is moved only if `device`/`dtype` are passed (in place, as
    `Module.to` does).
    """
    dtype = parse_dtype(dtype)
    if isinstance(base, tuple):
        if len(base) != 2:
            raise BaseModelError("base must be an HF id/path or a (model, tokenizer) pair")
        model, tokenizer = base
        name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model.eval(), tokenizer, name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(base)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BaseModelError(f"{name}: cannot load base model ({first})") from e
    return model.to(device).eval(), tokenizer, name


def adapter_label(item: str | Path | LoraAdapter, i: int) -> str:
    return str(item) if isinstance(item, str | Path) else f"adapter[{i}]"


def _load_one(
    item: str | Path | LoraAdapter, label: str, model: nn.Module, fits: set | None = None
) -> LoraAdapter:
    """Load (if a path) and check that the adapter fits the model; AdapterError otherwise.

    `fits` remembers structures already checked against this model (a zoo shares one).
    """
    try:
        adapter = item if isinstance(item, LoraAdapter) else load_adapter(item)
        structure = _structure(adapter.spec)
        if fits is None or structure not in fits:
            check_fits(model, adapter.spec)
            if fits is not None:
                fits.add(structure)
    except LoraError as e:
        msg = str(e)
        raise AdapterError(msg if label in msg else f"{label}: {msg}") from e
    except (OSError, RuntimeError) as e:
        raise AdapterError(f"{label}: cannot load adapter ({e})") from e
    return adapter


def _prefetch(
    items, labels: list[str], model: nn.Module, workers: int, window: int, want_hash: bool
):
    """Yield (i, adapter, content hash, None) or (i, None, None, AdapterError) in input order.

    The content hash (only needed for cache keys) is None unless `want_hash`.

    Loading, checking and hashing run `window` adapters ahead in `workers` threads (file reads,
    safetensors and sha256 release the GIL), so they overlap each other and the forward passes.
    """

    fits: set = set()

    def prepare(i: int):
        try:
            adapter = _load_one(items[i], labels[i], model, fits)
        except AdapterError as e:
            return i, None, None, e
        return i, adapter, adapter_content_hash(adapter) if want_hash else None, None

    if workers <= 1 or len(items) <= 1:
        for i in range(len(items)):
            yield prepare(i)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llgbm-delta-load") as ex:
        ahead: deque = deque()
        nxt = 0
        try:
            while ahead or nxt < len(items):
                while nxt < len(items) and len(ahead) < window:
                    ahead.append(ex.submit(prepare, nxt))
                    nxt += 1
                yield ahead.popleft().result()
        finally:
            for f in ahead:
                f.cancel()


class _PeftRunner:
    """The reference path: one PeftModel; each adapter loaded, activated, then deleted."""

    def __init__(self, model: nn.Module):
        self.model = model
        # PEFT swaps the target nn.Linear modules for its own layers, which flora's check_fits
        # does not recognise; adapters are checked against a weightless copy on the meta device.
        with torch.device("meta"):
            self.shadow = type(model)(model.config)
        self.peft = None
        self.current: str | None = None
        self.count = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="llgbm-delta-peft-")

    def activation(self, item, adapter: LoraAdapter, batch: ProbeBatch, spec: DeltaSpec):
        from peft import PeftModel

        path = item
        if isinstance(item, LoraAdapter):
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
    base: str | Path | tuple,
    adapters: Sequence[str | Path | LoraAdapter],
    probes: ProbeSet | str | Path | None = None,
    cache: DeltaCache | str | Path | None = None,
    *,
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
    if method not in METHODS:
        raise DeltaError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if adapters_per_batch < 1:
        raise DeltaError(f"adapters_per_batch must be >= 1, got {adapters_per_batch}")
    t0 = time.perf_counter()
    probe_set = resolve_probes(probes)
    if cache is not None and not isinstance(cache, DeltaCache):
        cache = DeltaCache(cache)
    model, tokenizer, base_name = load_base(base, device=device, dtype=dtype)
    dev = next(model.parameters()).device
    batch = encode_probes(tokenizer, probe_set, device=dev)
    fingerprint = model_fingerprint(model)
    use_compile = dev.type == "cuda" if compile is None else compile
    info = BaseInfo(
        fingerprint=fingerprint,
        name=base_name,
        hidden_size=int(model.config.hidden_size),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )
    if cache is not None:
        cache.bind(info)
        n_problems = len(cache.problems)

    n = len(adapters)
    out = np.full((n, info.hidden_size), np.nan, dtype=np.float32)
    names = [adapter_label(a, i) for i, a in enumerate(adapters)]
    keys: list[str | None] = [None] * n
    cached = [False] * n
    failures: list[DeltaFailure] = []
    runner = _PeftRunner(model) if method == "peft" else None

    with torch.inference_mode():
        base_v = runner.base(batch, spec) if runner else activations(model, batch, spec)[0]

    def meta_for(i: int, adapter_hash: str) -> dict:
        return {
            "base_fingerprint": fingerprint,
            "probe_hash": probe_set.hash,
            "probe_name": probe_set.name,
            "token_hash": batch.token_hash,
            "spec": spec.to_dict(),
            "spec_hash": spec.hash,
            "adapter_hash": adapter_hash,
            "adapter_name": names[i],
        }

    def fail(i: int, err: Exception) -> None:
        if not keep_going:
            raise err
        failures.append(DeltaFailure(names[i], str(err)))
        log.info("skipped: %s", err)

    # Pending misses, grouped by LoRA structure (a LoraBatch needs one spec).
    pending: dict[object, list[tuple[int, LoraAdapter, str]]] = {}

    def flush(group: list[tuple[int, LoraAdapter, str]]) -> None:
        idx = [i for i, _, _ in group]
        try:
            with torch.inference_mode():
                lora = LoraBatch.from_adapters([a for _, a, _ in group]).to(device=dev)
                d = delta_for_lora(
                    model,
                    tokenizer,
                    lora,
                    batch,
                    spec,
                    base=base_v,
                    adapter_chunk_size=adapter_chunk_size,
                    compile=use_compile,
                )  # [len(group), H]
            d = d.cpu().numpy()
        except (RuntimeError, ValueError) as e:
            for i in idx:
                fail(i, AdapterError(f"{names[i]}: delta computation failed ({e})"))
            return
        _store(group, d)

    def _store(group, d: np.ndarray) -> None:
        rows = []
        for (i, _, h), row in zip(group, d):
            if not np.isfinite(row).all():
                fail(i, AdapterError(f"{names[i]}: delta is not finite (NaN/inf)"))
                continue
            out[i] = row
            rows.append((meta_for(i, h), row))
        if cache is not None and rows:
            cache.put_many(rows)

    bar = _progress(n, progress, desc=f"deltas ({method})")
    if loader_threads is None:
        # Threads pay off when the forward runs on an accelerator and the CPU is free to load.
        loader_threads = 4 if dev.type != "cpu" else 1
    workers = min(loader_threads, os.cpu_count() or 1) if runner is None else 1
    check_model = runner.shadow if runner else model
    try:
        for i, adapter, h, err in _prefetch(
            adapters, names, check_model, workers, 2 * adapters_per_batch, cache is not None
        ):
            item = adapters[i]
            if err is not None:
                fail(i, err)
                bar.update(1)
                continue
            hit = None
            if cache is not None:
                keys[i] = entry_key(
                    base_fingerprint=fingerprint,
                    probe_hash=probe_set.hash,
                    token_hash=batch.token_hash,
                    spec_hash=spec.hash,
                    adapter_hash=h,
                )
                hit = cache.get(keys[i])
            if hit is not None:
                out[i], cached[i] = hit, True
            elif runner is not None:
                with torch.inference_mode():
                    v = runner.activation(item, adapter, batch, spec)
                _store([(i, adapter, h)], (v - base_v).cpu().numpy()[None])
            else:
                structure = _structure(adapter.spec)
                group = pending.setdefault(structure, [])
                group.append((i, adapter, h))
                if len(group) >= adapters_per_batch:
                    flush(pending.pop(structure))
            bar.update(1)
        for group in pending.values():
            flush(group)
        pending.clear()

        with torch.inference_mode():
            base_again = runner.base(batch, spec) if runner else activations(model, batch, spec)[0]
    finally:
        bar.close()
        if runner is not None:
            runner.close()
    _check_no_drift(base_v, base_again, fingerprint, model)
    corrupt = cache.problems[n_problems:] if cache is not None else []
    return DeltaResult(
        deltas=out,
        names=names,
        keys=keys,
        cached=cached,
        failures=failures,
        base=info,
        probe_name=probe_set.name,
        probe_hash=probe_set.hash,
        seconds=time.perf_counter() - t0,
        corrupt=list(corrupt),
    )


def _structure(spec) -> tuple:
    """What adapters must share to go into one LoraBatch (not the base_model string)."""
    return (spec.target_modules, spec.layers, spec.rank, spec.scale, spec.shapes)


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
    base: str | Path | tuple,
    adapters: Sequence[str | Path | LoraAdapter],
    probes: ProbeSet | str | Path | None = None,
    cache: DeltaCache | str | Path | None = None,
    *,
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
    """Delta activations of `adapters` on `base`: float32 numpy [len(adapters), hidden].

    base: an HF id or path (loaded with AutoModelForCausalLM + AutoTokenizer) or a
    (model, tokenizer) pair. adapters: PEFT adapter directories or LoraAdapter objects, all
    for this base. probes: a ProbeSet, "generic" (default), a domain name, or a probe file.
    cache: a DeltaCache (or its directory) to read hits from and store new deltas in.
    Without `keep_going` the first bad adapter raises AdapterError (deltas already computed
    stay cached); with it, failed rows are NaN (use `run_deltas` for the list of failures).
    adapters_per_batch: adapters per forward (n adapters x P probes rows); adapter_chunk_size:
    flora's micro-batching inside that forward (memory); loader_threads: threads loading and
    hashing adapters ahead of the forward passes (default: 4 on an accelerator, 1 on CPU).
    compile: `torch.compile` the fused forward (default: on CUDA; the first batch of each size
    then takes seconds to compile, later ones run ~1.4x faster: docs/benchmarks.md).
    """
    return run_deltas(
        base,
        adapters,
        probes,
        cache,
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
