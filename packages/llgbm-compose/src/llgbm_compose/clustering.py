"""Clustering quality of three adapter representations: the Delta Activations paper's Table 1 in
miniature (silhouette on cosine distance, by family and by task).

    from llgbm_compose.clustering import clustering
    table = clustering(world_deltas)      # {"delta": {"family": .., "task": ..}, "weights": .., ...}

Representations of each single-task teacher:
- ``delta``: its Delta Activation (the world's delta cache);
- ``weights``: its LoRA A and B flattened and concatenated (the paper's "flattened weights");
- ``delta_w``: its update dW = s·B·A over all keys, compared through the Gram matrix
  <dW_i, dW_j>_F (llgbm_flora.algebra.gram), so no [out, in] matrix is formed.
The paper (15 adapters per base, 5 domains): deltas 0.614 on average, flattened weights -0.043.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

REPRESENTATIONS = ("delta", "weights", "delta_w")
GROUPINGS = ("family", "task")


def representations(world_deltas, teachers) -> dict[str, np.ndarray]:
    """``delta``: [n, hidden]; ``weights``: [n, n_params]; ``delta_w``: cosine distances [n, n]."""
    from llgbm_flora import LoraBatch, algebra, load_adapter
    from llgbm_worlds.quality import cosine_distances_from_gram, flat_weights

    deltas = world_deltas.teachers(teachers).deltas
    batch = LoraBatch.from_adapters([load_adapter(t.path) for t in teachers])
    gram = algebra.gram(batch.to(dtype=torch.float64)).numpy()  # [n, n]
    return {
        "delta": deltas,
        "weights": flat_weights([t.path for t in teachers]),
        "delta_w": cosine_distances_from_gram(gram),
    }


def clustering(world_deltas, teachers=None) -> dict[str, Any]:
    """Silhouette (cosine) of each representation, grouped by family and by task."""
    from llgbm_worlds.quality import silhouette, silhouette_cosine

    from llgbm_compose.zoo import single_teachers

    world = world_deltas.world
    teachers = single_teachers(world) if teachers is None else list(teachers)
    fam = {t.name: t.family for t in world.tasks}
    labels = {"family": [fam[t.task] for t in teachers], "task": [t.task for t in teachers]}
    reps = representations(world_deltas, teachers)
    table: dict[str, dict[str, float | None]] = {}
    for name in REPRESENTATIONS:
        table[name] = {}
        for g in GROUPINGS:
            if len(set(labels[g])) < 2:
                table[name][g] = None  # one group: silhouette undefined
                continue
            if name == "delta_w":
                table[name][g] = silhouette(reps[name], labels[g])
            else:
                table[name][g] = silhouette_cosine(reps[name], labels[g])
    return {
        "n_teachers": len(teachers),
        "n_families": len(set(labels["family"])),
        "n_tasks": len(set(labels["task"])),
        "silhouette": table,
        "paper_table1_average": {"delta": 0.614, "weights": -0.043},
        "labels": labels,
    }
