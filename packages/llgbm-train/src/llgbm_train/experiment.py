"""Experiments: objective configs x generator seeds x worlds (+ ablations), resumable, one report.

    llgbm experiment tiny                 # configs/experiments/tiny.yaml -> docs/results.{md,json}
    results = run_experiment(load_spec("configs/experiments/tiny.yaml"))

A spec (YAML, typed and validated like a config) names the objective configs (files in
``configs_dir``), the seeds (``training.seed``), the worlds (each a list of dotted overrides, e.g.
``world.dir=worlds/tiny-shared``), overrides applied to every run, and ablations: named override
lists applied to ``ablations.base`` on one world. Runs whose final configs are equal are trained
once (an ablation that restates the base is the base's run).

Every run lives in ``out/<world>/<label>-s<seed>/``, a normal run directory. A run whose eval
report is complete (final checkpoint, every task, this eval config) is reused; a run killed during
training is resumed from its newest checkpoint; one killed during evaluation is re-evaluated. The
generator-independent results (base, oracle, mean of teachers, nearest teacher) are computed once
per world and evaluation setting and kept in ``out/<world>/references.json``. The results are
aggregated over seeds (bootstrap: seeds, then items; ``llgbm_train.stats``) into ``results`` (JSON)
and ``report`` (Markdown, ``llgbm_train.results_doc``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llgbm_train.config import Config, ConfigError, _build, atomic_write_text, load_config
from llgbm_train.evaluate import EVAL_DIR, GROUPS, METHODS, REFERENCE_METHODS, REPORT, in_group
from llgbm_train.evaluate import FORMAT as EVAL_FORMAT
from llgbm_train.stats import bootstrap_accuracy, unbits

FORMAT = "llgbm-experiment/1"
_STEP = re.compile(r"^step_(\d+)\.")


class ExperimentError(ValueError):
    """A spec is wrong or a stored run does not belong to it; one-line message."""


@dataclass(frozen=True)
class AblationSpec:
    base: str = "delta_multi"  # objective config the ablations modify
    world: str | None = None  # world label they run on (None: the first world)
    variants: dict[str, Any] = field(default_factory=dict)  # label -> list of dotted overrides
    # Generator seeds of the ablations (None: the spec's seeds; a subset keeps a CPU budget).
    seeds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ExperimentSpec:
    name: str  # experiment name (titles, default out dir)
    objectives: tuple[str, ...]  # config names in configs_dir (or paths to .yaml files)
    worlds: dict[str, Any]  # world label -> list of dotted overrides selecting that world
    seeds: tuple[int, ...] = (0, 1, 2)  # generator seeds (training.seed)
    overrides: tuple[str, ...] = ()  # dotted overrides applied to every run
    ablations: AblationSpec = field(default_factory=AblationSpec)
    configs_dir: str = "configs"  # where objective names are looked up
    out: str | None = None  # run directories (None: runs/experiments/<name>)
    report: str = "docs/results.md"  # the Markdown report written at the end
    results: str = "docs/results.json"  # the machine-readable results
    discussion: str | None = None  # hand-written Markdown appended to the report (None: none)
    n_boot: int = 1000  # bootstrap draws for the 95% intervals
    budget_minutes: float | None = None  # the wall-clock target, stated in the report

    def __post_init__(self) -> None:
        if not self.objectives:
            raise ConfigError("experiment.objectives: must name at least one config")
        if not self.worlds:
            raise ConfigError("experiment.worlds: must name at least one world")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"experiment.seeds: must be distinct, got {list(self.seeds)}")
        for label, ov in {**self.worlds, **self.ablations.variants}.items():
            _check_label(label)
            if not isinstance(ov, list | tuple) or not all(isinstance(x, str) for x in ov):
                raise ConfigError(f"experiment: {label}: expected a list of key=value overrides")
        for o in self.objectives:
            _check_label(Path(o).stem)
        extra = set(self.ablations.seeds or ()) - set(self.seeds)
        if self.ablations.seeds is not None and (not self.ablations.seeds or extra):
            raise ConfigError(
                f"experiment.ablations.seeds: must be a non-empty subset of seeds {list(self.seeds)}"
            )
        if self.ablations.variants:
            w = self.ablations.world
            if w is not None and w not in self.worlds:
                raise ConfigError(f"experiment.ablations.world: {w!r} is not among the worlds")
        if self.n_boot < 10:
            raise ConfigError("experiment.n_boot: must be >= 10")

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/experiments/{self.name}")

    @property
    def ablation_seeds(self) -> tuple[int, ...]:
        return tuple(self.ablations.seeds) if self.ablations.seeds is not None else self.seeds

    @property
    def ablation_world(self) -> str:
        return self.ablations.world or next(iter(self.worlds))


def _check_label(label: str) -> None:
    ok = label and all(c.isalnum() or c in "-_." for c in label) and label not in (".", "..")
    if not ok:
        raise ConfigError(f"experiment: label {label!r} must be letters, digits, '-', '_', '.'")


def load_spec(name_or_path: str, overrides: tuple[str, ...] = ()) -> tuple[ExperimentSpec, Path]:
    """A spec by name (``configs/experiments/<name>.yaml``) or path; overrides join its own."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = Path("configs/experiments") / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ExperimentError(f"{path}: experiment spec not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    spec = _build(ExperimentSpec, data, prefix="", source=str(path))
    if overrides:
        spec = dataclasses.replace(spec, overrides=(*spec.overrides, *overrides))
    return spec, path


# the plan ----------------------------------------------------------------------------------------
@dataclass
class PlannedRun:
    world: str  # world label
    label: str  # objective or ablation label
    seed: int
    cfg: Config
    dir: Path
    aliases: list[tuple[str, str]] = field(default_factory=list)  # (world, label) sharing it


def _objective_path(spec: ExperimentSpec, name: str) -> Path:
    return Path(name) if name.endswith(".yaml") else Path(spec.configs_dir) / f"{name}.yaml"


def plan(spec: ExperimentSpec) -> list[PlannedRun]:
    """Every (world, label, seed) of the spec; equal final configs share one run."""
    # world, label, objective, overrides, seeds
    wanted: list[tuple[str, str, str, tuple[str, ...], tuple[int, ...]]] = []
    for world in spec.worlds:
        for obj in spec.objectives:
            wanted.append((world, Path(obj).stem, obj, (), spec.seeds))
    for label, ov in spec.ablations.variants.items():
        wanted.append(
            (spec.ablation_world, label, spec.ablations.base, tuple(ov), spec.ablation_seeds)
        )
    runs: dict[tuple[str, str, int], PlannedRun] = {}
    out: list[PlannedRun] = []
    labels_seen: set[tuple[str, str]] = set()
    for world, label, obj, extra, seeds in wanted:
        if (world, label) in labels_seen:
            raise ConfigError(f"experiment: label {label!r} is used twice on world {world!r}")
        labels_seen.add((world, label))
        path = _objective_path(spec, obj)
        for seed in seeds:
            ov = [*spec.worlds[world], *spec.overrides, *extra, f"training.seed={seed}"]
            cfg = load_config(path, ov)
            cfg = dataclasses.replace(cfg, name=f"{label}-s{seed}", runs_dir=str(spec.out_dir))
            key = (world, cfg.hash, seed)
            if key in runs:
                runs[key].aliases.append((world, label))
                continue
            run = PlannedRun(world, label, seed, cfg, spec.out_dir / world / f"{label}-s{seed}")
            runs[key] = run
            out.append(run)
    return out


def runs_of(planned: list[PlannedRun], world: str, label: str) -> list[PlannedRun]:
    return [
        r for r in planned if (r.world, r.label) == (world, label) or (world, label) in r.aliases
    ]


# running -----------------------------------------------------------------------------------------
def _check_owner(run: PlannedRun) -> None:
    """A stored run must have been made by this run's config (never silently mixed in)."""
    from llgbm_train.runs import Run

    if not (run.dir / "config.yaml").is_file():
        return
    have = Run.open(run.dir).config().hash
    if have != run.cfg.hash:
        raise ExperimentError(
            f"{run.dir}: made by another config (hash {have}, the spec's {run.cfg.hash}); "
            "remove it or give the experiment another out directory"
        )


def _finished_report(run: PlannedRun) -> dict[str, Any] | None:
    """The run's eval report if it is complete for this config, else None."""
    _check_owner(run)
    path = run.dir / EVAL_DIR / REPORT
    if not path.is_file() or not (run.dir / "config.yaml").is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    ok = (
        report.get("format") == EVAL_FORMAT
        and report.get("tasks_evaluated") == "all"
        and report.get("checkpoint", {}).get("step") == run.cfg.training.steps
        and report.get("eval_config") == dataclasses.asdict(run.cfg.eval)
    )
    return report if ok else None


def run_state(run: PlannedRun) -> str:
    """done | trained | step K | new (what a rerun will do with it)."""
    if _finished_report(run) is not None:
        return "done"
    ckpts = []
    if (run.dir / "checkpoints").is_dir():
        ckpts = [
            int(m.group(1))
            for p in (run.dir / "checkpoints").iterdir()
            if (m := _STEP.search(p.name))
        ]
    if not ckpts:
        return "started" if (run.dir / "config.yaml").is_file() else "new"
    step = max(ckpts)
    return "trained" if step == run.cfg.training.steps else f"step {step}"


def _train_seconds(run_dir: Path) -> float:
    p = run_dir / "timing.jsonl"
    if not p.is_file():
        return 0.0
    total = 0.0
    for line in p.read_text().splitlines():
        try:
            total += float(json.loads(line).get("seconds", 0.0))
        except (json.JSONDecodeError, ValueError, AttributeError):
            continue
    return total


def execute(run: PlannedRun, references: dict, *, progress: bool) -> tuple[dict, dict]:
    """Train (or resume) and evaluate one planned run; (its eval report, wall seconds)."""
    from llgbm_train.evaluate import evaluate, load_trained
    from llgbm_train.runs import Run
    from llgbm_train.trainer import prepare, train

    t0 = time.perf_counter()
    steps = run.cfg.training.steps
    setup = generator = None
    _check_owner(run)
    if (run.dir / "config.yaml").is_file():
        existing = Run.open(run.dir)
        if existing.checkpoints():
            setup = prepare(run.cfg, progress=progress)
            generator, step = load_trained(existing, setup)
            if step != steps:
                setup = generator = None
        if setup is None:
            result = train(run.cfg, run.dir, resume=True, progress=progress)
            setup, generator = result.setup, result.generator
    else:
        result = train(run.cfg, run.dir, progress=progress)
        setup, generator = result.setup, result.generator
    t1 = time.perf_counter()
    report = evaluate(
        setup,
        generator,
        out_dir=run.dir,
        tasks="all",
        checkpoint={"step": steps, "steps": steps},
        references=references,
        progress=progress,
    )
    return report, {"prepare_train_s": t1 - t0, "eval_s": time.perf_counter() - t1}


def _references(run: PlannedRun, progress: bool) -> tuple[str, dict]:
    """(key, results) of the generator-independent methods on ``run``'s evaluation."""
    import torch

    from llgbm_train.evaluate import references_of
    from llgbm_train.trainer import prepare

    out = references_of(prepare(run.cfg, progress=progress), "all")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _behaviour_recipe(run: PlannedRun) -> tuple[str, str]:
    return run.world, json.dumps(dataclasses.asdict(run.cfg.behaviour), default=str)


def warm_runs(runs: list[PlannedRun], prepared: list[PlannedRun] = ()) -> list[PlannedRun]:
    """The first run of each (world, behaviour section) among runs that use behaviour targets,
    leaving out recipes that a run in ``prepared`` (already set up) has filled."""
    seen = {_behaviour_recipe(r) for r in prepared if r.cfg.uses_behaviour}
    out = []
    for run in runs:
        sig = _behaviour_recipe(run)
        if run.cfg.uses_behaviour and sig not in seen:
            seen.add(sig)
            out.append(run)
    return out


def _warm(run: PlannedRun, progress: bool) -> None:
    """Prepare ``run`` once, for the caches it fills (teacher deltas, behaviour targets)."""
    import torch

    from llgbm_train.trainer import prepare

    prepare(run.cfg, progress=progress)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the workers need the memory, not this process


def _load_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return {}  # a cache: recomputed when unreadable


def _worker(run: PlannedRun, references: dict, threads: int) -> tuple[dict, dict, dict]:
    """One planned run in a worker process: (report, wall seconds, references it filled)."""
    import torch

    torch.set_num_threads(threads)
    refs = dict(references)
    report, wall = execute(run, refs, progress=False)
    return report, wall, refs


def run_experiment(
    spec: ExperimentSpec, *, progress: bool = True, source: str | None = None, jobs: int = 1
) -> dict[str, Any]:
    """Run (or reuse) every planned run, then write ``spec.results`` and ``spec.report``.

    ``jobs`` > 1 trains that many runs at once, each in its own process (CPU threads split
    between them; on a GPU, several small runs share the device). The reference results of each
    world (base, oracle, ...; they do not depend on the generator) are scored first, once, and
    shared by its runs (cached in ``OUT/<world>/references.json``).
    """
    import os

    from tqdm.auto import tqdm

    if jobs < 1:
        raise ExperimentError(f"--jobs: {jobs} must be >= 1")
    planned = plan(spec)
    t0 = time.perf_counter()
    timings = _load_json(spec.out_dir / "timings.json")
    refs = {w: _load_json(spec.out_dir / w / "references.json") for w in spec.worlds}
    reports: dict[Path, dict] = {}
    bar = tqdm(total=len(planned), desc=f"experiment {spec.name}", unit="run", disable=not progress)

    def record(run: PlannedRun, report: dict, wall: dict, new_refs: dict) -> None:
        # train_s: the optimiser steps of every session of the run (timing.jsonl); the wall
        # times: this session's, world loading and reference scoring included.
        timings[str(run.dir)] = {"train_s": _train_seconds(run.dir), **wall}
        atomic_write_text(spec.out_dir / "timings.json", json.dumps(timings, indent=1))
        if any(k not in refs[run.world] for k in new_refs):
            refs[run.world].update(new_refs)
            atomic_write_text(
                spec.out_dir / run.world / "references.json", json.dumps(refs[run.world])
            )
        reports[run.dir] = report
        bar.update(1)

    try:
        todo = []
        for run in planned:
            report = _finished_report(run)
            if report is None:
                todo.append(run)
            else:
                reports[run.dir] = report
                bar.update(1)
        if jobs > 1:  # references of worlds that have none cached, before the runs start
            prepared = []
            for w in spec.worlds:
                run = next((r for r in todo if r.world == w), None)
                if run is not None and not refs[w]:
                    bar.set_postfix_str(f"{w}: references")
                    key, scored = _references(run, progress)
                    prepared.append(run)
                    refs[w][key] = scored
                    atomic_write_text(spec.out_dir / w / "references.json", json.dumps(refs[w]))
            # Fill the world's behaviour cache once per behaviour recipe, so the workers read
            # it instead of each computing every teacher's targets at the same time.
            for run in warm_runs(todo, prepared):
                bar.set_postfix_str(f"{run.world}: behaviour targets")
                _warm(run, progress)
        rest = todo if jobs > 1 else []
        for run in [] if jobs > 1 else todo:
            bar.set_postfix_str(f"{run.world}/{run.label} seed {run.seed}")
            filled = dict(refs[run.world])
            report, wall = execute(run, filled, progress=progress)
            record(run, report, wall, filled)
        if jobs > 1 and rest:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            threads = max(1, (os.cpu_count() or 1) // jobs)
            with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
                futs = {pool.submit(_worker, r, refs[r.world], threads): r for r in rest}
                for fut in as_completed(futs):
                    run = futs[fut]
                    report, wall, filled = fut.result()
                    bar.set_postfix_str(f"done {run.world}/{run.label} seed {run.seed}")
                    record(run, report, wall, filled)
    finally:
        bar.close()
    results = aggregate(spec, planned, reports, timings)
    results["wall_s_this_call"] = time.perf_counter() - t0
    results["jobs"] = jobs
    results["spec_file"] = source
    from llgbm_train.results_doc import results_markdown

    atomic_write_text(Path(spec.results), json.dumps(results, indent=1) + "\n")
    atomic_write_text(Path(spec.report), results_markdown(results, spec))
    return results


# aggregation -------------------------------------------------------------------------------------
def _method_groups(reports: list[dict], method: str, group: str) -> tuple[list[np.ndarray], int]:
    """Per task of ``group``: correct [n_seeds, n_items] of ``method``; and the seed count.

    Reference methods give the same items under every seed (one reference key): one row.
    """
    same_refs = len({r.get("reference_key") for r in reports}) == 1
    use = reports[:1] if method in REFERENCE_METHODS and same_refs else reports
    tasks = [row["task"] for row in use[0]["per_task"] if in_group(row, group)]
    mats = []
    for task in tasks:
        rows = [next(x for x in r["per_task"] if x["task"] == task) for r in use]
        res = [row["methods"].get(method) for row in rows]
        if any(x is None for x in res):
            continue
        mats.append(np.stack([unbits(x["correct"]) for x in res]))
    return mats, len(use)


def _cell(reports: list[dict], method: str, group: str, n_boot: int) -> dict[str, Any] | None:
    mats, n_seeds = _method_groups(reports, method, group)
    if not mats:
        return None
    acc, lo, hi = bootstrap_accuracy(mats, n_boot=n_boot, seed=0)
    per_seed, coss = [], []
    use = reports[:n_seeds]
    for r in use:
        rows = [x for x in r["per_task"] if in_group(x, group) and x["methods"].get(method)]
        hits = [unbits(x["methods"][method]["correct"]) for x in rows]
        per_seed.append(float(np.concatenate(hits).mean()))
        coss += [x["methods"][method]["delta_cos"] for x in rows]
    coss = [c for c in coss if c is not None]
    return {
        "accuracy": acc,
        "ci95": [lo, hi],
        "per_seed": per_seed,
        "n_seeds": n_seeds,
        "n_tasks": len(mats),
        "n_items": int(sum(m.shape[1] for m in mats)),
        "delta_cos": float(np.mean(coss)) if coss else None,
    }


def _per_task(reports: list[dict]) -> dict[str, Any]:
    out = {}
    for row in reports[0]["per_task"]:
        task = row["task"]
        rows = [next(x for x in r["per_task"] if x["task"] == task) for r in reports]
        entry: dict[str, Any] = {
            "kind": row["kind"],
            "split": row["split"],
            "nearest": (row.get("nearest") or {}).get("task"),
        }
        for m in METHODS:
            res = [x["methods"].get(m) for x in rows]
            if any(x is None for x in res):
                entry[m] = None
                continue
            entry[m] = {
                "accuracy": float(np.mean([x["accuracy"] for x in res])),
                "per_seed": [x["accuracy"] for x in res],
                "delta_cos": None
                if any(x["delta_cos"] is None for x in res)
                else float(np.mean([x["delta_cos"] for x in res])),
            }
        out[task] = entry
    return out


def _checks(reports: list[dict]) -> dict[str, Any]:
    tw = [r["checks"]["teacher_vs_world"] for r in reports]
    diffs = [t["max_abs_diff"] for t in tw if t["max_abs_diff"] is not None]
    return {
        "runs": len(reports),
        "heldout_tasks_in_training": sum(r["checks"]["heldout_tasks_in_training"] for r in reports),
        "condition_prompts_in_scored_items": sum(
            r["checks"]["condition_prompts_in_scored_items"] for r in reports
        ),
        "teacher_vs_world_max_abs_diff": max(diffs) if diffs else None,
        "teacher_vs_world_tasks": max((t["n_compared"] for t in tw), default=0),
    }


def aggregate(spec: ExperimentSpec, planned: list[PlannedRun], reports: dict, timings: dict):
    """results.json's content: per world and label, every group x method over seeds."""
    from llgbm_train.runs import git_info

    labels: list[tuple[str, str, str]] = []  # world, label, role
    for world in spec.worlds:
        labels += [(world, Path(o).stem, "objective") for o in spec.objectives]
    labels += [(spec.ablation_world, lab, "ablation") for lab in spec.ablations.variants]
    table: dict[str, dict[str, Any]] = {w: {} for w in spec.worlds}
    for world, label, role in labels:
        runs = sorted(runs_of(planned, world, label), key=lambda r: r.seed)
        reps = [reports[r.dir] for r in runs]
        groups = {}
        for g in GROUPS:
            cells = {m: c for m in METHODS if (c := _cell(reps, m, g, spec.n_boot)) is not None}
            if cells:
                groups[g] = cells
        first = runs[0].cfg
        table[world][label] = {
            "role": role,
            "objective": first.training.objective,
            "variant": first.training.variant if first.training.objective == "delta_only" else None,
            "overrides": list(spec.ablations.variants.get(label, []) if role == "ablation" else []),
            "seeds": [r.seed for r in runs],
            "runs": [str(r.dir) for r in runs],
            "config_hash": sorted({r.cfg.hash for r in runs}),
            "steps": first.training.steps,
            "groups": groups,
            "per_task": _per_task(reps),
            "checks": _checks(reps),
        }
    mine = [timings[str(r.dir)] for r in planned if str(r.dir) in timings]
    total = {
        k: sum(float(v.get(k, 0.0)) for v in mine) for k in ("train_s", "prepare_train_s", "eval_s")
    }
    first_cfg = planned[0].cfg
    return {
        "format": FORMAT,
        "name": spec.name,
        "git": git_info(),
        "spec": _plain(dataclasses.asdict(spec)),
        "eval": dataclasses.asdict(first_cfg.eval),
        "interval": (
            "95% percentile bootstrap: seeds resampled, then each task's items (one item draw "
            "shared by the drawn seeds); tasks fixed"
        ),
        "n_runs": len(planned),
        "worlds": {
            w: {
                "overrides": list(ov),
                "dir": next(r.cfg.world.dir for r in planned if r.world == w),
                "content_hash": _world_hashes([r for r in planned if r.world == w]),
            }
            for w, ov in spec.worlds.items()
        },
        "timing": {**total, "runs": {str(r.dir): timings.get(str(r.dir)) for r in planned}},
        "machines": _machines(planned),
        "results": table,
    }


def _metadata(run: PlannedRun) -> dict:
    """The run's metadata.json, or {} when it is missing or unreadable (a run without one
    contributes nothing to what is read from it)."""
    try:
        meta = json.loads((run.dir / "metadata.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _machines(runs: list[PlannedRun]) -> list[str]:
    """What the runs trained on, from their metadata.json (sorted, one entry per distinct
    machine): the accelerators, or "CPU only", and the host's CPU count where recorded."""
    found = set()
    for r in runs:
        env = _metadata(r).get("environment")
        if not isinstance(env, dict):
            continue
        devices = env.get("devices") or []
        what = " + ".join(devices) if devices else "CPU only"
        if env.get("cpus"):
            what += f", {env['cpus']} CPUs"
        found.add(what)
    return sorted(found)


def _world_hashes(runs: list[PlannedRun]) -> list[str]:
    """The world content hashes the runs trained on (their metadata.json), sorted: one entry
    when the world stayed the same through the experiment, more when it was rebuilt between runs
    (a rebuild with the same seed and recipe can differ in float rounding, and so in results)."""
    found = set()
    for r in runs:
        world = _metadata(r).get("world")
        if isinstance(world, dict) and "hash" in world:
            found.add(str(world["hash"]))
    return sorted(found)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj
