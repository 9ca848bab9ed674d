"""A Triton kernel for the MLP of many LoRAs at once: silu(g + LoRA_g) * (u + LoRA_u) in one pass.

Without it, the gate/up LoRA outputs ([tokens, intermediate] each, the widest tensors of a decoder
layer) are written by two bmm calls and read back by the activation; with it, each output tile
adds its rank-r products (`tl.dot` against its adapter's B) in registers, so only the base
projections are read and the product is written. Forward only (no autograd), CUDA, bf16/fp16,
rank a multiple of 16; `swiglu_lora_supported` says whether a call qualifies.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; absent on CPU-only installs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["swiglu_lora", "swiglu_lora_supported"]


def swiglu_lora_supported(x: Tensor, rank: int) -> bool:
    """Whether `swiglu_lora` can run for activations like `x` and LoRA rank `rank`."""
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and rank % 16 == 0
        and not torch.is_grad_enabled()
    )


if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 256}, num_warps=8),
        ],
        key=["N", "R"],
    )
    @triton.jit
    def _swiglu_lora_kernel(
        G, U, XA, BG, BU, OUT,
        M, N, S,
        stride_xa, stride_bg_a, stride_bg_r, stride_bg_n, stride_bu_a, stride_bu_r, stride_bu_n,
        scale: tl.constexpr,  # a constant: a float argument would be float64 under torch.compile
        R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        # int64 offsets: B may be a view into a larger buffer (strides past 2**31), and
        # tokens x intermediate passes 2**31 for batches of ~1,300 adapters at 1.5B shapes.
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # token index in [0, n*S)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        tile_ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * N + cols[None, :]
        g = tl.load(G + offs, mask=tile_ok, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=tile_ok, other=0.0).to(tl.float32)
        ranks = tl.arange(0, R)
        first = (pid_m * BLOCK_M) // S
        last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // S
        for a32 in range(first, last + 1):  # a tile spans at most a few adapters' tokens
            a = a32.to(tl.int64)
            mine = row_ok & (rows // S == a)
            xa_off = rows[:, None] * stride_xa + ranks[None, :]
            xg = tl.load(XA + xa_off, mask=mine[:, None], other=0.0)  # [BM, R]
            xu = tl.load(XA + xa_off + R, mask=mine[:, None], other=0.0)
            bg = tl.load(
                BG + a * stride_bg_a + ranks[:, None] * stride_bg_r + cols[None, :] * stride_bg_n,
                mask=col_ok[None, :],
                other=0.0,
            )  # [R, BN]
            bu = tl.load(
                BU + a * stride_bu_a + ranks[:, None] * stride_bu_r + cols[None, :] * stride_bu_n,
                mask=col_ok[None, :],
                other=0.0,
            )
            g += scale * tl.dot(xg, bg)
            u += scale * tl.dot(xu, bu)
        out = g * tl.sigmoid(g) * u
        tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=tile_ok)


def swiglu_lora(g: Tensor, u: Tensor, xa: Tensor, Bg: Tensor, Bu: Tensor, scale: float) -> Tensor:
    """silu(g + scale * xa_g @ Bg) * (u + scale * xa_u @ Bu), per adapter.

    g, u: [n, S, N] base gate/up outputs (contiguous); xa: [n, S, 2r] (x @ [A_g; A_u]^T, gate
    first, contiguous); Bg, Bu: [n, r, N] (any strides). -> [n, S, N] in g's dtype.
    """
    n, S, N = g.shape
    R = Bg.shape[1]
    out = torch.empty_like(g)
    M = n * S

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))

    _swiglu_lora_kernel[grid](
        g, u, xa, Bg, Bu, out,
        M, N, S,
        xa.stride(1), Bg.stride(0), Bg.stride(1), Bg.stride(2), Bu.stride(0), Bu.stride(1),
        Bu.stride(2),
        scale=float(scale),
        R=R,
    )  # fmt: skip
    return out
