"""Evaluation of a trained generator: held-out and seen tasks, five adapters on the same items.

    report = evaluate_run("runs/delta_multi")   # writes runs/delta_multi/eval/ (swapped in whole)

For each evaluated task five adapters are scored on the same test items (greedy exact match,
``llgbm_worlds.score``) and compared by delta cosine to the task's own teacher:
- base: no adapter;
- teacher (oracle): the task's own best single-task teacher checkpoint;
- mean of teachers (the DnD baseline): the average of the training samples' teacher adapters,
  merged in delta-W space (mean of s·B·A per module, refactored exactly by SVD at rank
  min(n·r, in, out)), never by averaging A and B separately;
- nearest teacher (held-out tasks only): the best teacher of the train task whose condition
  embedding is closest (cosine) to this task's. A condition embedding is the masked mean over
  prompts and tokens of the condition encoder's states (the encoder the generator reads, the
  pooling T2L applies) for the N prompts the generator reads for that task;
- generated: the generator's adapter from those N prompts (no answers), saved as a PEFT directory
  ``eval/adapters/<task>/`` and scored from that directory, so the table is the saved adapter's.
  For delta_only b2 it is the merge of the training teachers nearest to the delta predicted from
  those prompts (``llgbm_train.predictor``); the report names them per task (``retrieved``).
  Its delta (the one compared to the teacher's) is kept in ``eval/deltas.safetensors`` (one
  float32 [hidden] tensor per task; the probe set and delta spec in the header), so readers such
  as the explorer draw generated adapters beside the teachers without a model.

Tasks are grouped as ``seen`` (train tasks, on their unseen test items) and held-out, split by
generalisation kind (``llgbm_train.generalisation``). Per-item results are kept (``correct``, a
0/1 string per method and task) so an experiment can bootstrap over seeds and items.

Honesty checks run on the data of every evaluation and stop it when violated: no held-out task is
a training sample and none of its prompts is a training condition; a task's condition prompts and
its scored items are disjoint. The report also records, per task, the oracle's accuracy in
world.json next to the one measured here (equal when every test item is scored).

The report names the checkpoint step it scored. ``eval/`` (report.json, report.md, adapters/,
deltas.safetensors) is
written into a fresh directory beside it and swapped in whole: never a mix of adapters from two
checkpoints beside an old report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llgbm_train import data as D
from llgbm_train.generalisation import KINDS, generalisation_kinds
from llgbm_train.runs import Run
from llgbm_train.stats import bits, bootstrap_accuracy, unbits
from llgbm_train.trainer import Setup, prepare, resolve_device

FORMAT = "llgbm-eval/2"
METHODS = ("base", "teacher", "mean_teachers", "nearest_teacher", "generated")
REFERENCE_METHODS = METHODS[:-1]  # do not depend on the generator
LABELS = {
    "base": "base",
    "teacher": "oracle teacher",
    "mean_teachers": "mean of teachers",
    "nearest_teacher": "nearest teacher",
    "generated": "generated",
}
GROUPS = ("heldout", *KINDS, "seen")
EVAL_DIR = "eval"
REPORT = "report.json"
GENERATED_DELTAS = "deltas.safetensors"  # in eval/: the generated adapters' deltas, by task
GENERATED_DELTAS_FORMAT = "llgbm-generated-deltas/1"


class EvalError(ValueError):
    """An evaluation cannot run or would be dishonest (e.g. a held-out task seen in training)."""


def mean_adapter(teachers):
    """Delta-W average of a LoraBatch as one LoraAdapter (exact: SVD at the smallest lossless rank)."""
    from llgbm_flora import algebra

    return algebra.refactor(algebra.mean(teachers)).adapter


# tasks, conditions, items --------------------------------------------------------------------
def eval_tasks(setup: Setup, which: str | None = None) -> list:
    """Non-mixture tasks of ``which`` (heldout | train | all; default eval.tasks), held-out first."""
    which = which or setup.cfg.eval.tasks
    # Mixture tasks exist for the additivity experiments; they have no single-task teacher.
    singles = [t for t in setup.world.tasks if getattr(t, "family", "") != "mixture"]
    tasks = [t for t in singles if t.split == "heldout" and which in ("heldout", "all")]
    tasks += [t for t in singles if t.split == "train" and which in ("train", "all")]
    if not tasks:
        raise EvalError(f"{setup.world_root}/world.json: no {which} tasks to evaluate")
    return tasks


def task_seed(seed: int, task: str) -> int:
    """A per-task seed that does not depend on which other tasks are evaluated."""
    return int(hashlib.sha256(f"{seed}\0{task}".encode()).hexdigest()[:8], 16)


def condition_pool(cfg, task) -> list[str]:
    """Prompts a task's condition may be drawn from: the training side's pool where it has one."""
    pool = getattr(D, "condition_prompts", None)
    return list(pool(task, cfg)) if pool is not None else list(task.prompts("train"))


def condition_prompts(setup: Setup, task) -> list[str]:
    """The N prompts the generator (and the nearest-teacher baseline) reads for ``task``."""
    rng = np.random.default_rng(task_seed(setup.cfg.eval.seed, task.name))
    return D.draw_prompts(rng, condition_pool(setup.cfg, task), setup.cfg.generator.n_prompts)


def scored_items(setup: Setup, task) -> list:
    return list(task.items("test"))[: setup.cfg.eval.max_items]


def check_data(setup: Setup, tasks: list, conditions: dict, items: dict) -> dict[str, int]:
    """The honesty checks on this evaluation's data; raises EvalError on a violation."""
    trained = set(setup.data.tasks)
    probes = getattr(setup.data, "probes", {})  # task probes (behaviour targets), where used
    seen_in_training = {p for texts in setup.data.prompts.values() for p in texts}
    seen_in_training |= {p for texts in probes.values() for p in texts}
    heldout = [t for t in tasks if t.split == "heldout"]
    leaked = sorted(t.name for t in heldout if t.name in trained)
    if leaked:
        raise EvalError(f"held-out tasks {', '.join(leaked)} are training samples")
    n_checked = 0
    for t in heldout:
        texts = set(t.prompts("train")) | set(t.prompts("test"))
        n_checked += len(texts)
        if texts & seen_in_training:
            raise EvalError(
                f"held-out task {t.name}: its prompts are training conditions or probes"
            )
    for t in tasks:
        scored = {e.prompt for e in items[t.name]}
        overlap = set(conditions[t.name]) & scored
        if overlap:
            raise EvalError(
                f"task {t.name}: {len(overlap)} condition prompts are also scored items"
            )
        if set(probes.get(t.name, ())) & scored:
            raise EvalError(f"task {t.name}: some of its training probes are scored items")
    return {
        "heldout_tasks_in_training": 0,
        "heldout_prompts_checked_against_training": n_checked,
        "condition_prompts_in_scored_items": 0,
    }


# adapters, deltas, scores -----------------------------------------------------------------------
def _known(x: float | None) -> float:
    """Accuracy for ranking: unknown (None or NaN) ranks lowest."""
    return -1.0 if x is None or x != x else float(x)


def best_teacher(setup: Setup, task: str):
    """The task's own single-task teacher with the best accuracy (later checkpoint on ties)."""
    own = [
        t
        for t in setup.world.teachers
        if t.task == task and getattr(t, "kind", "single") == "single"
    ]
    if not own:
        return None
    return max(own, key=lambda t: (_known(t.accuracy), getattr(t, "step", 0) or 0))


def oracle_teacher(setup: Setup, task: str) -> Path | None:
    best = best_teacher(setup, task)
    return None if best is None else D.teacher_path(setup.world_root, best)


def teacher_delta_map(setup: Setup, paths: list[Path]) -> dict[Path, torch.Tensor]:
    """Cached deltas [hidden] of teacher adapters, in one call of the world's delta service."""
    paths = list(dict.fromkeys(paths))
    if not paths:
        return {}
    deltas = D.teacher_deltas(
        setup.cfg,
        setup.model,
        setup.tokenizer,
        paths,
        setup.probes,
        world=setup.world,
        progress=False,
    )  # [n, hidden]
    return {p: torch.as_tensor(deltas[i]) for i, p in enumerate(paths)}


def oracle_deltas(setup: Setup, tasks: list) -> dict[str, torch.Tensor]:
    """Deltas [hidden] of each task's oracle teacher."""
    paths = {t.name: p for t in tasks if (p := oracle_teacher(setup, t.name)) is not None}
    by_path = teacher_delta_map(setup, list(paths.values()))
    return {name: by_path[p] for name, p in paths.items()}


@torch.no_grad()
def generate(setup: Setup, generator, task, *, prompts: list[str] | None = None):
    """The generator's adapter for ``task`` from its condition prompts. -> LoraAdapter (cpu).

    A delta predictor (delta_only b2) stands for the merge of the training teachers it
    retrieves by its predicted delta (``llgbm_train.predictor.retrieve_adapter``)."""
    from llgbm_train.predictor import is_predictor, retrieve_adapter

    prompts = prompts if prompts is not None else condition_prompts(setup, task)
    if is_predictor(generator):
        return retrieve_adapter(setup, generator, prompts)[0]
    states, mask = setup.encoder.encode([prompts])  # [1, N, L, D], [1, N, L]
    was = generator.training
    generator.eval()
    try:
        out = generator(states.to(setup.device), mask.to(setup.device))  # LoraBatch [1]
    finally:
        generator.train(was)
    return out.to(device="cpu", dtype=torch.float32)[0]


@torch.no_grad()
def condition_embedding(setup: Setup, prompts: list[str]) -> torch.Tensor:
    """Masked mean of the encoder's states over prompts and tokens. -> [D] float32 cpu."""
    from llgbm_train.generators.t2l import masked_mean

    states, mask = setup.encoder.encode([prompts])  # [1, N, L, D], [1, N, L]
    return masked_mean(states, mask)[0].float().cpu()


def nearest_train_task(setup: Setup, emb: torch.Tensor, train_embs: dict[str, torch.Tensor]):
    """(train task, cosine) whose condition embedding is closest to ``emb``."""
    names = list(train_embs)
    mat = torch.nn.functional.normalize(torch.stack([train_embs[n] for n in names]), dim=-1)
    sims = mat @ torch.nn.functional.normalize(emb, dim=-1)  # [n_train]
    i = int(sims.argmax())
    return names[i], float(sims[i])


@torch.no_grad()
def delta_of(setup: Setup, adapter) -> torch.Tensor:
    from llgbm_delta import delta_for_lora

    return (
        delta_for_lora(
            setup.model,
            setup.tokenizer,
            adapter.to(device=setup.device),
            setup.probes,
            setup.delta_spec,
            base=setup.base_act,
        )[0]
        .float()
        .cpu()
    )


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return None
    return float(a @ b) / (na * nb)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-20))


def score_items(setup: Setup, items: list, adapter) -> list[bool]:
    """Greedy exact match of ``items`` under ``adapter`` (None, a PEFT dir or a LoraAdapter)."""
    from llgbm_worlds import score

    ec = setup.cfg.eval
    kw = {} if ec.max_new_tokens is None else {"max_new_tokens": ec.max_new_tokens}
    if adapter is not None and not isinstance(adapter, str | Path):
        adapter = adapter.to(device=setup.device)
    return score(setup.model, setup.tokenizer, items, adapter=adapter, **kw)


def score_many(setup: Setup, groups: list[list], adapters: list) -> list[list[bool]]:
    """``[score_items(setup, g, a) for g, a in zip(groups, adapters)]``, per ``eval.scorer``.

    ``batched`` (default): ``llgbm_worlds.score_groups``, adapters of one structure in shared
    passes (one adapter per row group); ``peft``: each adapter loaded into PEFT on its own, the
    definition (the tests hold the two equal).
    """
    ec = setup.cfg.eval
    if ec.scorer == "peft":
        return [score_items(setup, g, a) for g, a in zip(groups, adapters)]
    from llgbm_worlds.scoring import score_groups

    return score_groups(
        setup.model,
        setup.tokenizer,
        groups,
        adapters,
        max_new_tokens=ec.max_new_tokens,
        max_rows=ec.batch_rows,
    )


def _result(correct: list[bool], delta: torch.Tensor | None, ref: torch.Tensor | None) -> dict:
    return {
        "accuracy": float(np.mean(correct)) if correct else float("nan"),
        "correct": bits(correct),
        "delta_cos": None if ref is None or delta is None else _cos(delta, ref),
        "delta_rel_err": None if ref is None or delta is None else _rel_err(delta, ref),
    }


def heldout_delta_error(setup: Setup, generator) -> dict[str, float]:
    """Delta error of the generator's adapters on the held-out tasks.

    ``loss``: the training delta loss (``training.delta_loss`` on deltas divided by the run's
    delta scale), so "lower than untrained" means the objective generalised; ``cos``: mean
    cosine to the task's teacher delta; ``rel_err``: mean ||d - d_t||^2 / ||d_t||^2 (a zero
    delta scores 1).
    """
    from llgbm_train.losses import delta_loss

    tc = setup.cfg.training
    preds, refs, coss, errs = [], [], [], []
    tasks = eval_tasks(setup, "heldout")
    oracles = oracle_deltas(setup, tasks)
    for task in tasks:
        ref = oracles.get(task.name)  # [hidden]
        if ref is None:
            continue
        pred = delta_of(setup, generate(setup, generator, task))  # [hidden]
        preds.append(pred)
        refs.append(ref)
        c = _cos(pred, ref)
        coss.append(0.0 if c is None else c)
        errs.append(_rel_err(pred, ref))
    if not refs:
        raise EvalError(f"{setup.world_root}/world.json: evaluated tasks have no teachers")
    with torch.no_grad():
        loss = delta_loss(
            torch.stack(preds) / setup.delta_scale,  # [n_tasks, hidden]
            torch.stack(refs) / setup.delta_scale,
            kind=tc.delta_loss,
            cos_weight=tc.cos_weight,
        )
    return {
        "loss": float(loss.value),
        "loss_baseline": float(loss.baseline),
        "cos": float(np.mean(coss)),
        "rel_err": float(np.mean(errs)),
    }


# the generator-independent adapters ------------------------------------------------------------
def reference_key(setup: Setup, tasks: list, conditions: dict, items: dict) -> str:
    """sha256 over everything the reference adapters' scores depend on."""
    from llgbm_delta import model_fingerprint

    ec = setup.cfg.eval
    blob = {
        "world": setup.metadata.get("world", {}).get("hash", str(setup.world_root)),
        "base": model_fingerprint(setup.model),
        "encoder": getattr(setup.encoder, "encoder_id", type(setup.encoder).__name__),
        "probes": setup.probes.hash,
        "delta_spec": setup.delta_spec.hash,
        "max_new_tokens": ec.max_new_tokens,
        "scorer": ec.scorer,
        "train_teachers": [str(p) for p in setup.data.paths],
        "tasks": [
            [t.name, conditions[t.name], [[e.prompt, e.answer] for e in items[t.name]]]
            for t in tasks
        ],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def reference_results(
    setup: Setup, tasks: list, conditions: dict, items: dict, *, bar=None
) -> dict[str, Any]:
    """Base, oracle, mean-of-teachers and nearest-teacher results of every task."""
    mean = mean_adapter(setup.data.teachers)
    mean_delta = delta_of(setup, mean)
    train_names = list(dict.fromkeys(setup.data.tasks))
    by_name = {t.name: t for t in setup.world.tasks}
    train_embs = {
        n: condition_embedding(setup, condition_prompts(setup, by_name[n])) for n in train_names
    }
    nearest = {
        t.name: nearest_train_task(
            setup, condition_embedding(setup, conditions[t.name]), train_embs
        )
        for t in tasks
        if t.split == "heldout"
    }
    oracle_paths = {t.name: oracle_teacher(setup, t.name) for t in tasks}
    nearest_paths = {n: oracle_teacher(setup, src) for n, (src, _) in nearest.items()}
    deltas = teacher_delta_map(
        setup, [p for p in [*oracle_paths.values(), *nearest_paths.values()] if p is not None]
    )
    out: dict[str, Any] = {}
    todo: dict[str, list[tuple[str, Any, torch.Tensor | None, torch.Tensor | None]]] = {}
    for t in tasks:
        oracle = oracle_paths[t.name]
        ref = None if oracle is None else deltas[oracle]
        best = best_teacher(setup, t.name)
        row: dict[str, Any] = {
            "teacher": None
            if best is None
            else {
                "path": str(oracle),
                "step": getattr(best, "step", None),
                "world_accuracy": None if best.accuracy != best.accuracy else best.accuracy,
            },
            "nearest": None,
            "methods": {},
        }
        zero = None if ref is None else torch.zeros_like(ref)
        runs: dict[str, tuple[Any, torch.Tensor | None]] = {
            "base": (None, zero),
            "mean_teachers": (mean, mean_delta),
        }
        if oracle is not None:
            runs["teacher"] = (oracle, ref)
        if t.name in nearest:
            src, sim = nearest[t.name]
            path = nearest_paths[t.name]
            row["nearest"] = {"task": src, "similarity": sim, "path": str(path)}
            if path is not None:
                runs["nearest_teacher"] = (path, deltas[path])
        for m in REFERENCE_METHODS:
            row["methods"][m] = None
            if m in runs:
                todo.setdefault(m, []).append((t.name, *runs[m], ref))
        out[t.name] = row
    for m, jobs in todo.items():  # one batched scoring per method
        oks = score_many(setup, [items[name] for name, *_ in jobs], [a for _, a, _, _ in jobs])
        for (name, _, delta, ref), ok in zip(jobs, oks):
            out[name]["methods"][m] = _result(ok, delta, ref)
        if bar is not None:
            bar.update(len(jobs))
    return out


def _inputs(setup: Setup, which: str):
    """(tasks, condition prompts, scored items, disjointness checks, reference key) of ``which``."""
    task_list = eval_tasks(setup, which)
    conditions = {t.name: condition_prompts(setup, t) for t in task_list}
    items = {t.name: scored_items(setup, t) for t in task_list}
    checks = check_data(setup, task_list, conditions, items)
    return task_list, conditions, items, checks, reference_key(setup, task_list, conditions, items)


def references_of(setup: Setup, tasks: str | None = None) -> tuple[str, dict[str, Any]]:
    """(reference key, reference results) that ``evaluate(setup, ..., tasks=tasks)`` would use.

    For an experiment to score the generator-independent methods once, before its runs train.
    """
    task_list, conditions, items, _, key = _inputs(setup, tasks or setup.cfg.eval.tasks)
    return key, reference_results(setup, task_list, conditions, items)


# the evaluation ---------------------------------------------------------------------------------
def evaluate(
    setup: Setup,
    generator,
    *,
    out_dir: Path | None = None,
    tasks: str | None = None,
    checkpoint: dict[str, Any] | None = None,
    references: MutableMapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the five adapters on every evaluated task; write ``out_dir/eval/`` when given.

    ``tasks``: heldout | train | all (default eval.tasks). ``checkpoint``: ``{"step", "steps"}``
    of the generator, named in the report. ``references``: a mapping reused across calls (an
    experiment's seeds) for the generator-independent results, keyed by ``reference_key``.
    """
    ec = setup.cfg.eval
    which = tasks or ec.tasks
    task_list, conditions, items, checks, key = _inputs(setup, which)
    kinds = generalisation_kinds(setup.world.tasks)
    from llgbm_train.predictor import is_predictor, retrieve_adapter

    refs = None if references is None else references.get(key)
    n_ref = 0 if refs is not None else sum(3 + (t.split == "heldout") for t in task_list)
    final = None if out_dir is None else Path(out_dir) / EVAL_DIR
    work = _fresh_dir(final) if final is not None else Path(tempfile.mkdtemp())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_ref + len(task_list), desc="evaluate", unit="score")
    try:
        if refs is None:
            refs = reference_results(setup, task_list, conditions, items, bar=bar)
            if references is not None:
                references[key] = refs
        oracles = oracle_deltas(setup, task_list)
        from llgbm_flora import save_adapter

        per_task = []
        gen_deltas: dict[str, torch.Tensor] = {}
        paths: dict[str, Path] = {}
        retrieved: dict[str, Any] = {}
        for t in task_list:
            if is_predictor(generator):
                gen, retrieved[t.name] = retrieve_adapter(setup, generator, conditions[t.name])
            else:
                gen = generate(setup, generator, t, prompts=conditions[t.name])
            paths[t.name] = save_adapter(gen, _adapter_dir(work / "adapters", t.name))
            gen_deltas[t.name] = delta_of(setup, gen)  # [hidden]
        # The saved files are what is scored (what a user re-scores with PEFT).
        scored = score_many(
            setup, [items[t.name] for t in task_list], [paths[t.name] for t in task_list]
        )
        if bar is not None:
            bar.update(len(task_list))
        for t, ok in zip(task_list, scored):
            generated = _result(ok, gen_deltas[t.name], oracles.get(t.name))
            r = refs[t.name]
            teacher = r["teacher"]
            n_test = len(t.items("test"))
            per_task.append(
                {
                    "task": t.name,
                    "family": getattr(t, "family", None),
                    "param": getattr(t, "param", None),
                    "split": t.split,
                    "kind": kinds.get(t.name, "unclassified"),
                    "n_items": len(items[t.name]),
                    "n_test_items": n_test,
                    "condition": conditions[t.name],
                    "teacher": teacher,
                    "nearest": r["nearest"],
                    "methods": {**r["methods"], "generated": generated},
                    **({"retrieved": retrieved[t.name]} if t.name in retrieved else {}),
                }
            )
        if bar is not None:
            bar.close()
        report = {
            "format": FORMAT,
            "checkpoint": checkpoint or {},
            "tasks_evaluated": which,
            "eval_config": dataclasses.asdict(ec),
            "n_tasks": len(task_list),
            "scorer": f"greedy exact match (llgbm_worlds.score, {ec.scorer})",
            "interval": f"95% percentile bootstrap over items within task ({ec.bootstrap} draws)",
            "reference_key": key,
            "mean_of_teachers": {"n_adapters": len(setup.data), "merge": "delta-W mean, SVD"},
            "checks": {**checks, "teacher_vs_world": teacher_vs_world(per_task)},
            "summary": summarise(per_task, n_boot=ec.bootstrap, seed=ec.seed),
            "per_task": per_task,
        }
        from llgbm_train.reports import report_markdown

        (work / "report.md").write_text(report_markdown(report))
        save_generated_deltas(setup, gen_deltas, work / GENERATED_DELTAS)
        (work / REPORT).write_text(json.dumps(report, indent=1))  # last: marks a complete eval/
        if final is not None:
            from llgbm_flora import atomic

            atomic.replace_dir(work, final, marker=REPORT)
            work = None
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return report


def teacher_vs_world(per_task: list[dict]) -> dict[str, Any]:
    """Oracle accuracy measured here vs world.json's, on tasks whose every test item was scored."""
    diffs = {}
    for row in per_task:
        teacher, res = row["teacher"], row["methods"].get("teacher")
        if teacher is None or res is None or row["n_items"] != row["n_test_items"]:
            continue
        world = teacher["world_accuracy"]
        if world is None or world != world:
            continue
        diffs[row["task"]] = abs(res["accuracy"] - world)
    return {
        "n_compared": len(diffs),
        "max_abs_diff": max(diffs.values()) if diffs else None,
        "mismatched": sorted(k for k, v in diffs.items() if v > 1e-9),
    }


def summarise(per_task: list[dict], *, n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    """Per group (held-out, each kind, seen) and method: accuracy, 95% CI, items, delta cos."""
    out: dict[str, dict[str, Any]] = {}
    for group in GROUPS:
        rows = [r for r in per_task if in_group(r, group)]
        if not rows:
            continue
        out[group] = {}
        for m in METHODS:
            res = [r["methods"][m] for r in rows if r["methods"].get(m) is not None]
            if not res:
                continue
            acc, lo, hi = bootstrap_accuracy(
                [unbits(x["correct"])[None] for x in res], n_boot=n_boot, seed=seed
            )
            coss = [x["delta_cos"] for x in res if x["delta_cos"] is not None]
            out[group][m] = {
                "accuracy": acc,
                "ci95": [lo, hi],
                "n_items": sum(len(x["correct"]) for x in res),
                "n_tasks": len(res),
                "delta_cos": float(np.mean(coss)) if coss else None,
            }
    return out


def in_group(row: dict, group: str) -> bool:
    """Whether a per-task row belongs to ``group`` (heldout, a kind, or seen)."""
    if group == "seen":
        return row["split"] == "train"
    if group == "heldout":
        return row["split"] == "heldout"
    return row["split"] == "heldout" and row["kind"] == group


# files -------------------------------------------------------------------------------------------
def save_generated_deltas(setup: Setup, deltas: dict[str, torch.Tensor], path: Path) -> None:
    """``deltas`` (task -> [hidden]) as safetensors; the header names probes and delta spec.

    The header's ``probe_hash`` and ``spec_hash`` are the ones llgbm-delta's cache entries carry,
    so a reader can tell which cached teacher deltas these compare with.
    """
    from safetensors.numpy import save_file

    meta = {
        "format": GENERATED_DELTAS_FORMAT,
        "probe_name": str(setup.probes.name),
        "probe_hash": setup.probes.hash,
        "spec": json.dumps(setup.delta_spec.to_dict(), sort_keys=True),
        "spec_hash": setup.delta_spec.hash,
    }
    tensors = {t: d.detach().float().cpu().numpy().reshape(-1) for t, d in deltas.items()}
    save_file(tensors, str(path), metadata=meta)


def load_generated_deltas(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(task -> delta [hidden] float32, header) of a file ``save_generated_deltas`` wrote.

    Raises EvalError, one line, when it is unreadable or not such a file. (The explorer keeps a
    copy that reports into its problems list: its pages must draw without importing torch.)
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as f:
            header = dict(f.metadata() or {})
            deltas = {k: np.asarray(f.get_tensor(k), np.float32).reshape(-1) for k in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, ValueError) as e:
        raise EvalError(
            f"{path}: unreadable ({type(e).__name__}); `llgbm evaluate` rewrites it"
        ) from None
    if header.get("format") != GENERATED_DELTAS_FORMAT or not {"probe_hash", "spec_hash"} <= set(
        header
    ):
        raise EvalError(
            f"{path}: not an llgbm generated-deltas file (format {header.get('format')})"
        )
    return deltas, header


def _adapter_dir(root: Path, task: str) -> Path:
    """``root/<task>``, refusing a task name that would leave ``root``."""
    from llgbm_flora.names import check_name

    return root / check_name(task, "task name", error=EvalError)


def _check_ours(final: Path, marker: str) -> None:
    """Refuse before the work, not after it: only an ``eval/`` this module wrote is replaced."""
    if final.exists() and not (final / marker).is_file():
        raise EvalError(f"{final}: exists and is not an evaluation directory; move it away")


def _fresh_dir(final: Path) -> Path:
    from llgbm_flora import atomic

    _check_ours(final, REPORT)
    final.parent.mkdir(parents=True, exist_ok=True)
    return atomic.fresh_dir(final)


# runs ----------------------------------------------------------------------------------------
def load_trained(run: Run, setup: Setup) -> tuple[torch.nn.Module, int | None]:
    """The run's newest checkpoint loaded into ``setup.generator``; (generator, its step)."""
    state = run.load_checkpoint(setup.cfg)
    setup.generator.load_state_dict(state["generator"])
    setup.weight_tokenizer.load_state_dict(state["weight_tokenizer"])
    step = state.get("step")
    return setup.generator, None if step is None else int(step)


def evaluate_run(
    run_dir: str | Path, *, tasks: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Re-evaluate a run from its newest checkpoint; ``tasks`` overrides ``eval.tasks``.

    Evaluating the train tasks (on their unseen test items) separates "the generator does not
    fit its training tasks" from "it does not generalise to held-out ones".
    """
    run = Run.open(run_dir)
    cfg = run.config()
    setup = prepare(cfg, device=resolve_device(cfg), progress=progress)
    generator, step = load_trained(run, setup)
    return evaluate(
        setup,
        generator,
        out_dir=run.dir,
        tasks=tasks,
        checkpoint={"step": step, "steps": cfg.training.steps},
        progress=progress,
    )
