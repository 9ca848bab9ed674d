"""GPU benchmark: delta activations at Qwen2.5-1.5B shapes, batched (llgbm-flora) vs a PEFT loop.

    PYTHONPATH=packages/llgbm-flora/src:packages/llgbm-delta/src \\
        python benchmarks/delta_gpu.py --out result.json [--adapters 512 --chunk 32 64 128 256]
    python benchmarks/delta_gpu.py --tiny          # small shapes on CPU: checks it runs

Needs only torch, transformers, peft, safetensors, numpy and tqdm; downloads nothing.

Setting: Qwen2Config with Qwen2.5-1.5B's shapes (hidden 1536, 28 layers, 12 heads, 2 KV heads,
intermediate 8960, vocab 151936, tied embeddings), random init, bf16. LoRA r=16, alpha=32 on
all 7 projections (18.5M parameters per adapter), random A and B. Probes: the 5 generic probes
as random token ids with one length per probe; by default the lengths are the token counts of
the real probe texts under SmolLM2's byte-level BPE (49k vocabulary, the GPT-2/Qwen family of
tokenizers; Qwen2.5's own tokenizer cannot be fetched here): [38, 33, 37, 36, 38]. `--probe-tokens
pretoken` uses the (smaller) pre-token counts, `--probe-tokens N` N tokens each.

Measured, in one run on one device:
- bf16 matmul rate: mean of 10 products of 8192x8192 by 8192x8192 after 3 warm-ups.
- forward FLOPs per adapter = sum over probes of [2 * (parameters of every nn.Linear in the
  decoder layers) * L + 2 * (LoRA parameters) * L + 4 * n_layers * hidden * L^2 (QK^T and AV,
  counted as full, not causal, matrices)], L = probe length; no LM head (it is never run).
  FLOP limit (adapters/s) = matmul rate / FLOPs per adapter; "% of limit" = measured / limit.
- batched: `delta_for_lora` under no_grad on adapters already on the GPU, for each `--path`
  (hooks: HF model + LoRA forward hooks; fused: llgbm-flora's fused Llama-family forward;
  compiled: the fused forward under torch.compile), `--unpad` layout and `--chunk` K (adapters
  per call), over `--adapters` adapters; peak memory per setting. The compiled path's compile
  time is reported separately (its warm-up call).
- end to end: `compute_deltas((model, tok), dirs)` on `--e2e` adapters saved to disk (load,
  content hash, forward, drift check; no cache).
- naive: per adapter `PeftModel.from_pretrained(model, dir)`, a full forward with
  `output_hidden_states=True`, `hidden_states[-1]` at the last real token, `unload()`; on
  `--naive` adapters; its deltas are compared with the batched ones (max abs difference).
- training step: forward + backward of `delta_for_lora` for `--grad-adapters` adapters whose
  fp32 A/B require grad (as a generator emits them), frozen bf16 base; time and peak memory,
  without and with gradient checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QWEN25_15B = {
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
}
# Token counts of the five generic probes under SmolLM2-135M-Instruct's tokenizer (byte-level BPE,
# 49,152 tokens), measured with `AutoTokenizer` on the llgbm smollm2 world's tokenizer.json.
BPE_LENGTHS = [38, 33, 37, 36, 38]
# GPT-2 / Qwen2-style pre-tokenisation; each piece is about one BPE token for common English.
_PRETOKEN = re.compile(
    r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class SyntheticTokenizer:
    """Maps each probe text to fixed random token ids of a chosen length (no real vocabulary)."""

    pad_token_id = 0

    def __init__(self, texts, lengths, vocab_size: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = {
            t: torch.randint(1, vocab_size, (n,), generator=gen).tolist()
            for t, n in zip(texts, lengths)
        }

    def __call__(self, text: str) -> dict:
        return {"input_ids": self.ids[text]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n x n x n matmul: mean of 10 after 3 warm-ups."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - t0)


def forward_flops(model, spec, lengths: list[int]) -> float:
    """Forward FLOPs of one adapter over the probes (see the module docstring)."""
    cfg = model.config
    linear = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"
    )
    lora = spec.num_params()
    total = 0.0
    for L in lengths:
        total += 2 * (linear + lora) * L
        total += 4 * cfg.num_hidden_layers * cfg.hidden_size * L * L
    return total


def random_lora(spec, n: int, device, dtype, seed: int, requires_grad: bool = False):
    """n random adapters of `spec`, made on the device: A ~ N(0, 1/in), B ~ N(0, 0.02^2)."""
    from llgbm_flora import LoraBatch

    gen = torch.Generator(device=device).manual_seed(seed)
    A, B = {}, {}
    keys = spec.keys()
    for key in keys:
        i, o = spec.in_out(key[1])
        A[key] = torch.randn(n, spec.rank, i, device=device, dtype=dtype, generator=gen) / i**0.5
        B[key] = torch.randn(n, o, spec.rank, device=device, dtype=dtype, generator=gen) * 0.02
        A[key].requires_grad_(requires_grad)
        B[key].requires_grad_(requires_grad)
    return LoraBatch(spec, A, B)


def kernel_table(fn, rows: int = 25) -> str:
    """CUDA kernel time of one call of `fn`, top kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def naive_loop(model, batch, dirs) -> tuple[torch.Tensor, float]:
    """The PEFT loop people write (made correct with unload()). -> ([n, H] deltas, seconds)."""
    from peft import PeftModel

    ids, mask = batch.input_ids, batch.attention_mask
    last = mask.sum(-1) - 1  # right padding

    def v(m) -> torch.Tensor:
        hs = m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return hs[torch.arange(hs.shape[0], device=hs.device), last].float().mean(0)  # [H]

    device = ids.device
    rows = []
    with torch.no_grad():
        base_v = v(model)
        sync(device)
        t0 = time.perf_counter()
        for d in dirs:
            peft_model = PeftModel.from_pretrained(model, str(d))
            rows.append(v(peft_model) - base_v)
            model = peft_model.unload()
        sync(device)
    return torch.stack(rows), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=512, help="adapters per batched measurement")
    p.add_argument(
        "--chunk", type=int, nargs="+", default=[32, 64, 128, 256], help="adapters per call"
    )
    p.add_argument(
        "--unpad",
        nargs="+",
        choices=["auto", "yes", "no"],
        default=["auto"],
        help="probe layout of the batched sweep: auto (padded on GPU), yes (one forward per "
        "probe length), no (one padded forward)",
    )
    p.add_argument("--naive", type=int, default=4, help="adapters through the PEFT loop (0: skip)")
    p.add_argument(
        "--e2e", type=int, default=32, help="adapters for compute_deltas from disk (0: skip)"
    )
    p.add_argument("--e2e-batch", type=int, default=64, help="adapters_per_batch of the e2e run")
    p.add_argument("--grad-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument(
        "--probe-tokens",
        default=None,
        help="N (fixed probe length) or 'pretoken' (default: SmolLM2 BPE token counts)",
    )
    p.add_argument(
        "--path",
        nargs="+",
        choices=["hooks", "fused", "compiled"],
        default=["hooks", "fused", "compiled"],
        help="forward path(s) of the batched sweep",
    )
    p.add_argument("--profile", action="store_true", help="print a CUDA kernel-time table per path")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)

    from llgbm_delta import (
        base_activation,
        compute_deltas,
        delta_for_lora,
        encode_probes,
        generic_probes,
    )
    from llgbm_flora import LoraSpec, save_adapter
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    shapes = TINY if args.tiny else QWEN25_15B
    torch.manual_seed(args.seed)

    probes = generic_probes()
    if args.probe_tokens == "pretoken":
        lengths = [len(_PRETOKEN.findall(t)) for t in probes.texts]
    elif args.probe_tokens:
        lengths = [int(args.probe_tokens)] * len(probes)
    else:
        lengths = list(BPE_LENGTHS)
    tok = SyntheticTokenizer(probes.texts, lengths, shapes["vocab_size"], seed=args.seed)

    config = Qwen2Config(**shapes, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype).eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    spec = LoraSpec.for_model(model, rank=args.rank, alpha=2.0 * args.rank, target_modules=TARGETS)
    batch = encode_probes(tok, probes, device=device)
    res: dict = {
        "benchmark": "delta_gpu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "shapes": "tiny" if args.tiny else "Qwen2.5-1.5B",
        "model_params": sum(p.numel() for p in model.parameters()),
        "lora_params": spec.num_params(),
        "rank": args.rank,
        "probe_lengths": lengths,
        "probe_tokens": args.probe_tokens or "SmolLM2 BPE token counts of the generic probes",
        "model_build_s": build_s,
    }
    print(
        f"device {res['device']}, {res['dtype']}, {res['shapes']}: {res['model_params'] / 1e6:.1f}M "
        f"params, LoRA {res['lora_params'] / 1e6:.2f}M, probe lengths {lengths}"
    )

    mm_n = 1024 if args.tiny else 8192
    rate = matmul_rate(device, dtype, mm_n)
    flops = forward_flops(model, spec, lengths)
    limit = rate / flops
    res.update(
        matmul_n=mm_n,
        matmul_tflops=rate / 1e12,
        flops_per_adapter=flops,
        flop_limit_adapters_per_s=limit,
    )
    print(
        f"matmul {mm_n}^3: {rate / 1e12:.1f} TFLOP/s; {flops / 1e9:.1f} GFLOP per adapter; "
        f"FLOP limit {limit:.1f} adapters/s"
    )

    with torch.no_grad():
        base_v = base_activation(model, tok, batch)  # [H]

    # -- batched, adapters already on the device ------------------------------------------
    pool = random_lora(spec, max(args.chunk), device, dtype, args.seed + 1)
    sweep = []
    layouts = {"auto": None, "yes": True, "no": False}
    paths = {"hooks": (False, False), "fused": (True, False), "compiled": (True, True)}
    combos = [(path, m, k) for path in args.path for m in args.unpad for k in args.chunk]
    with torch.no_grad():  # every path must give the same deltas: compare on 8 adapters
        check = delta_for_lora(model, tok, pool[:8], batch, base=base_v, fused=False, unpad=False)
    for path, mode, k in combos:
        fused, compiled = paths[path]
        kw = dict(base=base_v, unpad=layouts[mode], fused=fused, compile=compiled)
        reset_peak(device)
        row = {"path": path, "chunk": k, "unpad": mode}
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                delta_for_lora(model, tok, pool[:k], batch, **kw)  # warm-up (compiles)
                sync(device)
                row["warmup_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                done = 0
                while done < args.adapters:
                    n = min(k, args.adapters - done)
                    delta_for_lora(model, tok, pool[:n], batch, **kw)
                    done += n
                sync(device)
            secs = time.perf_counter() - t0
            with torch.no_grad():
                diff = (delta_for_lora(model, tok, pool[:8], batch, **kw) - check).abs().max()
            row.update(
                max_abs_diff_vs_hooks=float(diff),
                adapters=args.adapters,
                seconds=secs,
                adapters_per_s=args.adapters / secs,
                pct_of_limit=100 * args.adapters / secs / limit,
                peak_gib=peak_gib(device),
            )
            if args.profile and device.type == "cuda":
                row["profile"] = kernel_table(
                    lambda kw=kw, lora=pool[:k]: delta_for_lora(model, tok, lora, batch, **kw)
                )
                print(row["profile"])
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        sweep.append(row)
        print(
            f"batched {path} unpad={mode} chunk {k}: "
            + (
                f"{row['adapters_per_s']:.1f} adapters/s ({row['pct_of_limit']:.1f}% of limit), "
                f"warm-up {row['warmup_s']:.1f} s, max |diff| vs hooks {row['max_abs_diff_vs_hooks']:.2e}"
                if "error" not in row
                else row["error"]
            )
        )
    res["batched"] = sweep
    best = max((r for r in sweep if "error" not in r), key=lambda r: r["adapters_per_s"])
    res["batched_best"] = best

    with tempfile.TemporaryDirectory(prefix="delta-gpu-") as tmp:
        # -- naive PEFT loop -------------------------------------------------------------------
        n_naive = args.naive
        if n_naive:  # 0: skipped
            dirs = [
                save_adapter(pool[i].to(device="cpu"), Path(tmp) / f"n{i}")
                for i in range(n_naive + 1)
            ]
            naive_loop(model, batch, dirs[:1])  # warm-up
            naive_deltas, naive_s = naive_loop(model, batch, dirs[1:])
            with torch.no_grad():
                ref = delta_for_lora(model, tok, pool[1 : n_naive + 1], batch, base=base_v)
            res["naive"] = {
                "adapters": n_naive,
                "seconds": naive_s,
                "adapters_per_s": n_naive / naive_s,
                "max_abs_diff_vs_batched": float((naive_deltas - ref).abs().max()),
                "max_abs_delta": float(ref.abs().max()),
            }
            res["speedup_vs_naive"] = best["adapters_per_s"] / res["naive"]["adapters_per_s"]
            print(
                f"naive PEFT loop: {res['naive']['adapters_per_s']:.2f} adapters/s; batched best "
                f"is {res['speedup_vs_naive']:.0f}x; max |diff| {res['naive']['max_abs_diff_vs_batched']:.2e} "
                f"(max |delta| {res['naive']['max_abs_delta']:.2e})"
            )

        # -- end to end from disk --------------------------------------------------------------
        if args.e2e:
            e2e_dirs = [
                save_adapter(pool[i % len(pool)].to(device="cpu"), Path(tmp) / f"e{i}")
                for i in range(args.e2e)
            ]
            e2e_batch = min(args.e2e_batch, args.e2e)
            kw = {"progress": False, "adapters_per_batch": e2e_batch}
            # Warm-up with the same batch size: compiles the fused layer for these shapes.
            compute_deltas((model, tok), e2e_dirs[:e2e_batch], probes, **kw)
            sync(device)
            t0 = time.perf_counter()
            compute_deltas((model, tok), e2e_dirs, probes, **kw)
            sync(device)
            secs = time.perf_counter() - t0
            res["end_to_end"] = {
                "adapters": args.e2e,
                "adapters_per_batch": e2e_batch,
                "seconds": secs,
                "adapters_per_s": args.e2e / secs,
            }
            print(f"compute_deltas from disk: {args.e2e / secs:.1f} adapters/s")

    # -- forward + backward of the differentiable delta ---------------------------------------
    del pool
    grads = []
    for ckpt in (False, True):
        lora = random_lora(
            spec, args.grad_adapters, device, torch.float32, args.seed + 2, requires_grad=True
        )
        reset_peak(device)
        row = {"adapters": args.grad_adapters, "gradient_checkpointing": ckpt}
        try:
            times = []
            for _ in range(3):
                sync(device)
                t0 = time.perf_counter()
                d = delta_for_lora(
                    model, tok, lora, batch, base=base_v, gradient_checkpointing=ckpt
                )
                d.square().sum().backward()
                sync(device)
                times.append(time.perf_counter() - t0)
            row.update(seconds=min(times[1:]), peak_gib=peak_gib(device))
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        grads.append(row)
        print(
            f"fwd+bwd {args.grad_adapters} adapters (checkpointing {ckpt}): "
            + (
                f"{row['seconds'] * 1e3:.0f} ms, peak {row['peak_gib']} GiB"
                if "error" not in row
                else row["error"]
            )
        )
        del lora
    res["fwd_bwd"] = grads

    print()
    print("| path | layout | chunk | adapters/s | % of FLOP limit | peak GiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in sweep:
        if "error" in r:
            print(f"| {r['path']} | unpad={r['unpad']} | {r['chunk']} | {r['error']} | | |")
        else:
            pk = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
            print(
                f"| {r['path']} | unpad={r['unpad']} | {r['chunk']} | {r['adapters_per_s']:.1f} | {r['pct_of_limit']:.1f} | {pk} |"
            )
    if "end_to_end" in res:
        e = res["end_to_end"]
        print(
            f"| compute_deltas (disk) | default | {e['adapters_per_batch']} | {e['adapters_per_s']:.1f} | "
            f"{100 * e['adapters_per_s'] / limit:.1f} | |"
        )
    if "naive" in res:
        nv = res["naive"]
        print(
            f"| naive PEFT loop | padded | 1 | {nv['adapters_per_s']:.2f} | {100 * nv['adapters_per_s'] / limit:.2f} | |"
        )
    if args.out:
        tmp_out = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
        tmp_out.write_text(json.dumps(res, indent=1) + "\n")
        os.replace(tmp_out, args.out)
    return res


if __name__ == "__main__":
    main()
