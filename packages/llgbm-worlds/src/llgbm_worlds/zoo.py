"""Teacher zoos: real LoRA training of every teacher of a world in one batched run, resumable.

One *run* trains one LoRA on one task's data split (a disjoint slice of its train items) and saves
checkpoints along the way (as DnD collects them), as PEFT adapter directories. The runs of a world
train together through llgbm-flora's per-row path: adapter ``i`` covers rows ``i*batch ..
(i+1)*batch - 1`` of one forward over ``n_runs * batch`` rows, so a zoo step is one forward and
one backward. Each run keeps everything it would have alone:

- its LoRA init: one for the whole zoo (``init="shared"``) or its own (``"independent"``), drawn by
  PEFT itself under the run's :func:`init_seed`;
- its data order (its own RNG, epochs over its slice);
- its loss: the mean token loss on its responses; the zoo minimises the *sum* of the runs' losses,
  so each run's gradient is exactly its solo gradient;
- gradient clipping to norm 1, per run;
- AdamW state and updates: AdamW is elementwise, so one AdamW over tensors stacked
  ``[n_runs, ...]`` is n independent AdamWs (weight decay 0; every run has the same schedule).

``tests/worlds/test_worlds_zoo.py`` trains a teacher in the batch and alone with plain PEFT and
checks that weights and accuracy agree.

Runs train in chunks of ``ZooConfig.chunk`` (fixed by the world's run list, so a resumed build
trains exactly the chunks an uninterrupted one would, bit for bit). A run is written into
``teachers/<task>/.split<d>.tmp`` and moved to ``teachers/<task>/split<d>`` with ``os.replace``
once every checkpoint is saved and scored, with a ``.done.json`` marker holding each adapter's
sha256; a rerun skips chunks whose runs' markers and files agree and retrains the rest, so a killed
build leaves no half-written adapter behind.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from llgbm_flora import LoraAdapter, LoraBatch, LoraSpec, save_adapter
from llgbm_flora.algebra import take
from llgbm_flora.spec import STANDARD_MODULES
from tqdm.auto import tqdm

from llgbm_worlds.data import collate, encode, hidden_states, response_loss
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

ALL_PROJECTIONS = STANDARD_MODULES  # llgbm-flora's names of a decoder layer's projections
DONE = ".done.json"
ADAPTER_FILE = "adapter_model.safetensors"
MAX_GRAD_NORM = 1.0  # per run, as torch.nn.utils.clip_grad_norm_ would clip a solo run

# scorer(model, tokenizer, groups, adapters) -> per group of items one bool per item, group i
# under adapter i of the LoraBatch (None: every group on the base); scoring.score_groups.
Scorer = Callable[
    [torch.nn.Module, object, Sequence[Sequence[Example]], LoraBatch | None], list[list[bool]]
]


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
    chunk: int = 0  # runs trained together in one batched run (0: all); memory and speed only

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
        if self.chunk < 0:
            raise ValueError(f"chunk: must be >= 0 (0: all runs at once), got {self.chunk}")
        unknown = set(self.target_modules) - set(ALL_PROJECTIONS)
        if unknown:
            raise ValueError(f"target_modules: unknown {sorted(unknown)}; valid: {ALL_PROJECTIONS}")

    @property
    def hash(self) -> str:
        return sha256_json(asdict(self))[:16]

    def lr_factor(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based) over ``lr``: warm-up, cosine to 0.1."""
        warm = max(1, self.steps // 20)
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, self.steps - warm)))


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


def peft_lora_config(cfg: ZooConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(cfg.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def initial_lora(base: torch.nn.Module, spec: LoraSpec, cfg: ZooConfig, torch_seed: int):
    """The LoRA PEFT starts a run from under ``torch_seed`` (A kaiming-uniform, B zero), on CPU.

    PEFT draws it (``get_peft_model`` on a copy of ``base``), so a teacher trained here starts
    where a plain PEFT run seeded the same way does. The global RNG state is left as it was.
    """
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT reads transformers' deprecated is_gradient_checkpointing; nothing for users to do.
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
        torch.manual_seed(torch_seed)
        peft_model = get_peft_model(copy.deepcopy(base).cpu(), peft_lora_config(cfg))
    inner = peft_model.base_model.model  # the CausalLM, its linears wrapped by PEFT
    A, B = {}, {}
    keys = spec.keys()  # LoraSpec.keys(): (layer, module) pairs in a stable order
    for key in keys:
        layer = inner.get_submodule(spec.path_template(key[1]).format(layer=key[0]))
        A[key] = layer.lora_A["default"].weight.detach().clone()  # [r, in]
        B[key] = layer.lora_B["default"].weight.detach().clone()  # [out, r]
    return LoraAdapter(spec, A, B)


class _Data:
    """One run's train items as padded tensors, and its own epoch order over them."""

    def __init__(self, tokenizer, items: Sequence[Example], width: int, rng: random.Random):
        batch = collate(encode(tokenizer, items), tokenizer.pad_token_id, width)
        self.ids, self.labels = batch["input_ids"], batch["labels"]  # [n_items, width] each
        self.lengths = batch["attention_mask"].sum(1)  # [n_items]
        self.rng = rng
        self.order: list[int] = []

    def draw(self, k: int) -> torch.Tensor:
        """The next ``k`` item indices: every item once per epoch, epochs shuffled by the run's RNG."""
        idx = []
        while len(idx) < k:
            if not self.order:
                self.order = list(range(len(self.ids)))
                self.rng.shuffle(self.order)
            idx.append(self.order.pop())
        return torch.tensor(idx)


def max_length(tokenizer, items: Sequence[Example]) -> int:
    return max(len(ids) for ids, _ in encode(tokenizer, items))


def clip_per_run(grads: Sequence[torch.Tensor], max_norm: float = MAX_GRAD_NORM) -> torch.Tensor:
    """Scale each run's slice of ``grads`` [n, ...] to total norm <= max_norm; -> norms [n].

    The same rule as ``clip_grad_norm_`` on one run's parameters (coefficient
    ``max_norm / (norm + 1e-6)``, capped at 1).
    """
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], 1).norm(dim=1)  # [n]
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # [n]
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
    return norms


def train_runs(
    base: torch.nn.Module,
    tokenizer,
    runs: Sequence[RunSpec],
    cfg: ZooConfig,
    out_dirs: Sequence[Path | None],
    *,
    seed: int,
    scorer: Scorer,
    base_name: str,
    bar: tqdm | None = None,
) -> list[list[dict]]:
    """Train ``runs`` together; save run ``i``'s checkpoints (PEFT dirs) into ``out_dirs[i]``.

    ``base`` is not modified. Returns per run one record per checkpoint:
    ``{"step", "accuracy", "sha256", "dir"}``, ``dir`` relative to its out dir (no records for a
    run whose out dir is None: it trains along, as in its chunk, and nothing of it is saved).
    """
    n, b = len(runs), cfg.batch
    device = next(base.parameters()).device
    model = copy.deepcopy(base).requires_grad_(False).eval()  # no dropout in these bases anyway
    spec = LoraSpec.for_model(
        model,
        rank=cfg.rank,
        alpha=cfg.alpha,
        target_modules=cfg.target_modules,
        base_model=base_name,
    )
    inits: dict[int, LoraAdapter] = {}
    for r in runs:
        s = init_seed(cfg, seed, r.task, r.data_split)
        if s not in inits:
            inits[s] = initial_lora(model, spec, cfg, s)
    start = [inits[init_seed(cfg, seed, r.task, r.data_split)] for r in runs]
    # Leaf tensors of the whole chunk: A [n, r, in], B [n, out, r] per (layer, module).
    keys = spec.keys()
    A = {k: torch.stack([a.A[k] for a in start]).to(device).requires_grad_() for k in keys}
    B = {k: torch.stack([a.B[k] for a in start]).to(device).requires_grad_() for k in keys}
    params = [*A.values(), *B.values()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
    width = max(max_length(tokenizer, r.items) for r in runs)
    data = [
        _Data(tokenizer, r.items, width, random.Random(run_seed(seed, r.task, r.data_split)))
        for r in runs
    ]
    tests = [list(r.test[: cfg.eval_items] if cfg.eval_items else r.test) for r in runs]
    records: list[list[dict]] = [[] for _ in runs]
    for step in range(1, cfg.steps + 1):
        idx = [d.draw(b) for d in data]
        lengths = torch.cat([d.lengths[i] for d, i in zip(data, idx)])  # [n*b]
        T = int(lengths.max())
        ids = torch.cat([d.ids[i, :T] for d, i in zip(data, idx)]).to(device)  # [n*b, T]
        labels = torch.cat([d.labels[i, :T] for d, i in zip(data, idx)]).to(device)  # [n*b, T]
        lora = LoraBatch(spec, A, B)
        hidden = hidden_states(model, lora, ids, lengths.to(device))  # [n*b, T, H]
        losses = response_loss(model, hidden, labels, n)  # [n]: each run's own mean
        bad = [i for i, v in enumerate(losses.tolist()) if not math.isfinite(v)]
        if bad:
            r = runs[bad[0]]
            raise FloatingPointError(
                f"teacher {r.task} split {r.data_split}: loss is {losses[bad[0]].item()} at step "
                f"{step}; lower the zoo's lr"
            )
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        clip_per_run([p.grad for p in params])
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
            if step % 20 == 0 or step == cfg.steps:
                bar.set_postfix_str(f"{n} runs, mean loss {losses.mean().item():.3f}")
        if step in cfg.checkpoints:
            name = f"step{step:04d}"
            saved = [i for i in range(n) if out_dirs[i] is not None]
            for i in saved:
                adapter = LoraAdapter(
                    spec,
                    {k: v[i].detach().cpu() for k, v in A.items()},
                    {k: v[i].detach().cpu() for k, v in B.items()},
                )
                save_adapter(adapter, out_dirs[i] / name)
            # Every saved run's checkpoint scored together: one adapter per row group.
            now = LoraBatch(
                spec, {k: v.detach() for k, v in A.items()}, {k: v.detach() for k, v in B.items()}
            )
            oks = (
                scorer(model, tokenizer, [tests[i] for i in saved], take(now, saved))
                if saved
                else []
            )
            for i, ok in zip(saved, oks):
                records[i].append(
                    {
                        "step": step,
                        "accuracy": sum(ok) / max(1, len(ok)),
                        "sha256": sha256_file(out_dirs[i] / name / ADAPTER_FILE),
                        "dir": name,
                    }
                )
    return records


def train_peft_alone(
    base: torch.nn.Module,
    tokenizer,
    run: RunSpec,
    cfg: ZooConfig,
    out: Path | None = None,
    *,
    seed: int = 0,
    data_seed: int | None = None,
):
    """The reference for one run: trained alone, the ordinary way, with plain PEFT.

    ``get_peft_model`` with the run's init (PEFT draws it under :func:`init_seed`), HF's
    ``model(**batch).loss``, ``clip_grad_norm_`` and AdamW with the zoo's schedule, on the run's
    items in the order of ``random.Random(data_seed)`` (default: the run's own,
    :func:`run_seed`). What :func:`train_runs` must reproduce per run (tested), and the
    sequential baseline its speed is measured against (``benchmarks/zoo_batched.py``).
    Checkpoints go to ``out/stepNNNN`` when ``out`` is given. Returns the PEFT model.
    """
    from peft import get_peft_model

    torch.manual_seed(init_seed(cfg, seed, run.task, run.data_split))
    model = get_peft_model(copy.deepcopy(base), peft_lora_config(cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
    rng = random.Random(
        run_seed(seed, run.task, run.data_split) if data_seed is None else data_seed
    )
    encoded = encode(tokenizer, run.items)
    order: list[int] = []
    model.train()
    for step in range(1, cfg.steps + 1):
        idx = []
        while len(idx) < cfg.batch:
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            idx.append(order.pop())
        loss = model(**collate([encoded[i] for i in idx], tokenizer.pad_token_id)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        opt.step()
        sched.step()
        if out is not None and step in cfg.checkpoints:
            model.save_pretrained(out / f"step{step:04d}", save_embedding_layers=False)
    return model


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


def chunks(runs: Sequence[RunSpec], cfg: ZooConfig, tokenizer) -> list[list[int]]:
    """Indices of ``runs`` per batched run: runs of similar length together (less padding)."""
    order = sorted(range(len(runs)), key=lambda i: (max_length(tokenizer, runs[i].items), i))
    size = cfg.chunk or len(runs)
    return [order[i : i + size] for i in range(0, len(order), size)]


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
    """Train every chunk of runs that is not finished yet; return the teacher rows of world.json."""
    fps = [r.fingerprint(cfg, seed, base_hash) for r in runs]
    done = [finished_run(world_dir, r, fp) for r, fp in zip(runs, fps)]
    todo = [c for c in chunks(runs, cfg, tokenizer) if any(done[i] is None for i in c)]
    bar = tqdm(total=len(todo) * cfg.steps, desc="teacher zoo", unit="step", disable=not progress)
    for c in todo:
        # The whole chunk trains (the same batches as an uninterrupted build); only its
        # unfinished runs are written.
        tmps = [fresh_tmp_dir(world_dir / runs[i].rel_dir) if done[i] is None else None for i in c]
        try:
            records = train_runs(
                base,
                tokenizer,
                [runs[i] for i in c],
                cfg,
                tmps,
                seed=seed,
                scorer=scorer,
                base_name=base_name,
                bar=bar,
            )
        except OSError as e:
            raise BuildError(
                f"{world_dir / 'teachers'}: cannot write teachers ({e.strerror or e}); the world "
                "is resumable: free space and rerun the same build command"
            ) from e
        for i, tmp, recs in zip(c, tmps, records):
            if tmp is not None:
                write_json_atomic(tmp / DONE, {"fingerprint": fps[i], "checkpoints": recs})
                replace_dir(tmp, world_dir / runs[i].rel_dir)
                done[i] = recs
    bar.close()
    rows: list[dict] = []
    for run, records in zip(runs, done):
        assert records is not None
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
