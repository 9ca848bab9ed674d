"""Page logic on numbers already read: projections, similarities, neighbours, cluster quality.

All functions take float arrays ``x`` [n, hidden] (one delta per row) and return plain numpy or
pandas; none reads a file. Cosine everywhere, as Delta Activations compares deltas by cosine.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero). [n, d] float64."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)  # [n, 1]
    return x / np.where(norm > 0, norm, 1.0)


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    """[n, n] cosine similarity of the rows of ``x``."""
    u = unit_rows(x)
    return np.clip(u @ u.T, -1.0, 1.0)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates [n, 2], explained variance ratio [2]) of the centred rows of ``x``."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return np.zeros((len(x), 2)), np.zeros(2)
    xc = x - x.mean(axis=0)  # [n, d]
    u, s, _ = np.linalg.svd(xc, full_matrices=False)  # u [n, k], s [k]
    k = min(2, len(s))
    coords = np.zeros((len(x), 2))
    coords[:, :k] = u[:, :k] * s[:k]
    var = s**2
    ratio = np.zeros(2)
    if var.sum() > 0:
        ratio[:k] = var[:k] / var.sum()
    return coords, ratio


def tsne_2d(x: np.ndarray, *, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """[n, 2] t-SNE of the rows of ``x`` under cosine distance (perplexity capped for small n)."""
    n = len(x)
    if n < 4:  # t-SNE needs perplexity < n; with three points there is nothing to learn
        return pca_2d(x)[0]
    from sklearn.manifold import TSNE

    p = float(min(perplexity, (n - 1) / 3))
    return TSNE(
        n_components=2, perplexity=p, metric="cosine", init="pca", random_state=seed
    ).fit_transform(np.asarray(x, dtype=np.float64))


def nearest(
    x: np.ndarray, query: np.ndarray, k: int, *, exclude: int | None = None
) -> pd.DataFrame:
    """The ``k`` rows of ``x`` most cosine-similar to ``query`` [d]: columns ``row``, ``cosine``.

    ``exclude``: a row index to leave out (the query adapter itself).
    """
    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    q = unit_rows(np.asarray(query, dtype=np.float64)[None])[0]  # [d]
    sims = unit_rows(x) @ q  # [n]
    order = np.argsort(-sims, kind="stable")
    if exclude is not None:
        order = order[order != exclude]
    order = order[:k]
    return pd.DataFrame({"row": order, "cosine": sims[order]})


def precision_at_k(x: np.ndarray, labels: list[str], k: int) -> float:
    """Mean over rows of the share of its ``k`` nearest other rows with the same label."""
    lab = np.asarray(labels)
    n = len(lab)
    if n < 2:
        return float("nan")
    k = min(k, n - 1)
    sims = cosine_matrix(x)
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [n, k]
    return float((lab[top] == lab[:, None]).mean())


def silhouettes(x: np.ndarray, labels: list[str]) -> np.ndarray:
    """Silhouette of each row under cosine distance ([n]); rows of a singleton label score 0."""
    from sklearn.metrics import silhouette_samples

    if len(set(labels)) < 2 or len(set(labels)) >= len(labels):
        raise ValueError("silhouette needs at least two labels and fewer labels than rows")
    return silhouette_samples(np.asarray(x, dtype=np.float64), np.asarray(labels), metric="cosine")


def cluster_table(groups: dict[str, tuple[np.ndarray, list[str]]]) -> pd.DataFrame:
    """Silhouette (cosine) of each representation by each grouping.

    ``groups``: name -> (x [n, d], labels [n]); returns columns ``representation``, ``by``,
    ``silhouette``, ``n``, ``groups``. A grouping that cannot be scored (one label, or one row
    per label) gets a NaN silhouette.
    """
    rows = []
    for name, (x, labels) in groups.items():
        rep, _, by = name.partition(" by ")
        try:
            s = float(np.mean(silhouettes(x, labels)))
        except ValueError:
            s = float("nan")
        rows.append(
            {
                "representation": rep,
                "by": by,
                "silhouette": s,
                "n": len(labels),
                "groups": len(set(labels)),
            }
        )
    return pd.DataFrame(rows)


def curves(metrics: pd.DataFrame) -> list[tuple[str, str | None]]:
    """(metric, its trivial baseline column or None) for every numeric logged metric.

    The trainer logs each loss beside ``<loss>_baseline`` (the same loss of a trivial predictor);
    those columns are paired with their metric, not drawn alone. Metrics with a baseline come
    first, then the other losses, then the rest (learning rate, schedules, gradient norm).
    """
    cols = [
        c
        for c in metrics.columns
        if c != "step" and pd.api.types.is_numeric_dtype(metrics[c]) and not c.endswith("_baseline")
    ]
    pairs = [(c, f"{c}_baseline" if f"{c}_baseline" in metrics.columns else None) for c in cols]
    return sorted(pairs, key=lambda p: (p[1] is None, not p[0].startswith("loss")))
