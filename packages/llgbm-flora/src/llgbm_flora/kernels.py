"""Triton kernels for the MLP of many LoRAs at once: silu(g + LoRA_g) * (u + LoRA_u).

- `gemm_swiglu_lora` (Hopper and newer): the gate and up GEMMs themselves, persistent and fed by
  TMA, with the activation and both rank-r LoRA products in the epilogue. The gate/up outputs
  ([tokens, intermediate] each, the widest tensors of a decoder layer) never reach memory: only
  x is read and the product written, and g, u stay in float32 until the activation.
- `swiglu_lora` (any CUDA GPU Triton supports): the base projections come from cuBLAS; each output
  tile adds its rank-r products (`tl.dot` against its adapter's B) in registers, so the LoRA
  outputs are never written.

Forward only (no autograd), bf16/fp16, rank a multiple of 16; `*_supported` says whether a call
qualifies. Rows are adapter-major: adapter a owns rows [a*S, (a+1)*S).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; absent on CPU-only installs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
try:  # host-side TMA descriptors: Triton >= 3.3; older ones keep `swiglu_lora` only
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the install
    TensorDescriptor = None

__all__ = [
    "gemm_swiglu_lora",
    "gemm_swiglu_lora_supported",
    "swiglu_lora",
    "swiglu_lora_supported",
]


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

    @triton.jit
    def _add_lora(
        g, u, rows, cols, off_m, M, N, S, XA, BG, BU,
        stride_xa, stride_bg_a, stride_bg_r, stride_bg_n, stride_bu_a, stride_bu_r, stride_bu_n,
        scale: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """g += scale * xa_g @ Bg[a], u += scale * xa_u @ Bu[a] for the adapters a of the tile."""
        row_ok = rows < M
        col_ok = cols < N
        ranks = tl.arange(0, R)
        first = off_m // S
        last = (tl.minimum(off_m + BLOCK_M, M) - 1) // S
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
        return g, u

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
        g, u = _add_lora(
            g, u, rows, cols, pid_m * BLOCK_M, M, N, S, XA, BG, BU,
            stride_xa, stride_bg_a, stride_bg_r, stride_bg_n, stride_bu_a, stride_bu_r, stride_bu_n,
            scale, R, BLOCK_M,
        )  # fmt: skip
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


def gemm_swiglu_lora_supported(x: Tensor, w_gate: Tensor, w_up: Tensor, rank: int) -> bool:
    """Whether `gemm_swiglu_lora` can run: CUDA capability >= 9 (TMA), 16-byte aligned rows."""
    return (
        TensorDescriptor is not None
        and swiglu_lora_supported(x, rank)
        and torch.cuda.get_device_capability(x.device)[0] >= 9
        and w_gate.dtype == w_up.dtype == x.dtype
        and w_gate.shape == w_up.shape
        and w_gate.is_contiguous()
        and w_up.is_contiguous()
        and w_gate.data_ptr() % 16 == 0  # TMA: 16-byte aligned base addresses
        and w_up.data_ptr() % 16 == 0
        and x.shape[-1] % 8 == 0  # TMA: row strides are multiples of 16 bytes
        and w_gate.shape[0] % 8 == 0
    )


if triton is not None and TensorDescriptor is not None:

    def _gemm_hook(nargs: dict) -> None:
        """Give the host-side TMA descriptors the block shapes of the config being run."""
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["x_desc"].block_shape = [bm, bk]
        nargs["g_desc"].block_shape = [bn, bk]
        nargs["u_desc"].block_shape = [bn, bk]
        nargs["o_desc"].block_shape = [bm, bn]

    @triton.jit
    def _tile_of(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """Grouped order: GROUP_M row blocks sweep the columns together (weights stay in L2)."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        size = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % size, (tile % per_group) // size

    # Measured on an H100 at Qwen2.5-1.5B shapes (benchmarks/delta_gpu.py): 128 x 128 x 64 with
    # 3 stages won for 64-512 adapters; the others stay as candidates for other cards and shapes.
    @triton.autotune(
        configs=[
            triton.Config(
                {"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": 64, "GROUP_M": 8},
                num_warps=8,
                num_stages=stages,
                pre_hook=_gemm_hook,
            )
            for bn, stages in ((128, 3), (128, 4), (64, 4))
        ],
        key=["N", "K", "R"],
    )
    @triton.jit
    def _gemm_swiglu_lora_kernel(
        x_desc, g_desc, u_desc, o_desc, XA, BG, BU,
        M, N, K, S,
        stride_xa, stride_bg_a, stride_bg_r, stride_bg_n, stride_bu_a, stride_bu_r, stride_bu_n,
        scale: tl.constexpr, R: tl.constexpr, NUM_SMS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile_of(tile, num_m, num_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, K, BLOCK_K):  # TMA zero-fills past M, N and K
                x = x_desc.load([off_m, k])
                g = tl.dot(x, g_desc.load([off_n, k]).T, g)
                u = tl.dot(x, u_desc.load([off_n, k]).T, u)
            rows = off_m + tl.arange(0, BLOCK_M).to(tl.int64)  # 64-bit: see _swiglu_lora_kernel
            cols = off_n + tl.arange(0, BLOCK_N)
            g, u = _add_lora(
                g, u, rows, cols, off_m, M, N, S, XA, BG, BU,
                stride_xa, stride_bg_a, stride_bg_r, stride_bg_n, stride_bu_a, stride_bu_r,
                stride_bu_n, scale, R, BLOCK_M,
            )  # fmt: skip
            o_desc.store(
                [off_m, off_n], (g * tl.sigmoid(g) * u).to(o_desc.dtype)
            )  # clipped at M, N

    @torch.library.custom_op("llgbm_flora::gemm_swiglu_lora", mutates_args=())
    def _gemm_swiglu_lora_op(
        x: Tensor, w_gate: Tensor, w_up: Tensor, xa: Tensor, Bg: Tensor, Bu: Tensor, scale: float
    ) -> Tensor:
        n, S, K = x.shape
        N = w_gate.shape[0]
        M = n * S
        x2 = x.reshape(M, K)
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
        if M == 0:
            return out.view(n, S, N)
        block = [1, 1]  # set per config by _gemm_hook
        descs = [TensorDescriptor.from_tensor(t, block) for t in (x2, w_gate, w_up, out)]
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count

        def grid(meta):
            tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
            return (min(sms, tiles),)

        _gemm_swiglu_lora_kernel[grid](
            *descs, xa, Bg, Bu,
            M, N, K, S,
            xa.stride(1), Bg.stride(0), Bg.stride(1), Bg.stride(2), Bu.stride(0), Bu.stride(1),
            Bu.stride(2),
            scale=float(scale), R=Bg.shape[1], NUM_SMS=sms,
        )  # fmt: skip
        return out.view(n, S, N)

    @_gemm_swiglu_lora_op.register_fake
    def _(x, w_gate, w_up, xa, Bg, Bu, scale):
        return x.new_empty(*x.shape[:-1], w_gate.shape[0])


def gemm_swiglu_lora(
    x: Tensor, w_gate: Tensor, w_up: Tensor, xa: Tensor, Bg: Tensor, Bu: Tensor, scale: float
) -> Tensor:
    """silu(x @ Wg^T + scale * xa_g @ Bg) * (x @ Wu^T + scale * xa_u @ Bu), per adapter.

    x: [n, S, K]; w_gate, w_up: [N, K] (nn.Linear weights, contiguous, no bias); xa: [n, S, 2r]
    (x @ [A_g; A_u]^T, gate first, contiguous); Bg, Bu: [n, r, N] (any strides) -> [n, S, N].
    Runs as one custom op (opaque to torch.compile).
    """
    x = x.contiguous()
    if x.data_ptr() % 16:  # a contiguous view at an odd offset: TMA needs 16-byte alignment
        x = x.clone()
    return _gemm_swiglu_lora_op(x, w_gate, w_up, xa.contiguous(), Bg, Bu, float(scale))
