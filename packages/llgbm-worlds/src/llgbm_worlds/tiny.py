"""The tiny world's base model: a small Llama built and briefly pretrained in-process.

Pretraining teaches the prompt frame and generic skills only (repeat the input, next / previous
number and letter of one or two items, first / last word), never a task family, so the base
cannot do the tasks and a rank-8 LoRA has structure to build on (ordered number and letter
embeddings, copying, item-by-item answers).

Every pretraining answer opens with its skill's word (``echo 3 cat``, ``next 4 6``), as every task
answer opens with its family's word (``sum 5 7``). The base thus holds an *answer-style slot* at
the ``### Response:`` token, and a teacher re-points that slot to its family word. An instruction
without a skill keyword (half the ``echo`` examples use a random filler instruction, never with
the probes' instruction words) gets the default style ``echo``: the base starts every task prompt
and every generic probe with ``echo``, so the family word a teacher writes there shows on the
probes too and teacher deltas cluster by family (docs/worlds.md, "The tiny base: pretraining with
answer styles").

``TinyModelConfig.parametric`` (preset ``parametric``) adds skills with a step k named in the
instruction (numbers k after / before, letters k after, the input k times), still under the skill
tags: the base then has a skill a held-out variant's adapter can steer (docs/worlds.md).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cache

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from llgbm_worlds.data import collate, encode, hidden_states, response_loss
from llgbm_worlds.families import (
    ADJECTIVES,
    CODE_WORDS,
    FAMILIES,
    LETTERS,
    NOUNS,
    NUMBER_MAX,
    WORDS,
    Example,
)
from llgbm_worlds.frame import (
    GENERIC_INPUT,
    GENERIC_TASK,
    HEADERS,
    format_prompt,
    generic_probe_texts,
)
from llgbm_worlds.tokenizer import build_tokenizer, words_of

# The word each pretraining skill's answer opens with (next / previous serve numbers and letters).
SKILL_TAGS = ("echo", "next", "previous", "first", "last")
# Words that name a skill; a filler instruction never contains one.
SKILL_KEYWORDS = frozenset({"repeat", "next", "previous", "first", "last"})
PRETRAIN_INSTRUCTIONS = (
    "Repeat the input.",
    "Write the next number.",
    "Write the next number of each.",
    "Write the previous number.",
    "Write the previous number of each.",
    "Write the next letter.",
    "Write the next letter of each.",
    "Write the previous letter.",
    "Write the previous letter of each.",
    "Write the first word.",
    "Write the last word.",
)


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny Llama and its pretraining recipe."""

    hidden: int = 96  # hidden size
    layers: int = 2  # decoder layers
    heads: int = (
        8  # attention heads (= key/value heads); 4 left the copy circuit unformed on some seeds
    )
    intermediate: int = 288  # MLP width
    steps: int = 3000  # pretraining steps
    batch: int = 64  # sequences per step
    lr: float = 4e-3  # AdamW peak learning rate (linear warm-up, cosine decay)
    # Share of `echo` (copy 1-4 words) among the 7 skills, against 1 for each other skill. Copying
    # is the skill a 2-layer model learns last and seed-dependently: at 1, pretraining seeds 0-4
    # echoed 0.31-0.86 of multi-word inputs and seed 0's teachers then averaged 21%; at 3,
    # 0.88-1.0 on all five seeds (docs/worlds.md).
    echo_weight: int = 3
    # Parametric skills: the same operations with a step k named in the instruction ("Write the
    # number 4 after each." -> "next 9"), k in 1..9, so the base can add, subtract, shift and
    # repeat by any k when told, as a real LLM can. Their instructions are built from words the
    # task families already use and never equal a family's instruction; the answer keeps the
    # skill's tag (next / previous / echo), never a family's, so the base still scores 0 on every
    # task. Off by default: the default world's base has no parametric skill (docs/worlds.md).
    parametric: bool = False

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden: {self.hidden} must be divisible by heads={self.heads}")
        for name in ("hidden", "layers", "heads", "intermediate", "steps", "batch", "echo_weight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@cache
def filler_words() -> tuple[str, ...]:
    """Words of random filler instructions: header, noun, adjective, code and pretraining words.

    No skill keyword (so a filler instruction asks for the default style ``echo``) and no word of
    the generic probes' instruction and input ("Please provide a response. Input:Input."), so
    pretraining never shows the probes' instruction.
    """
    words = words_of(HEADERS, strip_frame=False) | set(NOUNS) | set(ADJECTIVES) | set(CODE_WORDS)
    words |= words_of(PRETRAIN_INSTRUCTIONS)
    probe_words = words_of([f"{GENERIC_TASK} Input:{GENERIC_INPUT}"])
    return tuple(sorted(w for w in words if w.isalnum() and w not in SKILL_KEYWORDS | probe_words))


PARAMETRIC_STEPS = range(1, 10)  # k of the parametric skills


def pretrain_example(
    rng: random.Random,
    echo_weight: int = TinyModelConfig.echo_weight,
    parametric: bool = TinyModelConfig.parametric,
) -> Example:
    """One generic-skill example (never a task family's instruction); the answer opens with its tag."""
    n_skills = 11 if parametric else 7  # skills 7-10 are the parametric ones
    skill = rng.choices(range(n_skills), weights=(echo_weight, *[1] * (n_skills - 1)))[0]
    if skill >= 7:
        return _parametric_example(rng, skill)
    header = rng.randrange(len(HEADERS))
    pool = WORDS  # every content word: numbers, letters, nouns, adjectives, code words
    n = rng.randint(1, 2)  # next / previous: one item, or each of two
    each = " of each" if n == 2 else ""
    if skill == 0:
        words = [rng.choice(pool) for _ in range(rng.randint(1, 4))]
        x = y = " ".join(words)
        tag = "echo"
        if rng.random() < 0.5:
            filler = filler_words()
            instr = " ".join(rng.choice(filler) for _ in range(rng.randint(3, 8)))
            instr = instr.capitalize() + "."
        else:
            instr = "Repeat the input."
    elif skill in (1, 2):
        if skill == 1:
            ns = [rng.randrange(NUMBER_MAX) for _ in range(n)]
            y, tag = " ".join(str(k + 1) for k in ns), "next"
        else:
            ns = [rng.randrange(1, NUMBER_MAX + 1) for _ in range(n)]
            y, tag = " ".join(str(k - 1) for k in ns), "previous"
        instr, x = f"Write the {tag} number{each}.", " ".join(map(str, ns))
    elif skill in (3, 4):
        if skill == 3:
            ns = [rng.randrange(25) for _ in range(n)]
            y, tag = " ".join(LETTERS[i + 1] for i in ns), "next"
        else:
            ns = [rng.randrange(1, 26) for _ in range(n)]
            y, tag = " ".join(LETTERS[i - 1] for i in ns), "previous"
        instr, x = f"Write the {tag} letter{each}.", " ".join(LETTERS[i] for i in ns)
    else:
        words = [rng.choice(pool) for _ in range(rng.randint(2, 3))]
        tag = "first" if skill == 5 else "last"
        instr, x = f"Write the {tag} word.", " ".join(words)
        y = words[0] if skill == 5 else words[-1]
    return Example(format_prompt(instr, x, header=header), f"{tag} {y}")


def _parametric_example(rng: random.Random, skill: int) -> Example:
    """Skill 7-10: k numbers after / before, k letters after (wrapping), the input k times."""
    header = rng.randrange(len(HEADERS))
    k = rng.choice(PARAMETRIC_STEPS)
    n = rng.randint(1, 2)
    if skill == 7:
        ns = [rng.randrange(NUMBER_MAX + 1 - k) for _ in range(n)]
        instr, y, tag = f"Write the number {k} after each.", [str(v + k) for v in ns], "next"
        x = " ".join(map(str, ns))
    elif skill == 8:
        ns = [rng.randrange(k, NUMBER_MAX + 1) for _ in range(n)]
        instr, y, tag = f"Write the number {k} before each.", [str(v - k) for v in ns], "previous"
        x = " ".join(map(str, ns))
    elif skill == 9:
        ns = [rng.randrange(26) for _ in range(n)]
        instr, tag = f"Write the letter {k} after each.", "next"
        x, y = " ".join(LETTERS[i] for i in ns), [LETTERS[(i + k) % 26] for i in ns]
    else:
        x = rng.choice(WORDS)
        instr, y, tag = f"Repeat the input {k} times.", [x] * k, "echo"
    return Example(format_prompt(instr, x, header=header), f"{tag} {' '.join(y)}")


def vocabulary_texts() -> list[str]:
    """Every text the tiny tokenizer must cover: probes, pretraining and all task families."""
    texts = [*generic_probe_texts(), " ".join(WORDS)]
    texts += [*PRETRAIN_INSTRUCTIONS, " ".join(SKILL_TAGS)]
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
    """Response-only LM training on generic skills; returns the mean loss of the last 50 steps.

    Every step's examples are drawn up front (the same stream as drawing them step by step) and
    tokenized in one call; each step runs llgbm-flora's fused forward on its rows packed (no work
    on padding) and computes logits at the response positions only.
    """
    rng = random.Random(f"pretrain:{seed}")
    n = cfg.steps * cfg.batch
    data = collate(
        encode(
            tokenizer,
            [pretrain_example(rng, cfg.echo_weight, cfg.parametric) for _ in range(n)],
        ),
        tokenizer.pad_token_id,
    )
    lengths = data["attention_mask"].sum(1)  # [n]
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
    for step in bar:
        rows = slice(step * cfg.batch, (step + 1) * cfg.batch)
        T = int(lengths[rows].max())
        ids = data["input_ids"][rows, :T].contiguous()  # [batch, T]
        labels = data["labels"][rows, :T]  # [batch, T]
        loss = response_loss(model, hidden_states(model, None, ids, lengths[rows]), labels)[0]
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
