"""Readers: what the llgbm command line wrote, as plain tables the pages draw.

    world = read_world(Path("worlds/tiny"))                     # WorldView (tasks, teachers)
    runs, problems = read_runs(Path("runs"))                    # [RunView], [(name, message)]
    table = read_deltas(world, Path("worlds/tiny/delta_cache"), runs)   # DeltaTable

Every reader goes through the owning package's public API (``llgbm_worlds.World``,
``llgbm_delta.DeltaCache``, ``llgbm_train.runs.Run``) and turns its errors into one-line
``ExplorerError``s. Nothing here computes a delta or loads a model; the ``st.cache_data``
loaders in ``ui.py`` keep results per file stamp, so a page redraw reads nothing again.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llgbm_explorer.folders import ExplorerError

TEACHER_COLUMNS = [
    "adapter",
    "source",
    "task",
    "family",
    "split",
    "heldout_kind",
    "accuracy",
    "step",
    "data_split",
    "run",
]


def stamp(*paths: Path) -> tuple:
    """(path, mtime_ns, size) of each path that exists: a cache key that changes with the files."""
    out = []
    for p in paths:
        try:
            s = p.stat()
        except OSError:
            out.append((str(p), None, None))
            continue
        out.append((str(p), s.st_mtime_ns, s.st_size))
    return tuple(out)


# -- worlds ------------------------------------------------------------------------------
@dataclass
class WorldView:
    """A world as tables: one row per task and one per teacher adapter."""

    root: Path
    kind: str
    preset: str
    tasks: pd.DataFrame  # name, family, split, heldout_kind, param, base_accuracy
    teachers: pd.DataFrame  # TEACHER_COLUMNS + path (absolute)


def read_world(root: Path) -> WorldView:
    """``root/world.json`` through ``llgbm_worlds.World.load``; ExplorerError on any problem."""
    from llgbm_worlds import World, WorldError

    try:
        w = World.load(root)
    except WorldError as e:
        raise ExplorerError(str(e)) from None
    tasks = pd.DataFrame(
        [
            {
                "name": t.name,
                "family": t.family,
                "split": t.split,
                "heldout_kind": t.heldout_kind or "",
                "param": t.param,
                "base_accuracy": t.base_accuracy,
            }
            for t in w.tasks
        ]
    )
    by_name = {t.name: t for t in w.tasks}
    rows = []
    for t in w.teachers:
        task = by_name[t.task]
        try:
            rel = Path(t.path).relative_to(w.root).as_posix()
        except ValueError:
            rel = str(t.path)
        rows.append(
            {
                "adapter": rel,
                "source": "mixture" if t.kind == "mixture" else "teacher",
                "task": t.task,
                "family": task.family,
                "split": task.split,
                "heldout_kind": task.heldout_kind or "",
                "accuracy": t.accuracy,
                "step": t.step,
                "data_split": t.data_split,
                "run": "",
                "path": str(Path(t.path).resolve()),
            }
        )
    teachers = pd.DataFrame(rows, columns=[*TEACHER_COLUMNS, "path"])
    return WorldView(w.root, w.kind, w.preset, tasks, teachers)


# -- runs --------------------------------------------------------------------------------
@dataclass
class RunView:
    """One run directory as the pages need it."""

    name: str
    dir: Path
    config: dict[str, Any]  # llgbm_train Config.to_dict()
    metadata: dict[str, Any]  # metadata.json
    metrics: pd.DataFrame  # one row per logged step
    reports: dict[str, dict]  # eval/<stem>.json by stem ("report", "report-all", ...)
    adapters: dict[str, Path]  # generated PEFT adapter dir by task
    problems: list[str] = field(default_factory=list)  # one line each (unreadable parts)
    deltas: dict[str, np.ndarray] = field(default_factory=dict)  # generated delta [hidden] by task
    deltas_header: dict[str, str] = field(default_factory=dict)  # probe_hash, spec_hash, ...

    @property
    def objective(self) -> str:
        return str(self.config.get("training", {}).get("objective", "?"))


def run_dirs(runs_dir: Path) -> list[Path]:
    """Run directories (holding config.yaml) directly under ``runs_dir``, by name."""
    if not runs_dir.is_dir():
        return []
    return sorted(p for p in runs_dir.iterdir() if (p / "config.yaml").is_file())


def read_run(path: Path) -> RunView:
    """A run through ``llgbm_train.runs.Run``; unreadable parts become ``problems`` lines."""
    from llgbm_train.runs import Run, RunError

    run = Run.open(path)
    problems: list[str] = []
    try:
        config = run.config().to_dict()
    except RunError as e:
        config, problems = {}, [str(e)]
    try:
        metadata = run.metadata()
    except (OSError, json.JSONDecodeError) as e:
        metadata = {}
        problems.append(f"{run.metadata_path}: unreadable ({type(e).__name__})")
    try:
        metrics = pd.DataFrame(run.read_metrics())
    except json.JSONDecodeError:
        metrics = pd.DataFrame()
        problems.append(
            f"{run.metrics_path}: a line is not JSON (a killed run? `llgbm train --resume` "
            "drops it)"
        )
    reports: dict[str, dict] = {}
    for rp in sorted((path / "eval").glob("report*.json")):
        try:
            reports[rp.stem] = json.loads(rp.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"{rp}: unreadable ({type(e).__name__})")
    adapters = {}
    adir = path / "eval" / "adapters"  # llgbm evaluate swaps eval/ in whole, adapters inside
    if adir.is_dir():
        adapters = {
            p.name: p.resolve()
            for p in sorted(adir.iterdir())
            if (p / "adapter_config.json").is_file()
        }
    deltas, header = read_generated_deltas(path / "eval" / GENERATED_DELTAS, problems)
    return RunView(
        path.name,
        path.resolve(),
        config,
        metadata,
        metrics,
        reports,
        adapters,
        problems,
        deltas,
        header,
    )


GENERATED_DELTAS = "deltas.safetensors"  # llgbm_train.evaluate.GENERATED_DELTAS, in eval/
GENERATED_DELTAS_FORMAT = "llgbm-generated-deltas/1"


def read_generated_deltas(
    path: Path, problems: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(task -> delta [hidden], header) of the run's ``eval/deltas.safetensors``, if any.

    ``llgbm evaluate`` writes it (each generated adapter's delta, the probe set and delta spec in
    the header). Read with safetensors' numpy loader: no torch. A damaged file adds a line to
    ``problems`` and reads as absent.
    """
    if not path.is_file():
        return {}, {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as f:
            header = dict(f.metadata() or {})
            deltas = {k: np.asarray(f.get_tensor(k), np.float32).reshape(-1) for k in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, ValueError) as e:
        problems.append(f"{path}: unreadable ({type(e).__name__}); `llgbm evaluate` rewrites it")
        return {}, {}
    if header.get("format") != GENERATED_DELTAS_FORMAT or not {"probe_hash", "spec_hash"} <= set(
        header
    ):
        problems.append(
            f"{path}: not an llgbm generated-deltas file (format {header.get('format')})"
        )
        return {}, {}
    return deltas, header


def read_runs(runs_dir: Path) -> tuple[list[RunView], list[tuple[str, str]]]:
    """Every run under ``runs_dir`` and (name, message) for the ones that cannot be opened."""
    from llgbm_train.runs import RunError

    runs, bad = [], []
    for d in run_dirs(runs_dir):
        try:
            runs.append(read_run(d))
        except (RunError, OSError) as e:
            bad.append((d.name, str(e)))
    return runs, bad


def main_report(run: RunView) -> tuple[str, dict] | None:
    """The run's evaluation report: every task's if there is one, else held-out, else any."""
    for stem in ("report-all", "report", *sorted(run.reports)):
        if stem in run.reports:
            return stem, run.reports[stem]
    return None


def report_tables(report: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, per task) tables of an eval report: accuracy %, 95% CI, delta cosine."""
    summary = []
    # summary: group (heldout, each generalisation kind, seen) -> method -> numbers
    rows = [
        (group, method, s)
        for group, methods in (report.get("summary") or {}).items()
        if isinstance(methods, dict)
        for method, s in methods.items()
    ]
    for group, method, s in rows:
        if not isinstance(s, dict):
            continue
        lo, hi = (s.get("ci95") or [None, None])[:2]
        summary.append(
            {
                "tasks": group,
                "method": method,
                "accuracy %": _pct(s.get("accuracy")),
                "CI low %": _pct(lo),
                "CI high %": _pct(hi),
                "delta cos to teacher": s.get("delta_cos"),
                "items": s.get("n_items"),
            }
        )
    per_task = []
    for row in report.get("per_task") or []:
        r = {
            "task": row.get("task"),
            "family": row.get("family"),
            "kind": row.get("kind") or "",
        }
        for method, m in (row.get("methods") or {}).items():
            r[f"{method} %"] = _pct(m.get("accuracy")) if isinstance(m, dict) else None
        per_task.append(r)
    return pd.DataFrame(summary), pd.DataFrame(per_task)


def _pct(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else 100.0 * x


def generated_accuracy(run: RunView) -> dict[str, float]:
    """Task -> accuracy of the run's generated adapter, from its evaluation reports."""
    out: dict[str, float] = {}
    for report in run.reports.values():
        for row in report.get("per_task") or []:
            m = (row.get("methods") or {}).get("generated")
            if isinstance(m, dict) and m.get("accuracy") is not None:
                out[str(row.get("task"))] = float(m["accuracy"])
    return out


# -- the delta cache ---------------------------------------------------------------------
@dataclass(frozen=True)
class DeltaView:
    """One (probe set, delta spec) slice of a cache: deltas in one slice are comparable."""

    probe_name: str
    probe_hash: str
    token_hash: str
    spec: str  # DeltaSpec as JSON
    spec_hash: str

    @property
    def label(self) -> str:
        return f"probes {self.probe_name} ({self.probe_hash[:8]}), spec {self.spec}"


@dataclass
class DeltaTable:
    """Deltas of one view, one row per adapter the world or a run names."""

    meta: pd.DataFrame  # TEACHER_COLUMNS + key
    deltas: np.ndarray  # [n, hidden] float32, row i = meta row i
    view: DeltaView
    views: list[DeltaView]  # every view the cache holds (the chosen one included)
    missing: list[str]  # world teachers with no delta in this view
    unmatched: int  # entries of this view that belong to no teacher or run adapter
    problems: list[str]  # damaged cache entries (moved aside by llgbm-delta), bad run deltas
    other_view: list[str] = field(default_factory=list)  # runs whose deltas are of another view

    @property
    def n_generated(self) -> int:
        return int((self.meta["source"] == "generated").sum())


def no_cache_message(cache_dir: Path, world: Path) -> str:
    return (
        f"{cache_dir}: no deltas in this delta cache; fill it with "
        f"`just compute-deltas --world {world}` (`just train delta_multi` does it too), or pick "
        "the cache your runs used in the sidebar (a run's config.yaml names it: delta.cache_dir)"
    )


def read_deltas(
    world: WorldView, cache_dir: Path, runs: list[RunView], view: int | None = None
) -> DeltaTable:
    """Teacher and generated deltas of ``world`` from the cache at ``cache_dir``.

    Cache entries name the adapter they were computed for (``adapter_name``: its path). An entry
    joins a world teacher when that path is the teacher's directory. A run's generated adapters
    come from its ``eval/deltas.safetensors`` (written by ``llgbm evaluate``) when their probes
    and spec are the view's; for a run without that file, from a cache entry whose path is
    ``runs/<name>/eval/adapters/<task>``. ``view`` picks a (probes, spec) slice by index into
    ``views``; default: the one holding the most teachers.
    """
    from llgbm_delta import CacheError, DeltaCache

    if not cache_dir.is_dir():
        raise ExplorerError(no_cache_message(cache_dir, world.root))
    cache = DeltaCache(cache_dir)
    try:
        entries = cache.entries()
    except CacheError as e:
        raise ExplorerError(str(e)) from None
    if not entries:
        raise ExplorerError(no_cache_message(cache_dir, world.root))

    rows_by_path: dict[str, dict] = {r["path"]: r for r in world.teachers.to_dict("records")}
    generated = generated_rows(world, runs)  # (run, row) of every generated adapter
    for run, row in generated:
        if not run.deltas:  # without the run's own deltas file, a cache entry may hold it
            rows_by_path[row["path"]] = row

    views: list[DeltaView] = []
    joined: dict[DeltaView, list[tuple[dict, str]]] = {}
    unmatched: dict[DeltaView, int] = {}
    for e in entries:
        v = DeltaView(e.probe_name, e.probe_hash, e.token_hash, e.spec, e.spec_hash)
        if v not in joined:
            views.append(v)
            joined[v], unmatched[v] = [], 0
        row = rows_by_path.get(str(Path(e.adapter_name).resolve()))
        if row is None:
            unmatched[v] += 1
        else:
            joined[v].append((row, e.key))
    if view is None:
        teachers_in = [sum(r["source"] != "generated" for r, _ in joined[v]) for v in views]
        chosen = views[int(np.argmax(teachers_in))]
    elif 0 <= view < len(views):
        chosen = views[view]
    else:
        raise ExplorerError(f"delta view {view}: the cache holds views 0..{len(views) - 1}")

    pairs = joined[chosen]
    # A teacher computed twice under two names is one adapter: keep its first entry.
    seen: set[str] = set()
    keep = []
    for row, key in pairs:
        if row["path"] not in seen:
            seen.add(row["path"])
            keep.append((row, key))
    deltas, rows = [], []
    for row, key in keep:
        d = cache.get(key)
        if d is not None:  # damaged since entries(): llgbm-delta moved it aside and reported it
            deltas.append(d)
            rows.append({**{c: row[c] for c in TEACHER_COLUMNS}, "key": key})
    hidden = int(entries[0].hidden_size)
    problems = [f"cache entry {k[:12]}: {why}" for k, why in cache.problems]
    other_view: list[str] = []
    for run, row in generated:
        d = run.deltas.get(row["task"])
        if d is None:
            continue
        h = run.deltas_header
        if (h["probe_hash"], h["spec_hash"]) != (chosen.probe_hash, chosen.spec_hash):
            if run.name not in other_view:
                other_view.append(run.name)
            continue
        if d.shape != (hidden,):
            problems.append(
                f"{run.name}: generated delta of {row['task']} is {d.shape}, not [{hidden}]"
            )
            continue
        deltas.append(d)
        rows.append({**{c: row[c] for c in TEACHER_COLUMNS}, "key": f"{run.name}/{row['task']}"})
    meta = pd.DataFrame(rows, columns=[*TEACHER_COLUMNS, "key"])
    rank = meta["source"].map({"teacher": 0, "mixture": 1, "generated": 2})
    order = meta.assign(rank=rank).sort_values(["rank", "family", "task", "adapter"]).index
    meta = meta.loc[order].reset_index(drop=True)
    x = np.stack(deltas)[np.asarray(order)] if deltas else np.zeros((0, hidden), np.float32)
    have = {row["path"] for row, _ in keep}
    missing = [r["adapter"] for r in world.teachers.to_dict("records") if r["path"] not in have]
    return DeltaTable(meta, x, chosen, views, missing, unmatched[chosen], problems, other_view)


def generated_rows(world: WorldView, runs: list[RunView]) -> list[tuple[RunView, dict]]:
    """(run, table row) of every generated adapter of a run of this world, by run and task."""
    out = []
    for run in runs:
        acc = generated_accuracy(run)
        for task in sorted({*run.adapters, *run.deltas}):
            t = world.tasks[world.tasks["name"] == task]
            if t.empty:  # a run of another world
                continue
            t = t.iloc[0]
            path = run.adapters.get(task, run.dir / "eval" / "adapters" / task)
            out.append(
                (
                    run,
                    {
                        "adapter": f"{run.name}/eval/adapters/{task}",
                        "source": "generated",
                        "task": task,
                        "family": t["family"],
                        "split": t["split"],
                        "heldout_kind": t["heldout_kind"],
                        "accuracy": acc.get(task, float("nan")),
                        "step": int(run.metrics["step"].max()) if "step" in run.metrics else 0,
                        "data_split": 0,
                        "run": run.name,
                        "path": str(path),
                    },
                )
            )
    return out
