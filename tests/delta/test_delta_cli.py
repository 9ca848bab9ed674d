"""The llgbm-delta CLI end to end on a tiny saved model: compute, ls, export, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from llgbm_delta import DeltaCache, compute_deltas
from llgbm_delta.cli import discover_adapters, main
from llgbm_delta.testing import make_peft_adapter, synthetic_cache, tiny_llama


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory, adapter_dirs, tok):
    """Adapters that must fail, each for a different reason."""
    root = tmp_path_factory.mktemp("bad")
    no_weights = shutil.copytree(adapter_dirs[0], root / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    corrupt = shutil.copytree(adapter_dirs[0], root / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    hidden32 = make_peft_adapter(tiny_llama(len(tok), hidden_size=32), root / "hidden32", seed=1)
    deeper = make_peft_adapter(tiny_llama(len(tok), num_hidden_layers=3), root / "deeper", seed=2)
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
        )
    )
    cfg = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    get_peft_model(gpt2, cfg).save_pretrained(root / "gpt2")
    return {
        "no_weights": no_weights,
        "corrupt": corrupt,
        "hidden32": hidden32,
        "deeper": deeper,
        "gpt2": root / "gpt2",
    }


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compute_ls_export(base_dir, adapter_dirs, tmp_path, capsys):
    folder = tmp_path / "zoo"
    for d in adapter_dirs:
        shutil.copytree(d, folder / "nested" / d.name)
    cache = tmp_path / "cache"
    code, out, err = run(
        ["compute", "--base", base_dir, "--adapters", folder, "--cache", cache, "--no-progress"],
        capsys,
    )
    assert code == 0, err
    assert "| 5 | 0 | 5 | 0 |" in out  # adapters, cached, computed, failed

    code, out, _ = run(
        ["compute", "--base", base_dir, "--adapters", folder, "--cache", cache, "--no-progress"],
        capsys,
    )
    assert code == 0 and "| 5 | 5 | 0 | 0 |" in out

    code, out, _ = run(["ls", cache], capsys)
    assert code == 0 and "5 entries" in out and "base: " in out
    assert all(d.name in out for d in adapter_dirs)

    npz = tmp_path / "deltas.npz"
    code, out, _ = run(["export", cache, npz], capsys)
    assert code == 0 and "wrote 5 deltas" in out
    expected = compute_deltas(base_dir, sorted(folder.glob("nested/*")), progress=False)
    with np.load(npz) as z:
        names = [os.path.basename(n) for n in z["adapter_names"]]
        assert names == sorted(d.name for d in adapter_dirs)
        np.testing.assert_allclose(z["deltas"], expected, rtol=0, atol=1e-6)
        assert json.loads(str(z["metadata"]))["base"]["hidden_size"] == 64


def test_probes_option_changes_entries(base_dir, adapter_dirs, tmp_path, capsys):
    cache = tmp_path / "cache"
    probe_file = tmp_path / "mine.json"
    probe_file.write_text(json.dumps({"name": "mine", "probes": ["Hello there.", "Second one"]}))
    for probes in ("math", probe_file):
        code, _, err = run(
            ["compute", "--base", base_dir, "--adapters", adapter_dirs[0], "--cache", cache,
             "--probes", probes, "--no-progress"],
            capsys,
        )  # fmt: skip
        assert code == 0, err
    entries = DeltaCache(cache).entries()
    assert sorted(e.probe_name for e in entries) == ["math", "mine"]


@pytest.mark.parametrize("which", ["no_weights", "corrupt", "hidden32", "deeper", "gpt2"])
def test_bad_adapter_is_one_line_error(base_dir, bad_adapters, tmp_path, capsys, which):
    cache = tmp_path / "cache"
    bad = bad_adapters[which]
    code, _, err = run(
        ["compute", "--base", base_dir, "--adapters", bad, "--cache", cache, "--no-progress"],
        capsys,
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
    assert "Traceback" not in err
    assert DeltaCache(cache).entries() == []


def test_keep_going_computes_the_rest(base_dir, adapter_dirs, bad_adapters, tmp_path, capsys):
    cache = tmp_path / "cache"
    bad = list(bad_adapters.values())
    missing = tmp_path / "nothing_here"
    argv = ["compute", "--base", base_dir, "--cache", cache, "--keep-going", "--no-progress"]
    argv += ["--adapters", adapter_dirs[0], *bad, missing, adapter_dirs[1]]
    code, out, err = run(argv, capsys)
    assert code == 1
    assert f"{len(bad) + 1} failed:" in err
    for b in [*bad, missing]:
        assert str(b) in err
    assert "| 7 | 0 | 2 | 5 |" in out
    entries = DeltaCache(cache).entries()
    assert sorted(e.adapter_name for e in entries) == sorted(map(str, adapter_dirs[:2]))
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


def test_errors_and_debug(base_dir, adapter_dirs, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = ["compute", "--base", base_dir, "--adapters", adapter_dirs[0], "--cache", tmp_path / "c"]
    code, _, err = run([*base, "--probes", empty, "--no-progress"], capsys)
    assert code == 2 and err.strip() == f"error: {empty}: probe file is empty"

    code, _, err = run(["ls", tmp_path / "nope"], capsys)
    assert code == 2 and "not a delta cache" in err

    code, _, err = run(
        ["compute", "--base", tmp_path / "no_model", "--adapters", adapter_dirs[0],
         "--cache", tmp_path / "c", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 2 and err.startswith(f"error: {tmp_path / 'no_model'}: cannot load base model")
    assert len(err.strip().splitlines()) == 1

    with pytest.raises(Exception, match="probe file is empty"):
        main([*map(str, base), "--probes", str(empty), "--debug"])


def test_cache_of_another_base_cli(base_dir, adapter_dirs, tmp_path, tok, capsys):
    other_dir = tmp_path / "other_base"
    other = tiny_llama(len(tok), seed=5)
    other.save_pretrained(other_dir)
    tok.save_pretrained(other_dir)
    cache = tmp_path / "cache"
    argv = ["compute", "--adapters", adapter_dirs[0], "--cache", cache, "--no-progress"]
    assert run([*argv, "--base", base_dir], capsys)[0] == 0
    code, _, err = run([*argv, "--base", other_dir], capsys)
    assert code == 2 and "use one cache directory per base model" in err


def test_discover_adapters(adapter_dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    found, problems = discover_adapters([str(adapter_dirs[0]), str(adapter_dirs[0].parent)])
    assert found[0] == adapter_dirs[0] and len(found) == len(adapter_dirs)
    assert problems == []
    _, problems = discover_adapters([str(tmp_path / "empty"), str(tmp_path / "x")])
    assert [p for _, p in problems] == [
        f"{tmp_path / 'empty'}: no PEFT adapter (adapter_config.json) or checkpoint found",
        f"{tmp_path / 'x'}: no such file or directory",
    ]


def test_console_script_help():
    exe = shutil.which("llgbm-delta", path=os.path.dirname(sys.executable))
    assert exe is not None, "llgbm-delta entry point not installed"
    out = subprocess.run([exe, "compute", "--help"], capture_output=True, text=True, check=True)
    assert "--keep-going" in out.stdout and "--probes" in out.stdout
    bad = subprocess.run([exe, "ls", "/nonexistent/cache"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    assert torch is not None


_LS_PROBE = """
import sys, time
t0 = time.perf_counter()
from llgbm_delta.cli import main
codes = [main(["ls", sys.argv[1]]), main(["export", sys.argv[1], sys.argv[2]])]
elapsed = time.perf_counter() - t0
heavy = ("torch", "transformers", "peft", "llgbm_flora.spec", "llgbm_flora.functional")
heavy = sorted(m for m in heavy if m in sys.modules)  # llgbm_flora.atomic is torch-free
print("RESULT", codes, heavy, f"{elapsed:.3f}", file=sys.stderr)
"""


def test_ls_and_export_import_no_torch(tmp_path):
    synthetic_cache(tmp_path / "cache", 200)
    out = subprocess.run(
        [sys.executable, "-c", _LS_PROBE, str(tmp_path / "cache"), str(tmp_path / "d.npz")],
        capture_output=True,
        text=True,
        check=True,
    )
    result = next(line for line in out.stderr.splitlines() if line.startswith("RESULT"))
    assert result.startswith("RESULT [0, 0] []"), result  # exit codes, heavy modules imported
    assert "200 entries" in out.stdout and "wrote 200 deltas" in out.stdout
    with np.load(tmp_path / "d.npz") as z:
        assert z["deltas"].shape == (200, 64)


def test_ls_and_export_exit_1_on_corrupt_entries(tmp_path, capsys):
    cache = synthetic_cache(tmp_path / "cache", 3)
    victim = cache.entry_path(cache.entries()[1].key)
    victim.write_bytes(victim.read_bytes()[:-5])
    code, out, err = run(["ls", tmp_path / "cache"], capsys)
    assert code == 1 and "2 entries" in out
    assert "is corrupt" in err and "error: 1 corrupt entries" in err
    assert (tmp_path / "cache" / "corrupt").is_dir()
    code, out, _ = run(["ls", tmp_path / "cache"], capsys)  # quarantined: the rest is clean
    assert code == 0 and "2 entries" in out
    victim = cache.entry_path(cache.entries()[0].key)
    victim.write_bytes(b"\x00" * 10)
    code, out, err = run(["export", tmp_path / "cache", tmp_path / "x.npz"], capsys)
    assert code == 1 and "wrote 1 deltas" in out and "skipped" in err


def test_compute_os_error_is_one_line(base_dir, adapter_dirs, tmp_path, capsys, monkeypatch):
    import llgbm_delta.cache as cache_mod

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache_mod, "write_bytes", refuse)
    argv = ["compute", "--base", base_dir, "--adapters", adapter_dirs[0], "--cache", tmp_path / "c"]
    code, _, err = run([*argv, "--no-progress"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: cache {tmp_path / 'c'}: cannot write: Permission denied")


def test_compute_counts_line_and_warnings_as_lines(tmp_path, base_dir, adapter_dirs, tok, capsys):
    from transformers import AutoModelForCausalLM

    short = tmp_path / "short_context"
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.config.max_position_embeddings = 16
    model.save_pretrained(short)
    tok.save_pretrained(short)
    argv = ["compute", "--base", short, "--adapters", *adapter_dirs[:2], "--cache", tmp_path / "c"]
    code, out, err = run([*argv, "--no-progress"], capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("done: 2 computed, 0 cached, 0 failed in ")
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "more than" in warning[0] and "context of 16" in warning[0]


def test_discover_checkpoints_and_hub_ids(adapter_dirs, base_dir, tmp_path):
    import shutil

    zoo = tmp_path / "zoo"
    shutil.copytree(adapter_dirs[0], zoo / "lora")
    shutil.copytree(base_dir, zoo / "full" / "ckpt")
    found, problems = discover_adapters([str(zoo), "org/some-lora@v1", "./not/here"])
    assert found == [zoo / "full" / "ckpt", zoo / "lora", "org/some-lora@v1"]
    assert [p for _, p in problems] == ["./not/here: no such file or directory"]
