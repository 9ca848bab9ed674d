"""Micro-benchmark: ways to add per-row LoRA to the 7 linears of one Qwen2.5-1.5B layer (bf16, CUDA).

    python benchmarks/flora_lora_kernels.py

Compares the base linears alone, the hook formulation functional_forward uses (linear, then
bmm for A and baddbmm for B into the output), and computing the LoRA term first so the base
GEMM adds it in its epilogue (addmm). Not collected by pytest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SHAPES = {  # module: (in, out)
    "q": (1536, 1536),
    "k": (1536, 256),
    "v": (1536, 256),
    "o": (1536, 1536),
    "gate": (1536, 8960),
    "up": (1536, 8960),
    "down": (8960, 1536),
}


def bench(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(n: int = 64, rows_tokens: int = 200, r: int = 16) -> None:
    opts = {"device": "cuda", "dtype": torch.bfloat16}
    W = {m: torch.randn(o, i, **opts) * i**-0.5 for m, (i, o) in SHAPES.items()}
    X = {m: torch.randn(n * rows_tokens, i, **opts) for m, (i, _) in SHAPES.items()}
    At = {m: torch.randn(n, i, r, **opts) * i**-0.5 for m, (i, _) in SHAPES.items()}
    Bt = {m: torch.randn(n, r, o, **opts) * 0.01 for m, (_, o) in SHAPES.items()}
    s = 2.0

    def base():
        for m in SHAPES:
            F.linear(X[m], W[m])

    def hook_style():
        for m, (i, o) in SHAPES.items():
            y = F.linear(X[m], W[m])
            xa = torch.bmm(X[m].view(n, -1, i), At[m])
            torch.baddbmm(y.view(n, -1, o), xa, Bt[m], alpha=s)

    def epilogue_style():
        for m, (i, o) in SHAPES.items():
            xa = torch.bmm(X[m].view(n, -1, i), At[m]) * s
            d = torch.bmm(xa, Bt[m])
            torch.addmm(d.view(-1, o), X[m], W[m].t())

    def lora_only():
        for m, (i, _) in SHAPES.items():
            xa = torch.bmm(X[m].view(n, -1, i), At[m])
            torch.bmm(xa, Bt[m])

    flops = 2 * n * rows_tokens * sum(i * o for i, o in SHAPES.values())
    for name, fn in [
        ("base", base),
        ("hook", hook_style),
        ("epilogue", epilogue_style),
        ("lora_only", lora_only),
    ]:
        ms = bench(fn)
        print(f"{name:10s} {ms:7.3f} ms/layer  base-FLOP rate {flops / ms / 1e9:6.1f} TFLOPS")


if __name__ == "__main__":
    main()
