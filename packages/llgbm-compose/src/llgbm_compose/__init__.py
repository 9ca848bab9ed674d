"""llgbm-compose: adapters clustered, added, merged and retrieved by their Delta Activations.

    from llgbm_compose import merges, DeltaIndex, index_world, run_compose
    m = merges.ties(["teachers/a", "teachers/b"], density=0.2, rank=8)   # in delta-W space
    m.save("out/merged")                                                  # a PEFT adapter
    index = index_world("worlds/tiny"); index.save()                      # faiss, cosine
    hits = index.query_adapter("out/merged", k=5)
    report = run_compose("worlds/tiny", "runs/compose/tiny")              # the whole study

Nothing runs or reads files at import time.
"""

from llgbm_compose import merges
from llgbm_compose.additivity import additivity, compare_deltas
from llgbm_compose.clustering import clustering
from llgbm_compose.errors import ComposeError, RetrievalError
from llgbm_compose.experiment import ComposeConfig, run_compose
from llgbm_compose.merges import Merge, average, dare, merge, task_arithmetic, ties
from llgbm_compose.retrieval import DeltaIndex, Hit, index_world, precision_at_k, retrieve_merge

__version__ = "0.1.0"

__all__ = [
    "ComposeConfig",
    "ComposeError",
    "DeltaIndex",
    "Hit",
    "Merge",
    "RetrievalError",
    "additivity",
    "average",
    "clustering",
    "compare_deltas",
    "dare",
    "index_world",
    "merge",
    "merges",
    "precision_at_k",
    "retrieve_merge",
    "run_compose",
    "task_arithmetic",
    "ties",
]
