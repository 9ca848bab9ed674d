"""Experiments: spec validation, the plan, and a resumable run on both test-preset world inits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from llgbm_train import experiment as X
from llgbm_train.cli import main
from llgbm_train.config import ConfigError, save_config
from train_world import small_config

REPO = Path(__file__).resolve().parents[2]


def _configs(tmp: Path, world: Path) -> Path:
    d = tmp / "configs"
    d.mkdir(exist_ok=True)
    for obj in ("baseline", "delta_multi"):
        cfg = small_config(world, tmp / "unused", f"training.objective={obj}", "training.steps=4")
        save_config(dataclasses.replace(cfg, name=None), d / f"{obj}.yaml")
    return d


def _spec(tmp: Path, world_dirs: dict[str, Path], **extra) -> Path:
    worlds = world_dirs
    body = {
        "name": "t",
        "objectives": ["baseline", "delta_multi"],
        "worlds": {k: [f"world.dir={v}"] for k, v in worlds.items()},
        "seeds": [0, 1],
        "overrides": ["eval.tasks=all", "eval.max_items=4", "eval.bootstrap=50"],
        "ablations": {
            "base": "delta_multi",
            "world": next(iter(worlds)),
            "variants": {"as_base": [], "high_lr": ["training.lr=1e-2"]},
        },
        "configs_dir": str(tmp / "configs"),
        "out": str(tmp / "out"),
        "report": str(tmp / "results.md"),
        "results": str(tmp / "results.json"),
        "n_boot": 100,
        **extra,
    }
    path = tmp / "spec.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"seeds": [0, 0]}, "experiment.seeds: must be distinct"),
        ({"objectives": []}, "must name at least one config"),
        ({"worlds": {"a/b": ["world.dir=x"]}}, "label 'a/b' must be"),
        ({"worlds": {"w": "world.dir=x"}}, "w: expected a list of key=value overrides"),
        ({"ablations": {"world": "nope", "variants": {"x": []}}}, "'nope' is not among the worlds"),
        ({"seedz": [1]}, "unknown key 'seedz' (did you mean 'seeds'?"),
        ({"ablations": {"seeds": [5], "variants": {"x": []}}}, "non-empty subset of seeds [0, 1]"),
    ],
)
def test_bad_specs_are_one_line(tmp_path, patch, needle):
    path = _spec(tmp_path, {"w": tmp_path / "w"}, **patch)
    with pytest.raises(ConfigError) as e:
        X.load_spec(str(path))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_plan_trains_equal_configs_once(test_world_dir, tmp_path):
    _configs(tmp_path, test_world_dir)
    spec, _ = X.load_spec(str(_spec(tmp_path, {"w": test_world_dir})))
    runs = X.plan(spec)
    # 2 objectives x 2 seeds, plus 1 ablation x 2 seeds; "as_base" restates delta_multi.
    assert [(r.label, r.seed) for r in runs] == [
        ("baseline", 0),
        ("baseline", 1),
        ("delta_multi", 0),
        ("delta_multi", 1),
        ("high_lr", 0),
        ("high_lr", 1),
    ]
    dm = [r for r in runs if r.label == "delta_multi"]
    assert all(r.aliases == [("w", "as_base")] for r in dm)
    assert [r.cfg.training.seed for r in dm] == [0, 1]
    assert runs[-1].cfg.training.lr == 1e-2 and runs[-1].cfg.training.objective == "delta_multi"
    assert runs[0].dir == tmp_path / "out" / "w" / "baseline-s0"
    assert all(r.cfg.eval.tasks == "all" for r in runs)
    assert X.runs_of(runs, "w", "as_base") == dm
    # Ablations may run on a subset of the seeds (a CPU budget); objectives keep all of them.
    path = _spec(
        tmp_path,
        {"w": test_world_dir},
        ablations={
            "base": "delta_multi",
            "seeds": [1],
            "variants": {"high_lr": ["training.lr=1e-2"]},
        },
    )
    spec, _ = X.load_spec(str(path))
    assert [(r.label, r.seed) for r in X.plan(spec)][-1:] == [("high_lr", 1)]
    assert len(X.plan(spec)) == 5 and spec.ablation_seeds == (1,)


def test_the_tiny_experiment_spec_plans():
    """configs/experiments/tiny.yaml: every objective, >= 3 seeds, both world inits, valid."""
    spec, _ = X.load_spec(str(REPO / "configs/experiments/tiny.yaml"))
    spec = dataclasses.replace(spec, configs_dir=str(REPO / "configs"))
    assert {"baseline", "delta_multi", "delta_only", "delta_retrieve"} <= set(spec.objectives)
    assert len(spec.seeds) >= 3 and set(spec.worlds) == {"shared", "independent"}
    runs = X.plan(spec)
    presets = {r.world: r.cfg.world.preset for r in runs}
    assert presets == {"shared": "default", "independent": "default-independent"}
    assert len({r.cfg.world.dir for r in runs}) == 2
    assert spec.ablation_world == "shared"
    assert all(r.cfg.eval.tasks == "all" for r in runs)
    assert {r.cfg.training.variant for r in runs if r.label == "delta_retrieve"} == {"b2"}


def test_the_smollm2_specs_are_one_recipe_on_two_inits():
    """smollm2.yaml and smollm2-independent.yaml plan the same runs but for the world's init."""
    plans = {}
    for name in ("smollm2", "smollm2-independent"):
        spec, _ = X.load_spec(str(REPO / f"configs/experiments/{name}.yaml"))
        spec = dataclasses.replace(spec, configs_dir=str(REPO / "configs"))
        assert len(spec.seeds) >= 3 and {"baseline", "delta_multi"} <= set(spec.objectives)
        plans[name] = X.plan(spec)
    shared, indep = plans["smollm2"], plans["smollm2-independent"]
    assert [(r.label, r.seed) for r in shared] == [(r.label, r.seed) for r in indep]
    assert {r.cfg.world.preset for r in indep} == {"default-independent"}
    assert {r.cfg.world.dir for r in shared}.isdisjoint({r.cfg.world.dir for r in indep})
    for a, b in zip(shared, indep):
        same = dataclasses.replace(b.cfg.world, dir=a.cfg.world.dir, preset=a.cfg.world.preset)
        assert dataclasses.replace(b.cfg, world=same, runs_dir=a.cfg.runs_dir) == a.cfg


def test_the_parametric_spec_is_the_tiny_shared_runs_on_the_parametric_world():
    """tiny-parametric.yaml changes only the world of tiny.yaml's shared-init main runs."""
    plans = {}
    for name in ("tiny", "tiny-parametric"):
        spec, _ = X.load_spec(str(REPO / f"configs/experiments/{name}.yaml"))
        spec = dataclasses.replace(spec, configs_dir=str(REPO / "configs"))
        main = set(spec.objectives)
        plans[name] = [r for r in X.plan(spec) if r.world == "shared" and r.label in main]
    tiny, par = plans["tiny"], plans["tiny-parametric"]
    assert [(r.label, r.seed) for r in tiny] == [(r.label, r.seed) for r in par]
    assert {r.cfg.world.preset for r in par} == {"parametric"}
    from llgbm_worlds.presets import get_preset

    assert get_preset("tiny", "parametric").model.parametric
    for a, b in zip(tiny, par):
        same = dataclasses.replace(b.cfg.world, dir=a.cfg.world.dir, preset=a.cfg.world.preset)
        assert dataclasses.replace(b.cfg, world=same, runs_dir=a.cfg.runs_dir) == a.cfg


@pytest.fixture(scope="module")
def independent_world_dir():
    from llgbm_worlds.testing import test_world

    return test_world(preset="test-independent")


@pytest.mark.slow
def test_experiment_resumes_and_aggregates(
    test_world_dir, independent_world_dir, tmp_path, monkeypatch, capsys
):
    from llgbm_train.trainer import train

    _configs(tmp_path, test_world_dir)
    worlds = {"shared": test_world_dir, "independent": independent_world_dir}
    spec_file = _spec(tmp_path, worlds)
    spec, _ = X.load_spec(str(spec_file))
    runs = X.plan(spec)
    assert len(runs) == 2 * 2 * 2 + 2  # objectives x seeds x worlds + the lr ablation's seeds
    # A run killed half-way through training (what --stop-after leaves: a resumable checkpoint).
    half = runs[1]
    train(half.cfg, half.dir, stop_after=2, progress=False)
    assert X.run_state(half) == "step 2"
    # The experiment is killed during its third run.
    calls, kill = [], [True]
    real = X.execute

    def killed(run, refs, *, progress):
        calls.append(run.dir)
        if len(calls) == 3 and kill and kill.pop():
            raise KeyboardInterrupt
        return real(run, refs, progress=progress)

    monkeypatch.setattr(X, "execute", killed)
    with pytest.raises(KeyboardInterrupt):
        X.run_experiment(spec, progress=False)
    assert not Path(spec.results).exists()
    done = [r for r in runs if X.run_state(r) == "done"]
    assert [r.dir for r in done] == calls[:2]
    stamps = {r.dir: (r.dir / "eval" / "report.json").stat().st_mtime_ns for r in done}
    # Rerun: the two finished runs are reused, the others (the half-trained one too) finish.
    calls.clear()
    results = X.run_experiment(spec, progress=False)
    assert sorted(calls) == sorted(r.dir for r in runs if r.dir not in stamps)
    assert all((d / "eval" / "report.json").stat().st_mtime_ns == t for d, t in stamps.items())
    steps = [json.loads(x)["step"] for x in (half.dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert all(X.run_state(r) == "done" for r in runs)
    # A third call trains and evaluates nothing.
    calls.clear()
    again = X.run_experiment(spec, progress=False)
    assert calls == [] and again["results"] == results["results"]

    # The aggregate is the runs' own reports, pooled over seeds.
    on_disk = json.loads(Path(spec.results).read_text())
    assert on_disk["results"] == results["results"] and on_disk["n_runs"] == len(runs)
    for world in worlds:
        entry = results["results"][world]["delta_multi"]
        reports = [
            json.loads((r.dir / "eval" / "report.json").read_text())
            for r in runs
            if (r.world, r.label) == (world, "delta_multi")
        ]
        for group in ("heldout", "seen"):
            gen = entry["groups"][group]["generated"]
            per_run = [rep["summary"][group]["generated"]["accuracy"] for rep in reports]
            assert gen["per_seed"] == pytest.approx(per_run)
            assert gen["accuracy"] == pytest.approx(np.mean(per_run))
            assert gen["n_seeds"] == 2 and gen["ci95"][0] <= gen["accuracy"] <= gen["ci95"][1]
            assert entry["groups"][group]["teacher"]["n_seeds"] == 1  # one reference per world
    assert (
        results["results"]["shared"]["as_base"]["runs"]
        == results["results"]["shared"]["delta_multi"]["runs"]
    )
    assert (
        "high_lr" in results["results"]["shared"]
        and "high_lr" not in results["results"]["independent"]
    )
    # Each world's content hash, from its runs: what the numbers were measured on.
    from llgbm_worlds import World

    for world, wdir in worlds.items():
        want = World.load(wdir).content_hash
        assert [want.startswith(h) for h in results["worlds"][world]["content_hash"]] == [True]
    # What the runs trained on, from their metadata (here: this machine, no GPU visible to it).
    import os

    import torch

    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    machine = (" + ".join(devices) or "CPU only") + f", {os.cpu_count()} CPUs"
    assert results["machines"] == [machine]
    md = Path(spec.report).read_text()
    for needle in (
        f"measured on {machine}.",
        f"content hash `{World.load(test_world_dir).content_hash[:12]}`",
        "## Honesty checks",
        "## World `shared`",
        "## World `independent`",
        "## Ablations",
        "| generated: **delta_multi** |",
        "| high_lr | `training.lr=1e-2` |",
        "nearest teacher",
    ):
        assert needle in md
    # The CLI: --plan lists every run as done; a changed spec is refused, not silently mixed.
    assert main(["experiment", str(spec_file), "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.count("done") == len(runs) and f"{len(runs)} runs" in out
    assert main(["experiment", str(spec_file), "training.lr=5e-3"]) == 2
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert err.startswith("error: ") and "made by another config" in err


def test_parallel_jobs_finish_every_run_once(test_world_dir, tmp_path, monkeypatch):
    """--jobs 2: the world's references are scored first, then every run trains in one of two
    worker processes; every run is done, and a sequential rerun reuses them all."""
    _configs(tmp_path, test_world_dir)
    spec_file = _spec(tmp_path, {"shared": test_world_dir}, objectives=["delta_multi"])
    spec, _ = X.load_spec(str(spec_file))
    runs = X.plan(spec)
    assert len(runs) == 4  # delta_multi and high_lr, two seeds each
    with pytest.raises(X.ExperimentError, match="--jobs"):
        X.run_experiment(spec, progress=False, jobs=0)
    results = X.run_experiment(spec, progress=False, jobs=2)
    assert results["jobs"] == 2 and results["n_runs"] == len(runs)
    assert all(X.run_state(r) == "done" for r in runs)
    refs = json.loads((spec.out_dir / "shared" / "references.json").read_text())
    assert len(refs) == 1  # scored before the runs, read by the workers (none added a key)
    report = json.loads((runs[0].dir / "eval" / "report.json").read_text())
    assert report["reference_key"] in refs
    timings = json.loads((spec.out_dir / "timings.json").read_text())
    assert sorted(timings) == sorted(str(r.dir) for r in runs)
    calls = []
    monkeypatch.setattr(X, "execute", lambda *a, **k: calls.append(a) or None)
    again = X.run_experiment(spec, progress=False)
    assert calls == [] and again["results"] == results["results"]


def test_unknown_experiment_is_one_line(capsys):
    assert main(["experiment", "nope"]) == 2
    assert (
        capsys.readouterr().err
        == "error: configs/experiments/nope.yaml: experiment spec not found\n"
    )


def test_behaviour_caches_are_filled_once_per_recipe_before_parallel_runs(test_world_dir, tmp_path):
    """warm_runs: the first run of each behaviour recipe per world; none for runs without one."""
    _configs(tmp_path, test_world_dir)
    kl = ["training.lambda_kl=1.0", "behaviour.n_probes=4"]
    variants = {
        "kl": kl,
        "kl_lr": [*kl, "training.lr=1e-2"],
        "kl_last": [*kl, "behaviour.positions=last"],
    }
    spec_file = _spec(
        tmp_path,
        {"a": test_world_dir, "b": test_world_dir},
        ablations={"base": "delta_multi", "world": "a", "variants": variants},
    )
    spec, _ = X.load_spec(str(spec_file))
    runs = X.plan(spec)
    warm = X.warm_runs(runs)
    # kl and kl_lr share a behaviour section (one warm-up); kl_last differs; the plain
    # objectives use no behaviour targets.
    assert sorted(r.label for r in warm) == ["kl", "kl_last"]
    assert all(r.world == "a" and r.seed == 0 for r in warm)
    assert X.warm_runs([r for r in runs if not r.cfg.uses_behaviour]) == []
    # A recipe whose run was already set up (for the references) is not set up again.
    kl = next(r for r in warm if r.label == "kl")
    assert [r.label for r in X.warm_runs(runs, [kl])] == ["kl_last"]
