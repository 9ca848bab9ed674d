"""Cosine similarity of delta activations, exact, in numpy (no torch, no index).

    S = similarity(deltas)                  # [n, n] cosine matrix
    idx, cos = nearest(deltas, 3, k=5)      # the 5 adapters closest to adapter 3 (itself excluded)
    idx, cos = nearest(deltas, query, k=5)  # closest to a vector [hidden] (or each of [m, hidden])

Computed in float64 over all pairs: exact at the scale of a zoo (10^4 adapters x 10^4 is 800 MB
of float64; beyond that, an approximate index such as llgbm-compose's faiss retrieval). A zero
delta (an adapter that changes nothing on the probes) has no direction: its cosine with anything
is 0. NaN or infinite rows (failed adapters under keep_going) are refused, naming the row.
Ties in `nearest` go to the lower index.
"""

from __future__ import annotations

import numpy as np

from llgbm_delta.errors import DeltaError


def _unit_rows(x, what: str) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float64. [n, H] -> [n, H]."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise DeltaError(f"{what} must be a 2-D array [n, hidden], got shape {a.shape}")
    bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
    if bad.size:
        raise DeltaError(
            f"{what} row {int(bad[0])} is not finite (NaN/inf; a failed adapter?); drop it first"
        )
    norms = np.linalg.norm(a, axis=1, keepdims=True)  # [n, 1]
    return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)


def similarity(deltas, other=None) -> np.ndarray:
    """Cosine similarity of every row of `deltas` with every row of `other` (default: itself).

    deltas [n, H], other [m, H] -> float64 [n, m]; the diagonal of `similarity(d)` is 1 (0 for
    a zero row).
    """
    u = _unit_rows(deltas, "deltas")
    v = u if other is None else _unit_rows(other, "other")
    if u.shape[1] != v.shape[1]:
        raise DeltaError(f"deltas have {u.shape[1]} columns, other has {v.shape[1]}")
    return np.clip(u @ v.T, -1.0, 1.0)


def nearest(deltas, query, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `deltas` with the highest cosine to `query`: (indices, cosines).

    query: a row index of `deltas` (that row is left out of its own answer), a vector [H]
    (-> [k], [k]) or a matrix [m, H] (-> [m, k], [m, k]). k larger than the candidates gives
    them all. Sorted by cosine, highest first; ties by lower index.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise DeltaError(f"k must be a positive int, got {k!r}")
    n = np.asarray(deltas).shape[0] if np.ndim(deltas) == 2 else 0
    exclude = None
    if isinstance(query, int | np.integer) and not isinstance(query, bool):
        if not -n <= query < n:
            raise DeltaError(f"query index {query} is out of range for {n} deltas")
        exclude = int(query) % n
        query = np.asarray(deltas)[exclude]
    q = np.asarray(query, dtype=np.float64)
    single = q.ndim == 1
    s = similarity(deltas, q[None] if single else q).T  # [m, n]
    if exclude is not None:
        s[:, exclude] = -np.inf
    k = min(int(k), n - (exclude is not None))
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]  # [m, k]
    scores = np.take_along_axis(s, order, axis=1)
    return (order[0], scores[0]) if single else (order, scores)
