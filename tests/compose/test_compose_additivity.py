"""Clustering and additivity numbers on the test world against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llgbm_compose import additivity, clustering, compare_deltas
from llgbm_compose.zoo import single_teachers
from llgbm_flora import load_adapter
from llgbm_worlds.quality import silhouette_cosine


def dense_flat(path) -> np.ndarray:
    """s * B @ A of every key, flattened and concatenated (computed here, not by flora)."""
    a = load_adapter(path)
    return np.concatenate(
        [
            (a.spec.scale * (a.B[k].double() @ a.A[k].double())).flatten().numpy()
            for k in a.spec.keys()  # noqa: SIM118 (LoraSpec.keys)
        ]
    )


def cos(x, y) -> float:
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_clustering_matches_direct_silhouettes(world, world_deltas):
    report = clustering(world_deltas)
    teachers = single_teachers(world)
    fam = {t.name: t.family for t in world.tasks}
    labels = {"family": [fam[t.task] for t in teachers], "task": [t.task for t in teachers]}
    deltas = world_deltas.teachers(teachers).deltas
    dw = np.stack([dense_flat(t.path) for t in teachers])
    # Flattened weights: every A and B entry of the adapter, concatenated (read here from the
    # safetensors file, not through llgbm_worlds.quality).
    from safetensors.numpy import load_file

    def flat_ab(path) -> np.ndarray:
        tensors = load_file(str(path / "adapter_model.safetensors"))
        a = [tensors[k].ravel() for k in sorted(tensors) if "lora_A" in k]
        b = [tensors[k].ravel() for k in sorted(tensors) if "lora_B" in k]
        return np.concatenate(a + b).astype(np.float64)

    flat = np.stack([flat_ab(t.path) for t in teachers])
    s = report["silhouette"]
    for g, lab in labels.items():
        assert s["delta"][g] == pytest.approx(silhouette_cosine(deltas, lab), abs=1e-9)
        assert s["delta_w"][g] == pytest.approx(silhouette_cosine(dw, lab), abs=1e-6)
        assert s["weights"][g] == pytest.approx(silhouette_cosine(flat, lab), abs=1e-6)
    assert report["n_teachers"] == len(teachers)
    assert report["n_families"] == len(set(labels["family"])) == 3


def test_compare_deltas_on_known_vectors():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 2.0, 0.0])
    r = compare_deltas(a + b, a, b)
    assert r["sum"]["cos"] == pytest.approx(1.0) and r["sum"]["rel_err"] == pytest.approx(0.0)
    assert r["mean"]["cos"] == pytest.approx(1.0) and r["mean"]["rel_err"] == pytest.approx(0.5)
    assert r["a"]["cos"] == pytest.approx(1 / 5**0.5)
    assert r["fit"]["coef"] == pytest.approx([1.0, 1.0])


def test_additivity_numbers_equal_a_direct_computation(world, world_deltas):
    report = additivity(world_deltas, rank=4)
    mixtures = [t for t in world.teachers if t.kind == "mixture"]
    assert len(report["mixtures"]) == len(mixtures) > 0
    singles = single_teachers(world)
    mu = world_deltas.teachers(singles).deltas.astype(np.float64).mean(0)
    for row, m in zip(report["mixtures"], mixtures):
        a_name, b_name = world.task(m.task).parts
        pa = [t for t in singles if t.task == a_name and t.step == m.step]
        pb = [t for t in singles if t.task == b_name and t.step == m.step]
        assert row["n_part_teachers"] == [len(pa), len(pb)]
        d = world_deltas.teachers([m, *pa, *pb]).deltas.astype(np.float64)
        x, a, b = d[0], d[1 : 1 + len(pa)].mean(0), d[1 + len(pa) :].mean(0)
        for target, t in (("sum", a + b), ("mean", (a + b) / 2), ("a", a), ("b", b)):
            assert row["delta"][target]["cos"] == pytest.approx(cos(x, t), abs=1e-6)
            err = np.linalg.norm(x - t) / np.linalg.norm(x)
            assert row["delta"][target]["rel_err"] == pytest.approx(err, abs=1e-6)
        xc, ac, bc = x - mu, a - mu, b - mu
        assert row["delta_centred"]["sum"]["cos"] == pytest.approx(cos(xc, ac + bc), abs=1e-6)
        coef = np.linalg.lstsq(np.stack([a, b], 1), x, rcond=None)[0]
        assert row["delta"]["fit"]["coef"] == pytest.approx(list(coef), rel=1e-5)
        # delta-W space, from dense matrices.
        wx = dense_flat(m.path)
        wa = np.mean([dense_flat(t.path) for t in pa], axis=0)
        wb = np.mean([dense_flat(t.path) for t in pb], axis=0)
        for target, t in (("sum", wa + wb), ("mean", (wa + wb) / 2), ("a", wa)):
            assert row["delta_w"][target]["cos"] == pytest.approx(cos(wx, t), abs=1e-5)
            err = np.linalg.norm(wx - t) / np.linalg.norm(wx)
            assert row["delta_w"][target]["rel_err"] == pytest.approx(err, abs=1e-5)


def test_merged_adapter_deltas_equal_a_direct_computation(world, world_deltas):
    from llgbm_flora import LoraAdapter

    row = additivity(world_deltas)["mixtures"][0]
    pa, pb = (load_adapter(world.root / p) for p in row["merged"]["adapters"])
    # The exact sum written by hand: factors stacked, scales folded into B.
    keys = pa.spec.keys()
    summed = LoraAdapter(
        pa.spec.replace(rank=2 * pa.spec.rank, alpha=2.0 * pa.spec.rank),
        {k: torch.cat([pa.A[k], pb.A[k]]) for k in keys},
        {k: torch.cat([pa.spec.scale * pa.B[k], pb.spec.scale * pb.B[k]], 1) for k in keys},
    )
    d_sum, d_a, d_b = world_deltas.adapters([summed, pa, pb]).astype(np.float64)
    got = row["merged"]["exact_sum_vs_sum_of_deltas"]
    assert got["cos"] == pytest.approx(cos(d_sum, d_a + d_b), abs=1e-5)
    rel = np.linalg.norm(d_sum - (d_a + d_b)) / np.linalg.norm(d_sum)
    assert got["rel_err"] == pytest.approx(rel, abs=1e-5)
