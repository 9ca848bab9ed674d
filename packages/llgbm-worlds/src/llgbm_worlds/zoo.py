"""Teacher zoos: real PEFT LoRA training per task, several checkpoints along one run, resumable.

One *run* trains one LoRA on one task's data split (a disjoint slice of its train items) and saves
checkpoints along the way (as DnD collects them). Loss is on the response only. A run is written
into ``teachers/<task>/.split<d>.tmp`` and moved to ``teachers/<task>/split<d>`` with
``os.replace`` once every checkpoint is saved and scored, together with a ``.done.json`` marker
holding each adapter's sha256; a rerun skips runs whose marker and files agree and redoes the rest,
so a killed build leaves no half-written adapter behind.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llgbm_worlds.data import collate, encode
from llgbm_worlds.errors import BuildError, UnknownNameError
from llgbm_worlds.families import Example
from llgbm_worlds.io import (
    fresh_tmp_dir,
    read_json,
    replace_dir,
    sha256_file,
    sha256_json,
    write_json_atomic,
)
from llgbm_worlds.world import INITS

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DONE = ".done.json"
ADAPTER_FILE = "adapter_model.safetensors"

Scorer = Callable[[torch.nn.Module, object, Sequence[Example]], list[bool]]


@dataclass(frozen=True)
class ZooConfig:
    """How teachers are trained."""

    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA alpha (scale alpha / r)
    target_modules: tuple[str, ...] = ALL_PROJECTIONS  # projections that get a LoRA
    steps: int = 150  # optimizer steps per run
    lr: float = 5e-3  # AdamW peak learning rate (linear warm-up, cosine decay to lr / 10)
    batch: int = 32  # examples per step
    checkpoints: tuple[int, ...] = (75, 110, 150)  # steps at which a teacher is saved
    train_splits: int = 2  # disjoint data splits (runs) per train task
    heldout_splits: int = 1  # runs per held-out task (their teachers are oracles, not samples)
    mixture_splits: int = 1  # runs per mixture task
    eval_items: int = 0  # test items scored per checkpoint (0: all)
    init: str = "shared"  # teachers' LoRA init: "shared" | "independent" (world.INITS says how)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise UnknownNameError(f"unknown zoo init {self.init!r}; valid: {', '.join(INITS)}")
        if self.rank < 1:
            raise ValueError(f"rank: must be >= 1, got {self.rank}")
        if not self.checkpoints or any(not 0 < s <= self.steps for s in self.checkpoints):
            raise ValueError(
                f"checkpoints: each must be in 1..steps={self.steps}, got {self.checkpoints}"
            )
        if list(self.checkpoints) != sorted(set(self.checkpoints)):
            raise ValueError(f"checkpoints: must be strictly increasing, got {self.checkpoints}")
        for name in ("train_splits", "heldout_splits", "mixture_splits", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        unknown = set(self.target_modules) - set(ALL_PROJECTIONS)
        if unknown:
            raise ValueError(f"target_modules: unknown {sorted(unknown)}; valid: {ALL_PROJECTIONS}")

    @property
    def hash(self) -> str:
        return sha256_json(asdict(self))[:16]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the zoo."""

    task: str  # task name
    kind: str  # "single" | "mixture"
    data_split: int  # index of the disjoint slice of the train items
    items: tuple[Example, ...]  # the slice this run trains on
    test: tuple[Example, ...]  # items each checkpoint is scored on

    @property
    def rel_dir(self) -> str:
        return f"teachers/{self.task}/split{self.data_split}"

    def fingerprint(self, cfg: ZooConfig, seed: int, base_hash: str) -> str:
        items = [(e.prompt, e.answer) for e in self.items]
        test = [(e.prompt, e.answer) for e in self.test]
        return sha256_json([cfg.hash, seed, base_hash, self.task, self.data_split, items, test])


def split_items(items: Sequence[Example], n_splits: int) -> list[list[Example]]:
    """``n_splits`` disjoint, near-equal slices (round robin, so each covers the whole range)."""
    return [list(items[i::n_splits]) for i in range(n_splits)]


def run_seed(seed: int, task: str, data_split: int) -> int:
    """Seed of one run's data order (and of its LoRA init when the init is independent)."""
    return int(sha256_json(["run", seed, task, data_split])[:8], 16)


def init_seed(cfg: ZooConfig, seed: int, task: str, data_split: int) -> int:
    """torch seed PEFT draws a run's LoRA init under: one per world (shared) or per run."""
    if cfg.init == "shared":
        return int(sha256_json(["lora-init", seed])[:8], 16)
    return run_seed(seed, task, data_split)


def train_run(
    base: torch.nn.Module,
    tokenizer,
    run: RunSpec,
    cfg: ZooConfig,
    out_dir: Path,
    *,
    seed: int,
    scorer: Scorer,
    base_name: str,
    bar: tqdm | None = None,
) -> list[dict]:
    """Train one LoRA on ``run.items`` and save a PEFT checkpoint per ``cfg.checkpoints``.

    ``base`` is not modified (a deep copy is wrapped). Returns one record per checkpoint:
    ``{"step", "accuracy", "sha256", "dir"}``, ``dir`` relative to ``out_dir``.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(init_seed(cfg, seed, run.task, run.data_split))
    rng = random.Random(run_seed(seed, run.task, run.data_split))
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            target_modules=list(cfg.target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    model.peft_config["default"].base_model_name_or_path = base_name
    device = next(base.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warm = max(1, cfg.steps // 20)

    def lr_at(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, cfg.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    encoded = encode(tokenizer, run.items)
    order: list[int] = []
    test = list(run.test[: cfg.eval_items] if cfg.eval_items else run.test)
    records: list[dict] = []
    model.train()
    for step in range(1, cfg.steps + 1):
        idx = []
        while len(idx) < cfg.batch:
            if not order:  # epochs: every item once before any twice
                order = list(range(len(encoded)))
                rng.shuffle(order)
            idx.append(order.pop())
        batch = collate([encoded[i] for i in idx], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"teacher {run.task} split {run.data_split}: loss is {loss.item()} at step {step}"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if bar is not None and (step % 20 == 0 or step == cfg.steps):
            bar.set_postfix_str(f"{run.task} s{run.data_split} step {step} loss {loss.item():.3f}")
        if step in cfg.checkpoints:
            ok = scorer(model, tokenizer, test)
            acc = sum(ok) / max(1, len(ok))
            name = f"step{step:04d}"
            # The embeddings are not adapted; "auto" would look the base up on the hub.
            model.save_pretrained(out_dir / name, save_embedding_layers=False)
            records.append(
                {
                    "step": step,
                    "accuracy": acc,
                    "sha256": sha256_file(out_dir / name / ADAPTER_FILE),
                    "dir": name,
                }
            )
            model.train()
    return records


def finished_run(world_dir: Path, run: RunSpec, fingerprint: str) -> list[dict] | None:
    """The checkpoint records of a finished run, or None when it must be (re)trained."""
    final = world_dir / run.rel_dir
    marker = final / DONE
    if not marker.is_file():
        return None
    try:
        done = read_json(marker)
        if done.get("fingerprint") != fingerprint:
            return None
        for r in done["checkpoints"]:
            f = final / r["dir"] / ADAPTER_FILE
            if not f.is_file() or sha256_file(f) != r["sha256"]:
                return None
            if not (final / r["dir"] / "adapter_config.json").is_file():
                return None
        return list(done["checkpoints"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_zoo(
    world_dir: Path,
    base: torch.nn.Module,
    tokenizer,
    runs: Sequence[RunSpec],
    cfg: ZooConfig,
    *,
    seed: int,
    base_hash: str,
    scorer: Scorer,
    base_name: str,
    progress: bool = True,
) -> list[dict]:
    """Train every run that is not finished yet; return the teacher rows of world.json."""
    rows: list[dict] = []
    bar = tqdm(runs, desc="teacher zoo", unit="run", disable=not progress)
    for run in bar:
        fp = run.fingerprint(cfg, seed, base_hash)
        records = finished_run(world_dir, run, fp)
        if records is None:
            final = world_dir / run.rel_dir
            tmp = fresh_tmp_dir(final)
            try:
                records = train_run(
                    base,
                    tokenizer,
                    run,
                    cfg,
                    tmp,
                    seed=seed,
                    scorer=scorer,
                    base_name=base_name,
                    bar=bar,
                )
            except OSError as e:
                raise BuildError(
                    f"{tmp}: cannot write teacher ({e.strerror or e}); the world is resumable: "
                    "free space and rerun the same build command"
                ) from e
            write_json_atomic(tmp / DONE, {"fingerprint": fp, "checkpoints": records})
            replace_dir(tmp, final)
        for r in records:
            rows.append(
                {
                    "task": run.task,
                    "path": f"{run.rel_dir}/{r['dir']}",
                    "accuracy": r["accuracy"],
                    "step": r["step"],
                    "data_split": run.data_split,
                    "kind": run.kind,
                    "sha256": r["sha256"],
                }
            )
    return rows
