"""Evaluation of a trained generator on the world's held-out tasks.

    report = evaluate_run("runs/delta_multi")     # writes eval/report.{json,md}, adapters/<task>/

For each evaluated task four adapters are scored on the same test items (greedy exact match,
95% percentile-bootstrap CI over items) and compared by delta cosine to the task's own teacher:
- base: no adapter;
- mean of teachers (the DnD baseline): the average of the training samples' teacher adapters,
  merged in delta-W space (mean of s·B·A per module, refactored exactly by SVD at rank
  min(n·r, in, out)), never by averaging A and B separately;
- teacher (oracle): the task's own best teacher checkpoint;
- generated: the generator's adapter from N of the task's prompts (no answers), saved as a PEFT
  directory under ``adapters/<task>/``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llgbm_train import data as D
from llgbm_train.config import atomic_write_text
from llgbm_train.runs import Run
from llgbm_train.trainer import Setup, prepare, resolve_device

METHODS = ("base", "mean_teachers", "teacher", "generated")
LABELS = {
    "base": "base",
    "mean_teachers": "mean of teachers (delta-W avg)",
    "teacher": "task's teacher (oracle)",
    "generated": "generated",
}


def bootstrap_ci(correct, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Mean accuracy and its 95% percentile-bootstrap interval over items."""
    x = np.asarray(correct, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return float(x.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def mean_adapter(teachers):
    """Delta-W average of a LoraBatch as one LoraAdapter (exact: SVD at rank <= min(n r, in, out))."""
    from llgbm_flora import LoraAdapter

    spec = teachers.spec
    n = len(teachers)
    A, B, ranks = {}, {}, []
    for key in spec.keys():  # noqa: SIM118 (LoraSpec.keys, not a dict)
        a, b = teachers.A[key].double(), teachers.B[key].double()  # [n, r, in], [n, out, r]
        dw = spec.scale * (b @ a).mean(0)  # [out, in]
        k = min(n * spec.rank, *dw.shape)
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        root = s[:k].sqrt()
        B[key] = (u[:, :k] * root).float()  # [out, k]
        A[key] = (root[:, None] * vh[:k]).float()  # [k, in]
        ranks.append(k)
    # One rank for every key: zero-pad the factors of keys with fewer singular values.
    k = max(ranks)
    A = {key: torch.nn.functional.pad(v, (0, 0, 0, k - v.shape[0])) for key, v in A.items()}
    B = {key: torch.nn.functional.pad(v, (0, k - v.shape[1])) for key, v in B.items()}
    # Scale 1 so the factors carry the whole update (alpha = r, or sqrt(r) with rsLoRA).
    alpha = float(k) ** 0.5 if spec.use_rslora else float(k)
    return LoraAdapter(replace(spec, rank=k, alpha=alpha), A, B)


def eval_tasks(setup: Setup) -> list:
    which = setup.cfg.eval.tasks
    # Mixture tasks exist for the additivity experiments; they have no single-task teacher.
    tasks = [
        t
        for t in setup.world.tasks
        if (which == "all" or t.split == which) and getattr(t, "family", "") != "mixture"
    ]
    if not tasks:
        raise D.DataError(f"{setup.world_root}/world.json: no {which} tasks to evaluate")
    return tasks


def _known(x: float | None) -> float:
    """Accuracy for ranking: unknown (None or NaN) ranks lowest."""
    return -1.0 if x is None or x != x else float(x)


def oracle_teacher(setup: Setup, task: str) -> Path | None:
    """The task's own single-task teacher with the best accuracy (later checkpoint on ties)."""
    own = [
        t
        for t in setup.world.teachers
        if t.task == task and getattr(t, "kind", "single") == "single"
    ]
    if not own:
        return None
    best = max(own, key=lambda t: (_known(t.accuracy), getattr(t, "step", 0) or 0))
    return D.teacher_path(setup.world_root, best)


def oracle_deltas(setup: Setup, tasks: list) -> dict[str, torch.Tensor]:
    """Cached deltas [hidden] of each task's oracle teacher, in one compute_deltas call."""
    paths = {t.name: p for t in tasks if (p := oracle_teacher(setup, t.name)) is not None}
    if not paths:
        return {}
    deltas = D.teacher_deltas(
        setup.cfg,
        setup.model,
        setup.tokenizer,
        list(paths.values()),
        setup.probes,
        progress=False,
    )  # [n, hidden]
    return {name: torch.as_tensor(deltas[i]) for i, name in enumerate(paths)}


@torch.no_grad()
def generate(setup: Setup, generator, task, *, seed: int):
    """The generator's adapter for ``task`` from N of its train prompts. -> LoraAdapter (cpu)."""
    rng = np.random.default_rng(seed)
    prompts = D.draw_prompts(rng, list(task.prompts("train")), setup.cfg.generator.n_prompts)
    states, mask = setup.encoder.encode([prompts])  # [1, N, L, D], [1, N, L]
    was = generator.training
    generator.eval()
    try:
        out = generator(states.to(setup.device), mask.to(setup.device))  # LoraBatch [1]
    finally:
        generator.train(was)
    return out.to(device="cpu", dtype=torch.float32)[0]


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


def heldout_delta_error(setup: Setup, generator, *, seed: int = 0) -> dict[str, float]:
    """Delta error of the generator's adapters on the evaluated (held-out) tasks.

    ``loss``: the training delta loss (``training.delta_loss`` on deltas divided by the run's
    delta scale), so "lower than untrained" means the objective generalised; ``cos``: mean
    cosine to the task's teacher delta; ``rel_err``: mean ||d - d_t||^2 / ||d_t||^2 (a zero
    delta scores 1).
    """
    from llgbm_train.losses import delta_loss

    tc = setup.cfg.training
    preds, refs, coss, errs = [], [], [], []
    tasks = eval_tasks(setup)
    oracles = oracle_deltas(setup, tasks)
    for task in tasks:
        ref = oracles.get(task.name)  # [hidden]
        if ref is None:
            continue
        pred = delta_of(setup, generate(setup, generator, task, seed=seed))  # [hidden]
        preds.append(pred)
        refs.append(ref)
        c = _cos(pred, ref)
        coss.append(0.0 if c is None else c)
        errs.append(_rel_err(pred, ref))
    if not refs:
        raise D.DataError(f"{setup.world_root}/world.json: evaluated tasks have no teachers")
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


def evaluate(
    setup: Setup, generator, *, out_dir: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Score base / mean of teachers / oracle / generated on every evaluated task."""
    from llgbm_worlds import score

    ec = setup.cfg.eval
    mean = mean_adapter(setup.data.teachers)
    mean_delta = delta_of(setup, mean)
    tasks = eval_tasks(setup)
    oracles = oracle_deltas(setup, tasks)
    per_task: list[dict[str, Any]] = []
    pooled: dict[str, list[bool]] = {m: [] for m in METHODS}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks) * len(METHODS), desc="evaluate", unit="score")
    kw = {} if ec.max_new_tokens is None else {"max_new_tokens": ec.max_new_tokens}
    for ti, task in enumerate(tasks):
        items = list(task.items("test"))[: ec.max_items]
        gen = generate(setup, generator, task, seed=ec.seed + ti)
        if out_dir is not None:
            from llgbm_flora import save_adapter

            save_adapter(gen, Path(out_dir) / "adapters" / task.name)
        oracle_path = oracle_teacher(setup, task.name)
        adapters: dict[str, Any] = {"base": None, "mean_teachers": mean, "generated": gen}
        deltas = {
            "base": torch.zeros_like(mean_delta),
            "mean_teachers": mean_delta,
            "generated": delta_of(setup, gen),
        }
        ref = oracles.get(task.name)  # [hidden] or None
        if oracle_path is not None and ref is not None:
            from llgbm_flora import load_adapter

            adapters["teacher"] = load_adapter(oracle_path)
            deltas["teacher"] = ref
        row: dict[str, Any] = {
            "task": task.name,
            "family": getattr(task, "family", None),
            "heldout_kind": getattr(task, "heldout_kind", None),
            "n_items": len(items),
            "methods": {},
        }
        for m in METHODS:
            if m not in adapters:
                row["methods"][m] = None
                if bar is not None:
                    bar.update(1)
                continue
            ad = adapters[m]
            correct = score(
                setup.model,
                setup.tokenizer,
                items,
                adapter=None if ad is None else ad.to(device=setup.device),
                **kw,
            )
            pooled[m].extend(correct)
            acc, lo, hi = bootstrap_ci(correct, ec.bootstrap, ec.seed)
            row["methods"][m] = {
                "accuracy": acc,
                "ci95": [lo, hi],
                "delta_cos": None if ref is None else _cos(deltas[m], ref),
                "delta_rel_err": None if ref is None else _rel_err(deltas[m], ref),
            }
            if bar is not None:
                bar.update(1)
        per_task.append(row)
    if bar is not None:
        bar.close()
    summary = {}
    for m in METHODS:
        acc, lo, hi = bootstrap_ci(pooled[m], ec.bootstrap, ec.seed)
        rows = [r["methods"][m] for r in per_task if r["methods"][m] is not None]
        coss = [r["delta_cos"] for r in rows if r["delta_cos"] is not None]
        errs = [r["delta_rel_err"] for r in rows if r["delta_rel_err"] is not None]
        summary[m] = {
            "accuracy": acc,
            "ci95": [lo, hi],
            "n_items": len(pooled[m]),
            "delta_cos": float(np.mean(coss)) if coss else None,
            "delta_rel_err": float(np.mean(errs)) if errs else None,
        }
    report = {
        "tasks_evaluated": ec.tasks,
        "n_tasks": len(tasks),
        "mean_of_teachers": {
            "n_adapters": len(setup.data),
            "merge": "delta-W mean, SVD",
            "rank": mean.spec.rank,
        },
        "summary": summary,
        "per_task": per_task,
    }
    if out_dir is not None:
        stem = report_stem(ec.tasks)
        ev = Path(out_dir) / "eval"
        atomic_write_text(ev / f"{stem}.json", json.dumps(report, indent=2))
        atomic_write_text(ev / f"{stem}.md", report_markdown(report))
    return report


def report_stem(tasks: str) -> str:
    """`report` for the held-out evaluation (the run's result), `report-<tasks>` otherwise."""
    return "report" if tasks == "heldout" else f"report-{tasks}"


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or x != x:
        return "—"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in METHODS:
        s = report["summary"][m]
        lo, hi = s["ci95"]
        rows.append(
            [
                LABELS[m],
                f"{_fmt(s['accuracy'], True)}",
                f"[{_fmt(lo, True)}, {_fmt(hi, True)}]",
                _fmt(s["delta_cos"]),
                str(s["n_items"]),
            ]
        )
    return rows


SUMMARY_HEADER = ["adapter", "accuracy %", "95% CI", "delta cos to teacher", "items"]


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation on {report['tasks_evaluated']} tasks ({report['n_tasks']})",
        "",
        "Accuracy: greedy exact match, 95% bootstrap CI over items. Delta cosine: to the "
        "task's own teacher. Mean of teachers: delta-W average of "
        f"{report['mean_of_teachers']['n_adapters']} training teachers.",
        "",
        "| " + " | ".join(SUMMARY_HEADER) + " |",
        "|" + "---|" * len(SUMMARY_HEADER),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(report)]
    lines += [
        "",
        "## Per task",
        "",
        "| task | " + " | ".join(LABELS[m] for m in METHODS) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    for row in report["per_task"]:
        cells = []
        for m in METHODS:
            r = row["methods"][m]
            cells.append(
                "—" if r is None else f"{_fmt(r['accuracy'], True)} (cos {_fmt(r['delta_cos'])})"
            )
        lines.append(f"| {row['task']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_summary(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evaluation on {report['tasks_evaluated']} tasks ({report['n_tasks']})")
    for h in SUMMARY_HEADER:
        table.add_column(h, justify="left" if h == "adapter" else "right")
    for r in summary_rows(report):
        table.add_row(*r)
    Console().print(table)


def load_trained(run: Run, setup: Setup) -> torch.nn.Module:
    state = run.load_checkpoint(setup.cfg)
    setup.generator.load_state_dict(state["generator"])
    setup.weight_tokenizer.load_state_dict(state["weight_tokenizer"])
    return setup.generator


def evaluate_run(
    run_dir: str | Path, *, tasks: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Re-evaluate a finished run; `tasks` ("heldout", "train", "all") overrides `eval.tasks`.

    Evaluating the train tasks (on their unseen test items) separates "the generator does not
    fit its training tasks" from "it does not generalise to held-out ones".
    """
    run = Run.open(run_dir)
    cfg = run.config()
    if tasks is not None:
        cfg = cfg.override([f"eval.tasks={tasks}"])
    setup = prepare(cfg, device=resolve_device(cfg), progress=progress)
    generator = load_trained(run, setup)
    return evaluate(setup, generator, out_dir=run.dir, progress=progress)
