"""The tiny world's base model: a small Llama built and briefly pretrained in-process.

Pretraining teaches the prompt frame and generic skills only (repeat the input, next / previous
number and letter, first / last word), never a task family, so the base cannot do the tasks and a
rank-8 LoRA has structure to build on (ordered number and letter embeddings, copying).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from llgbm_worlds.data import collate, encode
from llgbm_worlds.families import (
    ADJECTIVES,
    CODE_WORDS,
    FAMILIES,
    LETTERS,
    NOUNS,
    NUMBER_MAX,
    Example,
)
from llgbm_worlds.frame import HEADERS, format_prompt, generic_probe_texts
from llgbm_worlds.tokenizer import build_tokenizer


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny Llama and its pretraining recipe."""

    hidden: int = 96  # hidden size
    layers: int = 2  # decoder layers
    heads: int = 4  # attention heads (= key/value heads)
    intermediate: int = 288  # MLP width
    steps: int = 3000  # pretraining steps
    batch: int = 64  # sequences per step
    lr: float = 4e-3  # AdamW peak learning rate (linear warm-up, cosine decay)

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden: {self.hidden} must be divisible by heads={self.heads}")
        for name in ("hidden", "layers", "heads", "intermediate", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


def _content_tokens() -> list[str]:
    return [
        *map(str, range(NUMBER_MAX + 1)),
        *LETTERS,
        *NOUNS,
        *ADJECTIVES,
        *CODE_WORDS,
    ]


def pretrain_example(rng: random.Random) -> Example:
    """One generic-skill example (never a task family's instruction)."""
    skill = rng.randrange(7)
    header = rng.randrange(len(HEADERS))
    pool = _content_tokens()
    if skill == 0:
        words = [rng.choice(pool) for _ in range(rng.randint(1, 4))]
        instr, x, y = "Repeat the input.", " ".join(words), " ".join(words)
    elif skill == 1:
        n = rng.randrange(NUMBER_MAX)
        instr, x, y = "Write the next number.", str(n), str(n + 1)
    elif skill == 2:
        n = rng.randrange(1, NUMBER_MAX + 1)
        instr, x, y = "Write the number before it.", str(n), str(n - 1)
    elif skill == 3:
        i = rng.randrange(25)
        instr, x, y = "Write the next letter.", LETTERS[i], LETTERS[i + 1]
    elif skill == 4:
        i = rng.randrange(1, 26)
        instr, x, y = "Write the letter before it.", LETTERS[i], LETTERS[i - 1]
    else:
        words = [rng.choice(pool) for _ in range(rng.randint(2, 3))]
        which = "first" if skill == 5 else "last"
        instr, x = f"Write the {which} word.", " ".join(words)
        y = words[0] if skill == 5 else words[-1]
    return Example(format_prompt(instr, x, header=header), y)


def vocabulary_texts() -> list[str]:
    """Every text the tiny tokenizer must cover: probes, pretraining and all task families."""
    texts = [*generic_probe_texts(), " ".join(_content_tokens())]
    texts += [
        "Repeat the input. Write the next number. Write the number before it. Write the next "
        "letter. Write the letter before it. Write the first word. Write the last word."
    ]
    for fam in FAMILIES.values():
        for p in fam.params:
            texts.append(fam.instruction(p))
            texts.extend(fam.domain(p)[:1])
            texts.extend(fam.answer(p, x) for x in fam.domain(p))
    return texts


def build_base(cfg: TinyModelConfig, *, seed: int, progress: bool = True):
    """Build the tokenizer and a pretrained tiny Llama; deterministic for ``seed``."""
    tokenizer = build_tokenizer(vocabulary_texts())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    pretrain(model, tokenizer, cfg, seed=seed, progress=progress)
    return model, tokenizer


def pretrain(model, tokenizer, cfg: TinyModelConfig, *, seed: int, progress: bool = True) -> float:
    """Response-only LM training on generic skills; returns the mean loss of the last 50 steps."""
    rng = random.Random(f"pretrain:{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warm = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="pretrain tiny base", disable=not progress, leave=False)
    for _ in bar:
        batch = collate(
            encode(tokenizer, [pretrain_example(rng) for _ in range(cfg.batch)]),
            tokenizer.pad_token_id,
        )
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    model.eval()
    tail = losses[-50:]
    return sum(tail) / len(tail)
