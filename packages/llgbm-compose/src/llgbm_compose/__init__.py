"""llgbm-compose: adapters clustered, added, merged and retrieved by their Delta Activations.

    from llgbm_compose import merges, DeltaIndex, index_world, run_compose
    m = merges.ties(["teachers/a", "teachers/b"], density=0.2, rank=8)   # in delta-W space
    m.save("out/merged")                                                  # a PEFT adapter
    index = index_world("worlds/tiny"); index.save()                      # faiss, cosine
    hits = index.query_adapter("out/merged", k=5)
    report = run_compose("worlds/tiny", "runs/compose/tiny")              # the whole study

Nothing runs or reads files at import time, and nothing heavy is imported: each name loads
its module (torch, faiss) on first use (llgbm_flora.lazy).
"""

from llgbm_flora.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "ComposeConfig": "experiment",
    "ComposeError": "errors",
    "DeltaIndex": "retrieval",
    "Hit": "retrieval",
    "Merge": "merges",
    "RetrievalError": "errors",
    "additivity": "additivity",
    "average": "merges",
    "clustering": "clustering",
    "compare_deltas": "additivity",
    "dare": "merges",
    "index_world": "retrieval",
    "merge": "merges",
    "merges": None,
    "precision_at_k": "retrieval",
    "retrieve_merge": "retrieval",
    "run_compose": "experiment",
    "task_arithmetic": "merges",
    "ties": "merges",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
