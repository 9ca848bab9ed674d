"""Retrieval benchmark: an IVF DeltaIndex over 1,000,000 synthetic deltas of width 1536.

    python benchmarks/retrieval.py [--n 1000000] [--dim 1536] [--threads 2] [--out results.jsonl]

Synthetic deltas, generated in seeded chunks so the full matrix is never held twice:
- ``clustered`` (default): ``--clusters`` random directions, each delta one of them plus
  isotropic noise of norm ``--noise`` (1.0: cosine ~0.7 to its centre, ~0.5 to a cluster mate,
  ~0 across), the shape a zoo of task adapters has (deltas cluster by task);
- ``gaussian``: no structure at all, the worst case for an inverted file.
Queries are fresh draws from the same distribution (not in the index). Exact top-10 comes from
brute force over the regenerated chunks (float64 scores). The index is llgbm-compose's
``DeltaIndex`` (``create`` -> ``train`` on ``--train`` deltas -> ``add`` per chunk); one query
at a time is timed with ``perf_counter`` around ``DeltaIndex.search`` (normalisation included),
at each ``--nprobe``. Prints markdown rows; ``--out`` appends one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time


def chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(size, n - start)


def make(rng, centres, count: int, dim: int, noise: float):
    """[count, dim] float32 synthetic deltas (see module doc)."""
    import numpy as np

    e = rng.standard_normal((count, dim), dtype=np.float32) * (noise / dim**0.5)
    if centres is None:
        return e
    return centres[rng.integers(0, len(centres), count)] + e


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="deltas in the index")
    p.add_argument("--dim", type=int, default=1536, help="delta width (hidden size)")
    p.add_argument("--data", choices=["clustered", "gaussian"], default="clustered")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--nlist", type=int, default=1024, help="IVF cells")
    p.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--codec", choices=["flat", "fp16", "sq8"], default="flat")
    p.add_argument("--train", type=int, default=65536, help="deltas k-means is trained on")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--threads", type=int, default=2, help="faiss / BLAS threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="append results as JSON lines to this file")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)

    import faiss
    import numpy as np
    from llgbm_compose.retrieval import DeltaIndex

    faiss.omp_set_num_threads(args.threads)
    d, n, k = args.dim, args.n, args.k
    root = np.random.default_rng(args.seed)
    centres = None
    if args.data == "clustered":
        centres = root.standard_normal((args.clusters, d), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    t0 = time.perf_counter()
    index = DeltaIndex.create(d, kind="ivf", nlist=args.nlist, codec=args.codec)
    index.train(make(np.random.default_rng([args.seed, 1]), centres, args.train, d, args.noise))
    t_train = time.perf_counter() - t0
    t_gen = t_add = 0.0
    for i, (_, count) in enumerate(chunks(n, args.chunk)):
        g0 = time.perf_counter()
        x = make(np.random.default_rng([args.seed, 2, i]), centres, count, d, args.noise)
        a0 = time.perf_counter()
        index.add(x, rows=[{}] * count)
        t_gen += a0 - g0
        t_add += time.perf_counter() - a0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ivf = faiss.extract_index_ivf(index.index)
    code_bytes = n * (ivf.code_size + 8) + args.nlist * d * 4  # codes + ids + centroids

    queries = make(np.random.default_rng([args.seed, 3]), centres, args.queries, d, args.noise)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    e0 = time.perf_counter()
    best = np.full((args.queries, k), -np.inf)
    best_id = np.zeros((args.queries, k), dtype=np.int64)
    for i, (start, count) in enumerate(chunks(n, args.chunk)):
        x = make(np.random.default_rng([args.seed, 2, i]), centres, count, d, args.noise)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = qn.astype(np.float64) @ x.T.astype(np.float64)  # [Q, count]
        cand = np.concatenate([best, s], axis=1)
        ids = np.concatenate([best_id, np.arange(start, start + count)[None].repeat(len(s), 0)], 1)
        top = np.argsort(-cand, axis=1)[:, :k]
        best, best_id = np.take_along_axis(cand, top, 1), np.take_along_axis(ids, top, 1)
    t_exact = time.perf_counter() - e0

    results = []
    load = os.getloadavg()
    for nprobe in args.nprobe:
        index.set_nprobe(nprobe)
        index.search(queries[:5], k)  # warm-up
        lat = []
        found = []
        for q in queries:
            s0 = time.perf_counter()
            _, ids = index.search(q[None], k)
            lat.append(time.perf_counter() - s0)
            found.append(ids[0])
        recall = float(np.mean([len(set(f) & set(b)) / k for f, b in zip(found, best_id)]))
        b0 = time.perf_counter()
        index.search(queries, k)
        batch = time.perf_counter() - b0
        lat_ms = np.array(lat) * 1e3
        r = {
            "n": n,
            "dim": d,
            "data": args.data,
            "clusters": args.clusters if centres is not None else 0,
            "noise": args.noise,
            "factory": index.factory,
            "nprobe": nprobe,
            "threads": args.threads,
            "queries": args.queries,
            "recall_at_k": recall,
            "k": k,
            "latency_ms_median": float(np.median(lat_ms)),
            "latency_ms_p95": float(np.percentile(lat_ms, 95)),
            "latency_ms_mean": float(lat_ms.mean()),
            "batch_ms_per_query": batch * 1e3 / args.queries,
            "train_s": t_train,
            "train_size": args.train,
            "add_s": t_add,
            "generate_s": t_gen,
            "exact_search_s": t_exact,
            "index_bytes": code_bytes,
            "peak_rss_gb": rss1 / 2**20,
            "rss_growth_gb": (rss1 - rss0) / 2**20,
            "loadavg": list(load),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
            "faiss": faiss.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        results.append(r)
        print(
            f"| {r['factory']} | {nprobe} | {recall:.3f} | {r['latency_ms_median']:.2f} | "
            f"{r['latency_ms_p95']:.2f} | {r['batch_ms_per_query']:.2f} | {t_train:.0f} | "
            f"{t_add:.0f} | {code_bytes / 2**30:.2f} | {r['peak_rss_gb']:.1f} |",
            flush=True,
        )
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    main()
