"""Shared fixtures: the worlds package's cached test-preset tiny world and its delta service."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def world_dir():
    from llgbm_worlds.testing import test_world

    torch.manual_seed(0)
    return test_world()


@pytest.fixture(scope="session")
def world(world_dir):
    from llgbm_worlds import World

    return World.load(world_dir)


@pytest.fixture(scope="session")
def world_deltas(world, tmp_path_factory):
    """Deltas of the test world through a cache of this session (teachers computed once)."""
    from llgbm_worlds.deltas import WorldDeltas

    return WorldDeltas(world, cache_dir=tmp_path_factory.mktemp("compose") / "delta_cache")
