"""The trainer: baseline (weights), delta_multi (weights + scheduled delta), delta_only b1/b2.

    result = train(load_config("configs/delta_multi.yaml"), run_dir=Path("runs/delta_multi"))

One loop serves every objective and every launch: a single process, or ``accelerate launch`` /
``torchrun`` (DDP; every rank draws the same global batch from the same seeded RNG and keeps its
slice, so ranks stay in lock step and only rank 0 writes). ``prepare`` validates and builds all
inputs before a run directory exists.

Objectives (per step, on the rank's rows):
- baseline:    L = L_w
- delta_multi: L = lambda_w * L_w + lambda_d(step) * L_delta + lambda_kl(step) * L_kl
- delta_only (b1): L = lambda_d(step) * L_delta + lambda_kl(step) * L_kl + norm_penalty * L_norm
  + lambda_w * L_w. The delta of a LoRA on
  a handful of probes is one hidden-size vector, while the LoRA has orders of magnitude more
  numbers, so L_delta alone is badly under-determined: it is met by large-norm updates that
  happen to move the probe states right and wreck everything else, and it leaves the A/B scale
  gauge free. L_norm (squared excess of each generated ||s B A||_F over the same sample's
  teacher norm, per (layer, module)) forbids the large-norm solutions; a small weight anchor
  (lambda_w, e.g. 0.05) picks, among updates with the right delta, the one near the teacher
  and fixes the gauge. Both are logged next to their trivial baselines.
- delta_only (b2): L = L_delta(predictor(prompts), teacher delta): a DeltaPredictor instead of a
  generator (llgbm_train.predictor), nothing through the base; its adapter for a task is the
  merge of the training teachers nearest to the predicted delta (evaluation does that).

L_delta is the paper's pooled delta (``training.delta_target: paper``) or the per-position,
per-layer deltas of the behaviour targets (``behaviour``); L_kl is the forward KL from the
teacher's next-token distributions to the generated adapter's at the behaviour positions. Both
behaviour terms run the generated adapters through the frozen base (llgbm-flora's per-row
functional path) on the teacher's own sequences, cached once (llgbm_delta.behaviour); no
teacher adapter runs during training.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from llgbm_flora import algebra

from llgbm_train import data as D
from llgbm_train.config import Config
from llgbm_train.runs import Run, environment, file_hash, git_info


class TrainingError(ValueError):
    """Training cannot start or had to stop (e.g. a non-finite loss); one-line message."""


@dataclass
class Setup:
    """Everything a run needs, validated, on its device."""

    cfg: Config
    world: Any
    world_root: Path
    model: Any  # frozen base model
    tokenizer: Any
    probes: Any
    delta_spec: Any
    base_act: torch.Tensor  # [hidden] fp32
    data: D.TrainData
    encoder: Any
    weight_tokenizer: Any
    generator: torch.nn.Module
    device: torch.device
    delta_scale: float
    metadata: dict[str, Any] = field(default_factory=dict)
    # Behaviour targets of every sample ([n, P, ...] tensors on device; see data.load_behaviour
    # for the names, plus "delta" = hidden - base_hidden) and each layer's delta RMS [L], when
    # the config uses them.
    behaviour: dict[str, torch.Tensor] | None = None
    behaviour_scale: torch.Tensor | None = None
    index: Any = None  # b2: the retrieval index over the training samples (llgbm_train.predictor)


def resolve_device(cfg: Config) -> torch.device:
    if cfg.model.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("model.device: cuda requested but no CUDA device is available")
    if cfg.model.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def load_base(path, cfg: Config, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except OSError as e:
        raise TrainingError(f"base model {path}: cannot load ({str(e).splitlines()[0]})") from None
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def check_lora(cfg: Config, spec, where: str) -> None:
    """The config's lora section (where set) must describe the teachers' adapters."""
    got = {
        "rank": spec.rank,
        "alpha": float(spec.alpha),
        "target_modules": tuple(spec.target_modules),
        "use_rslora": spec.use_rslora,
    }
    for name, have in got.items():
        want = getattr(cfg.lora, name)
        if want is None:
            continue
        if name == "target_modules" and set(want) == set(have):
            continue
        if want != have:
            raise TrainingError(f"lora.{name}: config says {want!r} but {where} has {have!r}")


def build_model_parts(
    cfg: Config,
    spec,
    teachers,
    device: torch.device,
    cache_dir: Path | None,
    *,
    base_path: Path | str | None = None,
    delta_dim: int | None = None,
):
    """Encoder, weight tokenizer (fit on ``teachers``) and a freshly initialised generator (for
    delta_only b2: a DeltaPredictor of ``delta_dim`` outputs instead).

    ``base_path``: the world's base model, read by the ``base`` encoder unless its options name
    another ``model_path``.
    """
    from llgbm_train.encoders import build_encoder
    from llgbm_train.generators import build_generator
    from llgbm_train.weight_tokens import WeightTokenizer

    g = cfg.generator
    options = dict(g.encoder_options)
    if g.encoder == "base" and "model_path" not in options:
        if base_path is None:
            raise TrainingError("generator.encoder: base needs the world's base model path")
        options["model_path"] = str(base_path)
    encoder = build_encoder(
        g.encoder,
        device=str(device),
        max_tokens=g.max_tokens,
        cache_dir=cache_dir,
        **options,
    )
    if any(p.requires_grad for p in encoder.parameters()):
        # The optimiser and checkpoints cover the generator only; a silently frozen encoder
        # would be worse than this error.
        raise TrainingError("generator.encoder_options: a trainable encoder is not supported")
    wt = WeightTokenizer(spec, slab_width=g.slab_width).fit(teachers)
    torch.manual_seed(cfg.training.seed)
    if cfg.retrieves:
        from llgbm_train.predictor import DeltaPredictor

        if delta_dim is None:
            raise TrainingError("delta_only b2: the predictor needs the deltas' width")
        predictor = DeltaPredictor(
            cond_dim=encoder.dim, delta_dim=delta_dim, hidden=cfg.retrieval.hidden
        )
        return encoder, wt, predictor.to(device)
    try:
        generator = build_generator(
            g.kind,
            spec=spec,
            cond_dim=encoder.dim,
            n_prompts=g.n_prompts,
            max_tokens=encoder.max_tokens,
            weight_tokenizer=wt,
            **g.options,
        )
    except TypeError as e:
        raise TrainingError(f"generator.options: {e}") from None
    return encoder, wt, generator.to(device)


def prepare(cfg: Config, *, device: torch.device | None = None, progress: bool = True) -> Setup:
    """Load the world, base model, teachers and their deltas; build encoder and generator."""
    device = device or resolve_device(cfg)
    root = D.ensure_world(cfg, progress=progress)
    world = D.load_world(root)
    model, tokenizer = load_base(world.base_path, cfg, device)
    if cfg.model.gradient_checkpointing:
        model.config.use_cache = False
    probes = D.load_probes(cfg)
    dspec = D.delta_spec(cfg)
    data = D.load_train_data(cfg, world, root, model, tokenizer, probes, progress=progress)
    check_lora(cfg, data.teachers.spec, f"{root}/world.json's teachers")
    from llgbm_delta import base_activation, model_fingerprint

    base_act = base_activation(model, tokenizer, probes, dspec)  # [hidden]
    rms = float(data.deltas.pow(2).mean().sqrt())
    delta_scale = cfg.training.delta_scale or (rms if rms > 0 else 1.0)
    behaviour, bscale = None, None
    if cfg.uses_behaviour:
        behaviour, bscale = behaviour_tensors(
            D.load_behaviour(cfg, data, model, tokenizer, progress=progress), device
        )
    encoder, wt, generator = build_model_parts(
        cfg,
        data.teachers.spec,
        data.teachers,
        device,
        D.encoder_cache_dir(cfg),
        base_path=world.base_path,
        delta_dim=int(data.deltas.shape[1]),
    )
    fit_condition(cfg, generator, encoder, data.prompts, device)
    meta = {
        "world": {
            "dir": str(root),
            # The world's own content hash (base, tasks, teachers); world.json's bytes when
            # absent. Not the file's bytes first: a re-validating build rewrites timings there.
            "hash": (getattr(world, "content_hash", "") or file_hash(root / "world.json"))[:16],
            "n_samples": len(data),
            "n_tasks": len(data.prompts),
        },
        "delta_cache": {
            "dir": str(D.delta_cache_dir(cfg)),
            "base_fingerprint": model_fingerprint(model),
            "probe_hash": probes.hash,
            "spec_hash": dspec.hash,
            "teacher_deltas_hash": data.deltas_hash,
        },
        "generator_parameters": sum(p.numel() for p in generator.parameters()),
        "delta_scale": delta_scale,
    }
    if behaviour is not None:
        meta["behaviour"] = {
            "dir": str(D.behaviour_cache_dir(cfg)),
            "spec_hash": D.behaviour_spec(cfg).hash,
            "probes": cfg.behaviour.probes,
            "probes_per_sample": int(behaviour["input_ids"].shape[1]),
            "positions_per_sample": float(behaviour["select_mask"].sum(-1).float().mean()),
            "layer_scale": [float(x) for x in bscale],
            "base_kl": float(behaviour["base_kl"][behaviour["select_mask"]].mean())
            if "base_kl" in behaviour
            else None,
        }
    return Setup(
        cfg,
        world,
        root,
        model,
        tokenizer,
        probes,
        dspec,
        base_act,
        data,
        encoder,
        wt,
        generator,
        device,
        delta_scale,
        meta,
        behaviour,
        bscale,
    )


# Conditions drawn per training task to fit the generator's condition standardisation; the
# "within" whitening estimates a D x D within-task scatter and draws more.
FIT_CONDITIONS_PER_TASK = 4
FIT_CONDITIONS_PER_TASK_WITHIN = 16


@torch.no_grad()
def fit_condition(cfg: Config, generator, encoder, prompts: dict[str, list[str]], device) -> None:
    """Fit a generator's condition standardisation (T2L) on the training tasks' conditions.

    Each task contributes FIT_CONDITIONS_PER_TASK conditions drawn from its condition pool with
    a fixed seed (not the training seed: every seed's run sees the same standardisation).
    """
    fit = getattr(generator, "fit_condition", None)
    if fit is None or not getattr(generator, "standardize", False):
        return
    rng = np.random.default_rng(0)
    n = cfg.generator.n_prompts
    within = getattr(generator, "standardize_mode", None) == "within"
    per_task = FIT_CONDITIONS_PER_TASK_WITHIN if within else FIT_CONDITIONS_PER_TASK
    tasks = sorted(prompts)
    conds = [D.draw_prompts(rng, prompts[t], n) for t in tasks for _ in range(per_task)]
    pooled = []
    for i in range(0, len(conds), 32):
        states, mask = encoder.encode(conds[i : i + 32])  # [c, N, L, D], [c, N, L]
        pooled.append(generator.pool(states.to(device), mask.to(device)))
    if within:
        groups = torch.arange(len(tasks), device=device).repeat_interleave(per_task)
        fit(torch.cat(pooled), groups)
    else:
        fit(torch.cat(pooled))


def behaviour_tensors(
    stacked: dict[str, torch.Tensor], device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Stacked behaviour targets on ``device``, the teacher's hidden states replaced by their
    delta, and each layer's delta RMS over real positions. -> (dict, [L])."""
    out = dict(stacked)
    out["select_mask"] = out["select_mask"].bool()
    out["delta"] = out.pop("hidden") - out["base_hidden"]  # [n, P, K, L, H]
    rows = out["delta"][out["select_mask"]]  # [N, L, H]
    scale = rows.pow(2).mean(dim=(0, 2)).sqrt()  # [L]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return {k: v.to(device) for k, v in out.items()}, scale.to(device)


def behaviour_rows(setup: Setup, samples: list[int], probes: list[list[int]] | None):
    """The behaviour targets of ``samples`` (each on its ``probes``, None: all) as rows.

    -> (SequenceBatch [b*P', T'], dict of [b*P', ...] targets), sample-major rows as a LoraBatch
    of the b samples expects; padding columns no selected row uses are dropped.
    """
    from llgbm_delta.behaviour import SequenceBatch

    bt = setup.behaviour
    assert bt is not None
    dev = setup.device
    si = torch.tensor(samples, dtype=torch.long, device=dev)[:, None]  # [b, 1]
    if probes is None:
        pi = torch.arange(bt["input_ids"].shape[1], device=dev)[None].expand(len(samples), -1)
    else:
        pi = torch.tensor(probes, dtype=torch.long, device=dev)  # [b, P']
    got = {k: v[si, pi].flatten(0, 1) for k, v in bt.items()}  # [b*P', ...]
    t = int(got["attention_mask"].sum(-1).max())
    k = int(got["select_mask"].sum(-1).max())
    batch = SequenceBatch(
        got.pop("input_ids")[:, :t],
        got.pop("attention_mask")[:, :t],
        got.pop("select")[:, :k],
        got.pop("select_mask")[:, :k],
    )
    return batch, {name: v[:, :k] for name, v in got.items()}


def loss_weight(tc, name: str, step: int) -> float:
    """lambda_<name>(step), from training.lambda_<name> and its _schedule, _warmup, _start."""
    from llgbm_train.schedules import lambda_at

    return lambda_at(
        step,
        kind=getattr(tc, f"lambda_{name}_schedule"),
        value=getattr(tc, f"lambda_{name}"),
        warmup_steps=getattr(tc, f"lambda_{name}_warmup"),
        start=getattr(tc, f"lambda_{name}_start"),
    )


def norm_penalty(pred, target) -> tuple[torch.Tensor, float]:
    """Mean squared excess of generated over teacher delta-W norms (0 at or below them)."""
    p = algebra.sq_norms(pred).clamp_min(1e-20).sqrt()  # [n, n_keys]
    with torch.no_grad():
        t = algebra.sq_norms(target).clamp_min(1e-20).sqrt()  # [n, n_keys]
    return torch.relu(p / t - 1.0).pow(2).mean(), 0.0


@dataclass
class TrainResult:
    run: Run | None
    step: int  # optimiser steps completed
    last: dict[str, float]  # the last metrics record
    generator: torch.nn.Module  # unwrapped, on its device
    setup: Setup
    stopped_early: bool = False


def _rng_state(rng: np.random.Generator, noise: torch.Generator) -> dict[str, Any]:
    state = {
        "numpy": rng.bit_generator.state,
        "torch": torch.get_rng_state(),
        "noise": noise.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state, rng: np.random.Generator, noise: torch.Generator) -> None:
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])
    noise.set_state(state["noise"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resumable(run: Run, cfg: Config, setup: Setup) -> None:
    """A run continues only under its own config and the world it started with."""
    from llgbm_train.runs import RunError

    meta = run.metadata()
    if meta.get("config_hash") != cfg.hash:
        raise RunError(
            f"{run.dir}: started with config hash {meta.get('config_hash')}, this config is "
            f"{cfg.hash}; resume with the run's own config.yaml or start a new run with --name"
        )
    then, now = meta.get("world", {}).get("hash"), setup.metadata["world"]["hash"]
    if then != now:
        raise RunError(f"{run.dir}: the world changed since the run started ({then} -> {now})")


def make_accelerator(cfg: Config):
    """An Accelerator for this config (DDP when launched by accelerate launch / torchrun).

    bf16 autocast is applied by the trainer itself (``autocast``), so the accelerator always
    runs with mixed_precision="no". accelerate keeps one process-wide state; outside a
    distributed launch it is reset so runs of different devices can follow each other in one
    process (tests, notebooks).
    """
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = resolve_device(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=device.type == "cpu", mixed_precision="no")


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA when training.precision is bf16; fp32 otherwise (CPU included)."""
    if cfg.training.precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(
    cfg: Config,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    accelerator=None,
) -> TrainResult:
    """Train ``cfg``; write ``run_dir`` (None: write nothing, as ``llgbm verify`` does).

    ``stop_after``: stop (with a checkpoint) once this many steps are done, as a kill would,
    leaving the run resumable. ``max_steps``: run at most this many steps this call, no checkpoint.
    """
    from llgbm_train.losses import behaviour_delta_loss, delta_loss, kl_loss, weight_loss
    from llgbm_train.schedules import lr_lambda

    acc = accelerator or make_accelerator(cfg)
    main = acc.is_main_process
    tc = cfg.training
    if tc.batch_size < acc.num_processes:
        raise TrainingError(
            f"training.batch_size: {tc.batch_size} is below the {acc.num_processes} processes"
        )
    if resume and run_dir is not None and not (Path(run_dir) / "config.yaml").is_file():
        raise TrainingError(f"{run_dir}: nothing to resume (no run directory)")
    # The main process builds a missing world and fills the delta cache first; the others then
    # read what it wrote instead of racing it.
    setup = prepare(cfg, device=acc.device, progress=progress) if main else None
    acc.wait_for_everyone()
    if setup is None:
        setup = prepare(cfg, device=acc.device, progress=False)
    gen = setup.generator
    opt = torch.optim.AdamW(gen.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: lr_lambda(
            min(s, tc.steps),
            warmup_steps=min(tc.warmup_steps, tc.steps),
            total_steps=tc.steps,
            min_ratio=tc.min_lr_ratio,
        ),
    )
    rng = np.random.default_rng(tc.seed)
    noise = torch.Generator().manual_seed(tc.seed + 1000 * acc.process_index)
    step = 0

    run: Run | None = None
    if run_dir is not None:
        if resume:
            run = Run.open(run_dir)
            check_resumable(run, cfg, setup)
            state = run.load_checkpoint(cfg) if run.checkpoints() else None
            if state is not None:
                gen.load_state_dict(state["generator"])
                setup.weight_tokenizer.load_state_dict(state["weight_tokenizer"])
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                _set_rng_state(state["rng"], rng, noise)
                step = int(state["step"])
            if main:
                run.truncate_metrics(step)
                resumes = run.metadata().get("resumed_at", [])
                run.update_metadata(resumed_at=[*resumes, {"step": step}])
        elif main:
            meta = {"git": git_info(), "environment": environment(), **setup.metadata}
            run = Run.create(run_dir, cfg, meta)
        acc.wait_for_everyone()
        if run is None:
            run = Run.open(run_dir)

    ddp_gen, opt = acc.prepare(gen, opt)
    data = setup.data
    rank, world_size = acc.process_index, acc.num_processes
    teachers = data.teachers.to(device=setup.device)
    deltas = data.deltas.to(setup.device) / setup.delta_scale  # [n, hidden]
    base_act = setup.base_act
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    if max_steps is not None:
        end = min(end, step + max_steps)
    last: dict[str, float] = {}
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc=f"train {tc.objective}", unit="step")

    def checkpoint(at: int) -> None:
        if run is None or not main:
            return
        state = {
            "step": at,
            "config_hash": cfg.hash,
            "generator": acc.unwrap_model(ddp_gen).state_dict(),
            "weight_tokenizer": setup.weight_tokenizer.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": _rng_state(rng, noise),
            "delta_scale": setup.delta_scale,
        }
        run.save_checkpoint(state, at, keep=tc.keep_checkpoints)

    ddp_gen.train()
    while step < end:
        t0 = time.perf_counter()
        idx, prompts = D.draw_batch(rng, data, tc.batch_size, cfg.generator.n_prompts)
        rows = list(range(rank, len(idx), world_size))
        local = [idx[i] for i in rows]
        probe_pick = None
        if setup.behaviour is not None and cfg.behaviour.probes_per_step is not None:
            n_p = setup.behaviour["input_ids"].shape[1]
            per = min(cfg.behaviour.probes_per_step, n_p)
            # Drawn for the whole global batch, so every rank's RNG stays in lock step.
            picks = [rng.choice(n_p, size=per, replace=False).tolist() for _ in idx]
            probe_pick = [picks[i] for i in rows]
        states, mask = setup.encoder.encode([prompts[i] for i in rows])  # [b, N, L, D], [b, N, L]
        states = states.to(setup.device)
        mask = mask.to(setup.device)
        if tc.cond_noise > 0:
            states = states + tc.cond_noise * torch.randn(states.shape, generator=noise).to(states)
        lam_d, lam_kl = loss_weight(tc, "d", step), loss_weight(tc, "kl", step)
        if cfg.retrieves:
            # b2: the predictor's delta against the teacher's; nothing runs through the base.
            with autocast(cfg, setup.device):
                pd = ddp_gen(states, mask)  # [b, hidden], delta-scale units
            ld = delta_loss(pd.float(), deltas[local], kind=tc.delta_loss, cos_weight=tc.cos_weight)
            terms = {"loss_d": ld}
            loss = ld.value
        else:
            target = algebra.take(teachers, local)
            with autocast(cfg, setup.device):
                pred = ddp_gen(states, mask)  # LoraBatch [b]
            pred = pred.to(dtype=torch.float32)
            lw = weight_loss(pred, target, tokenizer=setup.weight_tokenizer, space=tc.weight_space)
            need_grad = tc.objective != "baseline"
            # baseline trains on the weights alone: the delta / KL are only logged, every
            # training.monitor_every steps (and at the first and last), not every step.
            monitored = need_grad or step % tc.monitor_every == 0 or step + 1 == end
            lkl = ld = None
            if monitored:
                with (
                    contextlib.nullcontext() if need_grad else torch.no_grad(),
                    autocast(cfg, setup.device),
                ):
                    chunk = cfg.model.adapter_chunk_size
                    ckpt = cfg.model.gradient_checkpointing
                    if setup.behaviour is not None:
                        seqs, bt = behaviour_rows(setup, local, probe_pick)
                    if tc.delta_target == "paper" and setup.behaviour is not None:
                        from llgbm_delta.behaviour import delta_and_behaviour

                        # The generic probes and the task sequences share one forward where the
                        # fused path allows (docs/benchmarks.md: the paper-size step).
                        pd, out = delta_and_behaviour(
                            setup.model,
                            setup.probes,
                            setup.delta_spec,
                            seqs,
                            cfg.behaviour.layers,
                            pred,
                            base=base_act,
                            logits="logprobs" in bt,
                            adapter_chunk_size=chunk,
                            gradient_checkpointing=ckpt,
                            tokenizer=setup.tokenizer,
                        )  # [b, hidden]; hidden [b*P, K, L, H], logits [b*P, K, V]
                        pd = pd / setup.delta_scale
                    elif tc.delta_target == "paper":
                        from llgbm_delta import delta_for_lora

                        pd = (
                            delta_for_lora(
                                setup.model,
                                setup.tokenizer,
                                pred,
                                setup.probes,
                                setup.delta_spec,
                                base=base_act,
                                adapter_chunk_size=chunk,
                                gradient_checkpointing=ckpt,
                            )
                            / setup.delta_scale
                        )  # [b, hidden]
                    elif setup.behaviour is not None:
                        from llgbm_delta.behaviour import behaviour_forward

                        out = behaviour_forward(
                            setup.model,
                            seqs,
                            cfg.behaviour.layers,
                            pred,
                            logits="logprobs" in bt,
                            adapter_chunk_size=chunk,
                            gradient_checkpointing=ckpt,
                        )  # hidden [b*P, K, L, H], logits [b*P, K, V]
                if tc.delta_target == "paper":
                    ld = delta_loss(
                        pd.float(), deltas[local], kind=tc.delta_loss, cos_weight=tc.cos_weight
                    )
                else:
                    ld = behaviour_delta_loss(
                        out.hidden,
                        bt["base_hidden"],
                        bt["delta"],
                        seqs.select_mask,
                        setup.behaviour_scale,
                        kind=tc.delta_loss,
                        cos_weight=tc.cos_weight,
                    )
                if setup.behaviour is not None and out.logits is not None:
                    lkl = kl_loss(
                        out.logits,
                        bt["logprobs"],
                        seqs.select_mask,
                        top_ids=bt.get("top_ids"),
                        base_kl=bt.get("base_kl"),
                    )
            terms = {"loss_w": lw}
            if ld is not None:
                terms["loss_d"] = ld
            if lkl is not None:
                terms["loss_kl"] = lkl
            if tc.objective == "baseline":
                loss = lw.value
            else:
                behaviour_term = lam_d * ld.value
                if lkl is not None and tc.lambda_kl > 0:
                    behaviour_term = behaviour_term + lam_kl * lkl.value
                if tc.objective == "delta_multi":
                    loss = tc.lambda_w * lw.value + behaviour_term
                else:
                    ln, ln_base = norm_penalty(pred, target)
                    terms["loss_norm"] = type(lw)(ln, ln_base)
                    loss = behaviour_term + tc.norm_penalty * ln + tc.lambda_w * lw.value
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        params = [p for p in ddp_gen.parameters() if p.grad is not None]
        if tc.grad_clip > 0:
            gnorm = acc.clip_grad_norm_(params, tc.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        vals = torch.tensor(
            [float(loss.detach()), float(gnorm)]
            + [float(t.value.detach()) for t in terms.values()]
            + [float(t.baseline) for t in terms.values()],
            device=setup.device,
        )
        vals = acc.reduce(vals, reduction="mean") if world_size > 1 else vals
        vals = vals.tolist()
        if not all(math.isfinite(v) for v in vals[:2]):
            if bar is not None:
                bar.close()
            ckpts = run.checkpoints() if run is not None else []
            where = f"; last good checkpoint: {ckpts[-1]}" if ckpts else ""
            raise TrainingError(
                f"non-finite loss or gradient at step {step + 1} "
                f"(loss={vals[0]}, grad_norm={vals[1]}); stopped{where}"
            )
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        step += 1
        names = list(terms)
        rec = {"step": step, "loss": vals[0], "grad_norm": vals[1], "lr": lr, "lambda_d": lam_d}
        if tc.lambda_kl > 0:
            rec["lambda_kl"] = lam_kl
        for i, name in enumerate(names):
            rec[name] = vals[2 + i]
            rec[name + "_baseline"] = vals[2 + len(names) + i]
        last = rec
        if main and run is not None and (step % tc.log_every == 0 or step == end):
            run.append_metrics(rec)
            run.append_metrics(
                {"step": step, "seconds": time.perf_counter() - t0}, file="timing.jsonl"
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{vals[0]:.4g}",
                **(
                    {"d": f"{rec['loss_d']:.3g}/{rec['loss_d_baseline']:.3g}"}
                    if "loss_d" in rec
                    else {}
                ),
                **(
                    {"w": f"{rec['loss_w']:.3g}/{rec['loss_w_baseline']:.3g}"}
                    if "loss_w" in rec
                    else {}
                ),
                **(
                    {"kl": f"{rec['loss_kl']:.3g}/{rec['loss_kl_baseline']:.3g}"}
                    if "loss_kl" in rec
                    else {}
                ),
            )
        if step % tc.checkpoint_every == 0 or step == end:
            checkpoint(step)
    if bar is not None:
        bar.close()
    acc.wait_for_everyone()
    return TrainResult(
        run, step, last, acc.unwrap_model(ddp_gen), setup, stopped_early=step < tc.steps
    )
