"""Prompts -> a generated adapter's delta, through a trained run (imports torch; on demand only).

    setup, generator = load_generator(Path("runs/delta_multi"))          # seconds: base + checkpoint
    delta = prompt_delta(setup, generator, ["Add 3 to each number. Input:4"])   # [hidden]

Uses llgbm-train's own evaluation path (``generate`` then ``delta_of``), so the delta is the one
``llgbm evaluate`` would compute for a task with these prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def frame(lines: list[str]) -> list[str]:
    """Each non-empty line as a task prompt in the world's Alpaca frame.

    A line reads like the worlds' items: ``INSTRUCTION Input:INPUT`` (the input part optional);
    a line that already holds the frame is kept as it is.
    """
    from llgbm_worlds.frame import INSTRUCTION_TAG, format_prompt

    out = []
    for line in (x.strip() for x in lines):
        if not line:
            continue
        if INSTRUCTION_TAG.strip() in line:
            out.append(line)
            continue
        instruction, sep, inp = line.partition(" Input:")
        out.append(format_prompt(instruction, inp if sep else ""))
    return out


def bodies(prompts: list[str]) -> list[str]:
    """The ``INSTRUCTION Input:INPUT`` line of framed prompts (the inverse of ``frame``)."""
    from llgbm_worlds.frame import INSTRUCTION_TAG, RESPONSE_TAG

    out = []
    for p in prompts:
        body = p.split(INSTRUCTION_TAG, 1)[-1].split(RESPONSE_TAG, 1)[0]
        out.append(body.replace("\n", " ").strip())
    return out


def load_generator(run_dir: Path):
    """(Setup, trained generator) of the run at ``run_dir``, from its newest checkpoint.

    ``llgbm_train.generate.load_generator``, as ``llgbm generate`` loads it (no world rebuild).
    """
    from llgbm_train.generate import load_generator as load

    loaded = load(run_dir, progress=False)
    return loaded.setup, loaded.generator


def prompt_delta(setup, generator, prompts: list[str]) -> np.ndarray:
    """[hidden] float32 delta of the adapter the generator writes for ``prompts``."""
    from llgbm_train.evaluate import delta_of, generate

    if not prompts:
        raise ValueError("prompts: type at least one prompt")
    adapter = generate(setup, generator, None, prompts=prompts)
    return delta_of(setup, adapter).numpy().astype(np.float32)
