"""Config dataclasses: YAML round trip, overrides, hash stability, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from llgbm_train.config import (
    Config,
    ConfigError,
    TrainingConfig,
    dump_config,
    load_config,
    save_config,
)


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = Config(name="x").override(
        ["lora.target_modules=[q_proj, v_proj]", "generator.options.hidden=48", "training.lr=3e-5"]
    )
    path = save_config(cfg, tmp_path / "c.yaml")
    back = load_config(path)
    assert back == cfg
    assert back.lora.target_modules == ("q_proj", "v_proj")
    assert back.training.lr == pytest.approx(3e-5)
    assert back.generator.options == {"hidden": 48}
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_overrides_are_typed():
    cfg = Config().override(
        [
            "training.steps=7",
            "training.lr=1e-4",
            "model.gradient_checkpointing=true",
            "model.adapter_chunk_size=null",
            "delta.token=mean",
            "lora.target_modules=q_proj,v_proj",
        ]
    )
    assert cfg.training.steps == 7 and isinstance(cfg.training.steps, int)
    assert cfg.training.lr == pytest.approx(1e-4) and isinstance(cfg.training.lr, float)
    assert cfg.model.gradient_checkpointing is True
    assert cfg.model.adapter_chunk_size is None
    assert cfg.delta.token == "mean"
    assert cfg.lora.target_modules == ("q_proj", "v_proj")


def test_hash_is_stable_and_sensitive():
    a, b = Config(), Config()
    assert a.hash == b.hash and len(a.hash) == 16
    assert Config(name="other", runs_dir="elsewhere").hash == a.hash  # naming is not content
    assert a.override(["training.seed=1"]).hash != a.hash
    # Eval settings change scoring, not training: a run can be re-scored or resumed with them.
    assert a.override(["eval.tasks=train", "eval.max_items=8"]).hash == a.hash
    # Same value across processes (no dict-order or id() dependence).
    code = "from llgbm_train.config import Config; print(Config().hash)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == a.hash


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("training.lrr=1", "unknown key 'training.lrr' (did you mean 'training.lr'?"),
        ("trainig.steps=3", "unknown key 'trainig' (did you mean 'training'?"),
        ("training.steps=abc", "training.steps: expected an integer, got 'abc'"),
        ("training.steps=2.5", "training.steps: expected an integer"),
        ("training.lr=fast", "training.lr: expected a number"),
        ("generator.kind=dnd2", "generator.kind: 'dnd2' is not allowed (allowed: dnd, t2l)"),
        ("training.objective=x", "allowed: baseline, delta_multi, delta_only"),
        ("training.steps=0", "training.steps: 0 must be >= 1"),
        ("model.gradient_checkpointing=maybe", "expected true/false"),
        ("training.lr.x=1", "training.lr is not a section"),
        ("noequals", "expected key=value"),
    ],
)
def test_bad_overrides_give_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        Config().override([override])
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_bad_files_name_the_file_and_field(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("training:\n  stepz: 3\n")
    with pytest.raises(
        ConfigError,
        match=r"typo.yaml: unknown key 'training.stepz' \(did you mean 'training.steps'",
    ):
        load_config(p)
    p.write_text("training: 3\n")
    with pytest.raises(ConfigError, match="training: expected a section"):
        load_config(p)
    p.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_direct_construction_validates_without_side_effects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"training.delta_loss: 'l1' is not allowed \(allowed: mse, cosine, combined\)",
    ):
        TrainingConfig(delta_loss="l1")
    Config()  # no file, directory or model touched
    assert list(tmp_path.iterdir()) == []


def test_name_defaults_to_file_stem(tmp_path):
    p = tmp_path / "my_exp.yaml"
    p.write_text("# a comment\ntraining:\n  steps: 5\n")
    cfg = load_config(p, ["training.seed=3"])
    assert cfg.name == "my_exp" and cfg.training.steps == 5 and cfg.training.seed == 3
    assert "steps: 5" in dump_config(cfg)
