"""Throughput of functional_forward at Qwen2.5-1.5B shapes (random weights, built from a config).

    uv run python benchmarks/flora_forward.py --adapters 64 --probes 5 --tokens 40

Times the backbone forward (no LM head) without LoRA, with n per-row LoRA adapters (no grad), and
forward+backward to the LoRA tensors, and reports model FLOP utilisation against `--peak` TFLOPS
(989 = H100 SXM dense bf16). Needs CUDA. Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from llgbm_flora import LoraBatch, LoraSpec, functional_forward
from transformers import Qwen2Config, Qwen2Model

QWEN25_15B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--probes", type=int, default=5)
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=None, help="adapter_chunk_size")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--no-mask", action="store_true", help="attention_mask=None (causal fast path)")
    p.add_argument("--layers", type=int, default=None, help="override layer count (quick runs)")
    p.add_argument("--peak", type=float, default=989.0, help="peak dense bf16 TFLOPS of the GPU")
    args = p.parse_args()

    cfg = dict(QWEN25_15B)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    config = Qwen2Config(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2Model(config).to(torch.bfloat16).eval()
    model.requires_grad_(False)
    spec = LoraSpec.for_model(model, rank=args.rank, alpha=2 * args.rank, target_modules=ALL7)
    A, B = {}, {}
    keys = spec.keys()
    for k in keys:
        d_in, d_out = spec.in_out(k[1])
        opts = {"device": "cuda", "dtype": torch.bfloat16}
        A[k] = torch.randn(args.adapters, args.rank, d_in, **opts) * d_in**-0.5
        B[k] = torch.randn(args.adapters, d_out, args.rank, **opts) * 0.01
    batch = LoraBatch(spec, A, B)  # what a generator would emit, bf16 on the GPU
    leaves = [t.requires_grad_() for t in [*batch.A.values(), *batch.B.values()]]
    rows = args.adapters * args.probes
    ids = torch.randint(0, config.vocab_size, (rows, args.tokens), device="cuda")
    mask = None if args.no_mask else torch.ones_like(ids)
    kw = {"adapter_chunk_size": args.chunk, "gradient_checkpointing": args.checkpointing}

    tokens = rows * args.tokens
    linear_params = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    )
    lora_params = spec.num_params()
    h, L, T = config.hidden_size, config.num_hidden_layers, args.tokens
    attn = 4 * rows * T * T * h * L  # QK^T and AV, causal not discounted
    fwd_base = 2 * linear_params * tokens + attn
    fwd_lora = fwd_base + 2 * lora_params * tokens
    # backward to activations (not base weights) costs one forward; LoRA weight grads one LoRA fwd more
    bwd_lora = fwd_base + 4 * lora_params * tokens

    def base():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def lora_fwd():
        with torch.no_grad():
            functional_forward(model, batch, input_ids=ids, attention_mask=mask, **kw)

    def lora_fwd_bwd():
        out = functional_forward(model, batch, input_ids=ids, attention_mask=mask, **kw)
        torch.autograd.grad(out.last_hidden_state[:, -1].float().square().mean(), leaves)

    results = {"device": torch.cuda.get_device_name(), "args": vars(args), "tokens": tokens}
    for name, fn, flops in (
        ("base_forward", base, fwd_base),
        ("lora_forward", lora_fwd, fwd_lora),
        ("lora_forward_backward", lora_fwd_bwd, fwd_lora + bwd_lora),
    ):
        torch.cuda.reset_peak_memory_stats()
        s = timed(fn, args.repeats)
        tflops = flops / s / 1e12
        results[name] = {
            "ms": round(1e3 * s, 2),
            "tflops": round(tflops, 1),
            "mfu": round(tflops / args.peak, 3),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
        print(name, results[name], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
