"""Crash-safe writes and a portable lock: the one implementation every llgbm package uses.

    from llgbm_flora import atomic

    atomic.write_json(run / "metadata.json", meta)      # readers see the old file or the new one
    with atomic.atomic_file(path) as tmp:               # any writer that takes a file name
        save_file(tensors, tmp)
    tmp = atomic.fresh_dir(final)                       # build a directory beside its place ...
    atomic.write_json(tmp / ".done.json", {...})        # ... mark it as ours ...
    atomic.replace_dir(tmp, final, marker=".done.json") # ... and swap it in whole
    with atomic.file_lock(lock_path, what=f"run {run}"):  # one process at a time (filelock)
        ...

A file is written to a temporary name in its own directory, flushed to disk, then moved into
place with ``os.replace``: a kill leaves the old file or the new one, never half of either, and
at worst a ``.<name>.<random>.tmp`` file that :func:`remove_leftovers` clears.

A directory cannot be swapped by one rename. :func:`replace_dir` moves the old one aside, moves
the new one in, then deletes the old one; it only ever replaces a directory that carries the
caller's marker file (something llgbm wrote), and refuses in one line otherwise, so a wrong
``--out`` never deletes a user's files.

Errors: OSError from the file system propagates unchanged (callers add what they were doing);
the refusals raise :class:`DirectoryNotOwnedError` and :class:`LockHeldError`, both ValueErrors
with one-line messages, so every command line prints them as one ``error:`` line.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DirectoryNotOwnedError",
    "LockHeldError",
    "atomic_file",
    "file_lock",
    "fresh_dir",
    "remove_leftovers",
    "replace_dir",
    "write_bytes",
    "write_json",
    "write_jsonl",
    "write_text",
]

TMP_SUFFIX = ".tmp"  # of temporary files and directories (always dot-prefixed)
ASIDE_SUFFIX = ".old"  # of a directory moved aside during replace_dir


class DirectoryNotOwnedError(ValueError):
    """A directory to be replaced does not carry the tool's marker: it is refused, not deleted."""


class LockHeldError(ValueError):
    """Another process holds the lock (a run being trained, a world being built)."""


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. POSIX only: Windows cannot open a directory for fsync;
    # some file systems (network mounts) refuse it. The file's own data is synced either way.
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_tmp(path: Path) -> Path:
    """Create an empty ``.<name>.<random>.tmp`` beside ``path``, with the umask's permissions.

    (``mkstemp`` would make it 0600, and a shared run or world would become unreadable to others.)
    """
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is synced and moved to ``path``.

    On an exception (or Ctrl-C) the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_tmp(path)
    try:
        yield tmp
        with open(tmp, "r+b") as f:  # r+: Windows needs a writable handle to flush to disk
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **dumps: Any) -> Path:
    """Write ``obj`` as JSON (plus a final newline) atomically; ``dumps`` go to ``json.dumps``."""
    return write_text(path, json.dumps(obj, indent=indent, **dumps) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Write one JSON document per line atomically (non-ASCII kept as is)."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def remove_leftovers(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete temporary files a killed :func:`atomic_file` left in ``directory`` (of ``name``).

    Only call it where no other process writes at the same time (under the directory's lock),
    since another writer's temporary file looks the same. Returns what was removed.
    """
    directory = Path(directory)
    pattern = f".{glob.escape(name)}.*{TMP_SUFFIX}" if name else f".*{TMP_SUFFIX}"
    removed = []
    for p in directory.glob(pattern) if directory.is_dir() else ():
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def fresh_dir(final: str | os.PathLike) -> Path:
    """An empty ``.<name>.tmp`` directory beside ``final``, to be filled then swapped in.

    A leftover of a killed build (the same name, or a directory moved aside by an interrupted
    :func:`replace_dir`) is removed first: both names are this module's own.
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}{TMP_SUFFIX}"
    aside = final.parent.glob(f".{glob.escape(final.name)}.*{ASIDE_SUFFIX}")
    for leftover in (tmp, *aside):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        elif leftover.exists() or leftover.is_symlink():
            leftover.unlink()
    tmp.mkdir(parents=True)
    return tmp


def _owned(d: Path, marker: str) -> bool:
    """True when ``d`` may be replaced: an empty directory, or one carrying ``marker``."""
    if d.is_symlink() or not d.is_dir():
        return False
    return (d / marker).is_file() or not any(d.iterdir())


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike, *, marker: str) -> Path:
    """Put the finished directory ``tmp`` at ``final``; an old ``final`` is replaced whole.

    The old ``final`` must be a directory carrying ``marker`` (a file the tool writes into every
    directory it owns) or be empty; anything else raises :class:`DirectoryNotOwnedError` and
    nothing is touched. The swap moves the old directory aside, moves ``tmp`` in, then deletes
    the old one: a reader sees the old directory or the new one; a kill between the two moves
    leaves ``final`` missing (rebuilt by the next run) and the old copy aside, cleared by
    :func:`fresh_dir`.
    """
    tmp, final = Path(tmp), Path(final)
    if not (final.exists() or final.is_symlink()):
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return final
    if not _owned(final, marker):
        why = (
            f"was not written by llgbm (no {marker})"
            if final.is_dir() and not final.is_symlink()
            else "is not a directory"
        )
        raise DirectoryNotOwnedError(
            f"{final}: exists and {why}; refusing to replace it: move it away or choose "
            "another path"
        )
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=ASIDE_SUFFIX, dir=final.parent))
    os.replace(final, aside / final.name)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(aside / final.name, final)  # put the old one back: nothing was lost
        aside.rmdir()
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return final


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, what: str, timeout: float | None = 0) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    Portable (``filelock``: fcntl on POSIX, msvcrt on Windows); the operating system releases
    it when the process dies, so a killed run never leaves a stale lock. ``timeout``: seconds to
    wait (0: fail at once, None: wait as long as it takes); when it runs out,
    :class:`LockHeldError` names ``what`` is busy.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=-1 if timeout is None else timeout)
    try:
        lock.acquire()
    except Timeout:
        raise LockHeldError(
            f"{what} is in use by another process (lock {path}); wait for it to finish"
        ) from None
    try:
        yield
    finally:
        lock.release()
