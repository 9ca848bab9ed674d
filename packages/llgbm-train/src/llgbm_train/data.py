"""Training samples from a world: teacher checkpoints, their cached deltas, condition prompts.

Every train-split single-task teacher checkpoint is one sample. Each task's train items are split
once, by a hash of each prompt, into a *condition pool* and a *probe pool* (`task_pools`, which
checks the two are disjoint from each other and from the task's test items). A sample's condition
is N prompts of its task's condition pool, drawn afresh each step by a seeded ``numpy`` generator
whose state the checkpoint carries (so a resumed run draws the same prompts). Its targets are the
teacher LoRA, the teacher's delta (computed once through ``llgbm_delta.compute_deltas`` into a
``DeltaCache``) and, when the config asks, its behaviour target on probes (task probes come from
the probe pool), computed once into a ``BehaviourCache``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
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
    from llgbm_worlds.build import build_world

    build_world(
        cfg.world.kind, d, preset=cfg.world.preset, seed=cfg.world.build_seed, progress=progress
    )
    return d


def load_world(path: str | Path):
    from llgbm_worlds import World

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


def world_deltas(cfg: Config, model, tokenizer, probes, *, world=None, progress: bool = True):
    """The world's delta service (llgbm_worlds.deltas) on ``cfg``'s cache, probes and DeltaSpec,
    with the already loaded base (and world, when given): training, evaluation, ``quality`` and
    compose share entries."""
    from llgbm_worlds.deltas import WorldDeltas

    return WorldDeltas(
        world if world is not None else world_dir(cfg),
        cache_dir=delta_cache_dir(cfg),
        probes=probes,
        spec=delta_spec(cfg),
        base=(model, tokenizer),
        adapters_per_batch=cfg.delta.adapters_per_batch,
        progress=progress,
    )


def teacher_deltas(
    cfg: Config,
    model,
    tokenizer,
    paths: list[Path],
    probes,
    *,
    world=None,
    progress: bool = True,
) -> np.ndarray:
    """[n, hidden] float32 deltas of the adapters at ``paths`` (cached; the world's teachers
    through its delta index, so world.json entries and cache entries join). ``world``: the
    already loaded World of ``cfg`` (else it is loaded again)."""
    wd = world_deltas(cfg, model, tokenizer, probes, world=world, progress=progress)
    by_path = {t.path.resolve(): t for t in wd.world.teachers}
    infos = [by_path.get(Path(p).resolve()) for p in paths]
    if all(t is not None for t in infos):
        return wd.teachers(infos).deltas
    return wd.adapters([str(p) for p in paths])


@dataclass(frozen=True)
class TaskPools:
    """One task's train items split in two: what the generator reads, and its task probes."""

    condition: list[str]  # prompt texts the generator may read as its condition
    probes: list[Any]  # Examples (prompt, answer) whose prompts are the task's probes


def _question(prompt: str) -> str:
    """The prompt without its header: two prompts asking the same question compare equal."""
    from llgbm_worlds.frame import INSTRUCTION_TAG

    return prompt.split(INSTRUCTION_TAG, 1)[-1].strip()


def _in_probe_pool(task_name: str, prompt: str, share: float) -> bool:
    h = hashlib.sha256(f"llgbm-probe-pool\0{task_name}\0{_question(prompt)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < share


def task_pools(task, share: float) -> TaskPools:
    """Split ``task``'s train items into condition and probe pools (by a hash of each question).

    The split depends on the task name and question only, so it is the same in every process,
    for every objective and when items are reordered. Raises DataError when a pool is empty or
    when any condition prompt, probe or test item asks the same question as another pool's.
    """
    items = list(task.items("train"))
    probes = [e for e in items if _in_probe_pool(task.name, e.prompt, share)]
    condition = [e.prompt for e in items if not _in_probe_pool(task.name, e.prompt, share)]
    if not probes or not condition:
        raise DataError(
            f"task {task.name}: {len(items)} train items give {len(condition)} condition prompts "
            f"and {len(probes)} probes; both must be non-empty (adjust behaviour.probe_share)"
        )
    test = {_question(e.prompt) for e in task.items("test")}
    cond_q = {_question(p) for p in condition}
    probe_q = {_question(e.prompt) for e in probes}
    for a, b, qa, qb in (
        ("condition prompts", "probes", cond_q, probe_q),
        ("condition prompts", "test items", cond_q, test),
        ("probes", "test items", probe_q, test),
    ):
        both = qa & qb
        if both:
            raise DataError(
                f"task {task.name}: {len(both)} of its {a} are also {b} "
                f"(e.g. {sorted(both)[0]!r}); the world's train and test items overlap"
            )
    return TaskPools(condition, probes)


def condition_prompts(task, cfg: Config) -> list[str]:
    """The prompts a generator reads for ``task`` (train and evaluation alike)."""
    return task_pools(task, cfg.behaviour.probe_share).condition


@dataclass
class TrainData:
    """The samples of one world: teacher i is sample i."""

    tasks: list[str]  # task name of each sample
    paths: list[Path]  # teacher PEFT directory of each sample
    teachers: Any  # LoraBatch [n]
    deltas: torch.Tensor  # [n, hidden] fp32
    prompts: dict[str, list[str]]  # task -> its condition pool (prompt texts)
    probes: dict[str, list[str]] = field(default_factory=dict)  # task -> its probe pool prompts

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
    deltas = teacher_deltas(
        cfg, model, tokenizer, [p for _, p in pairs], probes, world=world, progress=progress
    )
    by_name = {t.name: t for t in world.tasks}
    pools = {}
    for name, _ in pairs:
        if not by_name[name].items("train"):
            raise DataError(f"{root}/world.json: task {name} has no train prompts")
        pools[name] = task_pools(by_name[name], cfg.behaviour.probe_share)
    return TrainData(
        tasks=[t for t, _ in pairs],
        paths=[p for _, p in pairs],
        teachers=teachers,
        deltas=torch.as_tensor(np.asarray(deltas, dtype=np.float32)),
        prompts={name: p.condition for name, p in pools.items()},
        probes={name: [e.prompt for e in p.probes] for name, p in pools.items()},
    )


def behaviour_spec(cfg: Config):
    from llgbm_delta.behaviour import BehaviourSpec

    b = cfg.behaviour
    return BehaviourSpec(
        positions=b.positions,
        layers=tuple(b.layers),
        max_answer_tokens=b.max_answer_tokens,
        top_k=b.top_k,
    )


def behaviour_cache_dir(cfg: Config) -> Path:
    b = cfg.behaviour.cache_dir
    return Path(b) if b else world_dir(cfg) / "behaviour_cache"


def behaviour_probe_sets(cfg: Config, data: TrainData) -> list:
    """The probe set of each sample.

    task: its own task's first n probes. world: n probes taken round-robin from every train
    task's probe pool, the same set for every sample (the world's domain of prompts). Any other
    name: that llgbm-delta probe set (generic, a domain, a file), the same for every sample.
    """
    from llgbm_delta import ProbeSet

    name = cfg.behaviour.probes
    n = cfg.behaviour.n_probes
    if name == "world":
        tasks = sorted(data.probes)
        texts = [data.probes[t][i] for i in range(n) for t in tasks if i < len(data.probes[t])]
        return [ProbeSet("world", tuple(texts[:n]))] * len(data)
    if name != "task":
        shared = load_probes(replace(cfg, probe=replace(cfg.probe, set=name)))
        return [shared] * len(data)
    sets = {}
    for task, texts in data.probes.items():
        if len(texts) < n:
            raise DataError(
                f"task {task}: its probe pool has {len(texts)} prompts, behaviour.n_probes is {n}"
                " (lower it or raise behaviour.probe_share)"
            )
        sets[task] = ProbeSet(f"task:{task}", tuple(texts[:n]))
    return [sets[t] for t in data.tasks]


FULL_VOCAB_LIMIT = 4 * 2**30  # bytes of full-vocabulary KL targets beyond which top_k is required


def load_behaviour(cfg: Config, data: TrainData, model, tokenizer, *, progress: bool = True):
    """Behaviour targets of every sample's teacher, stacked: dict of [n, P, ...] CPU tensors."""
    from llgbm_delta.behaviour import stack_targets
    from llgbm_delta.behaviour_cache import BehaviourCache, compute_behaviour

    spec = behaviour_spec(cfg)
    b = cfg.behaviour
    if spec.logits and spec.top_k is None:
        # Full next-token distributions at every answer position of every probe and teacher:
        # held in memory (and on the GPU) for the whole run, and cached on disk.
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or len(tokenizer))
        positions = 1 if b.positions == "last" else b.max_answer_tokens + 1
        size = len(data) * b.n_probes * positions * vocab * 4
        if size > FULL_VOCAB_LIMIT:
            raise DataError(
                f"behaviour.top_k: unset, so the KL targets keep the full {vocab}-token "
                f"distribution: up to {size / 2**30:.1f} GiB for {len(data)} teachers x "
                f"{b.n_probes} probes x {positions} positions; set behaviour.top_k=64 (the "
                f"teacher's top 64 and the rest's mass) or behaviour.top_k={vocab} to keep all"
            )
    targets = compute_behaviour(
        model,
        tokenizer,
        [data.teachers[i] for i in range(len(data))],
        behaviour_probe_sets(cfg, data),
        spec,
        BehaviourCache(behaviour_cache_dir(cfg)),
        adapters_per_batch=cfg.behaviour.adapters_per_batch,
        progress=progress,
        names=[str(p) for p in data.paths],
    )
    pad = getattr(tokenizer, "pad_token_id", None)
    return stack_targets(targets, 0 if pad is None else int(pad))


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
