"""The delta benchmark scripts run end to end at toy sizes (CPU), so the real runs do not crash."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_delta_cpu_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "cpu.jsonl"
    res = _load("delta_cpu").main(["--adapters", "4", "--batch", "2", "--out", str(out)])
    assert res["max_abs_diff"] < 1e-4  # batched and naive paths agree
    assert res["batched_adapters_per_s"] > 0 and res["naive_adapters_per_s"] > 0
    assert json.loads(out.read_text().splitlines()[-1])["adapters"] == 4
    assert "| tiny Llama" in capsys.readouterr().out


@pytest.mark.slow
def test_delta_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    argv = ["--tiny", "--device", "cpu", "--adapters", "4", "--chunk", "2", "4", "--naive", "1"]
    argv += ["--e2e", "2", "--grad-adapters", "2", "--path", "hooks", "fused", "--out", str(out)]
    res = _load("delta_gpu").main(argv)
    saved = json.loads(out.read_text())
    rows = [(r["path"], r["chunk"]) for r in saved["batched"]]
    assert saved["shapes"] == "tiny" and rows == [
        ("hooks", 2),
        ("hooks", 4),
        ("fused", 2),
        ("fused", 4),
    ]
    assert all(r["max_abs_diff_vs_hooks"] < 1e-4 for r in saved["batched"])
    assert res["naive"]["max_abs_diff_vs_batched"] < 1e-4
    assert res["flop_limit_adapters_per_s"] > 0 and res["batched_best"]["pct_of_limit"] > 0
    assert all("seconds" in r for r in res["fwd_bwd"])


@pytest.mark.slow
def test_delta_disk_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "disk.json"
    argv = ["--tiny", "--adapters", "6", "--batch", "4", "--threads", "2", "--repeats", "1"]
    res = _load("delta_disk").main([*argv, "--dir", str(tmp_path), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["bytes_per_adapter"] > 0 and saved["read_GBps"]["pinned_1"] > 0
    assert [(r["loader_threads"], r["cache"]) for r in res["end_to_end"]] == [
        (2, None),
        (2, "fresh"),
    ]
    assert all(r["adapters_per_s"] > 0 for r in res["end_to_end"])
    assert list(tmp_path.iterdir()) == [out]  # the adapters written are removed again


def test_flop_count_qwen_shapes():
    """The FLOP model on the real Qwen2.5-1.5B shapes, built on the meta device (no memory)."""
    import torch
    from llgbm_flora import LoraSpec
    from transformers import Qwen2Config, Qwen2ForCausalLM

    bench = _load("delta_gpu")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**bench.QWEN25_15B))
    spec = LoraSpec.for_model(model, rank=16, alpha=32, target_modules=bench.TARGETS)
    assert abs(spec.num_params() - 18.46e6) < 0.05e6  # DnD's "18.5M" for 1.5B r=16
    flops = bench.forward_flops(model, spec, [40] * 5)
    # 2 * 1.31e9 linear params * 200 tokens ~ 524 GFLOP; at 791 TFLOP/s about 1,500 adapters/s.
    assert 520e9 < flops < 545e9
    assert 1400 < 791e12 / flops < 1560


@pytest.mark.slow
def test_delta_cli_light_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    res = _load("delta_cli_light").main(["--entries", "5", "--repeats", "1", "--out", str(out)])
    assert res["imports"]["ls"]["heavy_imported"] == []
    assert res["imports"]["export"]["heavy_imported"] == []
    assert 0 < res["imports"]["ls"]["numpy_import_s"] < res["imports"]["ls"]["imports_s"]
    assert res["ls_s"]["min"] > 0 and json.loads(out.read_text())["entries"] == 5
    assert "| entries 5, hidden 96 |" in capsys.readouterr().out
