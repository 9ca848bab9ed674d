"""Page logic on arrays: projections, cosine, neighbours, cluster scores, curve pairing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from llgbm_explorer import analysis


def clusters(seed: int = 0, n: int = 6, d: int = 16) -> tuple[np.ndarray, list[str]]:
    """Three tight clusters around orthogonal directions: [3n, d] and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:3] * 5
    x = np.concatenate([c + 0.1 * rng.standard_normal((n, d)) for c in centres])
    return x, [g for g in "abc" for _ in range(n)]


def test_pca_matches_the_covariance_eigenvectors():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 5)) @ np.diag([5.0, 3.0, 1.0, 0.5, 0.1])
    coords, ratio = analysis.pca_2d(x)
    xc = x - x.mean(0)
    w, v = np.linalg.eigh(np.cov(xc.T))
    ref = xc @ v[:, ::-1][:, :2]
    # Each component equals the reference up to sign.
    for i in range(2):
        assert np.allclose(np.abs(coords[:, i]), np.abs(ref[:, i]), atol=1e-8)
    assert ratio == pytest.approx(w[::-1][:2] / w.sum())


def test_tsne_keeps_clusters_apart():
    x, labels = clusters()
    y = analysis.tsne_2d(x, seed=0)
    assert y.shape == (len(x), 2)
    lab = np.asarray(labels)
    centre = {g: y[lab == g].mean(0) for g in "abc"}
    spread = max(np.linalg.norm(y[lab == g] - centre[g], axis=1).max() for g in "abc")
    gap = min(np.linalg.norm(centre[a] - centre[b]) for a in "abc" for b in "abc" if a < b)
    assert gap > 2 * spread


def test_tiny_inputs_do_not_break_projections():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert analysis.tsne_2d(x).shape == (3, 2)
    assert analysis.pca_2d(x[:1])[0].shape == (1, 2)


def test_cosine_and_nearest():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])
    sims = analysis.cosine_matrix(x)
    assert sims[0, 3] == pytest.approx(-1.0)
    assert sims[4, 0] == 0.0  # a zero delta is similar to nothing
    hits = analysis.nearest(x, x[0], 3, exclude=0)
    assert list(hits["row"]) == [1, 2, 4]  # cosine 0.99, 0 (orthogonal), 0 (zero row): stable order
    assert 0 not in set(hits["row"])
    assert hits["cosine"].iloc[0] == pytest.approx(0.9 / np.hypot(0.9, 0.1))
    with pytest.raises(ValueError, match="k"):
        analysis.nearest(x, x[0], 0)


def test_precision_at_k_on_a_crafted_case():
    x, labels = clusters()
    assert analysis.precision_at_k(x, labels, 5) == 1.0
    # Relabel one row: it and its cluster-mates now have neighbours of another label.
    wrong = list(labels)
    wrong[0] = "b"
    hits = np.argsort(-np.where(np.eye(18) == 1, -np.inf, analysis.cosine_matrix(x)), axis=1)[:, :5]
    lab = np.asarray(wrong)
    expected = float((lab[hits] == lab[:, None]).mean())
    assert analysis.precision_at_k(x, wrong, 5) == pytest.approx(expected)
    assert expected < 1.0


def test_silhouettes_equal_the_worlds_package_score():
    from llgbm_worlds.quality import silhouette_cosine

    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 8))
    labels = [str(i % 4) for i in range(30)]
    labels[-1] = "solo"  # a singleton scores 0 in both
    assert analysis.silhouettes(x, labels).mean() == pytest.approx(
        silhouette_cosine(x, labels), abs=1e-9
    )


def test_cluster_table_scores_and_unscorable_groupings():
    x, labels = clusters()
    table = analysis.cluster_table(
        {"deltas by family": (x, labels), "deltas by task": (x, list(map(str, range(18))))}
    )
    row = table.set_index("by").loc["family"]
    assert row["representation"] == "deltas" and row["silhouette"] > 0.9 and row["groups"] == 3
    assert np.isnan(table.set_index("by").loc["task", "silhouette"])  # one row per label


def test_curves_pair_each_metric_with_its_baseline():
    m = pd.DataFrame(
        {
            "step": [1, 2],
            "loss": [2.0, 1.0],
            "loss_w": [1.0, 0.5],
            "loss_w_baseline": [1.0, 1.0],
            "lr": [1e-3, 5e-4],
            "note": ["a", "b"],
        }
    )
    assert analysis.curves(m) == [("loss_w", "loss_w_baseline"), ("loss", None), ("lr", None)]
