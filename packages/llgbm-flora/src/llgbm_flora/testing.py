"""Tiny models and random adapters for tests (this package's and other packages').

    model = tiny_llama(seed=0)                      # LlamaForCausalLM, hidden 32, 2 layers, fp32, eval
    spec = tiny_spec(model, rank=4)                 # all 7 projections
    adapter = random_adapter(spec, seed=1)          # A, B ~ N(0, scale^2)
    batch = random_batch(spec, n=3, seed=2)

Models are built from config objects (never downloaded) with a seeded init that leaves the
caller's global RNG state untouched. Nothing happens at import time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .spec import STANDARD_MODULES, LoraAdapter, LoraBatch, LoraSpec

__all__ = [
    "MODEL_BUILDERS",
    "assert_no_hooks",
    "assert_state_unchanged",
    "dependency_names",
    "hook_snapshot",
    "random_adapter",
    "random_batch",
    "state_snapshot",
    "tiny_llama",
    "tiny_mistral",
    "tiny_qwen2",
    "tiny_spec",
]


def _common(hidden: int, layers: int, vocab: int, heads: int, kv_heads: int) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _build(config_cls: type, model_cls: type, seed: int, attn: str, **kwargs: object) -> nn.Module:
    config = config_cls(**kwargs)
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.float().eval()


def tiny_llama(
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    vocab: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    attn: str = "eager",
) -> nn.Module:
    """A random LlamaForCausalLM (grouped-query attention, no biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build(
        LlamaConfig, LlamaForCausalLM, seed, attn, **_common(hidden, layers, vocab, heads, kv_heads)
    )


def tiny_qwen2(
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    vocab: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    attn: str = "eager",
) -> nn.Module:
    """A random Qwen2ForCausalLM (q/k/v projections have biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build(
        Qwen2Config, Qwen2ForCausalLM, seed, attn, **_common(hidden, layers, vocab, heads, kv_heads)
    )


def tiny_mistral(
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    vocab: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    attn: str = "eager",
) -> nn.Module:
    """A random MistralForCausalLM."""
    from transformers import MistralConfig, MistralForCausalLM

    kwargs = _common(hidden, layers, vocab, heads, kv_heads)
    return _build(MistralConfig, MistralForCausalLM, seed, attn, sliding_window=None, **kwargs)


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "mistral": tiny_mistral,
}


def tiny_spec(
    model: nn.Module,
    rank: int = 4,
    alpha: float = 8.0,
    target_modules: tuple[str, ...] = STANDARD_MODULES,
    use_rslora: bool = False,
    layers: tuple[int, ...] | None = None,
) -> LoraSpec:
    """LoraSpec.for_model with small defaults (all 7 projections, r=4, alpha=8)."""
    return LoraSpec.for_model(
        model,
        rank=rank,
        alpha=alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        layers=layers,
        base_model="tiny",
    )


def random_adapter(
    spec: LoraSpec, seed: int = 0, scale: float = 0.1, dtype: torch.dtype = torch.float32
) -> LoraAdapter:
    """An adapter with A, B ~ N(0, scale^2) (B non-zero, so it changes outputs)."""
    batch = random_batch(spec, 1, seed=seed, scale=scale, dtype=dtype)
    keys = spec.keys()
    return LoraAdapter(
        spec, {k: batch.A[k][0].clone() for k in keys}, {k: batch.B[k][0].clone() for k in keys}
    )


def random_batch(
    spec: LoraSpec, n: int, seed: int = 0, scale: float = 0.1, dtype: torch.dtype = torch.float32
) -> LoraBatch:
    """n random adapters stacked; A, B ~ N(0, scale^2), deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    keys = spec.keys()
    for key in keys:
        d_in, d_out = spec.in_out(key[1])
        A[key] = (torch.randn(n, spec.rank, d_in, generator=g) * scale).to(dtype)
        B[key] = (torch.randn(n, d_out, spec.rank, generator=g) * scale).to(dtype)
    return LoraBatch(spec, A, B)


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer, for `assert_state_unchanged` later."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Every parameter and buffer is bitwise what `state_snapshot` saw (same dtype too)."""
    now = model.state_dict()
    assert now.keys() == snapshot.keys(), "parameter/buffer names changed"
    for k, v in snapshot.items():
        assert now[k].dtype == v.dtype, f"{k} dtype changed"
        assert torch.equal(now[k], v), f"{k} changed"


def hook_snapshot(model: nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]]:
    """Per module: ids of forward hooks, ids of forward pre-hooks, whether `forward` is patched."""
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), "forward" in m.__dict__)
        for name, m in model.named_modules()
    }


def assert_no_hooks(model: nn.Module, baseline: dict | None = None) -> None:
    """No forward hook or patched `forward` on any module, beyond those in `baseline`
    (a `hook_snapshot` taken before the call; default: none at all)."""
    for name, state in hook_snapshot(model).items():
        want = (baseline or {}).get(name, ((), (), False))
        assert state == want, (
            f"hooks or patched forward left on {name or 'model'}: {state} != {want}"
        )


def dependency_names(package_dir, rename: dict[str, str] | None = None) -> tuple[set, set]:
    """(declared, imported) third-party distribution names of one package of this workspace.

    `package_dir` holds `pyproject.toml` and `src/<module>/`. Imported: every absolute import
    in the sources outside the standard library and the package itself, mapped to distribution
    names with `rename` (import name -> distribution, where they differ), `_` read as `-`. For
    each package's test that every import is declared (no phantom dependencies).
    """
    import ast
    import re
    import sys
    import tomllib
    from pathlib import Path

    package_dir = Path(package_dir)
    project = tomllib.loads((package_dir / "pyproject.toml").read_text())["project"]
    declared = {
        re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-")
        for r in project.get("dependencies", [])
    }
    (src,) = [p for p in (package_dir / "src").iterdir() if p.is_dir() and p.name.isidentifier()]
    imported = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != src.name}
    rename = rename or {}
    return declared, {rename.get(m, m).replace("_", "-") for m in third_party}
