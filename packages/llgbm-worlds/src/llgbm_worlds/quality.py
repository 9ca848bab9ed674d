"""Quality of a world's teacher zoo: accuracy, and how well teacher deltas cluster by family.

``measure_world(dir)`` computes, over the single-task teachers of the world, the silhouette score
(cosine distance) of their Delta Activations on the generic probes grouped by family, the same
grouped by task, the family silhouette of their flattened LoRA weights (A and B concatenated)
for comparison, and how aligned the zoo's weights are: the mean cosine of A, of B and of
delta-W = scale * B A between two checkpoints of one run, two runs of one task (other data
splits) and teachers of different tasks (``weight_cosines``). Deltas come from the world's delta
cache (``llgbm_worlds.deltas``), so a second call, or one after training, computes nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

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


def _flat_parts(path: Path) -> dict[str, np.ndarray]:
    from llgbm_flora import load_adapter

    a = load_adapter(path)
    order = a.spec.keys()  # LoraSpec.keys(): (layer, module) pairs in a stable order
    flat = lambda ts: np.concatenate([t.detach().float().flatten().numpy() for t in ts])  # noqa: E731
    return {"A": flat(a.A[k] for k in order), "B": flat(a.B[k] for k in order)}


def flat_weights(paths: list[Path]) -> np.ndarray:
    """[n, n_params] flattened LoRA A and B tensors of PEFT adapters (same structure)."""
    return np.stack([np.concatenate([p["A"], p["B"]]) for p in map(_flat_parts, paths)])


def weight_cosines(teachers: list) -> dict[str, dict[str, float]]:
    """Mean cosine of flattened A, B and delta-W over pairs of teachers, by how they relate.

    ``same_run``: two checkpoints of one run; ``same_task``: runs of one task on other data
    splits; ``different_tasks``: everything else. ``teachers``: TeacherInfo rows of one world.
    The delta-W cosines come from llgbm-flora's Gram (r x r products), never from dense B @ A: a
    real model's delta-W is ~10^8 numbers per adapter (the smollm2 zoo's would need ~100 GB).
    """
    from llgbm_flora import LoraBatch, load_adapter
    from llgbm_flora.algebra import gram

    batch = LoraBatch.from_adapters([load_adapter(t.path) for t in teachers])
    order = batch.spec.keys()
    flat = {
        "A": torch.cat([batch.A[k].flatten(1) for k in order], dim=1).double(),
        "B": torch.cat([batch.B[k].flatten(1) for k in order], dim=1).double(),
    }
    grams = {name: x @ x.T for name, x in flat.items()}
    grams["delta_w"] = gram(batch.to(dtype=torch.float64))
    cosines = {k: 1.0 - cosine_distances_from_gram(g.numpy()) for k, g in grams.items()}
    out: dict[str, dict[str, float]] = {}
    for name in ("A", "B", "delta_w"):
        cos = cosines[name]  # [n, n]
        groups: dict[str, list[float]] = {"same_run": [], "same_task": [], "different_tasks": []}
        for i in range(len(teachers)):
            for j in range(i + 1, len(teachers)):
                a, b = teachers[i], teachers[j]
                if a.task != b.task:
                    key = "different_tasks"
                elif a.data_split == b.data_split:
                    key = "same_run"
                else:
                    key = "same_task"
                groups[key].append(float(cos[i, j]))
        out[name] = {k: float(np.mean(v)) if v else float("nan") for k, v in groups.items()}
    return out


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
    out["cosine"] = weight_cosines(teachers)
    out["init"] = w.init
    out["max_base_accuracy"] = max(
        (t.base_accuracy for t in w.tasks if not math.isnan(t.base_accuracy)), default=float("nan")
    )
    return out
