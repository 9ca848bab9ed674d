"""Retrieval of adapters by their Delta Activations: a faiss index over normalised deltas.

    from llgbm_compose.retrieval import DeltaIndex, index_world
    index = index_world("worlds/tiny")                # every teacher, from the world's delta cache
    index.save()                                      # <world>/delta_index/{index.faiss,index.json}
    index = DeltaIndex.load("worlds/tiny/delta_index")
    hits = index.neighbours(delta, k=5)               # [Hit(rank, score, row)], best first
    hits = index.query_adapter("out/merged", k=5)     # embeds the adapter on the world's base
    hits = index.query_prompts(prompts, predictor, k=5)   # predictor: prompts -> delta [hidden]
    precision_at_k(index, deltas, rows, k=5, by="family")

Scores are inner products of unit vectors, i.e. cosines. ``kind="flat"`` searches exactly (its
top candidates re-ranked by float64 cosine: near-duplicate deltas differ below float32 rounding);
``kind="ivf"`` (an inverted file over ``nlist`` k-means cells, ``nprobe`` of them searched per
query; ``codec`` "flat", "fp16" or "sq8" for the stored vectors) is for large zoos; "auto" picks
IVF from 20,000 deltas up. On disk: ``index.faiss`` (faiss.write_index) and ``index.json``
(format, kind, dimension, nprobe, where the deltas came from, one metadata row per vector); no
pickle. An index is "beside the delta cache": ``<world>/delta_index`` by default.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llgbm_compose.errors import RetrievalError

FORMAT = "llgbm-delta-index/1"
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
INDEX_DIR = "delta_index"  # inside a world, beside its delta_cache
KINDS = ("auto", "flat", "ivf")
CODECS = {"flat": "Flat", "fp16": "SQfp16", "sq8": "SQ8"}
AUTO_IVF_FROM = 20_000  # "auto": flat below this many deltas, IVF from here
RERANK_EXTRA = 16  # flat search: candidates beyond k re-ranked by float64 cosine


@dataclass
class Hit:
    """One retrieved adapter."""

    rank: int  # 1 = best
    score: float  # cosine between the query and the indexed delta
    id: int  # row in the index
    row: dict[str, Any]  # the indexed metadata (name, task, family, path, ...)


def unit_rows(x: np.ndarray, what: str = "delta") -> np.ndarray:
    """Rows of ``x`` [n, d] scaled to unit length (float32, contiguous); zero rows are refused."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise RetrievalError(f"{what}s must be [n, hidden], got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise RetrievalError(f"a {what} is not finite (NaN/inf)")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise RetrievalError(
            f"{what} {int(zero[0])} is all zeros: it has no direction to compare by cosine"
        )
    return np.ascontiguousarray(x / norms)


def default_nlist(n: int) -> int:
    """Cells of an IVF index: about 4 sqrt(n), at most n / 39 (faiss wants >= 39 points per cell)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


@dataclass
class DeltaIndex:
    """A faiss inner-product index over unit deltas, with one metadata row per vector."""

    index: Any  # faiss.Index
    rows: list[dict[str, Any]]
    kind: str  # "flat" | "ivf"
    factory: str  # the faiss index_factory string
    source: dict[str, Any] = field(default_factory=dict)  # world, cache, probe/spec hashes
    nprobe: int = 1
    path: Path | None = None  # where it was loaded from / saved to

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    # -- building ------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        dim: int,
        *,
        kind: str = "flat",
        nlist: int | None = None,
        nprobe: int | None = None,
        codec: str = "flat",
        source: dict[str, Any] | None = None,
    ) -> DeltaIndex:
        """An empty index of ``dim``-wide deltas; IVF needs `train` before `add`.

        For zoos too large to hold twice in memory: create, train on a sample, add in chunks.
        """
        import faiss

        if kind not in ("flat", "ivf"):
            raise RetrievalError(f"index kind: {kind!r} is not flat or ivf")
        if codec not in CODECS:
            raise RetrievalError(f"index codec: {codec!r} is not one of {', '.join(CODECS)}")
        if kind == "flat":
            factory, probe = "Flat", 1
        else:
            if nlist is None or nlist < 1:
                raise RetrievalError(f"nlist: an IVF index needs >= 1 cells, got {nlist!r}")
            factory = f"IVF{int(nlist)},{CODECS[codec]}"
            probe = max(1, int(nlist) // 32) if nprobe is None else int(nprobe)
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        out = cls(index, [], kind, factory, dict(source or {}), probe)
        out.set_nprobe(probe)
        return out

    def train(self, sample: np.ndarray, *, seed: int = 0) -> None:
        """Learn the IVF cells by k-means on ``sample`` [m, dim] (m >= nlist); no-op for flat."""
        if self.kind != "ivf":
            return
        import faiss

        x = unit_rows(sample)
        ivf = faiss.extract_index_ivf(self.index)
        if x.shape[0] < ivf.nlist:
            raise RetrievalError(f"train: {x.shape[0]} deltas for {ivf.nlist} cells; use fewer")
        ivf.cp.seed = seed  # reproducible k-means cells
        self.index.train(x)

    def add(self, deltas: np.ndarray, rows: Sequence[dict[str, Any]] | None = None) -> None:
        """Append ``deltas`` [n, dim] (normalised here) and their metadata rows (default
        ``{"id": i}``)."""
        x = unit_rows(deltas)
        if x.shape[1] != self.dim:
            raise RetrievalError(f"add: deltas have {x.shape[1]} dimensions, the index {self.dim}")
        if not self.index.is_trained:
            raise RetrievalError("add: train the IVF index on a sample of deltas first")
        start = len(self)
        if rows is None:
            rows = [{"id": start + i} for i in range(x.shape[0])]
        if len(rows) != x.shape[0]:
            raise RetrievalError(f"{len(rows)} metadata rows for {x.shape[0]} deltas")
        self.index.add(x)
        self.rows.extend(dict(r) for r in rows)

    @classmethod
    def build(
        cls,
        deltas: np.ndarray,
        rows: Sequence[dict[str, Any]] | None = None,
        *,
        kind: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        codec: str = "flat",
        source: dict[str, Any] | None = None,
        train_size: int | None = None,
        seed: int = 0,
    ) -> DeltaIndex:
        """Index ``deltas`` [n, hidden] (normalised here); ``rows`` default to ``{"id": i}``.

        IVF: ``nlist`` cells (default `default_nlist`), trained by k-means on ``train_size``
        deltas drawn with ``seed`` (default: all, at most 256 per cell); ``nprobe`` cells
        searched per query (default: nlist / 32, at least 1; change it with `set_nprobe`).
        """
        if kind not in KINDS:
            raise RetrievalError(f"index kind: {kind!r} is not one of {', '.join(KINDS)}")
        x = np.asarray(deltas)
        if x.ndim != 2 or x.shape[0] == 0:
            raise RetrievalError(
                f"no deltas to index (got shape {list(x.shape)}); index at least one adapter"
            )
        n, d = x.shape
        if kind == "auto":
            kind = "ivf" if n >= AUTO_IVF_FROM else "flat"
        cells = (default_nlist(n) if nlist is None else int(nlist)) if kind == "ivf" else None
        if cells is not None and not 1 <= cells <= n:
            raise RetrievalError(f"nlist: {cells} cells for {n} deltas; use 1..{n}")
        out = cls.create(d, kind=kind, nlist=cells, nprobe=nprobe, codec=codec, source=source)
        if cells is not None:
            want = min(n, train_size or 256 * cells)
            rng = np.random.default_rng(seed)
            out.train(
                x if want >= n else x[np.sort(rng.choice(n, size=want, replace=False))], seed=seed
            )
        out.add(x, rows)
        return out

    def set_nprobe(self, nprobe: int) -> None:
        """IVF cells searched per query (more: slower, closer to exact); no-op for flat."""
        if self.kind != "ivf":
            return
        import faiss

        ivf = faiss.extract_index_ivf(self.index)
        if not 1 <= nprobe <= ivf.nlist:
            raise RetrievalError(f"nprobe: {nprobe} is outside 1..{ivf.nlist} (the index's cells)")
        ivf.nprobe = int(nprobe)
        self.nprobe = int(nprobe)

    # -- saving and loading --------------------------------------------------------------
    def save(self, directory: str | os.PathLike | None = None) -> Path:
        """``index.faiss`` + ``index.json`` in ``directory`` (default: the world's delta_index)."""
        import faiss
        from llgbm_worlds.io import write_bytes_atomic, write_json_atomic

        if directory is None:
            world = self.source.get("world")
            if not world:
                raise RetrievalError("index.save: give a directory (the index names no world)")
            directory = Path(world) / INDEX_DIR
        out = Path(directory)
        write_bytes_atomic(out / INDEX_FILE, faiss.serialize_index(self.index).tobytes())
        meta = {
            "format": FORMAT,
            "kind": self.kind,
            "factory": self.factory,
            "metric": "inner_product",
            "normalised": True,
            "dim": self.dim,
            "n": len(self),
            "nprobe": self.nprobe,
            "source": self.source,
            "rows": self.rows,
        }
        write_json_atomic(out / META_FILE, meta)
        self.path = out
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DeltaIndex:
        """Read an index saved by `save`; one clear line if it is missing, damaged or empty."""
        import faiss

        d = Path(directory)
        meta_path, index_path = d / META_FILE, d / INDEX_FILE
        if not meta_path.is_file() or not index_path.is_file():
            raise RetrievalError(
                f"{d}: no delta index ({META_FILE} + {INDEX_FILE}); build one with "
                "`python -m llgbm_compose index WORLD`"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RetrievalError(f"{meta_path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise RetrievalError(f"{meta_path}: not an {FORMAT} file")
        try:
            raw = np.frombuffer(index_path.read_bytes(), dtype=np.uint8)
            index = faiss.deserialize_index(raw)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
            raise RetrievalError(f"{index_path}: not a faiss index ({first})") from None
        rows = meta.get("rows")
        if not isinstance(rows, list) or len(rows) != index.ntotal:
            raise RetrievalError(
                f"{meta_path}: {len(rows) if isinstance(rows, list) else 'no'} rows for an index "
                f"of {index.ntotal} vectors; rebuild the index"
            )
        if index.ntotal == 0:
            raise RetrievalError(f"{d}: the index is empty; rebuild it over at least one adapter")
        if meta.get("dim") != index.d or meta.get("kind") not in ("flat", "ivf"):
            raise RetrievalError(f"{meta_path}: dim/kind do not match {index_path}; rebuild it")
        out = cls(
            index,
            rows,
            meta["kind"],
            str(meta.get("factory", "")),
            dict(meta.get("source") or {}),
            int(meta.get("nprobe", 1)),
            d,
        )
        out.set_nprobe(out.nprobe)
        return out

    # -- searching -----------------------------------------------------------------------
    def check_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise RetrievalError(f"k: must be a positive int, got {k!r}")
        if len(self) == 0:
            raise RetrievalError("the index is empty; rebuild it over at least one adapter")
        if k > len(self):
            raise RetrievalError(
                f"k={k} is larger than the index ({len(self)} adapters); ask for k <= {len(self)}"
            )

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [m, k], ids [m, k]) of the k nearest indexed deltas to each query [m, hidden]."""
        self.check_k(k)
        q = unit_rows(queries, "query")
        if q.shape[1] != self.dim:
            raise RetrievalError(
                f"query has {q.shape[1]} dimensions, the index {self.dim}: deltas of another "
                "base model or layer?"
            )
        if self.kind != "flat":
            return self.index.search(q, k)
        # Flat: faiss ranks in float32, whose rounding (~1e-7) exceeds the cosine gap between
        # checkpoints of one training run (1 - cos ~ 1e-8 on the tiny world); the candidates are
        # re-ranked by their cosine in float64, so an adapter's own delta ranks it first.
        m = min(len(self), k + RERANK_EXTRA)
        _, cand = self.index.search(q, m)  # [nq, m]
        q64 = np.asarray(queries, dtype=np.float64).reshape(q.shape)
        q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
        vecs = self.index.reconstruct_batch(cand.ravel()).astype(np.float64)
        vecs = vecs.reshape(*cand.shape, self.dim)  # [nq, m, d]
        vecs /= np.linalg.norm(vecs, axis=2, keepdims=True)
        exact = np.einsum("qmd,qd->qm", vecs, q64)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(cand, order, 1)

    def neighbours(self, query: np.ndarray, k: int) -> list[Hit]:
        """The k nearest indexed adapters to one delta [hidden], best first."""
        scores, ids = self.search(np.asarray(query).reshape(1, -1), k)
        return [
            Hit(j + 1, float(s), int(i), self.rows[int(i)])
            for j, (s, i) in enumerate(zip(scores[0], ids[0]))
            if i >= 0  # IVF returns -1 when the probed cells hold fewer than k vectors
        ]

    def _world_deltas(self, world=None):
        from llgbm_worlds.deltas import WorldDeltas

        if world is None:
            world = self.source.get("world")
            if not world:
                raise RetrievalError("this index names no world; pass world= to embed adapters")
        return world if isinstance(world, WorldDeltas) else WorldDeltas(world)

    def query_adapter(self, adapter, k: int, *, world=None) -> list[Hit]:
        """Neighbours of an adapter (PEFT dir or LoraAdapter), embedded on the index's world."""
        self.check_k(k)
        delta = self._world_deltas(world).adapters([adapter])[0]  # [hidden]
        return self.neighbours(delta, k)

    def query_prompts(
        self, prompts: Sequence[str], predictor: Callable[[list[str]], np.ndarray], k: int
    ) -> list[Hit]:
        """Neighbours of the delta a predictor (or generator) gives for a task's prompts."""
        self.check_k(k)
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise RetrievalError("no prompts to query with")
        delta = np.asarray(predictor(prompts), dtype=np.float32).reshape(-1)  # [hidden]
        return self.neighbours(delta, k)

    def adapter_path(self, hit: Hit) -> Path:
        """The PEFT directory of a hit, inside the index's world (escapes refused)."""
        rel = hit.row.get("path")
        world = self.source.get("world")
        if not rel or not world:
            raise RetrievalError(f"index row {hit.id} names no adapter path inside a world")
        root = Path(world).resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            raise RetrievalError(f"index row {hit.id}: path {rel!r} leaves the world {root}")
        return path


def teacher_rows(world, teachers, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Index metadata for world teachers: path (relative), task, family, kind, step, split."""
    from llgbm_compose.zoo import rel_path

    fam = {t.name: t.family for t in world.tasks}
    rows = []
    for i, t in enumerate(teachers):
        rel = rel_path(world, t.path)
        row = {
            "name": rel,
            "path": rel,
            "task": t.task,
            "family": fam.get(t.task, ""),
            "kind": t.kind,
            "step": t.step,
            "data_split": t.data_split,
        }
        if keys is not None:
            row["key"] = keys[i]
        rows.append(row)
    return rows


def index_world(world, *, teachers=None, kind: str = "auto", world_deltas=None, **kw) -> DeltaIndex:
    """A DeltaIndex over a world's teachers (default: all), deltas from its delta cache."""
    from llgbm_worlds.deltas import WorldDeltas

    wd = world_deltas if world_deltas is not None else WorldDeltas(world)
    td = wd.teachers(teachers)
    base = wd.cache.base_info()
    source = {
        "world": str(wd.world.root),
        "cache": str(wd.cache.root),
        "probe_name": wd.probes.name,
        "probe_hash": wd.probes.hash,
        "spec_hash": wd.spec.hash,
        "base_fingerprint": base.fingerprint if base else "",
    }
    return DeltaIndex.build(
        td.deltas, teacher_rows(wd.world, td.teachers, td.keys), kind=kind, source=source, **kw
    )


def precision_at_k(
    index: DeltaIndex, deltas: np.ndarray, rows: Sequence[dict[str, Any]], k: int, by: str
) -> dict[str, Any]:
    """Each item queried by its own delta, itself left out: share of its k nearest others with
    the same ``by`` label ("task" or "family"), averaged over items; plus self-retrieval.

    ``deltas``/``rows`` are the indexed items in index order. ``self_rank1``: items whose own
    delta retrieves themselves first.
    """
    n = len(rows)
    if n != len(index):
        raise RetrievalError(f"precision_at_k: {n} rows for an index of {len(index)}")
    if k > n - 1:
        raise RetrievalError(
            f"k={k} is larger than the zoo allows (n={n}, leaving the query out: k <= {n - 1})"
        )
    _, ids = index.search(deltas, min(n, k + 1))
    precisions, self_first = [], 0
    for i in range(n):
        order = [int(j) for j in ids[i] if j >= 0]
        self_first += bool(order) and order[0] == i
        others = [j for j in order if j != i][:k]
        same = sum(rows[j][by] == rows[i][by] for j in others)
        precisions.append(same / k)
    return {
        "k": k,
        "by": by,
        "precision": float(np.mean(precisions)),
        "self_rank1": int(self_first),
        "n": n,
    }


def retrieve_merge(
    index: DeltaIndex,
    delta: np.ndarray,
    k: int,
    *,
    method: str = "average",
    weights: str = "uniform",
    **merge_params: Any,
):
    """The b2 step "delta -> retrieve -> merge": the top-k adapters for ``delta`` merged in
    delta-W space. ``weights="score"`` weighs each by its cosine (task arithmetic with weights
    summing to one). -> (hits, Merge)."""
    from llgbm_compose.merges import merge

    hits = index.neighbours(delta, k)
    paths = [index.adapter_path(h) for h in hits]
    if weights == "score":
        s = np.clip(np.array([h.score for h in hits]), 0.0, None)
        w = s / s.sum() if s.sum() > 0 else np.full(len(hits), 1.0 / len(hits))
        return hits, merge("task_arithmetic", paths, weights=list(w), **merge_params)
    if weights != "uniform":
        raise RetrievalError(f"weights: {weights!r} is not 'uniform' or 'score'")
    return hits, merge(method, paths, **merge_params)
