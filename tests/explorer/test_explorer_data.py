"""Readers against a real test-preset world, its delta cache and two real runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from llgbm_explorer import data
from llgbm_explorer.folders import ExplorerError


@pytest.fixture(scope="module")
def world(demo):
    return data.read_world(demo.world)


@pytest.fixture(scope="module")
def runs(demo):
    runs, bad = data.read_runs(demo.runs)
    assert bad == []
    return runs


def test_world_tables_match_world_json(demo, world):
    from llgbm_worlds import World

    w = World.load(demo.world)
    assert list(world.tasks["name"]) == [t.name for t in w.tasks]
    assert len(world.teachers) == len(w.teachers)
    assert set(world.teachers["source"]) == {"teacher", "mixture"}
    mix = world.teachers[world.teachers["source"] == "mixture"]
    assert set(mix["family"]) == {"mixture"}


def test_missing_world_is_one_line_with_the_fix(tmp_path):
    with pytest.raises(ExplorerError, match="llgbm world build tiny") as e:
        data.read_world(tmp_path / "nowhere")
    assert "\n" not in str(e.value)


def test_runs_metrics_reports_and_adapters(demo, runs):
    by = {r.name: r for r in runs}
    assert set(by) == {"t", "t-baseline"}
    assert by["t"].objective == "delta_multi" and by["t-baseline"].objective == "baseline"
    assert list(by["t"].metrics["step"]) == [1, 2, 3, 4, 5, 6]
    assert "loss_w_baseline" in by["t"].metrics
    assert set(by["t"].reports) == {"report"} and set(by["t-baseline"].reports) == {"report"}
    assert set(by["t-baseline"].adapters) > set(by["t"].adapters)  # all tasks vs held-out ones
    summary, per_task = data.report_tables(by["t"].reports["report"])
    methods = {"base", "mean_teachers", "nearest_teacher", "teacher", "generated"}
    assert set(summary["method"]) == methods
    assert len(per_task) == by["t"].reports["report"]["n_tasks"]


def test_a_damaged_run_is_named_not_fatal(demo, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(
        demo.runs / "t", runs / "t", ignore=shutil.ignore_patterns("checkpoints", "adapters")
    )
    with open(runs / "t" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "loss"')  # a line cut by a kill
    (runs / "t" / "eval" / "report.json").write_text("{not json")
    (runs / "empty").mkdir()  # no config.yaml: not a run, skipped
    found, bad = data.read_runs(runs)
    assert [r.name for r in found] == ["t"] and bad == []
    problems = " | ".join(found[0].problems)
    assert "metrics.jsonl: a line is not JSON" in problems and "report.json: unreadable" in problems


def test_deltas_join_teachers_and_generated_adapters(demo, world, runs):
    """Teachers from the cache, generated adapters from each run's eval/deltas.safetensors."""
    from llgbm_delta import DeltaCache

    table = data.read_deltas(world, demo.cache, runs)
    cache = DeltaCache(demo.cache)
    assert len(table.meta) == len(table.deltas) > 0
    by_run = {r.name: r for r in runs}
    for i, row in table.meta.iterrows():
        if row["source"] == "generated":
            want = by_run[row["run"]].deltas[row["task"]]
        else:
            want = cache.get(row["key"])  # row i is entry key i
        assert np.array_equal(table.deltas[i], want)
    gen = table.meta[table.meta["source"] == "generated"]
    expected = {(r.name, t) for r in runs for t in r.adapters}
    assert len(expected) > 0 and set(zip(gen["run"], gen["task"])) == expected
    assert table.other_view == [] and table.problems == []
    # Training and evaluation cached every train teacher: the map holds them all.
    train = world.teachers[
        (world.teachers["source"] == "teacher") & (world.teachers["split"] == "train")
    ]
    assert set(train["adapter"]) <= set(table.meta["adapter"])
    assert set(table.missing) == set(world.teachers["adapter"]) - set(table.meta["adapter"])
    acc = data.generated_accuracy({r.name: r for r in runs}["t"])
    row = gen[gen["run"] == "t"].iloc[0]
    assert row["accuracy"] == pytest.approx(acc[row["task"]])


def test_empty_or_absent_cache_says_how_to_fill_it(demo, world, tmp_path):
    for cache in (tmp_path / "absent", tmp_path):
        with pytest.raises(ExplorerError, match="just compute-deltas --world"):
            data.read_deltas(world, cache, [])


def test_a_cache_of_another_view_is_offered_separately(demo, world, runs, tmp_path):
    """Entries of a second probe set form their own view; the default view holds the teachers."""
    from llgbm_delta import DeltaCache

    cache = tmp_path / "cache"
    shutil.copytree(demo.cache, cache)
    c = DeltaCache(cache)
    e = c.entries()[0]
    meta = {
        "base_fingerprint": e.base_fingerprint,
        "probe_hash": "f" * 64,
        "probe_name": "other",
        "token_hash": e.token_hash,
        "spec": json.loads(e.spec),
        "spec_hash": e.spec_hash,
        "adapter_hash": e.adapter_hash,
        "adapter_name": e.adapter_name,
    }
    c.put(meta, np.ones(e.hidden_size, np.float32))
    table = data.read_deltas(world, cache, runs)
    assert len(table.views) == 2 and table.view.probe_name == e.probe_name
    other = data.read_deltas(
        world, cache, runs, view=[v.probe_name for v in table.views].index("other")
    )
    assert len(other.meta) == 1 and np.all(other.deltas == 1)


def test_a_run_without_its_deltas_file_is_joined_through_the_cache(demo, world, tmp_path):
    """An older run (no eval/deltas.safetensors): llgbm-delta compute puts its adapters in the
    cache, and the map joins those entries by path."""
    from llgbm_delta.cli import main as delta_main

    runs = tmp_path / "runs"
    shutil.copytree(demo.runs / "t", runs / "t", ignore=shutil.ignore_patterns("checkpoints"))
    (runs / "t" / "eval" / data.GENERATED_DELTAS).unlink()
    cache = tmp_path / "cache"
    shutil.copytree(demo.cache, cache)
    found, _ = data.read_runs(runs)
    assert found[0].deltas == {}
    assert data.read_deltas(world, cache, found).n_generated == 0
    adapters = runs / "t" / "eval" / "adapters"
    argv = ["compute", "--base", str(world.root / "base"), "--adapters", str(adapters)]
    assert delta_main([*argv, "--cache", str(cache), "--no-progress"]) == 0
    table = data.read_deltas(world, cache, found)
    assert table.n_generated == len(found[0].adapters) > 0
    # The same adapters' deltas as the run's own file holds (llgbm evaluate computed those).
    own = {r.name: r for r in data.read_runs(demo.runs)[0]}["t"].deltas
    gen = table.meta[table.meta["source"] == "generated"]
    for i, task in zip(gen.index, gen["task"]):
        np.testing.assert_allclose(table.deltas[i], own[task], rtol=1e-4, atol=1e-5)


def test_generated_deltas_of_another_view_or_damaged_are_named(demo, world, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(demo.runs / "t", runs / "t", ignore=shutil.ignore_patterns("checkpoints"))
    path = runs / "t" / "eval" / data.GENERATED_DELTAS
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(path), "np") as f:
        header = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**header, "probe_hash": "0" * 64})
    found, _ = data.read_runs(runs)
    table = data.read_deltas(world, demo.cache, found)
    assert table.n_generated == 0 and table.other_view == ["t"]
    path.write_bytes(path.read_bytes()[:100])  # truncated
    found, _ = data.read_runs(runs)
    assert found[0].deltas == {}
    assert any("deltas.safetensors: unreadable" in p for p in found[0].problems)
