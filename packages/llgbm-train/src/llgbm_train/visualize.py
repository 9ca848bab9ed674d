"""PNG figures of a run or a world (matplotlib, no display needed).

    llgbm visualize runs/delta_multi        # -> runs/delta_multi/plots/*.png
    llgbm visualize worlds/tiny --out figs  # a world: its teachers' delta maps only

A run gives:
- ``curves.png``: every logged loss next to its trivial baseline (``loss_w`` vs the zero LoRA,
  ``loss_d`` vs the zero delta, ...), plus the total loss, learning rate and lambda_d;
- ``deltas_pca.png`` / ``deltas_tsne.png``: the world's teacher deltas and the run's generated
  adapters' deltas (``eval/adapters/<task>/``), coloured by family, marked by split, each generated
  point joined to the mean of its task's teachers;
- ``accuracy.png`` (``accuracy-<tasks>.png`` for ``eval/report-<tasks>.json``): accuracy per
  method with its 95% bootstrap interval, pooled and per task.

Deltas are the run's (or, for a world, the default config's: generic probes, last token) from
the world's delta cache; generated adapters' deltas are read from the evaluation's
``eval/deltas.safetensors`` when its probes and delta spec are the run's, else computed (never
written into that cache).
The maps show directions (rows scaled to unit norm: the cosine geometry Delta Activations uses).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llgbm_train.runs import Run


class VisualizeError(ValueError):
    """Nothing to draw, or the target is neither a run nor a world; one-line message."""


@dataclass
class DeltaPoints:
    """Deltas to draw: one row per adapter."""

    deltas: np.ndarray  # [n, hidden] float32
    task: list[str]
    family: list[str]
    role: list[str]  # one of ROLES


ROLES = ("train teacher", "held-out teacher", "mixture teacher", "generated")
_MARKERS = {"train teacher": "o", "held-out teacher": "^", "mixture teacher": "s", "generated": "*"}
_SIZES = {"train teacher": 22, "held-out teacher": 40, "mixture teacher": 26, "generated": 170}
# What the logged terms and their baselines are (others are drawn under their own names).
_TERMS = {
    "loss_w": ("weight loss (loss_w)", "zero LoRA"),
    "loss_d": ("delta loss (loss_d)", "zero delta"),
    "loss_norm": ("norm penalty (loss_norm)", "at the teacher's norm"),
}
_METHOD_COLORS = {
    "base": "#9e9e9e",
    "mean_teachers": "#f2a541",
    "teacher": "#3a7d44",
    "generated": "#2f6fb0",
}


# ---------------------------------------------------------------------------- inputs
def _world_config(world_dir: Path):
    """The default config pointed at ``world_dir`` (its delta cache, generic probes)."""
    from llgbm_train.config import Config

    return Config(name="visualize").override(
        [f"world.dir={world_dir}", "world.build_if_missing=false"]
    )


def _stored_generated(path: Path | None, probes, spec, tasks: list[str]) -> np.ndarray | None:
    """The ``tasks``' rows of an evaluation's ``eval/deltas.safetensors`` when it was computed
    with these probes and delta spec and holds every task; else None (a note says why)."""
    from llgbm_train.evaluate import EvalError, load_generated_deltas

    if path is None or not path.is_file():
        return None
    try:
        stored, header = load_generated_deltas(path)
    except EvalError as e:
        reason = str(e)
    else:
        missing = [t for t in tasks if t not in stored]
        if (header["probe_hash"], header["spec_hash"]) != (probes.hash, spec.hash):
            reason = f"{path}: made with other probes or delta spec"
        elif missing:
            reason = f"{path}: no delta for {missing[0]}"
        else:
            return np.stack([stored[t] for t in tasks])
    print(f"note: {reason}; computing the generated deltas", file=sys.stderr)
    return None


def collect_deltas(
    cfg, generated: dict[str, Path], *, stored: Path | None = None, progress: bool = True
) -> DeltaPoints:
    """Deltas of every teacher of ``cfg``'s world (cached) and of the ``generated`` adapters.

    ``stored``: the run's ``eval/deltas.safetensors``; the generated adapters' deltas are read
    from it when it matches the probes and delta spec, and computed otherwise.
    """
    from llgbm_delta import compute_deltas

    from llgbm_train import data as D
    from llgbm_train.trainer import load_base, resolve_device

    root = D.ensure_world(cfg, progress=progress)
    world = D.load_world(root)
    tasks = {t.name: t for t in world.tasks}
    model, tok = load_base(world.base_path, cfg, resolve_device(cfg))
    probes = D.load_probes(cfg)
    teachers = list(world.teachers)
    paths = [D.teacher_path(root, t) for t in teachers]
    deltas = D.teacher_deltas(cfg, model, tok, paths, probes, world=world, progress=progress)
    rows = [np.asarray(deltas)]
    task_names = [t.task for t in teachers]
    roles = []
    for t in teachers:
        if getattr(t, "kind", "single") == "mixture" or tasks[t.task].family == "mixture":
            roles.append("mixture teacher")
        else:
            roles.append("train teacher" if tasks[t.task].split == "train" else "held-out teacher")
    if generated:
        spec = D.delta_spec(cfg)
        got = _stored_generated(stored, probes, spec, list(generated))
        if got is None:
            got = compute_deltas(
                (model, tok),
                [str(p) for p in generated.values()],
                probes,
                None,
                spec=spec,
                progress=progress,
            )
        rows.append(np.asarray(got))
        task_names += list(generated)
        roles += ["generated"] * len(generated)
    family = [tasks[n].family if n in tasks else "?" for n in task_names]
    return DeltaPoints(np.concatenate(rows).astype(np.float32), task_names, family, roles)


def generated_adapters(run: Run) -> dict[str, Path]:
    """task -> generated PEFT directory under ``RUN/eval/adapters/`` (written by evaluation)."""
    from llgbm_train.evaluate import EVAL_DIR

    d = run.dir / EVAL_DIR / "adapters"
    if not d.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(d.iterdir())
        if p.is_dir() and (p / "adapter_config.json").is_file()
    }


# ---------------------------------------------------------------------------- drawing
def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _save(fig, path: Path) -> Path:
    """PNG written atomically (temp file beside it, then rename)."""
    from llgbm_flora.atomic import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def curve_terms(records: list[dict[str, Any]]) -> list[str]:
    """The logged terms that have a ``<name>_baseline`` companion, in logging order."""
    return [k for k in records[0] if f"{k}_baseline" in records[0]] if records else []


def plot_curves(records: list[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Each loss with a ``<name>_baseline`` companion, then total loss, lr and lambda_d."""
    from matplotlib.ticker import MaxNLocator

    if not records:
        raise VisualizeError(f"{path}: no metrics records to plot")
    keys = curve_terms(records)
    panels = [*keys, "loss", "schedule"]
    cols = 2 if len(panels) == 4 else min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig = _figure(4.2 * cols, 3.1 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    steps = np.array([r["step"] for r in records])
    marker = "o" if len(records) <= 30 else None

    def series(name):
        return np.array([r.get(name, np.nan) for r in records], dtype=float)

    for ax, name in zip(axes, panels):
        if name == "schedule":
            ax.plot(steps, series("lr"), marker=marker, ms=3, label="lr")
            ax.set_ylabel("learning rate")
            if "lambda_d" in records[0]:
                twin = ax.twinx()
                twin.plot(steps, series("lambda_d"), color="C3", marker=marker, ms=3)
                twin.set_ylabel("lambda_d", color="C3")
            ax.set_title("schedules")
        else:
            y = series(name)
            ok = np.isfinite(y)  # a term logged every k steps only (training.monitor_every)
            label, base = _TERMS.get(name, (name, "trivial baseline"))
            ax.plot(steps[ok], y[ok], marker=marker, ms=3, label=name)
            if name in keys:
                yb = series(f"{name}_baseline")
                ax.plot(steps[ok], yb[ok], "--", color="0.45", label=base)
                ax.legend(fontsize=8)
            ax.set_title(label if name in keys else "total loss (optimised)")
            both = np.concatenate([y, series(f"{name}_baseline") if name in keys else y])
            both = both[np.isfinite(both)]
            # Log scale only where the curve spans decades; on a narrow range it hides the gap.
            if both.size and both.min() > 0 and both.max() / both.min() > 20:
                ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def embed(x: np.ndarray, method: str, *, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of unit-norm rows of ``x`` [n, hidden] and an axis-label note."""
    u = _unit_rows(x.astype(np.float64))
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=seed)
        xy = pca.fit_transform(u)
        ev = pca.explained_variance_ratio_
        return xy, f"PC1 {100 * ev[0]:.0f}% / PC2 {100 * ev[1]:.0f}% of variance"
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(u) - 1) / 3))
    tsne = TSNE(
        n_components=2, metric="cosine", perplexity=perplexity, init="pca", random_state=seed
    )
    return tsne.fit_transform(u), f"cosine t-SNE, perplexity {perplexity:.0f}"


def plot_delta_map(points: DeltaPoints, path: Path, method: str, *, title: str = "") -> Path:
    """Scatter of ``points`` by ``method`` ("pca" | "tsne")."""
    from matplotlib.lines import Line2D

    n = len(points.task)
    if n < 4:
        raise VisualizeError(f"{n} deltas: too few adapters for a map (need 4)")
    xy, note = embed(points.deltas, method)
    families = sorted(set(points.family))
    cmap = "tab10" if len(families) <= 10 else "tab20"
    from matplotlib import colormaps

    colors = {f: colormaps[cmap](i % 20) for i, f in enumerate(families)}
    fig = _figure(9.4, 6.0)
    ax = fig.subplots()
    roles = np.array(points.role)
    task = np.array(points.task)
    for role in ROLES:
        m = roles == role
        if not m.any():
            continue
        edge = "black" if role == "generated" else "none"
        ax.scatter(
            xy[m, 0],
            xy[m, 1],
            c=[colors[f] for f in np.array(points.family)[m]],
            marker=_MARKERS[role],
            s=_SIZES[role],
            edgecolors=edge,
            linewidths=0.8,
            alpha=0.95 if role == "generated" else 0.7,
            zorder=3 if role == "generated" else 2,
        )
    teachers = roles != "generated"
    span = np.ptp(xy, axis=0).max() or 1.0
    placed: list[np.ndarray] = []
    for i in np.flatnonzero(~teachers):
        own = teachers & (task == task[i])
        if own.any():
            c = xy[own].mean(0)
            ax.plot([xy[i, 0], c[0]], [xy[i, 1], c[1]], color="0.3", lw=0.8, zorder=1)
        # Generated adapters often land on one spot: stack their names instead of overprinting.
        k = sum(np.linalg.norm(p - xy[i]) < 0.03 * span for p in placed)
        placed.append(xy[i])
        ax.annotate(task[i], xy[i], fontsize=7, xytext=(6, 4 - 9 * k), textcoords="offset points")
    fam_handles = [
        Line2D([], [], ls="", marker="o", color=colors[f], label=f, markersize=7) for f in families
    ]
    role_handles = [
        Line2D(
            [],
            [],
            ls="",
            marker=_MARKERS[r],
            color="0.5",
            markeredgecolor="black" if r == "generated" else "0.5",
            label=r + ("\n(line: to its task's teachers)" if r == "generated" else ""),
            markersize=10 if r == "generated" else 7,
        )
        for r in ROLES
        if (roles == r).any()
    ]
    # Legends outside the axes, where they cannot hide points.
    style = {"fontsize": 7, "title_fontsize": 8}
    leg = ax.legend(handles=fam_handles, title="family (colour)", loc="upper left",
                    bbox_to_anchor=(1.01, 1.0), **style)  # fmt: skip
    ax.add_artist(leg)
    ax.legend(handles=role_handles, title="split (marker)", loc="lower left",
              bbox_to_anchor=(1.01, 0.0), **style)  # fmt: skip
    ax.set_xlabel(note)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{method.upper()} of delta directions ({n} adapters)")
    return _save(fig, path)


def _bar_label(ax, x: float, y: float, text: str, size: int) -> None:
    ax.annotate(text, (x, y), ha="center", va="bottom", fontsize=size, xytext=(0, 1),
                textcoords="offset points")  # fmt: skip


def plot_accuracy(report: dict[str, Any], path: Path, *, title: str = "") -> Path:
    """Pooled accuracy per group (held-out, each kind, seen) and method with 95% CI whiskers,
    and per task (point estimates: the report's intervals are per group)."""
    from llgbm_train.evaluate import LABELS, METHODS

    groups = [g for g in report["summary"] if report["summary"][g]]
    methods = [m for m in METHODS if any(m in report["summary"][g] for g in groups)]
    rows = sorted(report["per_task"], key=lambda r: (r["split"], str(r.get("kind")), r["task"]))
    fig = _figure(4.0 + max(6.0, 0.55 * len(rows) * len(methods) / 2), 4.6)
    left, right = fig.subplots(
        1, 2, width_ratios=[max(1.0, len(groups) / 2), max(2.0, len(rows) / 2.5)]
    )
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, accs, lo, hi = [], [], [], []
        for i, g in enumerate(groups):
            s = report["summary"][g].get(m)
            if s is None or s["accuracy"] != s["accuracy"]:
                continue
            acc, (a, b) = 100 * s["accuracy"], s["ci95"]
            xs.append(i - 0.4 + width * (j + 0.5))
            accs.append(acc)
            lo.append(max(acc - 100 * a, 0.0))
            hi.append(max(100 * b - acc, 0.0))
        left.bar(xs, accs, width, yerr=[lo, hi], capsize=3, label=LABELS.get(m, m),
                 color=_METHOD_COLORS.get(m, f"C{j}"))  # fmt: skip
        for x, a, h in zip(xs, accs, hi):
            _bar_label(left, x, a + h, f"{a:.0f}", 6)  # above the whisker
    left.set_xticks(range(len(groups)), groups, rotation=25, ha="right", fontsize=8)
    left.set_title("pooled over tasks and items", fontsize=9)
    left.set_ylabel("accuracy % (greedy exact match, 95% bootstrap CI)")
    for j, m in enumerate(methods):
        xs, accs = [], []
        for i, r in enumerate(rows):
            s = r["methods"].get(m)
            if s is None or s["accuracy"] != s["accuracy"]:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            accs.append(100 * s["accuracy"])
        right.bar(xs, accs, width, label=LABELS.get(m, m), color=_METHOD_COLORS.get(m, f"C{j}"))
        if len(rows) <= 12:  # values readable; zero-height bars still show a number
            for x, a in zip(xs, accs):
                _bar_label(right, x, a, f"{a:.0f}", 6)
    labels = [r["task"] + (f"\n({r['kind']})" if r.get("kind") else "") for r in rows]
    right.set_xticks(
        range(len(rows)),
        labels,
        rotation=45 if len(rows) > 8 else 0,
        ha="right" if len(rows) > 8 else "center",
        fontsize=7,
    )
    right.set_title("per task", fontsize=9)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in (left, right):
        ax.set_ylim(0, 110)
        ax.grid(axis="y", alpha=0.3)
    step = (report.get("checkpoint") or {}).get("step")
    at = f", checkpoint step {step}" if step is not None else ""
    fig.suptitle(title or f"accuracy on {report['tasks_evaluated']} tasks{at}")
    return _save(fig, path)


# ---------------------------------------------------------------------------- entry
def visualize(
    target: str | Path, out: str | Path | None = None, *, progress: bool = True
) -> list[Path]:
    """Every figure of a run (config.yaml) or a world (world.json) into ``out``; their paths."""
    target = Path(target)
    if (target / "config.yaml").is_file():
        return _visualize_run(Run.open(target), Path(out) if out else target / "plots", progress)
    if (target / "world.json").is_file():
        out = Path(out) if out else target / "plots"
        points = collect_deltas(_world_config(target), {}, progress=progress)
        name = target.resolve().name
        return [
            plot_delta_map(
                points,
                out / f"deltas_{m}.png",
                m,
                title=f"{name}: {label} of teacher delta directions ({len(points.task)})",
            )
            for m, label in (("pca", "PCA"), ("tsne", "t-SNE"))
        ]
    raise VisualizeError(f"{target}: neither a run (config.yaml) nor a world (world.json)")


def _visualize_run(run: Run, out: Path, progress: bool) -> list[Path]:
    from llgbm_train.generate import require_world

    cfg = run.config()
    require_world(run)
    records = run.read_metrics()
    if not records:
        raise VisualizeError(f"{run.metrics_path}: no records yet (train the run first)")
    name = run.dir.resolve().name
    paths = [plot_curves(records, out / "curves.png", title=f"{name}: training")]
    from llgbm_train.evaluate import EVAL_DIR, GENERATED_DELTAS

    stored = run.dir / EVAL_DIR / GENERATED_DELTAS
    points = collect_deltas(cfg, generated_adapters(run), stored=stored, progress=progress)
    n_gen = points.role.count("generated")
    for m, label in (("pca", "PCA"), ("tsne", "t-SNE")):
        title = f"{name}: {label} of delta directions, teachers and {n_gen} generated"
        paths.append(plot_delta_map(points, out / f"deltas_{m}.png", m, title=title))
    for p in sorted((run.dir / "eval").glob("report*.json")):
        try:
            report = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VisualizeError(f"{p}: unreadable report ({e})") from None
        stem = p.stem.replace("report", "accuracy", 1)
        paths.append(plot_accuracy(report, out / f"{stem}.png", title=f"{name}: {p.name}"))
    return paths
