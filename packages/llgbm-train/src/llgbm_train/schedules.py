"""Scalar schedules for training: the loss weight lambda(step) and the learning-rate multiplier.

Both are pure functions of the optimiser step (0-based), so a resumed run reproduces them exactly.

    lambda_at(step, kind="cosine", value=1.0, warmup_steps=100)        # 0 -> 1 over 100 steps
    LambdaLR(opt, lambda s: lr_lambda(s, warmup_steps=50, total_steps=1000, min_ratio=0.1))
"""

from __future__ import annotations

import math

LAMBDA_KINDS = ("constant", "linear", "cosine")


class ScheduleError(ValueError):
    """A schedule was asked for with arguments that make no sense."""


def lambda_at(
    step: int, *, kind: str, value: float, warmup_steps: int, start: float = 0.0
) -> float:
    """The loss weight at `step`.

    constant: `value` at every step (warmup_steps and start are ignored).
    linear:   `start` at step 0, rising linearly to `value` at `warmup_steps`, then `value`.
    cosine:   the same ramp shaped as a half cosine, (1 - cos(pi t)) / 2 with t = step / warmup.
    With warmup_steps == 0, linear and cosine give `value` from step 0.
    """
    if kind not in LAMBDA_KINDS:
        raise ScheduleError(
            f"lambda schedule kind: {kind!r} is not one of {', '.join(LAMBDA_KINDS)}"
        )
    if step < 0:
        raise ScheduleError(f"lambda schedule step: {step} is negative")
    if warmup_steps < 0:
        raise ScheduleError(f"lambda schedule warmup_steps: {warmup_steps} is negative")
    if kind == "constant" or warmup_steps == 0 or step >= warmup_steps:
        return float(value)
    t = step / warmup_steps
    ramp = t if kind == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))
    return float(start + (value - start) * ramp)


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `min_ratio`.

    Warm-up: (step + 1) / warmup_steps for step < warmup_steps, so step 0 already moves and the
    last warm-up step reaches 1. Decay: min_ratio + (1 - min_ratio) * (1 + cos(pi p)) / 2 with
    p = (step - warmup_steps) / (total_steps - warmup_steps), clamped to [0, 1], so the multiplier
    is 1 at step == warmup_steps and min_ratio from total_steps on.
    """
    if total_steps <= 0:
        raise ScheduleError(f"lr schedule total_steps: {total_steps} must be positive")
    if not 0 <= warmup_steps <= total_steps:
        raise ScheduleError(
            f"lr schedule warmup_steps: {warmup_steps} must be in [0, total_steps={total_steps}]"
        )
    if not 0.0 <= min_ratio <= 1.0:
        raise ScheduleError(f"lr schedule min_ratio: {min_ratio} must be in [0, 1]")
    if step < 0:
        raise ScheduleError(f"lr schedule step: {step} is negative")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    p = 1.0 if decay_steps == 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
