"""Fixtures for the explorer tests: a real test-preset world with two real runs, and AppTest."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # explorer_fixture.py, browser.py

from explorer_fixture import Demo, build_demo, compose, demo_args
from llgbm_explorer.folders import Folders


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Demo:
    import torch

    torch.manual_seed(0)
    return build_demo(tmp_path_factory.mktemp("explorer"))


@pytest.fixture
def demo_folders(demo, tmp_path) -> Folders:
    return Folders.from_args([*demo_args(demo), "--results", str(tmp_path / "results.md")])


@pytest.fixture(scope="session")
def composed(demo, tmp_path_factory):
    """A real compose report of the demo world: RUNS/compose/<world name>/report.json."""
    return compose(demo.world, tmp_path_factory.mktemp("composed") / "runs")


@pytest.fixture(autouse=True)
def _keep_main_module():
    """Put ``sys.modules["__main__"]`` back after each test.

    AppTest runs the app script as ``__main__``; left in place, every later ``spawn`` worker of
    the session (the experiment's ``--jobs``) re-runs the app, whose argument parser exits on
    pytest's own arguments (`just test -k ...`), and the pool breaks.
    """
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main
