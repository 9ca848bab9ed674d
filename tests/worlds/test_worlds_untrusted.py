"""Worlds from someone else: no path escapes, no deleted user files, changed teachers named."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from llgbm_worlds import World, build_world, import_hf
from llgbm_worlds import world as world_mod
from llgbm_worlds.errors import BuildError, ChecksumError, ManifestError
from llgbm_worlds.testing import THREADS


@pytest.fixture
def world_copy(tmp_path, tiny_world_dir):
    out = tmp_path / "w"
    shutil.copytree(tiny_world_dir, out)
    return out


def _edit(world_dir, change):
    d = json.loads((world_dir / "world.json").read_text())
    change(d)
    (world_dir / "world.json").write_text(json.dumps(d))


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_a_task_name_that_is_a_path_is_refused(world_copy, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("keep me")

    def rename(d):
        task = next(t for t in d["tasks"] if t["split"] == "heldout")
        for te in d["teachers"]:
            if te["task"] == task["name"]:
                te["task"] = "../../../victim"
        task["name"] = "../../../victim"

    _edit(world_copy, rename)
    with pytest.raises(
        ManifestError, match=r"task name '\.\./\.\./\.\./victim' is not a safe name"
    ) as e:
        World.load(world_copy)
    _one_line(e)
    assert (victim / "important.txt").read_text() == "keep me"


@pytest.fixture
def outside(tmp_path, tiny_world):
    """Real files beside the world, so following a path out of it would succeed."""
    out = tmp_path / "outside"
    shutil.copytree(tiny_world.teachers[0].path, out / "adapter")
    shutil.copytree(tiny_world.base_path, out / "base")
    shutil.copy(tiny_world.tasks[0].train_path, out / "items.jsonl")
    return out


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("teacher", "../outside/adapter", "leaves"),
        ("teacher", "{outside}/adapter", "not absolute"),
        ("train", "../outside/items.jsonl", "leaves"),
        ("base", "../outside/base", "leaves"),
        ("base", "{outside}/base", "not absolute"),
        ("kind", "evil", "kind must be one of tiny, smollm2, hf"),
    ],
)
def test_paths_outside_a_built_world_and_unknown_kinds_are_refused(
    world_copy, outside, field, value, match
):
    value = value.replace("{outside}", str(outside))

    def change(d):
        if field == "teacher":
            d["teachers"][0]["path"] = value
        elif field == "train":
            d["tasks"][0]["train"] = value
        else:
            d[field] = value

    _edit(world_copy, change)
    with pytest.raises(ManifestError, match=match) as e:
        World.load(world_copy, verify=False)
    _one_line(e)


def test_a_changed_teacher_is_named_and_digests_are_cached(world_copy, monkeypatch):
    calls = []
    real = world_mod.sha256_file
    monkeypatch.setattr(world_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    w = World.load(world_copy)
    n = len(w.teachers)
    assert len(calls) == n  # a copied world's cache vouches for nothing: every file hashed once
    World.load(world_copy)
    assert len(calls) == n  # unchanged files: a stat each, no hashing
    # 64 flipped bytes inside the tensor data, same size, mtime set back: still caught.
    victim = w.teachers[3].path / "adapter_model.safetensors"
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    for i in range(len(data) - 64, len(data)):
        data[i] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ChecksumError, match=rf"{victim}: teacher of {w.teachers[3].task}") as e:
        World.load(world_copy)
    _one_line(e)
    World.load(world_copy, verify=False)  # show and other read-only views still work


def test_build_refuses_an_existing_folder_that_is_not_a_world(tmp_path):
    out = tmp_path / "my_project"
    (out / "base").mkdir(parents=True)
    (out / "base" / "notes.txt").write_text("mine")
    (out / "teachers" / "draft").mkdir(parents=True)
    with pytest.raises(BuildError, match="is not a world directory") as e:
        build_world("tiny", out, preset="test", progress=False, threads=THREADS)
    _one_line(e)
    assert (out / "base" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.rglob("*")) == ["base", "draft", "notes.txt", "teachers"]


def test_stale_teacher_cleanup_removes_only_what_the_zoo_wrote(world_copy):
    stale = world_copy / "teachers" / "gone_task"
    shutil.copytree(world_copy / "teachers" / "code_alpha" / "split0", stale / "split0")
    (stale / ".split1.tmp").mkdir()
    (stale / "my_adapter").mkdir()
    (stale / "my_adapter" / "adapter_config.json").write_text("{}")
    only_ours = world_copy / "teachers" / "gone_too"
    shutil.copytree(world_copy / "teachers" / "code_alpha" / "split0", only_ours / "split0")
    build_world("tiny", world_copy, preset="test", progress=False, threads=THREADS)
    assert sorted(p.name for p in stale.iterdir()) == ["my_adapter"]
    assert not only_ours.exists()
    World.load(world_copy)


def _hf_manifest(tmp_path, tiny_world, name="hi", train="p.jsonl"):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Say hi.", "answer": "hi"}) + "\n")
    m = {
        "base": str(tiny_world.base_path),
        "tasks": [
            {
                "name": name,
                "train": train,
                "test": "p.jsonl",
                "teachers": [{"path": str(tiny_world.teachers[0].path)}],
            }
        ],
    }
    (tmp_path / "m.json").write_text(json.dumps(m))
    return tmp_path / "m.json"


def test_import_hf_keeps_task_files_inside_out(tmp_path, tiny_world):
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    with pytest.raises(ManifestError, match=r"task name '\.\./\.\./escape_hf' is not a safe") as e:
        import_hf(_hf_manifest(sub, tiny_world, name="../../escape_hf"), sub / "out")
    _one_line(e)
    assert not (tmp_path / "escape_hf").exists() and not (sub / "out").exists()
    with pytest.raises(ManifestError, match=r"train prompt file .* leaves"):
        import_hf(_hf_manifest(sub, tiny_world, train="../../../x.jsonl"), sub / "out")


def test_hf_worlds_name_outside_folders_by_absolute_paths(tmp_path, tiny_world):
    out = import_hf(_hf_manifest(tmp_path, tiny_world), tmp_path / "world")
    raw = json.loads((out / "world.json").read_text())
    assert raw["base"] == str(tiny_world.base_path)  # recorded, not implied by "../.."
    assert raw["teachers"][0]["path"] == str(tiny_world.teachers[0].path)
    w = World.load(out)
    assert w.teachers[0].path == tiny_world.teachers[0].path
    # The same world with the old relative spelling, which only worked by walking out of it:
    rel = os.path.relpath(tiny_world.teachers[0].path, out.resolve())
    _edit(out, lambda d: d["teachers"][0].update(path=rel))
    with pytest.raises(ManifestError, match="run import-hf again"):
        World.load(out)
