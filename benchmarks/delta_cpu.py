"""CPU benchmark: teacher deltas of 64 PEFT adapters on a tiny Llama, batched path vs naive loop.

    python benchmarks/delta_cpu.py [--adapters 64] [--out results.jsonl]

Both paths start from the same loaded base model and the same adapter directories on disk and
produce the same deltas (the max difference is printed):
- batched: `llgbm_delta.compute_deltas((model, tokenizer), dirs)` (llgbm-flora's per-row LoRA,
  `--batch` adapters per forward; includes loading, hashing, the base pass and the drift check).
- naive: what people write: per adapter `PeftModel.from_pretrained(base, path)`, a forward with
  `output_hidden_states=True`, read `hidden_states[-1]` at the last real token, then `unload()`
  so the next adapter starts from a clean base (without it every delta would be contaminated).
Prints a markdown table row; `--out` appends the result as one JSON line. The tokenizer is
`llgbm_delta.testing.tiny_tokenizer()` (the generic probes are 34-39 tokens, as with a real one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def naive_loop(model, tokenizer, texts, dirs) -> tuple[torch.Tensor, float]:
    """Deltas the way a notebook computes them, made correct with unload(). -> ([n, H], seconds)."""
    from peft import PeftModel

    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    last = enc["attention_mask"].sum(-1) - 1  # right padding

    def v(m) -> torch.Tensor:
        hs = m(**enc, output_hidden_states=True).hidden_states[-1]  # [P, T, H]
        return hs[torch.arange(hs.shape[0]), last].float().mean(0)  # [H]

    t0 = time.perf_counter()
    rows = []
    with torch.no_grad():
        base_v = v(model)
        for d in dirs:
            peft_model = PeftModel.from_pretrained(model, str(d))
            rows.append(v(peft_model) - base_v)
            model = peft_model.unload()
    return torch.stack(rows), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="adapters per forward (batched path)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; 0 keeps torch's default). On a busy 2-core box "
        "idle threads spin and make the small ops of a tiny model 10-40x slower in both paths",
    )
    p.add_argument("--out", type=Path, default=None, help="append the result as a JSON line")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from llgbm_delta import compute_deltas, generic_probes
    from llgbm_delta.testing import make_peft_adapter, tiny_llama, tiny_tokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = tiny_tokenizer()
    model = tiny_llama(
        len(tok),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=2 * args.hidden,
    )
    probes = generic_probes()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [
            make_peft_adapter(
                model, Path(tmp) / f"a{i:03d}", seed=i, rank=args.rank, alpha=2.0 * args.rank
            )
            for i in range(args.adapters)
        ]
        # Warm both paths up once (first-call allocations, lazy imports).
        compute_deltas((model, tok), dirs[:2], probes, progress=False)
        naive_loop(model, tok, probes.texts, dirs[:1])

        t0 = time.perf_counter()
        batched = compute_deltas(
            (model, tok), dirs, probes, progress=False, adapters_per_batch=args.batch
        )
        t_batched = time.perf_counter() - t0
        naive, t_naive = naive_loop(model, tok, probes.texts, dirs)

    max_diff = float((torch.from_numpy(batched) - naive).abs().max())
    result = {
        "benchmark": "delta_cpu",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # other processes competing for the cores
        "torch": torch.__version__,
        "model": f"tiny Llama hidden {args.hidden}, {args.layers} layers, vocab {len(tok)}",
        "adapters": args.adapters,
        "rank": args.rank,
        "adapters_per_batch": args.batch,
        "batched_s": t_batched,
        "naive_s": t_naive,
        "batched_adapters_per_s": args.adapters / t_batched,
        "naive_adapters_per_s": args.adapters / t_naive,
        "speedup": t_naive / t_batched,
        "max_abs_diff": max_diff,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print("| model | adapters | batched adapters/s | naive adapters/s | speedup | max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {result['model']} (r={args.rank}, {result['cpu_threads']} threads) | {args.adapters} | "
        f"{result['batched_adapters_per_s']:.1f} | {result['naive_adapters_per_s']:.1f} | "
        f"{result['speedup']:.1f}x | {max_diff:.1e} |"
    )
    print(f"(load average {result['load_average_1min']:.1f} on {result['cpu_count']} cores)")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
