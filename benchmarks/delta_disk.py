"""compute_deltas over PEFT directories on local disk (warm page cache) against its floor.

    PYTHONPATH=packages/llgbm-flora/src:packages/llgbm-delta/src \\
        python benchmarks/delta_disk.py --adapters 512 --batch 64 256 --threads 8 --out disk.json

Qwen2.5-1.5B shapes (random bf16), LoRA r=16 on all 7 projections, the 5 generic probes as
SmolLM2-BPE-length token ids (as benchmarks/delta_gpu.py). `--adapters` distinct adapter
directories are written to `--dir` (default: a temporary directory) and read once, so their
pages are in the page cache. Measured, in this order:

- the floor: bytes per adapter (its safetensors file); page-cache read bandwidth with 1..16
  threads (`read_adapter_data`, the reader compute_deltas uses, into pinned and into pageable
  memory); host-to-device bandwidth (one adapter-sized copy at a time, pinned and pageable);
  sha256 rate, 1 thread and all threads (the content hash of a cache miss); the FLOP limit
  (bf16 8192^3 matmul rate over the forward FLOPs per adapter). I/O limit = bytes per adapter
  over min(best read bandwidth, pinned H2D bandwidth); with a cache of new adapters also over
  the parallel hash rate;
- `compute_deltas((model, tok), dirs)` end to end (validation, loading, forward, the drift
  check) after a warm-up call that compiles, for each `--threads` value: without a cache, and
  with a fresh cache (every adapter hashed and committed). Each reported as adapters/s and % of
  min(FLOP limit, I/O limit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import delta_gpu as bench


def read_bw(layouts, threads: int, pinned: bool, reps: int = 2) -> float:
    """GB/s of reading every file's data section, `threads` at a time (best of `reps`)."""
    from llgbm_flora import read_adapter_data

    n = layouts[0].nbytes
    bufs = [torch.empty(n, dtype=torch.uint8, pin_memory=pinned) for _ in range(threads)]
    best = 0.0
    with ThreadPoolExecutor(threads) as ex:
        for _ in range(reps):
            t0 = time.perf_counter()
            chunks = [layouts[j::threads] for j in range(threads)]

            def work(j, chunks=chunks):
                for lay in chunks[j]:
                    read_adapter_data(lay, bufs[j])

            list(ex.map(work, range(threads)))
            secs = time.perf_counter() - t0
            best = max(best, sum(lay.nbytes for lay in layouts) / secs / 1e9)
    return best


def h2d_bw(nbytes: int, pinned: bool, copies: int = 64) -> float:
    """GB/s of adapter-sized host-to-device copies, back to back on one stream."""
    host = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).pin_memory() if pinned else None
    if host is None:
        host = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        dev.copy_(host, non_blocking=pinned)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(copies):
        dev.copy_(host, non_blocking=pinned)
    torch.cuda.synchronize()
    return nbytes * copies / (time.perf_counter() - t0) / 1e9


def sha_bw(nbytes: int, threads: int) -> float:
    buf = os.urandom(nbytes)
    per = 4

    def work(_):
        for _ in range(per):
            hashlib.sha256(buf).digest()

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, range(threads)))  # warm
        t0 = time.perf_counter()
        list(ex.map(work, range(threads)))
        secs = time.perf_counter() - t0
    return nbytes * per * threads / secs / 1e9


def stages(model, tok, probes, dirs, batch: int, root: Path) -> dict:
    """Adapters/s of each stage of compute_deltas alone (where the end-to-end time goes)."""
    from llgbm_delta import DeltaCache, delta_for_lora, encode_probes, run_deltas
    from llgbm_delta.compute import _batch, _Loader
    from llgbm_delta.sources import resolve_source

    dev = next(model.parameters()).device
    out = {}
    for threads in (8, 16):
        loader = _Loader(dev)

        def load(d, loader=loader):
            return loader.to_device(loader.read(_Src(d)))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            items = list(ex.map(load, dirs))
        for it in items:
            it.wait()
        torch.cuda.synchronize()
        out[f"read+pin+h2d_{threads}t"] = len(dirs) / (time.perf_counter() - t0)
        if threads == 8:
            group = items[:batch]
        del items
    pb = encode_probes(tok, probes, device=dev)
    with torch.inference_mode():
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            lora = _batch(group, dev)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            delta_for_lora(model, tok, lora, pb, compile=True).cpu()
            t2 = time.perf_counter()
        out["batch_from_data"] = batch / (t1 - t0)
        out["forward"] = batch / (t2 - t1)
    cache = DeltaCache(root / "stage-cache")
    run_deltas((model, tok), dirs, probes, cache=cache, progress=False, adapters_per_batch=batch)
    t0 = time.perf_counter()
    run_deltas((model, tok), dirs, probes, cache=cache, progress=False, adapters_per_batch=batch)
    out["fully_cached_run"] = len(dirs) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    [resolve_source(d, str(d)) for d in dirs]
    out["resolve_source"] = len(dirs) / (time.perf_counter() - t0)
    return out


def profile(model, tok, probes, dirs, batch: int, threads: int, in_flight: int) -> dict:
    """One run_deltas call (no cache) with its pipeline instrumented: where the main thread
    waits, how busy the loader threads are, and how busy the GPU is (CUDA events around each
    batch's cut and forward). Seconds, summed over the run; `in_flight`: compute.IN_FLIGHT."""
    import threading

    from llgbm_delta import compute, run_deltas

    lock = threading.Lock()
    acc: dict[str, float] = {}
    events: list[tuple] = []

    def add(name, secs):
        with lock:
            acc[name] = acc.get(name, 0.0) + secs

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                add(name, time.perf_counter() - t0)

        return wrapper

    def gpu_timed(name, fn):
        def wrapper(*a, **kw):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                add(name + "_host", time.perf_counter() - t0)
                e1.record()
                events.append((name + "_gpu", e0, e1))

        return wrapper

    def timed_gen(fn):
        def wrapper(*a, **kw):
            gen = fn(*a, **kw)
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(gen)
                except StopIteration:
                    return
                finally:
                    add("main_wait_loader", time.perf_counter() - t0)
                yield item

        return wrapper

    marks: dict[str, float] = {}

    def first_flush(fn):
        def wrapper(*a, **kw):
            marks.setdefault("first_flush", time.perf_counter())
            return fn(*a, **kw)

        return wrapper

    def loop_end(fn):
        def wrapper(*a, **kw):
            try:
                return fn(*a, **kw)
            finally:
                marks["loop_end"] = time.perf_counter()

        return wrapper

    patches = [
        (compute, "IN_FLIGHT", in_flight),
        (compute._Run, "_loop", loop_end(compute._Run._loop)),
        (compute, "_prefetch", timed_gen(compute._prefetch)),
        (compute, "_batch", gpu_timed("cut", compute._batch)),
        (compute, "delta_for_lora", gpu_timed("forward", compute.delta_for_lora)),
        (compute._Readback, "numpy", timed("main_wait_readback", compute._Readback.numpy)),
        (compute._Run, "_store", timed("main_store", compute._Run._store)),
        (compute._Run, "_flush", first_flush(timed("main_flush", compute._Run._flush))),
        (compute._Loader, "read", timed("loader_read", compute._Loader.read)),
        (compute._Loader, "to_device", timed("loader_to_device", compute._Loader.to_device)),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = run_deltas(
            (model, tok),
            dirs,
            probes,
            progress=False,
            adapters_per_batch=batch,
            loader_threads=threads,
        )
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    assert out.n_computed == len(dirs) and not out.failures
    for name, e0, e1 in events:
        add(name, e0.elapsed_time(e1) / 1e3)
    # GPU time from the first cut's start to the last forward's end, and the idle part of it.
    span = events[0][1].elapsed_time(events[-1][2]) / 1e3
    busy = sum(e0.elapsed_time(e1) for _, e0, e1 in events) / 1e3
    res = {"in_flight": in_flight, "batch": batch, "threads": threads, "wall_s": wall}
    res["adapters_per_s"] = len(dirs) / wall
    # Before the first batch's forward (validation, keys, base activation, the first batch's
    # reads) and after the last read-back (the drift check: base again, weight fingerprint).
    res["head_s"] = marks["first_flush"] - t0
    res["tail_s"] = t0 + wall - marks["loop_end"]
    res.update(acc)
    # main_flush includes the read-back wait and the store of earlier batches.
    res["main_flush_launch"] = (
        acc.get("main_flush", 0.0) - acc.get("main_wait_readback", 0.0) - acc.get("main_store", 0.0)
    )
    res["loader_busy_threads"] = (acc.get("loader_read", 0) + acc.get("loader_to_device", 0)) / wall
    res["gpu_forward_share"] = acc.get("forward_gpu", 0.0) / wall
    res["gpu_span_s"] = span  # the part of the wall time in which batches ran
    res["gpu_idle_in_span_s"] = span - busy
    return res


class _Src:
    """A validated-looking Source for the loader stage alone."""

    def __init__(self, d: Path):
        from llgbm_flora import adapter_layout

        self.path, self.label = d, str(d)
        self.spec = adapter_layout(d).spec
        self.kind = "lora"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="+", default=[64], help="adapters_per_batch values")
    p.add_argument("--threads", type=int, nargs="+", default=[4, 8, 16], help="loader_threads")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per configuration")
    p.add_argument("--dir", type=Path, default=None, help="where the adapters are written")
    p.add_argument("--no-cache-runs", action="store_true", help="skip the runs with a cache")
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke run)")
    p.add_argument("--stages", action="store_true", help="time the pipeline's stages alone")
    p.add_argument(
        "--profile",
        type=int,
        nargs="*",
        default=None,
        help="instrumented runs with these compute.IN_FLIGHT values (e.g. 0 1), batch and "
        "threads of the first --batch / --threads",
    )
    p.add_argument(
        "--in-flight",
        type=int,
        nargs="+",
        default=[1],
        help="compute.IN_FLIGHT values for the end-to-end runs (0: the serial pipeline)",
    )
    p.add_argument(
        "--switch-intervals",
        type=float,
        nargs="+",
        default=[0.0],
        help="sys.setswitchinterval values to run with (0: Python's default, 5 ms)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from llgbm_delta import compute_deltas, generic_probes, run_deltas
    from llgbm_flora import LoraSpec, adapter_layout, save_adapter
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = bench.TINY if args.tiny else bench.QWEN25_15B
    probes = generic_probes()
    tok = bench.SyntheticTokenizer(probes.texts, bench.BPE_LENGTHS, shapes["vocab_size"])
    with torch.device(dev):
        model = Qwen2ForCausalLM(Qwen2Config(**shapes))
    model = model.to(dtype).eval().requires_grad_(False)
    spec = LoraSpec.for_model(model, rank=16, alpha=32, target_modules=bench.TARGETS)
    res: dict = {
        "benchmark": "delta_disk",
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "adapters": args.adapters,
        "adapters_per_batch": args.batch,
    }
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="llgbm-disk-"))
    try:
        # -- the zoo on disk: 8 random adapters, copied to distinct files ---------------------
        t0 = time.perf_counter()
        pool = bench.random_lora(spec, 8, dev, dtype, 0)
        seeds = [save_adapter(pool[i].to(device="cpu"), root / f"seed{i}") for i in range(8)]
        dirs = []
        first = min(adapter_layout(seeds[0]).tensors, key=lambda t: t[4])  # the tensor at byte 0
        for i in range(args.adapters):
            d = root / f"a{i:05d}"
            shutil.copytree(seeds[i % 8], d)
            # Distinct content (distinct cache keys): two exact small values at the front.
            mark = torch.tensor([(i % 256) / 1024, (i // 256) / 1024], dtype=first[2])
            with open(d / "adapter_model.safetensors", "r+b") as f:
                f.seek(adapter_layout(d).data_start)
                f.write(mark.view(torch.uint8).numpy().tobytes())
            dirs.append(d)
        layouts = [adapter_layout(d) for d in dirs]
        file_bytes = (dirs[0] / "adapter_model.safetensors").stat().st_size
        res["write_s"] = time.perf_counter() - t0
        res["bytes_per_adapter"] = file_bytes
        df = subprocess.run(["df", "-T", str(root)], capture_output=True, text=True).stdout
        res["filesystem"] = df.splitlines()[-1].split()[1] if df.strip() else "?"
        print(
            f"{args.adapters} adapters of {file_bytes / 1e6:.1f} MB in {root} ({res['filesystem']})"
        )

        # -- the floor --------------------------------------------------------------------------
        read_bw(layouts, 8, False, reps=1)  # warm the page cache
        res["read_GBps"] = {
            f"{'pinned' if pin else 'pageable'}_{t}": read_bw(layouts, t, pin and cuda)
            for pin in (True, False)
            for t in (1, 2, 4, 8, 16)
            if pin or t in (1, 8)
        }
        print("page-cache read GB/s:", {k: round(v, 1) for k, v in res["read_GBps"].items()})
        res["sha256_GBps"] = {f"{t}": sha_bw(file_bytes, t) for t in (1, 4, 8, 16)}
        print("sha256 GB/s:", {k: round(v, 2) for k, v in res["sha256_GBps"].items()})
        if cuda:
            res["h2d_GBps"] = {
                "pinned": h2d_bw(file_bytes, True),
                "pageable": h2d_bw(file_bytes, False),
            }
            print("H2D GB/s:", {k: round(v, 1) for k, v in res["h2d_GBps"].items()})
            res["matmul_tflops"] = bench.matmul_rate(dev, dtype, 8192) / 1e12
            flops = bench.forward_flops(model, spec, bench.BPE_LENGTHS)
            res["flop_limit"] = res["matmul_tflops"] * 1e12 / flops
            read_best = max(res["read_GBps"].values())
            io = min(read_best, res["h2d_GBps"]["pinned"]) * 1e9 / file_bytes
            res["io_limit"] = io
            res["io_limit_with_hash"] = min(io, max(res["sha256_GBps"].values()) * 1e9 / file_bytes)
            res["floor"] = min(res["flop_limit"], io)
            res["floor_with_hash"] = min(res["flop_limit"], res["io_limit_with_hash"])
            print(
                f"limits (adapters/s): FLOP {res['flop_limit']:.0f} ({res['matmul_tflops']:.0f} "
                f"TFLOP/s), I/O {io:.0f}, I/O with hashing {res['io_limit_with_hash']:.0f}"
            )

        # -- compute_deltas end to end ----------------------------------------------------------
        for b in args.batch:  # compiles the forward for each batch size
            compute_deltas((model, tok), dirs[:b], probes, progress=False, adapters_per_batch=b)
        if args.stages and cuda:
            try:
                res["stages"] = stages(model, tok, probes, dirs, args.batch[0], root)
                print("stages (adapters/s):", {k: round(v, 1) for k, v in res["stages"].items()})
            except Exception as e:  # a diagnostic: never lose the end-to-end runs to it
                print(f"stages failed: {type(e).__name__}: {e}")
        if args.profile and cuda:
            res["profile"] = []
            for depth in args.profile:
                for _ in range(2):
                    row = profile(model, tok, probes, dirs, args.batch[0], args.threads[0], depth)
                    res["profile"].append(row)
                    print("profile:", {k: round(v, 3) for k, v in row.items()})
        runs = []
        ref, drift = None, 0.0  # every run must give the deltas of the first one
        default_interval = sys.getswitchinterval()
        from llgbm_delta import compute

        settings = [
            (d, b, i, t)
            for d in args.in_flight
            for b in args.batch
            for i in args.switch_intervals
            for t in args.threads
        ]
        for depth, batch, interval, threads in settings:
            kw = {"progress": False, "adapters_per_batch": batch}
            sys.setswitchinterval(interval or default_interval)
            compute.IN_FLIGHT = depth
            for cached in (False,) if args.no_cache_runs else (False, True):
                times = []
                for r in range(args.repeats):
                    cache = root / f"cache-{threads}-{r}" if cached else None
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = run_deltas(
                        (model, tok), dirs, probes, cache=cache, loader_threads=threads, **kw
                    )
                    times.append(time.perf_counter() - t0)
                    assert out.n_computed == len(dirs) and not out.failures
                    if ref is None:
                        ref = out.deltas
                    drift = max(drift, float(abs(out.deltas - ref).max()))
                    if cache is not None:
                        shutil.rmtree(cache)
                secs = statistics.median(times)
                row = {
                    "in_flight": depth,
                    "adapters_per_batch": batch,
                    "switch_interval": sys.getswitchinterval(),
                    "loader_threads": threads,
                    "cache": "fresh" if cached else None,
                    "seconds": times,
                    "adapters_per_s": len(dirs) / secs,
                }
                if cuda:
                    floor = res["floor_with_hash"] if cached else res["floor"]
                    row["pct_of_floor"] = 100 * row["adapters_per_s"] / floor
                runs.append(row)
                print(
                    f"compute_deltas, in flight {depth}, batch {batch}, {threads} loader threads, "
                    "switch interval "
                    f"{row['switch_interval'] * 1e3:g} ms, cache {row['cache']}: "
                    f"{row['adapters_per_s']:.1f} adapters/s "
                    f"(runs {', '.join(f'{len(dirs) / t:.1f}' for t in times)})"
                    + (f", {row['pct_of_floor']:.1f}% of the floor" if cuda else "")
                )
        sys.setswitchinterval(default_interval)
        compute.IN_FLIGHT = 1
        res["end_to_end"] = runs
        res["max_abs_diff_between_runs"] = drift
        res["max_abs_delta"] = float(abs(ref).max())
        print(f"deltas agree across runs to {drift:.3g} (max |delta| {res['max_abs_delta']:.3g})")
        if cuda:
            res["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
