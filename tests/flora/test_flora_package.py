"""llgbm-flora stands alone: declared deps cover its imports; importing it stays light on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from llgbm_flora.testing import dependency_names

PKG = Path(__file__).resolve().parents[2] / "packages" / "llgbm-flora"
# Imported lazily by kernels.py, only on a CUDA call; shipped with CUDA builds of torch.
OPTIONAL = {"triton"}


def test_imports_are_declared_dependencies():
    declared, imported = dependency_names(PKG)
    assert imported - OPTIONAL <= declared, f"undeclared: {sorted(imported - OPTIONAL - declared)}"
    assert declared <= {"torch", "transformers", "peft", "safetensors", "filelock"}, declared
    assert {"torch", "safetensors"} <= imported


_PROBE = """
import sys
import torch
import llgbm_flora, llgbm_flora.fused, llgbm_flora.functional
after_import = "triton" in sys.modules
from llgbm_flora.testing import tiny_llama, tiny_spec, random_batch
m = tiny_llama().bfloat16()
b = random_batch(tiny_spec(m, rank=16), n=2)
with torch.no_grad():
    llgbm_flora.fused.fused_hidden_states(m, b, torch.ones(2, 3, dtype=torch.long))
try:
    torch.ops.llgbm_flora.gemm_swiglu_lora
    op = True
except (AttributeError, RuntimeError):
    op = False
print(after_import, "llgbm_flora.kernels" in sys.modules, op)
"""


def test_cpu_import_loads_no_triton_and_registers_no_op():
    """On a CPU machine, `import llgbm_flora` (and its fused forward) imports no Triton; a
    forward in bf16 with rank 16 (the kernels' case on CUDA) neither imports llgbm_flora.kernels
    nor registers its custom op. (Building an HF model may import Triton through
    torch.distributed where a CUDA torch is installed; a CPU-only torch has no Triton.)"""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.stdout.strip() == "False False False"


def test_package_import_is_torch_free_until_a_name_needs_it():
    """`import llgbm_flora` and its torch-free modules (atomic, cli_errors) load no torch, so a
    light command (llgbm-delta ls) stays light; the first tensor name imports it."""
    probe = (
        "import sys, llgbm_flora, llgbm_flora.atomic, llgbm_flora.cli_errors\n"
        "print('torch' in sys.modules)\n"
        "from llgbm_flora import LoraBatch, algebra\n"
        "print('torch' in sys.modules, LoraBatch.__module__, algebra.__name__)\n"
        "print(all(getattr(llgbm_flora, n) is not None for n in llgbm_flora.__all__))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == [
        "False",
        "True llgbm_flora.spec llgbm_flora.algebra",
        "True",
    ]
    import llgbm_flora

    try:
        llgbm_flora.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_every_lazy_name_of_every_package_resolves():
    """flora, delta and worlds export through llgbm_flora.lazy: each listed name must load from
    the submodule it is mapped to (a wrong mapping fails here, not in a user's import)."""
    import importlib

    for package in ("llgbm_flora", "llgbm_delta", "llgbm_worlds"):
        mod = importlib.import_module(package)
        for name in mod.__all__:
            assert getattr(mod, name) is not None, f"{package}.{name}"
        assert set(mod.__all__) <= set(dir(mod))
