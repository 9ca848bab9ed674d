"""Quality of a world's teacher zoo: accuracy, and how well teacher deltas cluster by family.

``measure_world(dir)`` computes, over the single-task teachers of the world, the silhouette score
(cosine distance) of their Delta Activations on the generic probes grouped by family, the same
grouped by task, and the family silhouette of their flattened LoRA weights (A and B concatenated)
for comparison. Deltas come from the world's delta cache (``llgbm_worlds.deltas``), so a second
call, or one after training, computes nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from llgbm_worlds.show import summary
from llgbm_worlds.world import World


def silhouette_cosine(x: np.ndarray, labels: list[str]) -> float:
    """Mean silhouette of rows of ``x`` [n, d] under cosine distance; singletons count 0."""
    x = np.asarray(x, dtype=np.float64)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    return silhouette(1.0 - x @ x.T, labels)


def cosine_distances_from_gram(gram: np.ndarray) -> np.ndarray:
    """1 - cos between items whose inner products are ``gram`` [n, n] (e.g. delta-W Gram)."""
    g = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(g), 1e-24, None))
    return 1.0 - g / np.outer(norms, norms)


def silhouette(dist: np.ndarray, labels: list[str]) -> float:
    """Mean silhouette of ``n`` items under the distance matrix ``dist`` [n, n]; singletons 0."""
    dist = np.asarray(dist, dtype=np.float64)
    lab = np.asarray(labels)
    if len(set(labels)) < 2:
        raise ValueError("silhouette needs at least two labels")
    if dist.shape != (len(lab), len(lab)):
        raise ValueError(f"silhouette: distances {dist.shape} for {len(lab)} labels")
    scores = []
    for i in range(len(lab)):
        same = lab == lab[i]
        same[i] = False
        if not same.any():
            scores.append(0.0)
            continue
        a = dist[i, same].mean()
        b = min(dist[i, lab == other].mean() for other in set(labels) if other != lab[i])
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(scores))


def flat_weights(paths: list[Path]) -> np.ndarray:
    """[n, n_params] flattened LoRA A and B tensors of PEFT adapters (same structure)."""
    from llgbm_flora import load_adapter

    rows = []
    for p in paths:
        a = load_adapter(p)
        order = a.spec.keys()  # LoraSpec.keys(): (layer, module) pairs in a stable order
        rows.append(
            np.concatenate(
                [t.detach().float().flatten().numpy() for k in order for t in (a.A[k], a.B[k])]
            )
        )
    return np.stack(rows)


def measure_world(path: str | Path, *, device: str | None = None, progress: bool = False) -> dict:
    """Accuracy summary and family silhouettes (delta vs flattened weights) of a world."""
    from llgbm_worlds.deltas import WorldDeltas

    w = World.load(path)
    fam = {t.name: t.family for t in w.tasks}
    teachers = [t for t in w.teachers if t.kind == "single"]
    deltas = WorldDeltas(w, device=device, progress=progress).teachers(teachers).deltas
    labels = [fam[t.task] for t in teachers]
    out = dict(summary(w))
    out["n_teachers"] = len(teachers)
    out["n_families"] = len(set(labels))
    out["silhouette_delta"] = silhouette_cosine(deltas, labels)
    # The same deltas grouped by task: do variants of one family (add 2 vs add 5) stay apart, or
    # does a family collapse to one point? (Its checkpoints and data splits form each group.)
    out["silhouette_delta_task"] = silhouette_cosine(deltas, [t.task for t in teachers])
    out["silhouette_weights"] = silhouette_cosine(flat_weights([t.path for t in teachers]), labels)
    out["max_base_accuracy"] = max(
        (t.base_accuracy for t in w.tasks if not math.isnan(t.base_accuracy)), default=float("nan")
    )
    return out
