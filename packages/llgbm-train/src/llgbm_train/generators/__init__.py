"""LoRA generators: a condition (prompt-token states) in, a LoraBatch out.

    gen = build_generator("dnd", spec=spec, cond_dim=384, n_prompts=8, max_tokens=64,
                          weight_tokenizer=tok, n_blocks=4, kernel=5)
    lora = gen(states, mask)          # LoraBatch of B adapters, differentiable

kinds: "dnd" (hyper-convolutional decoder over weight tokens, generators/dnd.py) and "t2l"
(per-(layer, module) heads over a pooled condition, generators/t2l.py).
"""

from __future__ import annotations

from llgbm_flora import LoraSpec

from llgbm_train.generators.base import Generator, GeneratorError
from llgbm_train.generators.dnd import DnDGenerator, HyperConvBlock
from llgbm_train.generators.t2l import T2LGenerator
from llgbm_train.weight_tokens import WeightTokenizer

GENERATOR_KINDS = ("dnd", "t2l")
_KWARGS = {
    "dnd": {"n_blocks", "kernel", "channels", "max_group_channels"},
    "t2l": {"hidden", "emb_dim", "head_rank", "standardize"},
}

__all__ = [
    "GENERATOR_KINDS",
    "DnDGenerator",
    "Generator",
    "GeneratorError",
    "HyperConvBlock",
    "T2LGenerator",
    "build_generator",
]


def build_generator(
    kind: str,
    *,
    spec: LoraSpec,
    cond_dim: int,
    n_prompts: int,
    max_tokens: int,
    weight_tokenizer: WeightTokenizer | None,
    **kw,
) -> Generator:
    """A generator of adapters with structure `spec` from conditions [B, n_prompts, max_tokens,
    cond_dim].

    dnd kwargs: n_blocks (4), kernel (5, odd), channels (None: geometric from n_prompts to
      n_tokens over the first n_blocks-1 blocks; else the n_blocks-1 intermediate channel
      counts), max_group_channels (64: grouped convs above that many channels).
      Needs `weight_tokenizer`. Conditions must have exactly n_prompts and max_tokens.
    t2l kwargs: hidden (256), emb_dim (32), head_rank (None: full heads), standardize ("features"
      or True: per feature; "within": whitened by the within-task scatter; "none" or False:
      as pooled; fitted on the training conditions). Uses the tokenizer's
      normalised tokens as its output space when `weight_tokenizer` is given, raw A/B otherwise;
      accepts any number of prompts and tokens.
    """
    allowed = _KWARGS.get(kind)
    if allowed is None:
        raise GeneratorError(f"generator kind: {kind!r} is not one of {', '.join(GENERATOR_KINDS)}")
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise GeneratorError(
            f"generator {kind!r}: unknown option(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(allowed))}"
        )
    if weight_tokenizer is not None and not spec.compatible(weight_tokenizer.spec):
        raise GeneratorError("generator: weight_tokenizer was built for a different LoRA spec")
    if kind == "dnd":
        return DnDGenerator(
            spec=spec,
            cond_dim=cond_dim,
            n_prompts=n_prompts,
            max_tokens=max_tokens,
            weight_tokenizer=weight_tokenizer,
            **kw,
        )
    return T2LGenerator(spec=spec, cond_dim=cond_dim, weight_tokenizer=weight_tokenizer, **kw)
