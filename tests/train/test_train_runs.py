"""Run directories: atomic creation, metadata, metrics, checkpoints, resume equality."""

from __future__ import annotations

import json

import pytest
import torch
from llgbm_train.config import Config
from llgbm_train.runs import CheckpointWarning, Run, RunError, git_info, new_run_name


def test_create_writes_config_metadata_and_is_atomic(tmp_path):
    cfg = Config(name="r1")
    run = Run.create(tmp_path / "r1", cfg, {"git": git_info(), "world": {"hash": "abc"}})
    assert run.config() == cfg
    meta = run.metadata()
    assert meta["config_hash"] == cfg.hash and meta["world"]["hash"] == "abc"
    assert set(meta["git"]) == {"commit", "dirty"}
    assert [p.name for p in tmp_path.iterdir()] == ["r1"]  # no temp dir left
    with pytest.raises(RunError, match="run directory exists"):
        Run.create(tmp_path / "r1", cfg, {})


def test_failed_create_leaves_nothing(tmp_path):
    class Boom:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError):
        Run.create(tmp_path / "bad", Config(), {"x": Boom()})
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_rotate_and_check_config(tmp_path):
    cfg = Config()
    run = Run.create(tmp_path / "r", cfg, {})
    for step in (1, 2, 3):
        run.save_checkpoint(
            {"step": step, "config_hash": cfg.hash, "w": torch.ones(2) * step}, step, keep=2
        )
    assert [p.name for p in run.checkpoints()] == [
        "step_000002.safetensors",
        "step_000003.safetensors",
    ]
    state = run.load_checkpoint(cfg)
    assert state["step"] == 3 and torch.equal(state["w"], torch.full((2,), 3.0))
    other = cfg.override(["training.lr=0.5"])
    with pytest.raises(RunError, match="checkpoint was written by another config") as e:
        run.load_checkpoint(other)
    assert "\n" not in str(e.value)
    # A damaged newest checkpoint is skipped for the one before it, with a warning.
    (run.checkpoint_dir / "step_000009.safetensors").write_bytes(b"not a checkpoint")
    with pytest.warns(CheckpointWarning, match=r"step_000009.*unreadable checkpoint.*step_000003"):
        assert run.load_checkpoint(cfg)["step"] == 3
    with pytest.raises(RunError, match="unreadable checkpoint"):
        run.load_checkpoint(cfg, run.checkpoint_dir / "step_000009.safetensors")
    for p in run.checkpoints():
        p.write_bytes(p.read_bytes()[:-8])  # torn
    with pytest.raises(RunError, match=r"no intact checkpoint .* 3 damaged") as e:
        run.load_checkpoint(cfg)
    assert "\n" not in str(e.value)


def test_truncate_metrics_drops_steps_after_the_checkpoint(tmp_path):
    run = Run.create(tmp_path / "r", Config(), {})
    for s in range(1, 6):
        run.append_metrics({"step": s, "loss": 1.0 / s})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 6, "lo')  # the line a kill cut short
    run.truncate_metrics(3)
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    assert json.loads(run.metrics_path.read_text().splitlines()[-1])["step"] == 3


def test_new_run_name_never_reuses(tmp_path):
    assert new_run_name(tmp_path, "exp") == "exp"
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp-2").mkdir()
    assert new_run_name(tmp_path, "exp") == "exp-3"


def test_open_rejects_non_runs(tmp_path):
    with pytest.raises(RunError, match="not a run directory"):
        Run.open(tmp_path)
