"""BehaviourCache: behaviour targets on disk, keyed by content like the DeltaCache.

    targets = compute_behaviour(model, tokenizer, adapters, probe_sets, spec,
                                cache=BehaviourCache("world/behaviour_cache"))

Layout: ``ROOT/entries/<key>.safetensors``, one per (adapter, probe set, spec), holding the
tensors of a `BehaviourTarget` and metadata (the key parts, names, a sha256 over the metadata and
every tensor's bytes). The key is sha256 over the base fingerprint, the probe-set hash, the
probe token-id hash, the BehaviourSpec hash and the adapter content hash: the DeltaCache's key
parts, with a behaviour spec in place of the delta spec. Writes are atomic (temp file, then
``os.replace``); an entry that fails its checks is moved to ``corrupt/`` and recomputed. No
manifest: entries are self-describing and found by key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from llgbm_flora import LoraAdapter
from llgbm_flora.atomic import write_bytes
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from llgbm_delta.behaviour import (
    BehaviourSpec,
    BehaviourTarget,
    teacher_targets,
    token_hash,
    tokenize_probes,
)
from llgbm_delta.errors import BaseModelError, CacheError
from llgbm_delta.fingerprint import adapter_content_hash, model_fingerprint
from llgbm_delta.probes import ProbeSet

log = logging.getLogger(__name__)

ENTRY_FORMAT = "llgbm-behaviour-entry/1"


def behaviour_key(
    *, base_fingerprint: str, probe_hash: str, token_hash: str, spec_hash: str, adapter_hash: str
) -> str:
    parts = [ENTRY_FORMAT, base_fingerprint, probe_hash, token_hash, spec_hash, adapter_hash]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _checksum(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(
        json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode()
    )
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))  # the bytes in place, no copy
    return h.hexdigest()


class BehaviourCache:
    """A directory of behaviour targets keyed by content (see module doc)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.problems: list[tuple[str, str]] = []  # (key, reason) of damaged entries met

    def __repr__(self) -> str:
        return f"BehaviourCache({str(self.root)!r})"

    def path(self, key: str) -> Path:
        return self.root / "entries" / f"{key}.safetensors"

    def get(self, key: str) -> BehaviourTarget | None:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            tensors = st_load(data)
            n = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
            if meta.get("format") != ENTRY_FORMAT or meta.get("key") != key:
                raise ValueError("not an entry for this key")
            if _checksum(meta, tensors) != meta.get("sha256"):
                raise ValueError("checksum mismatch")
            return BehaviourTarget.from_tensors(tensors)
        except Exception as e:  # damaged files raise assorted errors; all mean "miss"
            reason = f"{type(e).__name__}: {e}"
            log.warning("behaviour cache entry %s is corrupt (%s); recomputing", path, reason)
            self.problems.append((key, reason))
            qdir = self.root / "corrupt"
            qdir.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, qdir / f"{path.name}.{time.time_ns()}")
            return None

    def put(self, key: str, target: BehaviourTarget, names: dict[str, str]) -> None:
        tensors = {k: v.contiguous().cpu() for k, v in target.tensors().items()}
        for name, t in tensors.items():
            if t.is_floating_point() and bool(torch.isnan(t).any() or (t == float("inf")).any()):
                raise CacheError(f"refusing to cache a non-finite behaviour target ({name})")
        meta = {"format": ENTRY_FORMAT, "key": key, **{k: str(v) for k, v in names.items()}}
        meta["sha256"] = _checksum(meta, tensors)
        self.path(key).parent.mkdir(parents=True, exist_ok=True)
        write_bytes(self.path(key), st_save(tensors, metadata=meta))

    def __len__(self) -> int:
        d = self.root / "entries"
        return len(list(d.glob("*.safetensors"))) if d.is_dir() else 0


def compute_behaviour(
    model: nn.Module,
    tokenizer,
    adapters: Sequence[LoraAdapter],
    probes: Sequence[ProbeSet],
    spec: BehaviourSpec,
    cache: BehaviourCache | str | Path | None = None,
    *,
    adapters_per_batch: int = 16,
    progress: bool = False,
    names: Sequence[str] | None = None,
) -> list[BehaviourTarget]:
    """Behaviour targets of `adapters` (adapter i on `probes[i]`), read from / written to `cache`.

    Misses are computed by `teacher_targets` in batches; the base weights are fingerprinted
    before and after (a change raises BaseModelError).
    """
    if isinstance(cache, str | Path):
        cache = BehaviourCache(cache)
    fingerprint = model_fingerprint(model)
    out: list[BehaviourTarget | None] = [None] * len(adapters)
    keys: list[str] = []
    for i, (adapter, ps) in enumerate(zip(adapters, probes, strict=True)):
        rows = tokenize_probes(tokenizer, ps)
        key = behaviour_key(
            base_fingerprint=fingerprint,
            probe_hash=ps.hash,
            token_hash=token_hash(rows),
            spec_hash=spec.hash,
            adapter_hash=adapter_content_hash(adapter),
        )
        keys.append(key)
        if cache is not None:
            out[i] = cache.get(key)
    missing = [i for i, t in enumerate(out) if t is None]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(missing), desc="behaviour targets", unit="adapter", disable=not progress)
    try:
        step = max(1, adapters_per_batch)
        for s in range(0, len(missing), step):
            idx = missing[s : s + step]
            got = teacher_targets(
                model,
                tokenizer,
                [adapters[i] for i in idx],
                [probes[i] for i in idx],
                spec,
                adapters_per_batch=step,
            )
            for i, t in zip(idx, got):
                out[i] = t
                if cache is not None:
                    label = names[i] if names is not None else f"adapter[{i}]"
                    cache.put(
                        keys[i],
                        t,
                        {
                            "adapter_name": label,
                            "probe_name": probes[i].name,
                            "spec": json.dumps(spec.to_dict(), sort_keys=True),
                            "base_fingerprint": fingerprint,
                        },
                    )
            bar.update(len(idx))
    finally:
        bar.close()
    if missing and model_fingerprint(model) != fingerprint:
        raise BaseModelError("base model weights changed while computing behaviour targets")
    return out  # type: ignore[return-value]
