"""Run directories and worlds from someone else: no code execution, no escapes, no mixed runs."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from llgbm_train.cli import main
from llgbm_train.config import save_config
from llgbm_train.runs import run_lock
from train_world import small_config


@pytest.fixture
def config_file(world_dir, tmp_path):
    cfg = small_config(world_dir, tmp_path / "runs", "training.steps=4")
    return save_config(dataclasses.replace(cfg, name=None), tmp_path / "tiny.yaml")


def _err(capsys) -> str:
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]  # after any progress bar
    assert last.startswith("error: ") and "Traceback" not in err, err
    return last


class _Evil:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_a_crafted_pickle_checkpoint_never_runs(config_file, tmp_path, capsys):
    assert main(["train", str(config_file), "--name", "evil", "--no-eval"]) == 0
    run = tmp_path / "runs" / "evil"
    marker = tmp_path / "pwned"
    # What torch.save writes; torch.load(weights_only=False) would call exec while reading it.
    torch.save({"step": 99, "generator": _Evil(marker)}, run / "checkpoints" / "step_000099.pt")
    capsys.readouterr()
    for argv in (
        ["evaluate", str(run)],
        ["train", str(config_file), "--name", "evil", "--resume"],
    ):
        assert main(argv) == 2
        assert "step_000099.pt: pickle checkpoint (.pt) refused" in _err(capsys)
        assert not marker.exists()


@pytest.mark.parametrize("name", ["../../escaped", "/abs/path", "a/b", ".."])
def test_run_names_cannot_leave_runs_dir(config_file, tmp_path, capsys, name):
    argv = ["train", str(config_file), "--name", name.replace("/abs", str(tmp_path / "abs"))]
    assert main(argv) == 2
    assert "is not a safe name" in _err(capsys)
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "abs").exists()
    assert not (tmp_path / "runs").exists()


def test_one_process_at_a_time_per_run(config_file, tmp_path, capsys):
    assert main(["train", str(config_file), "--name", "r", "--stop-after", "2"]) == 0
    run = tmp_path / "runs" / "r"
    before = (run / "metrics.jsonl").read_text()
    with run_lock(run):  # another llgbm process is training or evaluating r
        assert main(["train", str(config_file), "--name", "r", "--resume"]) == 2
        assert "is in use by another process" in _err(capsys)
        assert main(["evaluate", str(run)]) == 2
        assert "is in use by another process" in _err(capsys)
        assert (run / "metrics.jsonl").read_text() == before
    assert main(["train", str(config_file), "--name", "r", "--resume", "--no-eval"]) == 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.filterwarnings("always::llgbm_train.runs.CheckpointWarning")  # the CLI prints it
def test_damaged_newest_checkpoint_falls_back_and_leftovers_go(config_file, tmp_path, capsys):
    assert main(["train", str(config_file), "--name", "r", "--no-eval"]) == 0
    run = tmp_path / "runs" / "r"
    ckpts = run / "checkpoints"
    full = (run / "metrics.jsonl").read_text()
    newest = ckpts / "step_000004.safetensors"
    data = bytearray(newest.read_bytes())
    data[-16:] = bytes(16)  # bytes of a tensor: the header still parses
    newest.write_bytes(bytes(data))
    leftover = ckpts / ".step_000006.safetensors.3f2a1b.tmp"  # a checkpoint write killed midway
    leftover.write_bytes(b"\0" * 1_000_000)
    capsys.readouterr()
    assert main(["train", str(config_file), "--name", "r", "--resume", "--no-eval"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "step_000004.safetensors: damaged checkpoint" in err
    assert "using the previous checkpoint step_000002.safetensors" in err
    assert (run / "metrics.jsonl").read_text() == full  # resumed at 2: the same steps 3 and 4
    assert not leftover.exists()
    assert json.loads((run / "metadata.json").read_text())["resumed_at"] == [{"step": 2}]


def test_os_errors_are_one_line(config_file, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a directory")
    argv = ["train", str(config_file), f"runs_dir={tmp_path / 'a_file' / 'runs'}"]
    assert main(argv) == 2
    assert "Not a directory" in _err(capsys)


def test_overrides_after_options(config_file, tmp_path):
    argv = ["train", str(config_file), "--name", "x", "training.steps=1", "--no-eval"]
    assert main(argv) == 0
    assert len((tmp_path / "runs" / "x" / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main(["train", str(config_file), "--name", "y", "--bogus"])
    assert e.value.code == 2


def test_ctrl_c_hints_name_what_each_command_has(config_file, tmp_path, capsys, monkeypatch):
    import llgbm_train.evaluate as E
    import llgbm_train.trainer as T
    import llgbm_worlds.build

    real = T.train

    def killed(cfg, run_dir, **kw):
        real(cfg, run_dir, **{**kw, "stop_after": 2})
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train", killed)
    assert main(["train", str(config_file), "--name", "k"]) == 130
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    assert hint.endswith(f"`llgbm train {config_file} --name k --resume`")
    monkeypatch.setattr(T, "train", real)
    again = hint.split("`")[1].split()[1:]
    assert main([*again, "--no-eval"]) == 0  # the hint's own command continues the run

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(llgbm_worlds.build, "build_world", interrupt)
    monkeypatch.setattr(E, "evaluate_run", interrupt)
    for argv in (
        ["world", "build", "tiny", "--out", str(tmp_path / "w")],
        ["evaluate", str(tmp_path / "runs" / "k")],
    ):
        assert main(argv) == 130
        err = capsys.readouterr().err
        assert "interrupted" in err and "--resume" not in err


def _copy_world(world_dir, tmp_path, change):
    w = tmp_path / "w"
    shutil.copytree(world_dir, w)
    d = json.loads((w / "world.json").read_text())
    change(w, d)
    (w / "world.json").write_text(json.dumps(d))
    return w


def test_a_task_name_in_world_json_cannot_redirect_adapters(world_dir, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("keep me")

    def rename(w, d):
        for t in d["tasks"]:
            if t["name"] == "add_3":
                t["name"] = "../../../victim"
        for t in d["teachers"]:
            if t["task"] == "add_3":
                t["task"] = "../../../victim"

    w = _copy_world(world_dir, tmp_path, rename)
    cfg = small_config(w, tmp_path / "runs", "training.steps=2")
    cfg_file = save_config(dataclasses.replace(cfg, name=None), tmp_path / "c.yaml")
    assert main(["train", str(cfg_file)]) == 2
    assert "task name '../../../victim' is not a safe name" in _err(capsys)
    assert sorted(p.name for p in victim.iterdir()) == ["important.txt"]


def test_a_changed_teacher_is_named_before_training(world_dir, tmp_path, capsys):
    def flip(w, d):
        f = w / d["teachers"][5]["path"] / "adapter_model.safetensors"
        data = bytearray(f.read_bytes())
        for i in range(len(data) - 64, len(data)):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))

    w = _copy_world(world_dir, tmp_path, flip)
    cfg = small_config(w, tmp_path / "runs", "training.steps=2")
    cfg_file = save_config(dataclasses.replace(cfg, name=None), tmp_path / "c.yaml")
    assert main(["train", str(cfg_file)]) == 2
    err = _err(capsys)
    assert "add_3/ckpt1/adapter_model.safetensors: teacher of add_3 (step 20) changed" in err
    assert not (tmp_path / "runs" / "c").exists()
