"""Retrieval by delta on the test world: self-retrieval, precision@k, save/load, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from llgbm_compose import DeltaIndex, RetrievalError, index_world, precision_at_k, retrieve_merge
from llgbm_compose.zoo import single_teachers


@pytest.fixture(scope="module")
def teachers(world):
    return single_teachers(world)


@pytest.fixture(scope="module")
def deltas(world_deltas, teachers):
    return world_deltas.teachers(teachers).deltas


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_every_teacher_retrieves_itself_first(world, world_deltas, teachers, deltas, kind):
    kw = {"nlist": 2, "nprobe": 2} if kind == "ivf" else {}  # all cells probed: exact
    index = index_world(world, teachers=teachers, kind=kind, world_deltas=world_deltas, **kw)
    assert index.kind == kind and len(index) == len(teachers)
    for i, t in enumerate(teachers):
        hits = index.neighbours(deltas[i], k=3)
        assert hits[0].id == i and hits[0].rank == 1
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].row["task"] == t.task
    r = precision_at_k(index, deltas, index.rows, 1, "task")
    assert r["self_rank1"] == len(teachers)


def test_precision_at_k_matches_a_direct_computation(world, world_deltas, teachers, deltas):
    index = index_world(world, teachers=teachers, kind="flat", world_deltas=world_deltas)
    x = deltas / np.linalg.norm(deltas, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    for by in ("task", "family"):
        labels = [row[by] for row in index.rows]
        for k in (1, 5):
            top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
            direct = np.mean([[labels[j] == labels[i] for j in top[i]] for i in range(len(x))])
            got = precision_at_k(index, deltas, index.rows, k, by)["precision"]
            assert got == pytest.approx(direct, abs=1e-9)


def test_save_load_round_trip_without_pickle(world, world_deltas, teachers, deltas, tmp_path):
    index = index_world(world, teachers=teachers, world_deltas=world_deltas)
    path = index.save(tmp_path / "idx")
    assert sorted(p.name for p in path.iterdir()) == ["index.faiss", "index.json"]
    meta = json.loads((path / "index.json").read_text())
    assert meta["n"] == len(teachers) and meta["source"]["world"] == str(world.root)
    loaded = DeltaIndex.load(path)
    a, b = index.search(deltas[:4], 5), loaded.search(deltas[:4], 5)
    np.testing.assert_array_equal(a[1], b[1])
    assert loaded.rows == index.rows


def test_query_by_adapter_and_by_prompts(world, world_deltas, teachers, deltas):
    index = index_world(world, teachers=teachers, world_deltas=world_deltas)
    hits = index.query_adapter(teachers[3].path, k=2, world=world_deltas)
    assert hits[0].id == 3
    seen = []

    def predictor(prompts):  # stands in for a trained prompts -> delta model
        seen.append(list(prompts))
        return deltas[5]

    prompts = world.task(teachers[5].task).prompts("train")[:4]
    hits = index.query_prompts(prompts, predictor, k=1)
    assert hits[0].id == 5 and seen == [prompts]


def test_retrieve_then_merge_for_b2(world, world_deltas, teachers, deltas):
    index = index_world(world, teachers=teachers, world_deltas=world_deltas)
    hits, merged = retrieve_merge(index, deltas[0], 3, method="average", rank=4)
    assert hits[0].id == 0 and merged.n_inputs == 3 and merged.rank == 4
    assert merged.sources == [str(index.adapter_path(h)) for h in hits]
    _, weighted = retrieve_merge(index, deltas[0], 3, weights="score")
    w = weighted.params["weights"]
    assert sum(w) == pytest.approx(1.0) and w[0] == max(w)


def test_ivf_recall_on_clustered_synthetic_deltas():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 64))
    x = centres[rng.integers(0, 50, 4000)] + 0.5 * rng.standard_normal((4000, 64))
    q = x[rng.choice(4000, 50, replace=False)] + 0.05 * rng.standard_normal((50, 64))
    exact = DeltaIndex.build(x, kind="flat").search(q, 10)[1]
    ivf = DeltaIndex.build(x, kind="ivf", nlist=64, nprobe=8)
    got = ivf.search(q, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got)])
    assert recall >= 0.95
    assert ivf.factory == "IVF64,Flat"


def test_bad_input_is_one_clear_line(world, world_deltas, teachers, deltas, tmp_path):
    index = index_world(world, teachers=teachers, world_deltas=world_deltas)
    cases = [
        (lambda: DeltaIndex.build(np.zeros((0, 32))), "no deltas to index"),
        (lambda: index.neighbours(deltas[0], k=len(teachers) + 1), "larger than the index"),
        (lambda: index.neighbours(deltas[0], k=0), "positive int"),
        (
            lambda: index.neighbours(np.ones(7), k=1),
            f"7 dimensions, the index {np.asarray(deltas).shape[1]}",
        ),
        (lambda: index.neighbours(np.zeros(32), k=1), "all zeros"),
        (lambda: precision_at_k(index, deltas, index.rows, len(teachers), "task"), "larger"),
        (lambda: DeltaIndex.load(tmp_path / "nothing"), "no delta index"),
        (lambda: DeltaIndex.build(deltas, kind="hnsw"), "index kind"),
    ]
    for fn, message in cases:
        with pytest.raises(RetrievalError, match=message) as info:
            fn()
        assert "\n" not in str(info.value)
    empty = DeltaIndex.create(np.asarray(deltas).shape[1]).save(tmp_path / "empty")
    with pytest.raises(RetrievalError, match="the index is empty") as info:
        DeltaIndex.load(empty)
    assert "\n" not in str(info.value)
    with pytest.raises(RetrievalError, match="the index is empty"):
        DeltaIndex.create(8).neighbours(np.ones(8), k=1)
    path = index.save(tmp_path / "idx")
    (path / "index.json").write_text("{broken")
    with pytest.raises(RetrievalError, match="not valid JSON"):
        DeltaIndex.load(path)
    index.save(path)
    (path / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(RetrievalError, match="not a faiss index"):
        DeltaIndex.load(path)
    meta = json.loads((index.save(path) / "index.json").read_text())
    meta["rows"] = meta["rows"][:-1]
    (path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(RetrievalError, match="rebuild the index"):
        DeltaIndex.load(path)


def test_paths_outside_the_world_are_refused(world, world_deltas, teachers):
    index = index_world(world, teachers=teachers, world_deltas=world_deltas)
    hit = index.neighbours(index.index.reconstruct(0), k=1)[0]
    hit.row = {**hit.row, "path": "../../etc"}
    with pytest.raises(RetrievalError, match="leaves the world"):
        index.adapter_path(hit)


def test_near_duplicate_deltas_still_retrieve_themselves_first():
    """Checkpoints of one run differ by 1 - cos ~ 1e-8, below faiss's float32 rounding; the flat
    index re-ranks by float64 cosine, so every delta still finds itself first."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((20, 64))
    x = np.concatenate([base + 1e-4 * rng.standard_normal(base.shape) for _ in range(3)])
    index = DeltaIndex.build(x, kind="flat")
    unit = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    plain = index.index.search(unit, 1)[1][:, 0]  # faiss alone
    assert (plain != np.arange(len(x))).any()  # float32 ranking loses some to their twins
    scores, ids = index.search(x, 3)
    assert (ids[:, 0] == np.arange(len(x))).all()
    assert (scores[:, 0] >= scores[:, 1]).all() and (ids[:, 1] % 20 == np.arange(len(x)) % 20).all()
    r = precision_at_k(index, x, [{"task": i % 20} for i in range(len(x))], 2, "task")
    assert r["self_rank1"] == len(x) and r["precision"] == 1.0
