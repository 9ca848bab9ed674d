"""Atomic writes, directory swaps that never delete foreign files, the portable lock, safe names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from llgbm_flora import atomic
from llgbm_flora.atomic import DirectoryNotOwnedError, LockHeldError
from llgbm_flora.names import UnsafePathError, check_name, inside


def _dot_files(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_writes_round_trip_with_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_json(tmp_path / "a" / "x.json", {"k": [1, 2]})
        atomic.write_text(tmp_path / "t.txt", "héllo\n")
        atomic.write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, {"b": "é"}])
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": [1, 2]}
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows == [{"a": 1}, {"b": "é"}]
    # mkstemp would give 0600: a shared world or run would be unreadable to the group.
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o644
    assert _dot_files(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "x.json"
    atomic.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic.atomic_file(path) as tmp:
        tmp.write_text('{"v": 2')  # half written, then the writer dies
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1}
    assert _dot_files(tmp_path) == []


def test_remove_leftovers_clears_only_temporary_files(tmp_path):
    (tmp_path / ".step_000005.safetensors.1a2b3c.tmp").write_text("torn")
    (tmp_path / ".other.9f9f.tmp").write_text("torn")
    (tmp_path / "step_000005.safetensors").write_text("good")
    (tmp_path / ".keep").write_text("not ours")
    removed = atomic.remove_leftovers(tmp_path, "step_000005.safetensors")
    assert [p.name for p in removed] == [".step_000005.safetensors.1a2b3c.tmp"]
    atomic.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "step_000005.safetensors"]


def _built(tmp_path, final, content):
    tmp = atomic.fresh_dir(final)
    (tmp / "data.txt").write_text(content)
    (tmp / ".done.json").write_text("{}")
    return tmp


def test_replace_dir_swaps_a_marked_directory_whole(tmp_path):
    final = tmp_path / "base"
    atomic.replace_dir(_built(tmp_path, final, "one"), final, marker=".done.json")
    atomic.replace_dir(_built(tmp_path, final, "two"), final, marker=".done.json")
    assert (final / "data.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # nothing aside, no tmp


def test_replace_dir_refuses_a_directory_it_did_not_write(tmp_path):
    final = tmp_path / "base"
    final.mkdir()
    (final / "thesis.tex").write_text("three years of work")
    tmp = _built(tmp_path, final, "new")
    with pytest.raises(
        DirectoryNotOwnedError,
        match=r"base: exists and was not written by llgbm \(no \.done\.json\)",
    ) as e:
        atomic.replace_dir(tmp, final, marker=".done.json")
    assert "\n" not in str(e.value)
    assert (final / "thesis.tex").read_text() == "three years of work"
    assert sorted(p.name for p in final.iterdir()) == ["thesis.tex"]
    # A plain file or a symlink at the target is refused too; an empty directory is replaced.
    (tmp_path / "f").write_text("x")
    with pytest.raises(DirectoryNotOwnedError, match="not a directory"):
        atomic.replace_dir(tmp, tmp_path / "f", marker=".done.json")
    (tmp_path / "link").symlink_to(final)
    with pytest.raises(DirectoryNotOwnedError):
        atomic.replace_dir(tmp, tmp_path / "link", marker=".done.json")
    (tmp_path / "empty").mkdir()
    atomic.replace_dir(tmp, tmp_path / "empty", marker=".done.json")
    assert (tmp_path / "empty" / "data.txt").read_text() == "new"


def test_a_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    final = tmp_path / "base"
    atomic.replace_dir(_built(tmp_path, final, "old"), final, marker=".done.json")
    tmp = _built(tmp_path, final, "new")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the move of the new directory into place
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError, match="No space"):
        atomic.replace_dir(tmp, final, marker=".done.json")
    monkeypatch.undo()
    assert (final / "data.txt").read_text() == "old"
    assert not list(tmp_path.glob("*.old"))


def test_fresh_dir_clears_leftovers_of_a_killed_swap(tmp_path):
    final = tmp_path / "base"
    (tmp_path / ".base.tmp").mkdir()
    (tmp_path / ".base.tmp" / "half").write_text("x")
    (tmp_path / ".base.k3j4.old" / "base").mkdir(parents=True)  # killed between the two moves
    tmp = atomic.fresh_dir(final)
    assert list(tmp.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".base.tmp"]


# The holder loads atomic.py by file: the module needs nothing of the package, and importing
# llgbm_flora (torch, transformers) would cost seconds.
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("atomic", sys.argv[2])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)
with atomic.file_lock(sys.argv[1], what="run x"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(lock):
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock), atomic.__file__],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_file_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    lock = tmp_path / "runs" / ".x.lock"
    p = _holder(lock)
    try:
        busy = r"run x is in use by another process"
        with pytest.raises(LockHeldError, match=busy) as e, atomic.file_lock(lock, what="run x"):
            pass
        assert "\n" not in str(e.value)
        t0 = time.perf_counter()
        with pytest.raises(LockHeldError), atomic.file_lock(lock, what="run x", timeout=0.3):
            pass
        assert time.perf_counter() - t0 >= 0.3
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
    # kill -9 leaves the lock file but not the lock: the next process gets it at once.
    with atomic.file_lock(lock, what="run x"):
        held = True
    assert held


@pytest.mark.parametrize(
    "name", ["add_3", "mix-add_3-shift_1", "Qwen2.5", "a", "run-2", "code_omega", "x" * 128]
)
def test_safe_names_pass(name):
    assert check_name(name, "task name") == name


@pytest.mark.parametrize(
    "name",
    ["../../victim", "/abs/path", "a/b", "a\\b", "..", ".", ".hidden", "-rf", "", "a.", "a b",
     "CON", "nul.txt", "x" * 129, "tâche", "a\nb"],
)  # fmt: skip
def test_unsafe_names_are_one_line_errors(name):
    with pytest.raises(UnsafePathError, match="task name") as e:
        check_name(name, "task name")
    assert "\n" not in str(e.value)


def test_check_name_raises_the_callers_error_type():
    class ManifestError(ValueError):
        pass

    with pytest.raises(ManifestError):
        check_name(3, "run name", error=ManifestError)


def test_inside_keeps_paths_within_their_root(tmp_path):
    (tmp_path / "w" / "teachers").mkdir(parents=True)
    assert inside(tmp_path / "w", "teachers/a", "p") == (tmp_path / "w" / "teachers" / "a")
    for bad in ("/etc/passwd", "../x", "teachers/../../x", ""):
        with pytest.raises(UnsafePathError):
            inside(tmp_path / "w", bad, "teacher path")
    (tmp_path / "w" / "teachers" / "out").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="leaves"):
        inside(tmp_path / "w", "teachers/out/x", "teacher path")
