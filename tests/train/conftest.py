"""Fixtures for the training tests: a minimal world (built once per session) and configs for it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # train_world.py, also run as a script

import train_world
from train_world import small_config


@pytest.fixture(scope="session")
def mini_world(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return train_world.build(tmp_path_factory.mktemp("world"))


@pytest.fixture
def world_dir(mini_world) -> Path:
    return mini_world


@pytest.fixture
def make_config(world_dir, tmp_path):
    def make(*overrides: str):
        return small_config(world_dir, tmp_path / "runs", *overrides)

    return make


@pytest.fixture(scope="session")
def test_world_dir() -> Path:
    """The worlds package's cached ``test``-preset tiny world (built once per code version)."""
    from llgbm_worlds.testing import test_world

    torch.manual_seed(0)
    return test_world()


@pytest.fixture(scope="session")
def test_world_run(test_world_dir, tmp_path_factory) -> Path:
    """A short run on the test world, trained and evaluated like `llgbm train`. Read-only: copy it
    (shutil.copytree) before changing anything."""
    from llgbm_train.evaluate import evaluate
    from llgbm_train.trainer import train

    runs = tmp_path_factory.mktemp("runs")
    cfg = small_config(test_world_dir, runs, "training.steps=4")
    result = train(cfg, runs / "tiny", progress=False)
    evaluate(
        result.setup,
        result.generator,
        out_dir=runs / "tiny",
        checkpoint={"step": result.step, "steps": cfg.training.steps},
        progress=False,
    )
    return runs / "tiny"
