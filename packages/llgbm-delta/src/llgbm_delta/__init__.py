"""llgbm-delta: Delta Activations of fine-tuned models (PEFT LoRA adapters, full checkpoints).

Probe sets, the one delta definition (`DeltaSpec`, `delta_for_lora`), fast batched deltas
(`compute_deltas`), a content-keyed cache (`DeltaCache`) and exact cosine similarity helpers.

    from llgbm_delta import compute_deltas, nearest
    deltas = compute_deltas(model=model, tokenizer=tok, adapters=["adapters/a", "adapters/b"])
    idx, scores = nearest(deltas, 0, k=1)

Names are imported on first use, so `import llgbm_delta` is cheap and the cache, probes and
similarity helpers work without importing torch.
"""

from __future__ import annotations

from llgbm_flora.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "BaseInfo": "cache",
    "DeltaCache": "cache",
    "EntryMeta": "cache",
    "entry_key": "cache",
    "DeltaFailure": "compute",
    "DeltaResult": "compute",
    "compute_deltas": "compute",
    "load_base": "base",
    "run_deltas": "compute",
    "ProbeBatch": "delta",
    "activations": "delta",
    "base_activation": "delta",
    "delta_for_lora": "delta",
    "encode_probes": "delta",
    "last_token_index": "delta",
    "pool_tokens": "delta",
    "AdapterError": "errors",
    "BaseModelError": "errors",
    "CacheError": "errors",
    "DeltaError": "errors",
    "DeltaSpecError": "errors",
    "DeltaWarning": "errors",
    "ProbeError": "errors",
    "adapter_content_hash": "fingerprint",
    "checkpoint_content_hash": "fingerprint",
    "model_fingerprint": "fingerprint",
    "ProbeSet": "probes",
    "domain_probes": "probes",
    "generic_probes": "probes",
    "load_probes": "probes",
    "resolve_probes": "probes",
    "nearest": "cosine",
    "similarity": "cosine",
    "DeltaSpec": "spec",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
