"""llgbm-compose stands alone: declared deps cover its imports, nothing heavy, README runs."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "packages" / "llgbm-compose"
FORBIDDEN = {"llgbm-train", "streamlit", "sentence-transformers"}
DIST_OF = {"faiss": "faiss-cpu"}  # import name -> distribution name, where they differ


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def test_imports_are_declared_dependencies():
    declared = _requirement_names(
        tomllib.loads((PKG / "pyproject.toml").read_text())["project"]["dependencies"]
    )
    imported = set()
    for path in (PKG / "src" / "llgbm_compose").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "llgbm_compose"}
    dists = {DIST_OF.get(m, m).replace("_", "-") for m in third_party}
    assert dists <= declared, f"imported but not declared: {sorted(dists - declared)}"
    assert not declared & FORBIDDEN
    assert {"llgbm-flora", "llgbm-delta", "llgbm-worlds", "faiss-cpu", "numpy"} <= declared


def test_readme_example_runs(world_dir, capsys):
    text = (PKG / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    code, n = re.subn(r'World\.load\("worlds/tiny"\)', f"World.load({str(world_dir)!r})", code)
    assert n == 1
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip().splitlines()[-1] == "True"


def test_import_is_lazy_and_every_export_resolves():
    """`import llgbm_compose` (and its CLI, which `llgbm` mounts) loads neither torch nor faiss;
    every name in __all__ resolves."""
    import subprocess

    code = """
import sys
import llgbm_compose, llgbm_compose.cli
print("torch" in sys.modules, "faiss" in sys.modules)
print(sorted(n for n in llgbm_compose.__all__ if getattr(llgbm_compose, n, None) is None))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["False False", "[]"]
