"""Teacher-zoo training: all runs in one batched run vs the same runs one after another with PEFT.

    uv run python benchmarks/zoo_batched.py --world worlds/tiny [--steps 10] [--repeats 3]

Uses the world's base and its preset's run list (the default tiny world: 78 runs, batch 32).
Per repeat, in this order:

- *batched*: ``llgbm_worlds.zoo.train_runs`` over every run for ``--steps`` and for 2 x
  ``--steps`` optimizer steps, nothing saved or scored; the difference over ``--steps`` is the
  time of one zoo step (set-up cancels);
- *alone*: ``llgbm_worlds.zoo.train_peft_alone`` (the reference each batched teacher is tested
  against: plain PEFT, HF loss, clip_grad_norm_, AdamW) for the shortest, the median and the
  longest run of the world, for ``--steps`` and 2 x ``--steps`` steps likewise; their mean step
  times 78 runs is one step of the sequential zoo.

Speed-up = sequential step / batched step: what the batched zoo saves over training the same
teachers one by one (checkpoint saving and scoring, the same in both, excluded). The recipe's
full zoo time follows as steps x batched step. Prints min / median / max over repeats and writes
one JSON line to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from llgbm_worlds.build import load_local_base, run_specs, task_items
from llgbm_worlds.presets import get_preset
from llgbm_worlds.world import World
from llgbm_worlds.zoo import max_length, train_peft_alone, train_runs


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, default=Path("worlds/tiny"))
    ap.add_argument("--steps", type=int, default=10, help="steps per timing (and twice that)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    world = World.load(args.world)
    preset = get_preset(world.kind, world.preset)
    runs = run_specs(preset, task_items(preset, world.seed))
    base, tok = load_local_base(Path(world.base_path))
    cfg = replace(preset.zoo, init=world.init)
    by_len = sorted(runs, key=lambda r: (max_length(tok, r.items), r.task, r.data_split))
    sample = [by_len[0], by_len[len(by_len) // 2], by_len[-1]]

    def batched(steps: int) -> float:
        c = replace(cfg, steps=steps, checkpoints=(steps,))
        return _timed(
            lambda: train_runs(
                base,
                tok,
                runs,
                c,
                [None] * len(runs),
                seed=world.seed,
                scorer=lambda *a: [],
                base_name="base",
            )
        )

    def alone(run, steps: int) -> float:
        c = replace(cfg, steps=steps, checkpoints=(steps,))
        return _timed(lambda: train_peft_alone(base, tok, run, c, seed=world.seed))

    s = args.steps
    batched_step, alone_step = [], []
    for rep in range(args.repeats):
        batched_step.append((batched(2 * s) - batched(s)) / s)
        alone_step.append(statistics.mean((alone(r, 2 * s) - alone(r, s)) / s for r in sample))
        print(
            f"repeat {rep + 1}: batched step {batched_step[-1]:.3f} s ({len(runs)} runs), "
            f"alone step {alone_step[-1] * 1e3:.1f} ms (one run)",
            flush=True,
        )
    seq = [a * len(runs) for a in alone_step]
    speedup = [q / b for q, b in zip(seq, batched_step)]

    def spread(xs):
        return [min(xs), statistics.median(xs), max(xs)]

    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "world": str(args.world),
        "runs": len(runs),
        "batch": cfg.batch,
        "recipe_steps": cfg.steps,
        "batched_step_s": spread(batched_step),
        "sequential_step_s": spread(seq),
        "speedup": spread(speedup),
        "zoo_training_s_batched": spread([b * cfg.steps for b in batched_step]),
        "zoo_training_s_sequential": spread([q * cfg.steps for q in seq]),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
