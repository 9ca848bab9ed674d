"""`compose WORLD`: clustering, additivity, merges scored on their tasks, retrieval; JSON + plots.

    from llgbm_compose.experiment import ComposeConfig, run_compose
    report = run_compose("worlds/tiny", "runs/compose/tiny", ComposeConfig(rank=8))

Writes ``OUT/report.json``, ``OUT/report.md``, ``OUT/{clustering,additivity,merges}.png``, the
merged adapters of each mixture under ``OUT/adapters/<mixture>/<method>/`` (PEFT + merge.json),
and the retrieval index beside the world's delta cache (``<world>/delta_index``).

Merges are scored by exact match (``llgbm_worlds.score``, greedy) on the same test items as the
adapters they are compared with, with 95% bootstrap intervals over items:
- mixtures (a, b): the best teacher of a, of b, the mixture teacher, and the merges of the two
  part teachers (average, task arithmetic a + b, TIES, DARE over `dare_seeds`), each scored on
  a's items, b's items and the mixture's items;
- same task: for each train task, its final-step teachers of different data splits merged
  (average, TIES, DARE) against its best single teacher and against averaging A and B apart
  (``factor_average``: the wrong merge, kept as a control).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llgbm_compose.errors import ComposeError


@dataclass(frozen=True)
class ComposeConfig:
    """What `run_compose` measures."""

    rank: int | None = None  # rank of merged adapters (None: the teachers' rank)
    max_items: int | None = None  # test items scored per task (None: all)
    density: float = 0.2  # TIES: share of each task vector's entries kept
    drop: float = 0.5  # DARE: probability of dropping an entry
    dare_seeds: tuple[int, ...] = (0, 1, 2)  # DARE masks, one merge per seed
    merges: bool = True  # score merges (the slow part; clustering/additivity/retrieval always)
    same_task: bool = True  # also merge each train task's teachers of different data splits
    k: tuple[int, ...] = (1, 5)  # precision@k of retrieval
    index_kind: str = "auto"  # retrieval index: auto | flat | ivf
    bootstrap: int = 1000  # bootstrap resamples for accuracy intervals
    seed: int = 0  # bootstrap seed
    plots: bool = True  # write PNGs

    def __post_init__(self) -> None:
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ComposeError(f"rank: must be a positive int or None, got {self.rank!r}")
        if self.max_items is not None and self.max_items < 1:
            raise ComposeError(f"max_items: must be >= 1 or None, got {self.max_items}")
        if not 0 < self.density <= 1:
            raise ComposeError(f"density: must be in (0, 1], got {self.density}")
        if not 0 <= self.drop < 1:
            raise ComposeError(f"drop: must be in [0, 1), got {self.drop}")
        if not self.dare_seeds:
            raise ComposeError("dare_seeds: give at least one seed")
        if not self.k or any(k < 1 for k in self.k):
            raise ComposeError(f"k: each must be >= 1, got {self.k}")
        if self.index_kind not in ("auto", "flat", "ivf"):
            raise ComposeError(f"index_kind: {self.index_kind!r} is not auto, flat or ivf")


def _scorer(world_deltas, cfg: ComposeConfig):
    from llgbm_worlds import bootstrap_ci, score

    model, tok = world_deltas.base()
    device = next(model.parameters()).device

    def run(adapter, task) -> dict[str, Any]:
        items = task.items("test")[: cfg.max_items]
        ad = None if adapter is None else adapter.to(device=device)
        correct = score(model, tok, items, adapter=ad)
        acc, lo, hi = bootstrap_ci(correct, cfg.bootstrap, cfg.seed)
        return {"accuracy": acc, "ci95": [lo, hi], "n_items": len(items)}

    return run


def factor_average(adapters) -> Any:
    """The wrong merge, as a control: A and B averaged apart (needs one rank and scale)."""
    from llgbm_flora import LoraAdapter, algebra

    spec = algebra.check_same_structure([a.spec for a in adapters], "factor_average")
    if any(a.spec.rank != spec.rank or a.spec.scale != spec.scale for a in adapters):
        raise ComposeError("factor_average: needs adapters of one rank and scale")
    keys = spec.keys()
    return LoraAdapter(
        spec,
        {k: sum(a.A[k] for a in adapters) / len(adapters) for k in keys},
        {k: sum(a.B[k] for a in adapters) / len(adapters) for k in keys},
    )


def _merges(paths, cfg: ComposeConfig, *, with_sum: bool) -> dict[str, Any]:
    """name -> Merge for the configured methods over ``paths``."""
    from llgbm_compose import merges as M

    out = {"average": M.average(paths, rank=cfg.rank)}
    if with_sum:
        out["task_arithmetic"] = M.task_arithmetic(paths, [1.0] * len(paths), rank=cfg.rank)
    out["ties"] = M.ties(paths, density=cfg.density, rank=cfg.rank)
    for s in cfg.dare_seeds:
        out[f"dare_s{s}"] = M.dare(paths, drop=cfg.drop, seed=s, rank=cfg.rank)
    return out


def mixture_merges(world_deltas, cfg: ComposeConfig, out_dir: Path | None) -> list[dict[str, Any]]:
    """Per mixture task: teachers and merges of its parts' best teachers on a, b and the mix."""
    from llgbm_flora import load_adapter

    from llgbm_compose.zoo import best_teacher, part_teachers, rel_path

    world = world_deltas.world
    run = _scorer(world_deltas, cfg)
    rows = []
    for task in [t for t in world.tasks if t.family == "mixture" and len(t.parts) == 2]:
        mix_teachers = [t for t in world.teachers if t.task == task.name]
        if not mix_teachers:
            continue
        m = best_teacher(mix_teachers)
        a, b = (best_teacher(part_teachers(world, p, m.step)) for p in task.parts)
        merged = _merges([a.path, b.path], cfg, with_sum=True)
        adapters: dict[str, Any] = {
            "base": None,
            "teacher_a": load_adapter(a.path),
            "teacher_b": load_adapter(b.path),
            "mixture_teacher": load_adapter(m.path),
            **{name: mg.adapter for name, mg in merged.items()},
        }
        evals = {"a": world.task(task.parts[0]), "b": world.task(task.parts[1]), "mix": task}
        scores = {name: {e: run(ad, t) for e, t in evals.items()} for name, ad in adapters.items()}
        if out_dir is not None:
            for name, mg in merged.items():
                mg.save(out_dir / "adapters" / task.name / name)
        rows.append(
            {
                "task": task.name,
                "parts": list(task.parts),
                "teachers": {
                    "a": rel_path(world, a.path),
                    "b": rel_path(world, b.path),
                    "mixture": rel_path(world, m.path),
                },
                "merges": {name: mg.summary() for name, mg in merged.items()},
                "scores": scores,
            }
        )
    return rows


def same_task_merges(world_deltas, cfg: ComposeConfig) -> list[dict[str, Any]]:
    """Per train task: its final-step teachers of different data splits, merged and scored."""
    from llgbm_flora import load_adapter

    from llgbm_compose.zoo import best_teacher, rel_path

    world = world_deltas.world
    run = _scorer(world_deltas, cfg)
    rows = []
    for task in [t for t in world.tasks if t.split == "train" and t.family != "mixture"]:
        own = [t for t in world.teachers if t.task == task.name and t.kind == "single"]
        if not own:
            continue
        last = max(t.step for t in own)
        final = sorted((t for t in own if t.step == last), key=lambda t: t.data_split)
        if len(final) < 2:
            continue
        merged = _merges([t.path for t in final], cfg, with_sum=False)
        adapters = {
            "best_teacher": load_adapter(best_teacher(own).path),
            "factor_average": factor_average([load_adapter(t.path) for t in final]),
            **{name: mg.adapter for name, mg in merged.items()},
        }
        rows.append(
            {
                "task": task.name,
                "teachers": [rel_path(world, t.path) for t in final],
                "merges": {name: mg.summary() for name, mg in merged.items()},
                "scores": {name: run(ad, task) for name, ad in adapters.items()},
            }
        )
    return rows


def pooled(rows: list[dict[str, Any]], key: str | None = None) -> dict[str, float]:
    """Mean accuracy per adapter over rows (``key``: which eval set, for mixtures)."""
    names = list(rows[0]["scores"]) if rows else []
    out = {}
    for n in names:
        accs = [(r["scores"][n][key] if key else r["scores"][n])["accuracy"] for r in rows]
        out[n] = float(np.mean(accs))
    return out


def retrieval_report(world_deltas, cfg: ComposeConfig) -> dict[str, Any]:
    """Index every single-task teacher; self-retrieval and precision@k by task and family."""
    from llgbm_compose.retrieval import index_world, precision_at_k
    from llgbm_compose.zoo import single_teachers

    teachers = single_teachers(world_deltas.world)
    index = index_world(
        world_deltas.world, teachers=teachers, kind=cfg.index_kind, world_deltas=world_deltas
    )
    path = index.save()
    deltas = world_deltas.teachers(teachers).deltas
    out: dict[str, Any] = {"index": str(path), "kind": index.kind, "n": len(index)}
    for by in ("task", "family"):
        for k in cfg.k:
            if k <= len(index) - 1:
                r = precision_at_k(index, deltas, index.rows, k, by)
                out[f"{by}_p@{k}"] = r["precision"]
                out["self_rank1"] = r["self_rank1"]
    return out


def run_compose(
    world,
    out_dir: str | Path | None,
    cfg: ComposeConfig | None = None,
    *,
    world_deltas=None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every measurement on ``world`` and write the report under ``out_dir`` (if given)."""
    from llgbm_worlds.deltas import WorldDeltas
    from llgbm_worlds.io import write_bytes_atomic, write_json_atomic

    from llgbm_compose.additivity import additivity
    from llgbm_compose.clustering import clustering
    from llgbm_compose.zoo import single_teachers

    cfg = cfg or ComposeConfig()
    wd = world_deltas or WorldDeltas(world, device=device, progress=progress)
    out = Path(out_dir) if out_dir is not None else None
    timings: dict[str, float] = {}

    def timed(name, fn, *args, **kw):
        t0 = time.perf_counter()
        if progress:
            print(f"compose: {name} ...", flush=True)
        r = fn(*args, **kw)
        timings[name] = round(time.perf_counter() - t0, 2)
        return r

    w = wd.world
    timed("deltas", wd.teachers)
    report: dict[str, Any] = {
        "world": str(w.root),
        "kind": w.kind,
        "preset": w.preset,
        "seed": w.seed,
        # Zoo init (shared / independent), from world.json where the world records it.
        "init": w.raw.get("init") or w.raw.get("recipe", {}).get("zoo", {}).get("init"),
        "recipe": w.raw.get("recipe", {}),
        "config": asdict(cfg),
        "clustering": timed("clustering", clustering, wd),
        "additivity": timed("additivity", additivity, wd, rank=cfg.rank),
        "retrieval": timed("retrieval", retrieval_report, wd, cfg),
    }
    if cfg.merges:
        mix = timed("mixture merges", mixture_merges, wd, cfg, out)
        same = timed("same-task merges", same_task_merges, wd, cfg) if cfg.same_task else []
        report["merges"] = {
            "mixtures": mix,
            "same_task": same,
            "summary": {
                "mixtures": {e: pooled(mix, e) for e in ("a", "b", "mix")} if mix else {},
                "same_task": pooled(same) if same else {},
            },
        }
    report["timings_s"] = timings
    if out is not None:
        from llgbm_compose.report import markdown

        write_json_atomic(out / "report.json", report)
        write_bytes_atomic(out / "report.md", markdown(report).encode())
        if cfg.plots:
            from llgbm_compose.plots import write_plots

            deltas = wd.teachers(single_teachers(w)).deltas
            write_plots(report, deltas, out)
    return report
