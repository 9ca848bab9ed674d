"""functional_forward on CUDA (skipped without a GPU): fp32 == PEFT, bf16 close to PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from llgbm_flora import functional_forward, to_peft_state_dict
from llgbm_flora.testing import assert_no_hooks, random_batch, tiny_qwen2, tiny_spec
from peft import LoraConfig, get_peft_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_batched_matches_peft(dtype, atol):
    model = tiny_qwen2(seed=0, hidden=64).to("cuda", dtype)
    spec = tiny_spec(model, rank=8, alpha=16)
    batch = random_batch(spec, n=3, seed=1, scale=0.2)  # fp32 on CPU: moved and cast per call
    ids = torch.randint(
        3, 128, (6, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    with torch.no_grad():
        ours = functional_forward(model, batch.to("cuda"), input_ids=ids).logits.float()
    assert_no_hooks(model)
    for i in range(3):
        pm = get_peft_model(
            copy.deepcopy(model),
            LoraConfig(r=8, lora_alpha=16, target_modules=list(spec.target_modules)),
        )
        state = {
            k.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                ".lora_B.weight", ".lora_B.default.weight"
            ): v
            for k, v in to_peft_state_dict(batch[i]).items()
        }
        assert not pm.load_state_dict(state, strict=False).unexpected_keys
        pm = pm.to("cuda", dtype).eval()
        with torch.no_grad():
            ref = pm(input_ids=ids[2 * i : 2 * i + 2]).logits.float()
        torch.testing.assert_close(ours[2 * i : 2 * i + 2], ref, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")  # inductor, fp32
def test_cuda_fused_matches_hooked_forward(dtype, compile):
    """fp32: equal to the hooked HF forward within 1e-4. bf16: both paths are compared with the
    exact (fp32) answer, and the fused one may not be worse than HF's own bf16 forward (the
    paths round at different places: compiled code keeps elementwise math in float32)."""
    from llgbm_flora.fused import fused_hidden_states

    exact = tiny_qwen2(seed=0, hidden=64).to("cuda")
    model = copy.deepcopy(exact).to(dtype)
    spec = tiny_spec(model, rank=16, alpha=32)  # rank 16: the Triton MLP kernel applies in bf16
    batch = random_batch(spec, n=3, seed=1, scale=0.2).to("cuda")
    lengths = torch.tensor([9, 5, 7], device="cuda").repeat(3)
    mask = (torch.arange(9, device="cuda") < lengths[:, None]).long()
    gen = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(3, 128, (9, 9), device="cuda", generator=gen) * mask
    rows = torch.arange(9, device="cuda")

    def hooked(m):
        out = functional_forward(m.model, batch, input_ids=ids, attention_mask=mask)
        return out.last_hidden_state[rows, lengths - 1].float()

    with torch.no_grad():
        ref = hooked(exact)
        got = fused_hidden_states(
            model, batch, ids, lengths=lengths, select=lengths - 1, compile=compile
        ).float()
        hf_same_dtype = hooked(model)
    assert ref.abs().max() > 0.5
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    else:
        err, hf_err = (got - ref).abs(), (hf_same_dtype - ref).abs()
        assert err.mean() <= 1.5 * hf_err.mean() and err.max() <= 2 * hf_err.max() + 0.02


def test_swiglu_lora_kernel_matches_torch():
    from llgbm_flora.kernels import swiglu_lora, swiglu_lora_supported

    gen = torch.Generator("cuda").manual_seed(0)
    n, S, N, r = 3, 37, 200, 16  # tiles straddle adapters; N not a multiple of the block
    kw = {"device": "cuda", "dtype": torch.bfloat16, "generator": gen}
    g, u = torch.randn(n, S, N, **kw), torch.randn(n, S, N, **kw)
    xa = torch.randn(n, S, 2 * r, **kw)
    Bg = torch.randn(n, N, r, **kw).transpose(1, 2)  # [n, r, N], strided as in the forward
    Bu = torch.randn(n, N, r, **kw).transpose(1, 2)
    with torch.no_grad():
        assert swiglu_lora_supported(g, r)
        got = swiglu_lora(g, u, xa, Bg, Bu, 0.5).float()
    f = {k: t.float() for k, t in {"g": g, "u": u, "xa": xa, "Bg": Bg, "Bu": Bu}.items()}
    gg = f["g"] + 0.5 * torch.bmm(f["xa"][..., :r], f["Bg"])
    uu = f["u"] + 0.5 * torch.bmm(f["xa"][..., r:], f["Bu"])
    ref = torch.nn.functional.silu(gg) * uu
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert not swiglu_lora_supported(g, 8) and not swiglu_lora_supported(g.float(), 16)


def test_swiglu_lora_kernel_with_strides_beyond_int32():
    """B as a view into a larger buffer (e.g. adapters packed together): batch stride > 2**31."""
    from llgbm_flora.kernels import swiglu_lora

    n, S, N, r = 2, 20, 64, 16
    stride = 2**31 + 64  # elements between adapters
    gen = torch.Generator("cuda").manual_seed(0)
    kw = {"device": "cuda", "dtype": torch.bfloat16}
    storage = torch.zeros(stride + N * r, **kw)  # 4 GiB: room for two adapters' B at that stride
    Bg = storage.as_strided((n, r, N), (stride, 1, r))
    Bg[0].copy_(torch.randn(r, N, generator=gen, device="cuda"))
    Bg[1].copy_(torch.randn(r, N, generator=gen, device="cuda"))
    Bu = Bg.clone()
    g, u = torch.randn(n, S, N, generator=gen, **kw), torch.randn(n, S, N, generator=gen, **kw)
    xa = torch.randn(n, S, 2 * r, generator=gen, **kw)
    with torch.no_grad():
        got = swiglu_lora(g, u, xa, Bg, Bu, 1.0).float()
    gg = g.float() + torch.bmm(xa[..., :r].float(), Bg.float())
    uu = u.float() + torch.bmm(xa[..., r:].float(), Bu.float())
    ref = torch.nn.functional.silu(gg) * uu
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize(
    ("n", "S", "K", "N"), [(3, 37, 96, 200), (40, 5, 64, 136), (2, 300, 128, 256)]
)
def test_gemm_swiglu_lora_kernel_matches_torch(n, S, K, N):
    """Tiles straddle adapters (S=37), hold many (S=5) or sit inside one (S=300); K and N are not
    multiples of the blocks; B strided as in the forward."""
    from llgbm_flora.kernels import gemm_swiglu_lora, gemm_swiglu_lora_supported

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9.0+")
    gen = torch.Generator("cuda").manual_seed(0)
    r = 16
    kw = {"device": "cuda", "dtype": torch.bfloat16, "generator": gen}
    x = torch.randn(n, S, K, **kw)
    wg, wu = torch.randn(N, K, **kw) * K**-0.5, torch.randn(N, K, **kw) * K**-0.5
    xa = torch.randn(n, S, 2 * r, **kw)
    Bg = torch.randn(n, N, r, **kw).transpose(1, 2)  # [n, r, N]
    Bu = torch.randn(n, N, r, **kw).transpose(1, 2)
    with torch.no_grad():
        assert gemm_swiglu_lora_supported(x, wg, wu, r)
        got = gemm_swiglu_lora(x, wg, wu, xa, Bg, Bu, 0.5).float()
    f = {k: t.float() for k, t in {"x": x, "wg": wg, "wu": wu, "xa": xa}.items()}
    gg = f["x"] @ f["wg"].T + 0.5 * torch.bmm(f["xa"][..., :r], Bg.float())
    uu = f["x"] @ f["wu"].T + 0.5 * torch.bmm(f["xa"][..., r:], Bu.float())
    ref = torch.nn.functional.silu(gg) * uu
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=1e-2 * ref.abs().max().item())
    assert not gemm_swiglu_lora_supported(x, wg, wu, 8)
    assert not gemm_swiglu_lora_supported(x, wg[:, :-1], wu[:, :-1], r)  # a strided view


def test_fused_forward_uses_the_gemm_kernel_on_hopper():
    from llgbm_flora.fused import _mlp_kernel

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9.0+")
    model = tiny_qwen2(seed=0, hidden=64).to("cuda", torch.bfloat16)
    batch = random_batch(tiny_spec(model, rank=16, alpha=32), n=2, seed=1).to("cuda")
    h = torch.zeros(1, 1, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert _mlp_kernel(h, model.model, batch) == "gemm"
        assert _mlp_kernel(h.float(), model.model, batch) is None
