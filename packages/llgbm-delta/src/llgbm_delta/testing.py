"""Tiny local models, tokenizers and PEFT adapters for tests, benchmarks and examples.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in-process on the probe texts,
the model a randomly initialised Llama built from a small config, and adapters are made with
PEFT itself (so they are independent of llgbm-flora's writer).

    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    base_dir = save_base(model, tok, tmp / "base")
    adapter_dirs = [make_peft_adapter(model, tmp / f"a{i}", seed=i) for i in range(4)]
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from llgbm_flora.spec import STANDARD_MODULES

from llgbm_delta.probes import DOMAINS, domain_probes, generic_probes

ALL_PROJECTIONS = STANDARD_MODULES  # llgbm-flora's names of a decoder layer's projections


def tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer (any text encodes) with <pad>, <s> (prepended) and </s>.

    Trained on the built-in probe texts with enough merges that they tokenize to whole words,
    like a real tokenizer: the generic probes are 34-39 tokens each (about 40, as with Qwen2.5).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(generic_probes().texts)
    for d in DOMAINS:
        corpus += list(domain_probes(d).texts)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_llama(
    vocab_size: int = 320,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised LlamaForCausalLM (eval mode) from a small config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def save_base(model, tokenizer, path: str | Path) -> Path:
    """Save a model and tokenizer so `AutoModelForCausalLM/AutoTokenizer.from_pretrained` load them."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_peft_adapter(
    model,
    path: str | Path,
    *,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    target_modules: tuple[str, ...] = ALL_PROJECTIONS,
    std_a: float = 0.3,
    std_b: float = 0.3,
    zero_b: bool = False,
    **config,
) -> Path:
    """Write a PEFT LoRA adapter for `model` with seeded random A and B (B = 0 if `zero_b`).

    The model is deep-copied, so it is never touched. `base_model_name_or_path` is the model's
    own `name_or_path` (its directory when loaded from disk), as PEFT writes it. Other keyword
    arguments go to `LoraConfig` (use_dora, rank_pattern, alpha_pattern, layers_to_transform,
    use_rslora, ...); DoRA magnitudes are moved off their initial value (where DoRA equals LoRA).
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        **config,
    )
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std_a / p.shape[1] ** 0.5)
            elif ".lora_B." in name:
                p.copy_(
                    torch.zeros(p.shape) if zero_b else torch.randn(p.shape, generator=gen) * std_b
                )
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=gen))
    path = Path(path)
    peft_model.save_pretrained(path)
    return path


def synthetic_cache(root: str | Path, n: int, hidden: int = 64, *, seed: int = 0):
    """A DeltaCache of `n` random entries written directly (no model), laid out as `compute`
    writes it: for tests and benchmarks of `ls` / `export` at a given size."""
    import numpy as np

    from llgbm_delta.cache import BaseInfo, DeltaCache

    cache = DeltaCache(root)
    cache.bind(BaseInfo(fingerprint="f" * 64, name="base", hidden_size=hidden, dtype="float32"))
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        meta = {
            "base_fingerprint": "f" * 64,
            "probe_hash": "p" * 64,
            "probe_name": "generic",
            "token_hash": "t" * 64,
            "spec": {"definition": 1, "layer": -1, "token": "last"},
            "spec_hash": "s" * 64,
            "adapter_hash": f"{i:064x}",
            "adapter_name": f"adapters/a{i:03d}",
        }
        rows.append((meta, rng.standard_normal(hidden).astype(np.float32)))
    cache.put_many(rows)
    return cache
