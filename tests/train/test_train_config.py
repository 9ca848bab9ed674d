"""Config dataclasses: YAML round trip, overrides, hash stability, one-line errors."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
from llgbm_train.config import (
    SECTIONS,
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


FLOAT_FIELDS = [
    (section, name)
    for section, cls in SECTIONS.items()
    for name, tp in typing.get_type_hints(cls).items()
    if tp is float or float in typing.get_args(tp)
]


def test_every_float_field_is_covered():
    # Sanity of the table below: the sections have float fields, optional ones included.
    assert ("training", "grad_clip") in FLOAT_FIELDS and ("lora", "alpha") in FLOAT_FIELDS
    assert ("training", "delta_scale") in FLOAT_FIELDS and len(FLOAT_FIELDS) >= 12


@pytest.mark.parametrize(("section", "name"), FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf"])
def test_nan_and_infinity_are_refused_for_every_float_field(section, name, value):
    # NaN compares false with every bound, so range checks alone let it through.
    with pytest.raises(ConfigError, match=rf"{section}\.{name}: expected a finite number") as e:
        Config().override([f"{section}.{name}={value}"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=rf"{section}\.{name}: nan must be a finite number"):
        SECTIONS[section](**{name: float("nan")})


def test_an_empty_config_file_is_refused(tmp_path):
    # It used to mean "all defaults": a 35-minute default world build nobody asked for.
    for text in ("", "# only a comment\n"):
        p = tmp_path / "empty.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=r"empty.yaml: config is empty") as e:
            load_config(p)
        assert "\n" not in str(e.value)


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
