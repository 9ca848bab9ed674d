"""Where the time of `compute_deltas` from disk goes (GPU), stage by stage, on one batch.

    PYTHONPATH=packages/llgbm-flora/src:packages/llgbm-delta/src \\
        python benchmarks/delta_e2e_profile.py [--adapters 128]

Qwen2.5-1.5B shapes (random bf16), LoRA r=16 on all 7 projections (37 MB per adapter in bf16),
adapters saved to a temporary directory first (so reads come from the page cache). Stages timed
separately: load_adapter (sequential), LoraBatch.from_adapters (CPU stack), .to(device), the
forward (delta_for_lora), and compute_deltas end to end for the same adapters.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=128)
    p.add_argument("--cprofile", action="store_true", help="cProfile the last compute_deltas call")
    args = p.parse_args(argv)
    import delta_gpu as bench
    from llgbm_delta import compute_deltas, delta_for_lora, encode_probes, generic_probes
    from llgbm_flora import LoraBatch, LoraSpec, load_adapter, save_adapter
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dev = torch.device("cuda")
    probes = generic_probes()
    tok = bench.SyntheticTokenizer(probes.texts, bench.BPE_LENGTHS, bench.QWEN25_15B["vocab_size"])
    with torch.device(dev):
        model = Qwen2ForCausalLM(Qwen2Config(**bench.QWEN25_15B))
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    spec = LoraSpec.for_model(model, rank=16, alpha=32, target_modules=bench.TARGETS)
    batch = encode_probes(tok, probes, device=dev)
    n = args.adapters
    pool = bench.random_lora(spec, 8, "cpu", torch.bfloat16, 0)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [save_adapter(pool[i % 8], Path(tmp) / f"a{i}") for i in range(n)]
        print(f"torch threads {torch.get_num_threads()}")
        t = time.perf_counter()
        adapters = [load_adapter(d) for d in dirs]
        print(f"load_adapter x{n}: {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        lb = LoraBatch.from_adapters(adapters)
        print(f"from_adapters (CPU stack): {time.perf_counter() - t:.2f} s")
        t = time.perf_counter()
        lb = lb.to(device=dev)
        torch.cuda.synchronize()
        print(f".to(cuda): {time.perf_counter() - t:.2f} s")
        with torch.no_grad():
            delta_for_lora(model, tok, lb, batch, compile=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            delta_for_lora(model, tok, lb, batch, compile=True)
            torch.cuda.synchronize()
        print(f"forward (compiled): {time.perf_counter() - t:.2f} s")
        del lb
        for run in ("first (compiles)", "second", "third"):
            t = time.perf_counter()
            if args.cprofile and run == "third":
                import cProfile
                import pstats

                with cProfile.Profile() as prof:
                    compute_deltas((model, tok), dirs, probes, progress=False, adapters_per_batch=n)
                pstats.Stats(prof).sort_stats("tottime").print_stats(15)
            else:
                compute_deltas((model, tok), dirs, probes, progress=False, adapters_per_batch=n)
            secs = time.perf_counter() - t
            print(f"compute_deltas, {run} call: {secs:.2f} s, {n / secs:.1f} adapters/s")


if __name__ == "__main__":
    main()
