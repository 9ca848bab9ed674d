"""Tiny models, tokenizers and adapters on disk for the llgbm-delta tests (all local, seeded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llgbm_delta.testing import make_peft_adapter, save_base, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

N_ADAPTERS = 5


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    threads' spin-waiting makes small ops up to 10x slower; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tok) -> Path:
    model = tiny_llama(vocab_size=len(tok), seed=0)
    return save_base(model, tok, tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture
def model(base_dir):
    """A fresh fp32 copy of the base for each test (tests may not share mutable models)."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory, base_dir) -> list[Path]:
    """Adapters with different ranks/targets: a mix, so grouping by structure is exercised."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for i in range(N_ADAPTERS):
        kwargs = {"rank": 4, "alpha": 8.0}
        if i == 3:
            kwargs = {"rank": 2, "alpha": 4.0, "target_modules": ("q_proj", "v_proj")}
        dirs.append(make_peft_adapter(model, root / f"adapter_{i}", seed=100 + i, **kwargs))
    return dirs


@pytest.fixture(scope="session")
def zero_adapter_dir(tmp_path_factory, base_dir) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return make_peft_adapter(model, tmp_path_factory.mktemp("zero") / "zero_b", seed=7, zero_b=True)


def merged_reference_model(base_dir: Path, adapter_dir: Path | None):
    """A fresh base with the adapter merged by hand: W += s * B @ A, read from the raw files.

    Independent of llgbm-flora and of PEFT's model code: only the PEFT file layout is assumed.
    """
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is None:
        return model
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
            w = model.get_submodule(module).weight
            w.copy_((w.double() + scale * b.double() @ a.double()).float())
    return model


def reference_vector(model, tok, texts, *, layer: int = -1, token: str = "last") -> torch.Tensor:
    """v read by hand: each probe alone (no padding), full CausalLM, hidden_states[layer]."""
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            hs = model(**enc, output_hidden_states=True).hidden_states[layer][0].double()  # [T, H]
            rows.append(hs[-1] if token == "last" else hs.mean(0))
    return torch.stack(rows).mean(0)  # [H]
