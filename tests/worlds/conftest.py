"""Shared fixtures: the cached test-preset tiny world (built once per code version)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_world_dir():
    from llgbm_worlds.testing import test_world

    torch.manual_seed(0)
    return test_world()


@pytest.fixture(scope="session")
def tiny_world(tiny_world_dir):
    from llgbm_worlds import World

    return World.load(tiny_world_dir)


@pytest.fixture(scope="session")
def tiny_base(tiny_world):
    from llgbm_worlds.build import load_local_base

    return load_local_base(tiny_world.base_path)
