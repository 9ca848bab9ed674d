"""A cached ``test``-preset tiny world for test suites (this package's and others').

    from llgbm_worlds.testing import test_world
    world_dir = test_world()          # built once per code version, then reused

The world is cached under ``root/llgbm-test-world-<key>`` (``root`` defaults to
``$LLGBM_TEST_WORLDS`` or ``<tmp>/llgbm-test-worlds``), where the key hashes this package's
source and the torch / transformers / peft versions, so a code change builds a fresh one. A file
lock makes concurrent callers wait for one build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

from llgbm_flora.atomic import file_lock

import llgbm_worlds

__test__ = False  # pytest: this module is a helper, not tests
# One thread: fast for a model this small, no oversubscription on a busy machine, and the same
# bits whatever the core count.
THREADS = 1


def code_key() -> str:
    """sha256 (16 hex) of this package's source files and the library versions it depends on."""
    h = hashlib.sha256()
    pkg = Path(llgbm_worlds.__file__).parent
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    for name in ("torch", "transformers", "peft", "tokenizers"):
        h.update(f"{name}={version(name)}".encode())
    return h.hexdigest()[:16]


def default_root() -> Path:
    return Path(
        os.environ.get("LLGBM_TEST_WORLDS") or Path(tempfile.gettempdir()) / "llgbm-test-worlds"
    )


def test_world(root: str | Path | None = None, *, seed: int = 0, preset: str = "test") -> Path:
    """Directory of a built tiny world of ``preset`` under ``root`` (built on first use).

    ``preset``: ``test`` (shared LoRA init) or ``test-independent`` (one init per run; it reuses
    the ``test`` world's base rather than pretraining the same one again).
    """
    from llgbm_worlds.build import build_world

    root = Path(root) if root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    suffix = "" if preset == "test" else f"-{preset}"
    out = root / f"llgbm-test-world-{code_key()}-s{seed}{suffix}"
    with file_lock(root / f".{out.name}.lock", what=f"test world {out}", timeout=None):
        if not (out / "world.json").is_file():
            if preset != "test" and not (out / "base").exists():
                _share_base(root, out, preset, seed)
            build_world("tiny", out, preset=preset, seed=seed, progress=False, threads=THREADS)
    return out


def _share_base(root: Path, out: Path, preset: str, seed: int) -> None:
    """Copy the ``test`` world's base into ``out`` when ``preset`` pretrains the same one.

    The build checks the copy's fingerprint and sha256 like any base it resumes from.
    """
    from llgbm_worlds.presets import get_preset

    if get_preset("tiny", preset).model == get_preset("tiny", "test").model:
        donor = test_world(root, seed=seed)
        shutil.copytree(donor / "base", out / "base")
