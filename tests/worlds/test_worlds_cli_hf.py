"""The module entry point and the hf world (manifest import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from llgbm_worlds import World, import_hf
from llgbm_worlds.cli import main
from llgbm_worlds.errors import ManifestError


def test_cli_show(tiny_world_dir, capsys):
    assert main(["show", str(tiny_world_dir)]) == 0
    assert "code_alpha" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["build", "huge", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown world kind 'huge'") and err.count("\n") == 1
    assert main(["show", str(tmp_path / "none")]) == 2
    assert "llgbm world build tiny" in capsys.readouterr().err


def test_python_dash_m_entry_point(tiny_world_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "llgbm_worlds", "show", str(tiny_world_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "prefix_red" in r.stdout


def _manifest(tmp_path, tiny_world, adapter):
    prompts = tmp_path / "p.jsonl"
    rows = [{"instruction": "Say hi.", "input": "x", "output": "hi"}] * 3
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "base": str(tiny_world.base_path),
        "tasks": [
            {
                "name": "hi",
                "family": "greet",
                "split": "train",
                "train": "p.jsonl",
                "test": "p.jsonl",
                "teachers": [{"path": str(adapter), "step": 3}],
            },
            {
                "name": "hi2",
                "family": "greet",
                "split": "heldout",
                "heldout_kind": "variant",
                "train": "p.jsonl",
                "test": "p.jsonl",
            },
        ],
    }


def test_import_hf_yaml(tmp_path, tiny_world):
    import yaml

    m = _manifest(tmp_path, tiny_world, tiny_world.teachers[0].path)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(m))
    out = import_hf(tmp_path / "m.yaml", tmp_path / "world")
    w = World.load(out)
    assert w.kind == "hf" and w.base_path == tiny_world.base_path
    assert w.teachers[0].path == tiny_world.teachers[0].path and w.teachers[0].step == 3
    assert w.task("hi").prompts()[0].endswith("Say hi. Input:x\n\n### Response:")
    assert w.task("hi").items()[0].answer == "hi"


def test_import_hf_missing_adapter(tmp_path, tiny_world):
    m = _manifest(tmp_path, tiny_world, tmp_path / "no_such_adapter")
    (tmp_path / "m.json").write_text(json.dumps(m))
    with pytest.raises(
        ManifestError, match=r"tasks\[0\] \(hi\) teachers\[0\]: adapter directory .*no_such_adapter"
    ) as e:
        import_hf(tmp_path / "m.json", tmp_path / "world")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "world" / "world.json").exists()


def test_import_hf_hub_id_base(tmp_path, tiny_world):
    m = _manifest(tmp_path, tiny_world, tiny_world.teachers[0].path)
    m["base"] = "Qwen/Qwen2.5-1.5B"
    (tmp_path / "m.json").write_text(json.dumps(m))
    w = World.load(import_hf(tmp_path / "m.json", tmp_path / "world"))
    assert w.base_path == "Qwen/Qwen2.5-1.5B"
