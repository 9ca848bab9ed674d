"""Training samples from a world: teacher checkpoints, their cached deltas, condition prompts.

Every train-split single-task teacher checkpoint is one sample. Its condition is N prompts of
its task's train items, drawn afresh each step by a seeded ``numpy`` generator whose state the
checkpoint carries (so a resumed run draws the same prompts). Its targets are the teacher LoRA
and the teacher's delta, computed once through ``llgbm_delta.compute_deltas`` into a
``DeltaCache``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llgbm_train.config import Config


class DataError(ValueError):
    """The world or its teachers cannot give training samples; one-line message."""


def world_dir(cfg: Config) -> Path:
    return Path(cfg.world.dir)


def ensure_world(cfg: Config, *, progress: bool = True) -> Path:
    """World directory of ``cfg``; builds a tiny/smollm2 world there when missing and allowed."""
    d = world_dir(cfg)
    if (d / "world.json").is_file():
        return d
    if cfg.world.kind == "hf" or not cfg.world.build_if_missing:
        raise DataError(
            f"{d}: no world.json (build one with `llgbm world build {cfg.world.kind} --out {d}`)"
        )
    try:
        from llgbm_worlds import build_world
    except ImportError:  # an llgbm_worlds without the top-level export
        from llgbm_worlds.build import build_world

    build_world(
        cfg.world.kind, d, preset=cfg.world.preset, seed=cfg.world.build_seed, progress=progress
    )
    return d


def load_world(path: str | Path):
    try:
        from llgbm_worlds import World
    except ImportError:  # an llgbm_worlds without the top-level export
        from llgbm_worlds.world import World

    path = Path(path)
    if not (path / "world.json").is_file():
        raise DataError(f"{path}: no world.json (build one with `llgbm world build tiny`)")
    return World.load(path)


def teacher_path(world_root: Path, teacher) -> Path:
    p = Path(teacher.path)
    return p if p.is_absolute() else world_root / p


def load_probes(cfg: Config):
    from llgbm_delta import domain_probes, generic_probes
    from llgbm_delta import load_probes as load_probe_file

    name = cfg.probe.set
    if name == "generic":
        return generic_probes()
    if name in ("math", "code", "commonsense"):
        return domain_probes(name)
    if not Path(name).is_file():
        raise DataError(
            f"probe.set: {name!r} is neither generic, math, code, commonsense nor a probe file"
        )
    return load_probe_file(name)


def delta_spec(cfg: Config):
    from llgbm_delta import DeltaSpec

    return DeltaSpec(layer=cfg.delta.layer, token=cfg.delta.token)


def delta_cache_dir(cfg: Config) -> Path:
    return Path(cfg.delta.cache_dir) if cfg.delta.cache_dir else world_dir(cfg) / "delta_cache"


def encoder_cache_dir(cfg: Config) -> Path:
    """Condition-encoder cache: beside the delta cache (inside the world by default)."""
    return delta_cache_dir(cfg).parent / "encoder_cache"


def teacher_deltas(
    cfg: Config, model, tokenizer, paths: list[Path], probes, *, progress: bool = True
) -> np.ndarray:
    """[n, hidden] float32 deltas of the teacher adapters at ``paths`` (cached)."""
    from llgbm_delta import DeltaCache, compute_deltas

    cache = DeltaCache(delta_cache_dir(cfg))
    kwargs: dict[str, Any] = {
        "adapters_per_batch": cfg.delta.adapters_per_batch,
        "progress": progress,
    }
    spec = delta_spec(cfg)
    if spec != type(spec)():
        kwargs["spec"] = spec
    return compute_deltas((model, tokenizer), [str(p) for p in paths], probes, cache, **kwargs)


@dataclass
class TrainData:
    """The samples of one world: teacher i is sample i."""

    tasks: list[str]  # task name of each sample
    paths: list[Path]  # teacher PEFT directory of each sample
    teachers: Any  # LoraBatch [n]
    deltas: torch.Tensor  # [n, hidden] fp32
    prompts: dict[str, list[str]]  # task -> its train prompt texts

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def deltas_hash(self) -> str:
        return hashlib.sha256(self.deltas.numpy().tobytes()).hexdigest()[:16]


def train_teachers(world, root: Path) -> list[tuple[str, Path]]:
    """(task, adapter dir) of every single-task teacher checkpoint of a train-split task."""
    train_tasks = {t.name for t in world.tasks if t.split == "train"}
    out = [
        (t.task, teacher_path(root, t))
        for t in world.teachers
        if t.task in train_tasks and getattr(t, "kind", "single") == "single"
    ]
    if not out:
        raise DataError(f"{root}/world.json: no teachers of train-split tasks")
    return out


def load_train_data(
    cfg: Config, world, root: Path, model, tokenizer, probes, *, progress: bool = True
) -> TrainData:
    from llgbm_flora import LoraBatch, load_adapter

    pairs = train_teachers(world, root)
    adapters = []
    for _, path in pairs:
        if not path.is_dir():
            raise DataError(f"{root}/world.json: teacher adapter {path} is missing")
        adapters.append(load_adapter(path))
    teachers = LoraBatch.from_adapters(adapters)
    deltas = teacher_deltas(cfg, model, tokenizer, [p for _, p in pairs], probes, progress=progress)
    by_name = {t.name: t for t in world.tasks}
    prompts = {name: list(by_name[name].prompts("train")) for name, _ in pairs}
    for name, texts in prompts.items():
        if not texts:
            raise DataError(f"{root}/world.json: task {name} has no train prompts")
    return TrainData(
        tasks=[t for t, _ in pairs],
        paths=[p for _, p in pairs],
        teachers=teachers,
        deltas=torch.as_tensor(np.asarray(deltas, dtype=np.float32)),
        prompts=prompts,
    )


def draw_prompts(rng: np.random.Generator, texts: list[str], n: int) -> list[str]:
    """``n`` prompts of ``texts`` (without replacement when there are enough)."""
    idx = rng.choice(len(texts), size=n, replace=len(texts) < n)
    return [texts[int(i)] for i in idx]


def draw_batch(
    rng: np.random.Generator, data: TrainData, batch_size: int, n_prompts: int
) -> tuple[list[int], list[list[str]]]:
    """Sample indices of one global batch and the condition prompts of each."""
    idx = rng.choice(len(data), size=batch_size, replace=len(data) < batch_size)
    idx = [int(i) for i in idx]
    return idx, [draw_prompts(rng, data.prompts[data.tasks[i]], n_prompts) for i in idx]
