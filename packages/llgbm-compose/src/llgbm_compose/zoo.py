"""Which of a world's teachers an experiment uses, and how it names them.

single_teachers(world)              # teachers of one task (mixtures have two)
part_teachers(world, "add_3", 320)  # a task's single teachers at a step (all, if none is)
best_teacher(teachers)              # accuracy, then later step, then data split 0
rel_path(world, teacher.path)       # "teachers/add_3/split0/step0320"
"""

from __future__ import annotations

from pathlib import Path


def single_teachers(world) -> list:
    """The world's single-task teachers (a mixture teacher has two tasks, so no one label)."""
    return [t for t in world.teachers if t.kind == "single"]


def part_teachers(world, task: str, step: int) -> list:
    """Single-task teachers of ``task`` at ``step`` (every one of the task if none is)."""
    own = [t for t in world.teachers if t.task == task and t.kind == "single"]
    same = [t for t in own if t.step == step]
    return same or own


def best_teacher(teachers: list):
    """Highest accuracy (unknown ranks lowest), then the later checkpoint, then data split 0."""

    def rank(t):
        acc = -1.0 if t.accuracy != t.accuracy else t.accuracy
        return (acc, t.step, -t.data_split)

    return max(teachers, key=rank)


def rel_path(world, path) -> str:
    """``path`` relative to the world's root (as given if it lies outside)."""
    p = Path(path)
    return p.relative_to(world.root).as_posix() if p.is_relative_to(world.root) else str(p)
