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
