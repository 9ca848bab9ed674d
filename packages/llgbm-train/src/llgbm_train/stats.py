"""Accuracy with a 95% bootstrap interval over generator seeds and scored items.

    acc, lo, hi = bootstrap_accuracy([x_task1, x_task2], n_boot=1000, seed=0)
    # x_task: bool array [n_seeds, n_items] (one row per generator seed, the same items in each)

One replicate draws the seeds with replacement (a seed is one trained generator, applied to every
task, so the same draw serves all tasks), then each task's items with replacement (the same item
draw for every seed: seeds and items are crossed, every seed scores the same items), and takes the
mean over the drawn (seed, item) cells of every task. With one seed it is the ordinary percentile
bootstrap over items, stratified by task. Tasks themselves are not resampled: the interval is about
these tasks, as many seeds and items as were scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _counts(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """How often each of ``n`` units is drawn in each of ``n_boot`` resamples. -> [n_boot, n]."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def bootstrap_accuracy(
    groups: Sequence[np.ndarray], *, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean accuracy and its 95% interval; ``groups``: per task, correct [n_seeds, n_items]."""
    mats = [np.atleast_2d(np.asarray(g, dtype=np.float64)) for g in groups]
    mats = [m for m in mats if m.size]
    if not mats:
        return float("nan"), float("nan"), float("nan")
    n_seeds = {m.shape[0] for m in mats}
    if len(n_seeds) != 1:
        raise ValueError(f"bootstrap_accuracy: tasks have different seed counts {sorted(n_seeds)}")
    (s,) = n_seeds
    total = sum(m.size for m in mats)
    point = sum(m.sum() for m in mats) / total
    rng = np.random.default_rng(seed)
    seed_w = _counts(rng, n_boot, s)  # [n_boot, n_seeds]
    hits = np.zeros(n_boot)
    for m in mats:
        item_w = _counts(rng, n_boot, m.shape[1])  # [n_boot, n_items]
        hits += np.einsum("bs,si,bi->b", seed_w, m, item_w)
    means = hits / total
    return float(point), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def bits(correct: Sequence[bool]) -> str:
    """Per-item results as a compact string of 0/1 (what reports store)."""
    return "".join("1" if c else "0" for c in correct)


def unbits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8) == ord("1")
