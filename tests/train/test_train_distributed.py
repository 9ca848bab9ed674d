"""The trainer under DDP: 2 CPU processes (gloo) via torch.distributed.run on the minimal world."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llgbm_train.checkpoint import load_state
from llgbm_train.config import save_config
from train_world import small_config

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_and_only_rank0_writes(mini_world, tmp_path):
    runs = tmp_path / "runs"
    cfg = small_config(mini_world, runs, "training.steps=3", "training.checkpoint_every=3")
    config = save_config(cfg, tmp_path / "ddp.yaml")
    out = tmp_path / "ranks"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(HERE / "train_world.py"),
        "--ddp-check",
        str(config),
        str(runs / "r"),
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(out / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "rank1.pt", weights_only=False)
    assert r0["world_size"] == r1["world_size"] == 2
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    # One run directory, written once: one metrics line per step, one final checkpoint.
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == [
        "delta_cache",
        "encoder_cache",
        "r",
    ]
    lines = (runs / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert [p.name for p in (runs / "r" / "checkpoints").iterdir()] == ["step_000003.safetensors"]
    # The checkpoint holds the parameters both ranks ended with.
    ckpt = load_state(runs / "r/checkpoints/step_000003.safetensors")
    for key, value in ckpt["generator"].items():
        assert torch.equal(value, r0["state"][key])
