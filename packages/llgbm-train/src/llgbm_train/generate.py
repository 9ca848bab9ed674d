"""A trained run's generator applied to new prompts: one PEFT adapter directory per task.

    llgbm generate --run runs/delta_multi --prompts my_task.jsonl --out adapters/my_task

    gen = load_generator("runs/delta_multi")            # the run's newest checkpoint
    adapter = gen.adapter(prompts)                       # exactly N prompts -> LoraAdapter

The prompts file is JSONL, one object per line with a ``prompt`` string: the full text the base
model reads, framed like the world's own task files (``tasks/<task>/train.jsonl`` works as it
is; other fields such as ``answer`` are ignored, blank lines are skipped). The generator was
trained on conditions of exactly ``generator.n_prompts`` prompts (N): a file of N prompts is used
in its order, a longer one gives N drawn without replacement by ``--seed`` (the evaluation's
rule), a shorter one is an error rather than a condition the generator never saw.

The output directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` (loads with
``PeftModel.from_pretrained(base, DIR)`` on the world's base) and ``generation.json`` (run,
checkpoint, the N prompts used, seed). ``--out`` must be new, empty or an earlier output of this
command (replaced); any other directory is left alone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from llgbm_flora import atomic

from llgbm_train.config import atomic_write_text
from llgbm_train.data import draw_prompts
from llgbm_train.runs import Run

PROVENANCE = "generation.json"


class GenerateError(ValueError):
    """A prompts file or output directory is unusable; one-line message."""


def read_prompts(path: str | Path) -> list[str]:
    """The ``prompt`` strings of a JSONL file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"{path}: prompts file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise GenerateError(f"{path}: not UTF-8 text (expected JSONL)") from None
    prompts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerateError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise GenerateError(f'{path}:{i}: expected an object with a "prompt" string')
        if not row["prompt"].strip():
            raise GenerateError(f"{path}:{i}: empty prompt")
        prompts.append(row["prompt"])
    if not prompts:
        raise GenerateError(f'{path}: no prompts (one JSON object with a "prompt" per line)')
    return prompts


def condition_prompts(
    prompts: list[str], n: int, *, seed: int, where: str = "prompts"
) -> list[str]:
    """The N prompts of one condition: all of them when there are N, else N drawn by ``seed``."""
    if len(prompts) < n:
        raise GenerateError(
            f"{where}: {len(prompts)} prompts, but the generator reads {n} per task "
            f"(generator.n_prompts); give at least {n}"
        )
    if len(prompts) == n:
        return list(prompts)
    return draw_prompts(np.random.default_rng(seed), prompts, n)


@dataclass
class LoadedGenerator:
    """A run's generator at its newest checkpoint, with the setup it reads prompts through."""

    run: Run
    setup: Any  # llgbm_train.trainer.Setup
    generator: torch.nn.Module
    checkpoint: Path

    @property
    def n_prompts(self) -> int:
        return self.setup.cfg.generator.n_prompts

    def adapter(self, prompts: list[str]):
        """The generated LoraAdapter (cpu, float32) for exactly ``n_prompts`` prompts."""
        return generate_adapter(self.setup, self.generator, prompts)


def generate_adapter(setup, generator: torch.nn.Module, prompts: list[str]):
    """One condition of N prompts -> the generator's LoraAdapter (cpu, float32), in eval mode."""
    from llgbm_train.evaluate import generate

    n = setup.cfg.generator.n_prompts
    if len(prompts) != n:
        raise GenerateError(f"generate_adapter: needs {n} prompts, got {len(prompts)}")
    return generate(setup, generator, None, prompts=prompts)


def require_world(run: Run) -> None:
    """The run's world must exist: rebuilding a missing one here (``world.build_if_missing``)
    would take minutes and need not give the world the checkpoint was trained on."""
    d = Path(run.config().world.dir)
    if not (d / "world.json").is_file():
        raise GenerateError(
            f"{run.dir}: its world {d} has no world.json (build or restore it, or fix world.dir "
            f"in {run.config_path})"
        )


def load_generator(run_dir: str | Path, *, progress: bool = True) -> LoadedGenerator:
    """Rebuild a run's world, encoder and generator from its config; load the newest checkpoint."""
    from llgbm_train.evaluate import load_trained
    from llgbm_train.trainer import prepare, resolve_device

    run = Run.open(run_dir)
    cfg = run.config()
    ckpts = run.checkpoints()
    if not ckpts:
        raise GenerateError(f"{run.dir}: no checkpoint (train the run first)")
    require_world(run)
    setup = prepare(cfg, device=resolve_device(cfg), progress=progress)
    generator, _ = load_trained(run, setup)
    return LoadedGenerator(run, setup, generator, ckpts[-1])


def check_out_dir(out: Path) -> None:
    """``out`` may be new, empty, or an earlier output of ``llgbm generate`` (then replaced).

    Any other directory is refused, adapters included: a teacher or another tool's adapter is
    not ours to overwrite.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise GenerateError(f"{out}: exists and is not a directory; choose another --out")
    if any(out.iterdir()) and not (out / PROVENANCE).is_file():
        what = "a PEFT adapter" if (out / "adapter_config.json").is_file() else "a directory"
        raise GenerateError(
            f"{out}: {what} not written by `llgbm generate` (no {PROVENANCE}); it is left "
            "alone, choose a new or empty --out"
        )


def generate_dir(
    run_dir: str | Path,
    prompts_file: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Read prompts, generate their adapter, write ``out``; returns the provenance record."""
    from llgbm_flora import save_adapter

    out = Path(out)
    # Every input is checked before the slow part (world, base model, checkpoint).
    run = Run.open(run_dir)
    n = run.config().generator.n_prompts
    require_world(run)
    check_out_dir(out)
    prompts = read_prompts(prompts_file)
    chosen = condition_prompts(prompts, n, seed=seed, where=str(prompts_file))
    gen = load_generator(run.dir, progress=progress)
    adapter = gen.adapter(chosen)
    record = {
        "run": str(gen.run.dir),
        "checkpoint": gen.checkpoint.name,
        "config_hash": gen.setup.cfg.hash,
        "prompts_file": str(prompts_file),
        "prompts_sha256": hashlib.sha256(Path(prompts_file).read_bytes()).hexdigest(),
        "n_in_file": len(prompts),
        "seed": seed if len(prompts) > n else None,
        "prompts": chosen,
        "rank": adapter.spec.rank,
        "target_modules": list(adapter.spec.target_modules),
    }
    check_out_dir(out)  # again: it may have appeared meanwhile
    # Adapter and provenance appear together: built beside ``out``, then swapped in (an earlier
    # output moved aside first), so a crash never leaves an adapter this command would refuse.
    staging = atomic.fresh_dir(out)
    try:
        save_adapter(adapter, staging)
        atomic_write_text(staging / PROVENANCE, json.dumps(record, indent=2) + "\n")
        atomic.replace_dir(staging, out, marker=PROVENANCE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record
