"""The folders the explorer may read: command line, typed paths, containment, binding."""

from __future__ import annotations

from pathlib import Path

import pytest
from llgbm_explorer.cli import streamlit_argv
from llgbm_explorer.folders import ExplorerError, Folders, inside


def test_defaults_are_the_cli_layout(tmp_path):
    f = Folders.from_args([], cwd=tmp_path)
    assert f.world == tmp_path / "worlds" / "tiny"
    assert f.delta_cache == tmp_path / "worlds" / "tiny" / "delta_cache"
    assert f.runs == tmp_path / "runs"
    assert f.results == tmp_path / "docs" / "results.md"
    assert f.roots[0] == tmp_path


def test_typed_paths_must_stay_inside_the_roots(tmp_path):
    (tmp_path / "work" / "worlds" / "other").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    f = Folders.from_args([], cwd=tmp_path / "work")
    assert f.with_typed(world="worlds/other").world == tmp_path / "work" / "worlds" / "other"
    for typed in (str(outside), "../secret", "/etc", "~"):
        with pytest.raises(ExplorerError, match="outside the folders"):
            f.with_typed(runs=typed)
    # A symlink inside the root that points outside it is refused too.
    (tmp_path / "work" / "link").symlink_to(outside)
    with pytest.raises(ExplorerError, match="outside the folders"):
        f.with_typed(runs="link")
    # --root allows another folder explicitly.
    g = Folders.from_args(["--root", str(outside)], cwd=tmp_path / "work")
    assert g.with_typed(runs=str(outside)).runs == outside


def test_changing_the_world_moves_its_cache_along(tmp_path):
    f = Folders.from_args([], cwd=tmp_path)
    g = f.with_typed(world="worlds/b")
    assert g.delta_cache == tmp_path / "worlds" / "b" / "delta_cache"
    h = Folders.from_args(["--delta-cache", "caches/x"], cwd=tmp_path).with_typed(world="worlds/b")
    assert h.delta_cache == tmp_path / "caches" / "x"  # an explicitly chosen cache stays


def test_inside_refuses_files_named_outside_their_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    assert inside(tmp_path / "runs" / "a.json", tmp_path / "runs") == tmp_path / "runs" / "a.json"
    with pytest.raises(ExplorerError, match="points outside"):
        inside(tmp_path / "runs" / ".." / "x.json", tmp_path / "runs")


def test_the_server_binds_to_localhost_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = streamlit_argv(["--world", "w", "--runs", "r", "--port", "8611"])
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert argv[argv.index("--server.port") + 1] == "8611"
    assert argv[argv.index("--browser.gatherUsageStats") + 1] == "false"
    app = argv[argv.index("--") + 1 :]
    assert app[app.index("--world") + 1] == str(tmp_path / "w")
    assert Path(argv[argv.index("run") + 1]).name == "app.py"
    other = streamlit_argv(["--address", "0.0.0.0"])
    assert other[other.index("--server.address") + 1] == "0.0.0.0"
