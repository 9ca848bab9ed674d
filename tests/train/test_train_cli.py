"""The ``llgbm`` CLI end to end on the minimal world: train, evaluate, verify, compute-deltas, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from llgbm_train.cli import main
from llgbm_train.config import save_config
from train_world import small_config

LLGBM = Path(sys.executable).parent / "llgbm"


@pytest.fixture
def test_world_config(test_world_dir, tmp_path) -> Path:
    """A fast config on the worlds package's cached test-preset world, named by its file."""
    cfg = small_config(test_world_dir, tmp_path / "runs", "training.steps=4")
    return save_config(dataclasses.replace(cfg, name=None), tmp_path / "tiny.yaml")


@pytest.fixture
def config_file(world_dir, tmp_path) -> Path:
    cfg = small_config(world_dir, tmp_path / "runs", "training.steps=4")
    return save_config(dataclasses.replace(cfg, name=None), tmp_path / "tiny.yaml")


def test_help_names_every_command():
    out = subprocess.run(
        [str(LLGBM), "--help"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    for cmd in (
        "verify",
        "train",
        "train-delta-only",
        "compute-deltas",
        "world",
        "evaluate",
        "experiment",
    ):
        assert cmd in out


@pytest.mark.slow
def test_train_then_evaluate_end_to_end(test_world_config, test_world_dir, tmp_path, capsys):
    from llgbm_worlds import World

    world = World.load(test_world_dir)
    singles = [t for t in world.tasks if t.family != "mixture"]
    heldout = sorted(t.name for t in singles if t.split == "heldout")
    seen = sorted(t.name for t in singles if t.split == "train")
    assert main(["train", str(test_world_config), "eval.tasks=all"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "tiny"
    # The closing table: held-out and seen rows, every method, the checkpoint it scored.
    for label in ("held-out (", "seen (", "base", "mean of teachers", "oracle", "nearest"):
        assert label in out
    assert "generated" in out and "95% CI" in out and "checkpoint step 4 of 4" in out
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["checkpoint"] == {"step": 4, "steps": 4}
    assert set(report["summary"]) >= {"heldout", "seen", "new_symbol", "new_family"}
    assert set(report["summary"]["heldout"]) == {
        "base",
        "teacher",
        "mean_teachers",
        "nearest_teacher",
        "generated",
    }
    assert "nearest_teacher" not in report["summary"]["seen"]  # its own teacher: the oracle
    assert report["summary"]["heldout"]["teacher"]["delta_cos"] == pytest.approx(1.0)
    assert sorted(r["task"] for r in report["per_task"]) == sorted(heldout + seen)
    md = (run / "eval" / "report.md").read_text()
    assert "| held-out (2) | generated |" not in md  # 4 held-out tasks in the test world
    assert "| held-out (4) | generated |" in md and "checkpoint step 4 of 4" in md
    adapters = run / "eval" / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == sorted(heldout + seen)
    from peft import PeftConfig

    teacher_r = PeftConfig.from_pretrained(str(world.teachers[0].path)).r
    assert PeftConfig.from_pretrained(str(adapters / heldout[0])).r == teacher_r
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    # A second `train` of the same config never overwrites: it picks the next free name.
    assert main(["train", str(test_world_config), "training.steps=1", "--no-eval"]) == 0
    assert (tmp_path / "runs" / "tiny-2" / "config.yaml").is_file()
    # `llgbm evaluate RUN` re-scores the saved run from its newest checkpoint, identically.
    assert main(["evaluate", str(run), "--tasks", "all"]) == 0
    again = json.loads((run / "eval" / "report.json").read_text())
    assert again["summary"] == report["summary"]
    # Only the train tasks: eval/ is replaced whole, no held-out adapter of the old one is left.
    assert main(["evaluate", str(run), "--tasks", "train"]) == 0
    assert "report.md" in capsys.readouterr().out
    only_seen = json.loads((run / "eval" / "report.json").read_text())
    assert sorted(r["task"] for r in only_seen["per_task"]) == seen
    assert only_seen["tasks_evaluated"] == "train" and set(only_seen["summary"]) == {"seen"}
    assert sorted(p.name for p in adapters.iterdir()) == seen


def test_world_build_and_show(test_world_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "w"
    shutil.copytree(test_world_dir, copy)  # build_world re-validates and touches world.json
    assert main(["world", "build", "tiny", "--preset", "test", "--out", str(copy)]) == 0
    assert f"world {copy}  kind=tiny  preset=test" in capsys.readouterr().out  # worlds' own CLI
    assert main(["world", "show", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "code_omega" in out and "suffix_red" in out
    assert main(["world", "show", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    # Mounted as it is: the options of `python -m llgbm_worlds` exist under `llgbm world`.
    with pytest.raises(SystemExit):
        main(["world", "build", "--help"])
    assert "--threads" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["world", "--help"])
    out = capsys.readouterr().out
    assert "import-hf" in out and "quality" in out


def test_stop_and_resume_from_the_cli(config_file, tmp_path, capsys):
    assert main(["train", str(config_file), "--name", "r", "--stop-after", "2"]) == 0
    run = tmp_path / "runs" / "r"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["train", str(config_file), "--name", "r", "--resume", "--no-eval"]) == 0
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]


def test_train_delta_only_sets_the_objective(config_file, tmp_path):
    assert (
        main(
            [
                "train-delta-only",
                "--variant",
                "b1",
                str(config_file),
                "training.steps=2",
                "--name",
                "donly",
                "--no-eval",
            ]
        )
        == 0
    )
    cfg = (tmp_path / "runs" / "donly" / "config.yaml").read_text()
    assert "objective: delta_only" in cfg and "variant: b1" in cfg
    rec = json.loads((tmp_path / "runs/donly/metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_norm" in rec


def test_verify_and_compute_deltas(test_world_config, test_world_dir, tmp_path, capsys):
    from llgbm_worlds import World

    n = len(World.load(test_world_dir).teachers)
    argv = ["compute-deltas", "--config", str(test_world_config), "--world", str(test_world_dir)]
    assert main(argv) == 0
    assert f"{n} teacher deltas" in capsys.readouterr().out
    assert main(["verify", str(test_world_config)]) == 0
    out = capsys.readouterr().out
    assert "one training step: loss" in out and out.rstrip().endswith("ok")
    assert not (tmp_path / "runs" / "tiny").exists()  # verify writes no run


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["train", "{cfg}", "training.lrr=1"],
            "unknown key 'training.lrr' (did you mean 'training.lr'?",
        ),
        (["train", "{cfg}", "generator.kind=gan"], "generator.kind: 'gan' is not allowed"),
        (["train", "missing.yaml"], "missing.yaml: config file not found"),
        (["train", "{cfg}", "--resume", "--name", "nope"], "no run to resume"),
        (["train", "{cfg}", "world.dir=/nonexistent/w"], "no world.json"),
        (["evaluate", "/nonexistent/run"], "not a run directory"),
    ],
)
def test_errors_are_one_line_and_exit_2(config_file, tmp_path, capsys, argv, needle):
    argv = [a.replace("{cfg}", str(config_file)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    assert "Traceback" not in err
    runs = tmp_path / "runs"
    left = [] if not runs.exists() else list(runs.iterdir())
    assert not [p for p in left if not p.name.endswith(("_cache", ".lock"))]  # no run, no tmp


def test_error_exit_code_from_the_real_entry_point(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  stepz: 3\n")
    proc = subprocess.run(
        [str(LLGBM), "train", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {bad}: unknown key 'training.stepz' (did you mean 'training.steps'? allowed: "
        + proc.stderr.split("allowed: ", 1)[1].strip()
    )
    assert "Traceback" not in proc.stderr


def test_delta_cache_of_another_base_model_is_one_line(config_file, tmp_path, capsys):
    from llgbm_delta import DeltaCache, compute_deltas
    from llgbm_delta.testing import make_peft_adapter, tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    other = tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64, seed=7)
    adapter = make_peft_adapter(other, tmp_path / "other_adapter", seed=0)
    cache = tmp_path / "foreign_cache"
    compute_deltas((other, tok), [adapter], cache=DeltaCache(cache), progress=False)
    assert main(["train", str(config_file), f"delta.cache_dir={cache}"]) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]  # after the model-loading bar
    assert last.startswith("error: ") and "use one cache directory per base model" in last
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "tiny").exists()


def test_debug_shows_the_exception_before_or_after_the_command(tmp_path):
    from llgbm_train.config import ConfigError

    for argv in (["--debug", "train", "missing.yaml"], ["train", "missing.yaml", "--debug"]):
        with pytest.raises(ConfigError, match="config file not found"):
            main(argv)
