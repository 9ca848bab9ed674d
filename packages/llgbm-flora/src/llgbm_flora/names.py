"""Names that become paths, and paths read from files someone else wrote.

    from llgbm_flora.names import check_name, inside

    check_name(task_name, "task name")                  # -> the name, or one-line UnsafePathError
    inside(world_root, entry["path"], "teacher path")   # -> resolved path within world_root

A task, run, teacher or adapter name becomes one path component (``runs/<name>``,
``adapters/<task>``), so it is checked against a whitelist: letters, digits, ``_``, ``-`` and
``.``, starting with a letter or digit, not ending in ``.``, at most 128 characters, and not a
Windows device name. That excludes separators, ``..``, absolute paths, hidden files and names a
shell would read as options. A relative path read from a ``world.json`` or manifest is resolved
(symlinks included) and must stay inside the root it is relative to.

Both functions take the exception class to raise (``error=ManifestError``), so each package keeps
its own error types; the default is :class:`UnsafePathError`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["UnsafePathError", "check_name", "inside"]

MAX_NAME = 128
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?")
# Opening these names on Windows opens a device, whatever the folder.
_DEVICES = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}


class UnsafePathError(ValueError):
    """A name or path from a config, manifest or command line would leave its directory."""


def check_name(name: object, what: str, *, error: type[Exception] = UnsafePathError) -> str:
    """``name`` if it is safe as one path component, else ``error`` with a one-line message."""
    if not isinstance(name, str):
        raise error(f"{what}: must be a string, got {type(name).__name__}")
    ok = (
        len(name) <= MAX_NAME
        and _NAME.fullmatch(name) is not None
        and name.split(".")[0].lower() not in _DEVICES
    )
    if not ok:
        raise error(
            f"{what} {name!r} is not a safe name: use letters, digits, '_', '-' and '.', "
            f"starting with a letter or digit, at most {MAX_NAME} characters"
        )
    return name


def inside(
    root: str | os.PathLike,
    rel: object,
    what: str,
    *,
    error: type[Exception] = UnsafePathError,
) -> Path:
    """``root / rel`` resolved; ``error`` unless ``rel`` is relative and stays inside ``root``."""
    if not isinstance(rel, str) or not rel:
        raise error(f"{what}: must be a non-empty relative path, got {rel!r}")
    if Path(rel).is_absolute() or Path(rel).drive:
        raise error(f"{what} {rel!r}: must be relative to {root}, not absolute")
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise error(f"{what} {rel!r}: leaves {base} (resolves to {path})")
    return path
