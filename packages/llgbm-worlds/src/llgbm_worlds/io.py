"""File writes and content hashes used by every world builder.

The writes are :mod:`llgbm_flora.atomic`'s (a temporary file in the same directory moved into
place with ``os.replace``, so a reader never sees half a file; directories swapped in whole);
here they only turn a failing write (disk full, no permission) or a refused replacement into a
:class:`~llgbm_worlds.errors.BuildError` naming the path. Every directory a build swaps in
carries the marker :data:`DONE`; a directory without it is never replaced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llgbm_flora import atomic

from llgbm_worlds.errors import BuildError

DONE = ".done.json"  # marker of a finished directory the build wrote (base, teacher runs)


def _cannot(path: Path, what: str, e: OSError) -> BuildError:
    return BuildError(f"{path}: cannot {what} ({e.strerror or e})")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    try:
        atomic.write_bytes(path, data)
    except OSError as e:
        raise _cannot(path, "write", e) from e


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_bytes_atomic(path, text.encode())


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def dir_digest(path: Path) -> str:
    """sha256 over the relative names and contents of every file under ``path`` (dot files skipped)."""
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(str(rel).encode() + b"\0" + sha256_file(p).encode() + b"\0")
    return h.hexdigest()


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap the finished ``tmp`` in at ``final``; an old ``final`` must carry :data:`DONE`."""
    try:
        atomic.replace_dir(tmp, final, marker=DONE)
    except atomic.DirectoryNotOwnedError as e:
        raise BuildError(str(e)) from None
    except OSError as e:
        raise _cannot(final, "move finished directory into place", e) from e


def fresh_tmp_dir(final: Path) -> Path:
    """An empty ``.<name>.tmp`` directory beside ``final`` (a leftover from a kill is removed)."""
    try:
        return atomic.fresh_dir(final)
    except OSError as e:
        raise _cannot(final.parent / f".{final.name}.tmp", "create build directory", e) from e


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
