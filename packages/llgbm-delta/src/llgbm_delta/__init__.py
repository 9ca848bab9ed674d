"""llgbm-delta: Delta Activations for LoRA adapters.

Probe sets, the one delta definition (`DeltaSpec`, `delta_for_lora`), fast batched teacher
deltas (`compute_deltas`) and a content-keyed cache (`DeltaCache`).

    from llgbm_delta import compute_deltas, DeltaCache
    deltas = compute_deltas("path/to/base", ["adapters/a", "adapters/b"], cache=DeltaCache("cache"))
"""

from llgbm_delta.cache import BaseInfo, DeltaCache, EntryMeta, entry_key
from llgbm_delta.compute import DeltaFailure, DeltaResult, compute_deltas, load_base, run_deltas
from llgbm_delta.delta import (
    ProbeBatch,
    activations,
    base_activation,
    delta_for_lora,
    encode_probes,
    last_token_index,
    pool_tokens,
)
from llgbm_delta.errors import (
    AdapterError,
    BaseModelError,
    CacheError,
    DeltaError,
    DeltaSpecError,
    ProbeError,
)
from llgbm_delta.fingerprint import adapter_content_hash, model_fingerprint
from llgbm_delta.probes import ProbeSet, domain_probes, generic_probes, load_probes, resolve_probes
from llgbm_delta.spec import DeltaSpec

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "BaseInfo",
    "BaseModelError",
    "CacheError",
    "DeltaCache",
    "DeltaError",
    "DeltaFailure",
    "DeltaResult",
    "DeltaSpec",
    "DeltaSpecError",
    "EntryMeta",
    "ProbeBatch",
    "ProbeError",
    "ProbeSet",
    "activations",
    "adapter_content_hash",
    "base_activation",
    "compute_deltas",
    "delta_for_lora",
    "domain_probes",
    "encode_probes",
    "entry_key",
    "generic_probes",
    "last_token_index",
    "load_base",
    "load_probes",
    "model_fingerprint",
    "pool_tokens",
    "resolve_probes",
    "run_deltas",
]
