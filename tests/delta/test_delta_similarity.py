"""similarity / nearest: exact cosine against a direct formula; edge cases; no torch needed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from llgbm_delta import DeltaError, nearest, similarity


def _direct(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.array([[x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for y in b] for x in a])


def test_similarity_equals_the_direct_formula():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((7, 16)).astype(np.float32)
    q = rng.standard_normal((3, 16))
    np.testing.assert_allclose(similarity(d), _direct(d, d), rtol=0, atol=1e-12)
    np.testing.assert_allclose(similarity(d, q), _direct(d, q), rtol=0, atol=1e-12)
    assert similarity(d).dtype == np.float64
    np.testing.assert_allclose(np.diag(similarity(d)), 1.0, atol=1e-12)
    # Scale-free: a longer copy of a row is its nearest neighbour at cosine 1.
    d2 = np.vstack([d, 5 * d[2]])
    idx, cos = nearest(d2, 2, k=1)
    assert idx.tolist() == [7] and cos[0] == pytest.approx(1.0, abs=1e-12)


def test_nearest_orders_excludes_self_and_breaks_ties_by_index():
    d = np.array([[1.0, 0], [0, 1], [1, 1], [1, 0], [-1, 0]])
    idx, cos = nearest(d, 0, k=10)  # k beyond the candidates: all of them, itself left out
    assert idx.tolist() == [3, 2, 1, 4]
    np.testing.assert_allclose(cos, [1, 2**-0.5, 0, -1], atol=1e-12)
    idx, cos = nearest(d, np.array([1.0, 0]), k=2)  # a vector: every row is a candidate
    assert idx.tolist() == [0, 3]
    idx, cos = nearest(d, np.array([[0, 2.0], [-3, 0]]), k=1)  # a batch of queries
    assert idx.tolist() == [[1], [4]] and cos.shape == (2, 1)
    brute = np.argsort(-_direct(d, d[[2]])[:, 0], kind="stable")
    assert nearest(d, d[2], k=5)[0].tolist() == brute.tolist()


def test_zero_and_non_finite_rows():
    d = np.array([[1.0, 0], [0, 0], [0, 1]])
    s = similarity(d)
    assert s[1].tolist() == [0, 0, 0] and s[:, 1].tolist() == [0, 0, 0]
    bad = d.copy()
    bad[2, 0] = np.nan
    with pytest.raises(DeltaError, match="row 2 is not finite"):
        similarity(bad)
    with pytest.raises(DeltaError, match="k must be a positive int"):
        nearest(d, 0, k=0)
    with pytest.raises(DeltaError, match="out of range"):
        nearest(d, 3)
    with pytest.raises(DeltaError, match="2-D"):
        similarity(d[0])


def test_no_torch_needed():
    code = (
        "import sys, numpy as np\n"
        "from llgbm_delta import similarity, nearest, DeltaCache, generic_probes\n"
        "print(nearest(np.eye(3), 0, k=1)[0].tolist(), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[1] False"
