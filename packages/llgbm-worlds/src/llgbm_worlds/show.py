"""``show_world``: a world directory as text tables (tasks with base and teacher accuracy)."""

from __future__ import annotations

import math
from pathlib import Path

from llgbm_worlds.world import World


def _pct(x: float) -> str:
    return "  -" if math.isnan(x) else f"{100 * x:3.0f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def summary(world: World) -> dict[str, float]:
    """Mean base accuracy, mean teacher accuracy (all / last checkpoints) over single-task teachers."""
    single = [t for t in world.teachers if t.kind == "single"]
    last: dict[tuple[str, int], float] = {}
    steps: dict[tuple[str, int], int] = {}
    for t in single:
        key = (t.task, t.data_split)
        if t.step >= steps.get(key, -1):
            steps[key], last[key] = t.step, t.accuracy

    def mean(xs):
        xs = [x for x in xs if not math.isnan(x)]
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "base_accuracy": mean([t.base_accuracy for t in world.tasks]),
        "teacher_accuracy": mean([t.accuracy for t in single]),
        "teacher_accuracy_last": mean(list(last.values())),
    }


def show_world(path: str | Path) -> str:
    """The world at ``path`` as a header line, a task table and a summary line."""
    w = World.load(path)
    out = [
        f"world {w.root}  kind={w.kind}  preset={w.preset}  seed={w.seed}  init={w.init}",
        f"base  {w.base_path}",
        f"hash  {w.content_hash[:16]}  created with "
        + ", ".join(f"{k} {v}" for k, v in w.created_with.items()),
        "",
    ]
    rows = []
    for t in w.tasks:
        ts = w.teachers_of(t.name)
        accs = [x.accuracy for x in ts if not math.isnan(x.accuracy)]
        rows.append(
            [
                t.name,
                t.family,
                t.split if t.heldout_kind is None else f"{t.split}/{t.heldout_kind}",
                _pct(t.base_accuracy),
                str(len(ts)),
                _pct(sum(accs) / len(accs)) if accs else "  -",
                _pct(max(accs)) if accs else "  -",
            ]
        )
    out.append(_table(["task", "family", "split", "base", "teachers", "mean acc", "best"], rows))
    s = summary(w)
    out += [
        "",
        f"{len(w.tasks)} tasks ({sum(t.split == 'train' for t in w.tasks)} train), "
        f"{len(w.teachers)} teachers; base {_pct(s['base_accuracy']).strip()}, single-task "
        f"teachers {_pct(s['teacher_accuracy']).strip()} (last checkpoints "
        f"{_pct(s['teacher_accuracy_last']).strip()})",
    ]
    return "\n".join(out)
