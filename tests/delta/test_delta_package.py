"""llgbm-delta stands alone: declared deps cover its imports, wheels stay light, README runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from llgbm_flora.testing import dependency_names

PKG = Path(__file__).resolve().parents[2] / "packages" / "llgbm-delta"
FORBIDDEN = {"faiss", "faiss-cpu", "faiss-gpu", "streamlit", "sentence-transformers", "pyyaml"}
FORBIDDEN |= {"llgbm-train", "llgbm-worlds", "llgbm-compose"}
# import name -> distribution name, where they differ
DIST_OF = {"llgbm_flora": "llgbm-flora", "yaml": "pyyaml"}


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_imports_are_declared_dependencies():
    declared, imported = dependency_names(PKG, rename=DIST_OF)
    assert imported <= declared, f"imported but not declared: {sorted(imported - declared)}"
    assert not declared & FORBIDDEN
    assert {"torch", "numpy", "llgbm-flora"} <= imported


@pytest.mark.slow
def test_wheels_require_nothing_heavy(tmp_path):
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv not on PATH")
    for package in ("llgbm-flora", "llgbm-delta"):
        subprocess.run(
            [uv, "build", "--package", package, "--wheel", "--out-dir", str(tmp_path)],
            cwd=PKG.parents[1],
            check=True,
            capture_output=True,
        )
    wheels = sorted(tmp_path.glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["llgbm_delta", "llgbm_flora"]
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode()
            entry_points = [n for n in z.namelist() if n.endswith("entry_points.txt")]
            if wheel.name.startswith("llgbm_delta"):
                assert "llgbm-delta = llgbm_delta.cli:main" in z.read(entry_points[0]).decode()
        reqs = _requirement_names(re.findall(r"^Requires-Dist: (.+)$", text, flags=re.M))
        assert reqs, wheel.name
        assert not reqs & FORBIDDEN, f"{wheel.name} requires {sorted(reqs & FORBIDDEN)}"
        assert reqs <= {"torch", "transformers", "peft", "safetensors", "numpy", "tqdm",
                        "tokenizers", "filelock", "huggingface-hub", "llgbm-flora"}, reqs  # fmt: skip


def _readme_example(i: int = 0) -> str:
    text = (PKG / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) > i, "README has no python example"
    return blocks[i]


def _readme_code(base_dir, adapter_dirs) -> str:
    """The README's example, its two inputs pointed at a tiny local model and adapters."""
    code = _readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 6
    code, n_base = re.subn(r"^base = .*$", f"base = {str(base_dir)!r}", code, flags=re.M)
    local = [str(d) for d in adapter_dirs[:2]]
    code, n_adapters = re.subn(r"^adapters = .*$", f"adapters = {local!r}", code, flags=re.M)
    assert n_base == n_adapters == 1
    return code


def test_readme_example_runs(base_dir, adapter_dirs, model, tok, tmp_path, monkeypatch, capsys):
    code = _readme_code(base_dir, adapter_dirs)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "(2, 64)"
    from llgbm_delta import DeltaCache

    entries = DeltaCache(tmp_path / "delta-cache").entries()
    assert len(entries) == 2 and np.isfinite(entries[0].hidden_size)

    # The second example: model=/tokenizer= keywords, then similarity and nearest.
    from llgbm_delta import compute_deltas

    ns = {"model": model, "tokenizer": tok, "adapters": [str(d) for d in adapter_dirs[:2]]}
    ns["compute_deltas"] = compute_deltas
    exec(compile(_readme_example(1), "README.md", "exec"), ns)
    assert ns["S"].shape == (2, 2) and ns["idx"].tolist() == [1]
    assert ns["cos"][0] == pytest.approx(ns["S"][0, 1])


@pytest.mark.slow
def test_readme_example_runs_in_an_empty_venv(base_dir, adapter_dirs, tmp_path):
    """The two wheels and their locked dependencies in a fresh venv (from uv's cache, offline):
    every requirement met, nothing heavy installed, and the README example prints its shape."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv not on PATH")
    root = PKG.parents[1]
    wheels = tmp_path / "wheels"
    for package in ("llgbm-flora", "llgbm-delta"):
        subprocess.run(
            [uv, "build", "-q", "--package", package, "--wheel", "--out-dir", str(wheels)],
            cwd=root, check=True, capture_output=True,
        )  # fmt: skip
    req = tmp_path / "requirements.txt"
    subprocess.run(
        [uv, "export", "-q", "--package", "llgbm-delta", "--no-emit-workspace", "--no-hashes",
         "--no-dev", "--format", "requirements-txt", "-o", str(req)],
        cwd=root, check=True, capture_output=True,
    )  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "-q", str(venv), "--python", sys.executable], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [uv, "pip", "install", "-q", "--python", python, "--offline", "--no-deps", "-r", str(req),
         *map(str, sorted(wheels.glob("*.whl")))],
        capture_output=True, text=True,
    )  # fmt: skip
    if install.returncode != 0:
        pytest.skip(f"locked wheels not in uv's cache (offline): {install.stderr[-300:]}")
    check = subprocess.run([uv, "pip", "check", "--python", python], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = subprocess.run(
        [uv, "pip", "list", "--python", python, "--format", "freeze"],
        capture_output=True, text=True, check=True,
    ).stdout.lower()  # fmt: skip
    installed = {line.split("==")[0] for line in listed.splitlines()}
    heavy = FORBIDDEN - {"pyyaml"}  # pyyaml comes with transformers; the rest must not come
    assert not installed & heavy, sorted(installed & heavy)
    out = subprocess.run(
        [python, "-c", _readme_code(base_dir, adapter_dirs)],
        cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(2, 64)"


def test_import_is_lazy_and_cpu_import_loads_no_triton():
    """`import llgbm_delta` imports no torch; the compute path on CPU imports no Triton, no
    llgbm_flora.kernels, and registers no custom op (issue 12: CPU users do not pay for them)."""
    code = """
import sys
import llgbm_delta
light = "torch" in sys.modules
from llgbm_delta import compute_deltas, DeltaCache, delta_for_lora
import torch
try:
    torch.ops.llgbm_flora.gemm_swiglu_lora
    op = True
except (AttributeError, RuntimeError):
    op = False
print(light, "triton" in sys.modules, "llgbm_flora.kernels" in sys.modules, op)
print(sorted(n for n in llgbm_delta.__all__ if not hasattr(llgbm_delta, n)))
"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.splitlines() == ["False False False False", "[]"]


def test_package_readmes_have_only_absolute_links():
    """A README is also the wheel's page on an index, where a relative link leads nowhere."""
    readmes = sorted((PKG.parent).glob("*/README.md"))
    assert PKG / "README.md" in readmes
    for readme in readmes:
        text = readme.read_text()
        targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)", text)
        targets += re.findall(r"^\[[^\]]+\]:\s*(\S+)", text, flags=re.M)  # reference links
        targets += re.findall(r"""(?:src|href)=["']([^"']+)""", text)  # HTML
        relative = [t for t in targets if not re.match(r"(https?://|mailto:|#)", t)]
        assert not relative, f"{readme}: relative links {relative}"
