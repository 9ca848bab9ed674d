"""Every file in configs/ loads, validates and starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
from llgbm_train.config import Config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {
        "baseline",
        "delta_multi",
        "delta_behaviour",
        "delta_only",
        "delta_retrieve",
        "smollm2_delta_multi",
        "qwen2.5-1.5b_delta_multi",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert Config.from_dict(cfg.to_dict()) == cfg
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("llgbm" in first or "just " in first), first


def test_default_configs_use_the_tiny_world():
    by = {p.stem: load_config(p) for p in CONFIGS}
    for name, objective in (
        ("baseline", "baseline"),
        ("delta_multi", "delta_multi"),
        ("delta_behaviour", "delta_multi"),
        ("delta_only", "delta_only"),
        ("delta_retrieve", "delta_only"),
    ):
        assert by[name].world.kind == "tiny" and by[name].world.dir == "worlds/tiny"
        assert by[name].training.objective == objective
    assert by["delta_retrieve"].retrieves and not by["delta_only"].retrieves
    # delta_behaviour is delta_multi with the behaviour delta in place of the logit KL, nothing else.
    multi, behav = by["delta_multi"].to_dict(), by["delta_behaviour"].to_dict()
    assert (
        behav["training"].pop("delta_target") == "behaviour"
        and behav["training"].pop("lambda_kl") == 0
    )
    multi["training"].pop("delta_target"), multi["training"].pop("lambda_kl")
    assert behav.pop("name") == "delta_behaviour" and multi.pop("name") == "delta_multi"
    assert behav == multi


def test_paper_setting():
    q = load_config(CONFIGS[0].parent / "qwen2.5-1.5b_delta_multi.yaml")
    assert q.world.kind == "hf" and q.lora.rank == 16 and len(q.lora.target_modules) == 7
    assert q.generator.kind == "dnd" and q.generator.encoder == "sbert"
    assert q.training.precision == "bf16" and q.model.dtype == "bfloat16"
