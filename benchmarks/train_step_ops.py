"""Host work of one generator training step: torch ops and autograd nodes per step, on any world.

    uv run python benchmarks/train_step_ops.py configs/baseline.yaml world.kind=smollm2 \\
        world.dir=/tmp/smoke world.preset=smoke world.build_if_missing=false \\
        generator.max_tokens=96 model.device=cpu --out ops.json

A GPU step of a small model is bound by the host: every torch op is a kernel launch of ~5-20 us
of Python and dispatcher time, so the op count per step, not FLOPs, sets its speed. This counts
them on the CPU (no GPU needed): the whole run (setup + `--warmup` + `--steps` steps) is
profiled twice, once with `--warmup` steps only, and the difference divided by `--steps` is the
per-step count (setup cancels out; a first 1-step run fills the caches both read). Counted: top-level `aten::` calls (what the Python side
issues), all `aten::` events (nested ones included), and autograd nodes (`... Backward` events).
Each run's wall time is kept in the JSON; it means little (it includes the model's real compute).

For SmolLM2's shapes without a GPU world: `llgbm world build smollm2 --preset smoke --out
/tmp/smoke` (one teacher, 2 steps; CPU, about a minute) and, for the behaviour objectives,
`behaviour.n_probes=4 behaviour.probes_per_step=4` (the smoke world's probe pool holds 4).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _count(cfg_path: str, overrides: list[str], steps: int) -> dict[str, float]:
    from llgbm_train.config import load_config
    from llgbm_train.trainer import train
    from torch.profiler import ProfilerActivity, profile

    cfg = load_config(cfg_path, overrides=[*overrides, f"training.steps={steps}"])
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        train(cfg, None, progress=False)
    wall = time.perf_counter() - t0
    events = prof.events()
    aten = [e for e in events if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    # Each node shows up as "XBackward0" inside "autograd::engine::evaluate_function: XBackward0".
    nodes = [
        e
        for e in events
        if "Backward" in e.name and not e.name.startswith(("aten::", "autograd::"))
    ]
    return {
        "top_level_aten": len(top),
        "aten": len(aten),
        "autograd_nodes": len(nodes),
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    _count(a.config, a.overrides, 1)  # fills the world's caches (deltas, behaviour targets)
    short = _count(a.config, a.overrides, a.warmup)
    long = _count(a.config, a.overrides, a.warmup + a.steps)
    per = {k: (long[k] - short[k]) / a.steps for k in short if k != "wall_s"}
    result = {"config": a.config, "overrides": a.overrides, "per_step": per, "runs": [short, long]}
    print(json.dumps(per, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
