"""The smollm2 world on CPU: the GGUF -> safetensors loader and the task phrasing (slow)."""

from __future__ import annotations

import shutil

import pytest
import torch
from llgbm_worlds import FAMILIES, make_items

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    pytest.importorskip("gguf")
    from llgbm_worlds.smollm2 import convert_smollm2

    return convert_smollm2(tmp_path_factory.mktemp("smollm2") / "base", progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from llgbm_worlds.build import load_local_base

    return load_local_base(smollm2_dir)


def test_converted_model(smollm2):
    from transformers import LlamaForCausalLM

    model, tok = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    # The GGUF tokenizer has no pad token; batched scoring and the zoo's batches need one.
    assert tok.pad_token_id is not None and tok.pad_token == tok.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip()


def test_task_phrasing_with_real_tokenizer(smollm2):
    from llgbm_worlds.data import collate, encode

    _, tok = smollm2
    for fam in FAMILIES.values():
        train, _ = make_items(fam, fam.params[0], seed=0, n_train=4, n_test=2)
        enc = encode(tok, train)
        batch = collate(enc, tok.pad_token_id)
        for (ids, n_prompt), e in zip(enc, train):
            assert tok.decode(ids[n_prompt:-1]).strip() == e.answer
            assert tok.decode(ids[:n_prompt]).rstrip().endswith("### Response:")
        assert (batch["labels"] != -100).sum() > 0


def test_smoke_zoo_one_teacher(tmp_path, smollm2_dir):
    from llgbm_worlds import World, build_world

    out = tmp_path / "w"
    shutil.copytree(smollm2_dir, out / "base")  # reuse the conversion (a valid .done marker)
    build_world("smollm2", out, preset="smoke", progress=False, device="cpu")
    w = World.load(out)
    assert len(w.teachers) == 1 and (w.teachers[0].path / "adapter_model.safetensors").is_file()
