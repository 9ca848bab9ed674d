"""Run directories: config, metadata, metrics, atomic checkpoints and resume.

    runs/<name>/
        config.yaml      the full config (load_config reads it back)
        metadata.json    git commit + dirty flag, environment versions, config/world/delta hashes
        metrics.jsonl    one JSON record per logged step (no wall-clock values: resumable equality)
        timing.jsonl     wall-clock per logged step (kept apart from metrics on purpose)
        checkpoints/step_000050.safetensors ...   atomic, newest ``keep`` kept
        adapters/<task>/ generated PEFT adapters;  eval/report.{json,md}
    runs/.<name>.lock    held by the one process training or evaluating the run (run_lock)

A run directory appears in one ``os.rename`` once its inputs were validated, so bad input never
leaves a half-written run behind. Run names are single safe path components
(:func:`llgbm_flora.names.check_name`). Checkpoints are :mod:`llgbm_train.checkpoint` files
(safetensors + JSON, never pickle); a run holding old ``.pt`` checkpoints is refused in one
line. Resuming takes the newest checkpoint that reads back intact and falls back to the one
before when the newest is damaged; temporary files of a killed checkpoint write are removed by
the next one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llgbm_flora import atomic
from llgbm_flora.names import check_name

from llgbm_train.checkpoint import SUFFIX, CheckpointError, load_state, save_state
from llgbm_train.config import Config, ConfigError, dump_config, load_config


class RunError(ValueError):
    """A run directory or checkpoint is missing, foreign or corrupt; one-line message."""


class CheckpointWarning(UserWarning):
    """The newest checkpoint was damaged and an older one is used instead."""


_CKPT = re.compile(rf"^step_(\d{{6,}}){re.escape(SUFFIX)}$")
_PICKLE_CKPT = re.compile(r"^step_(\d{6,})\.pt$")  # written by llgbm-train before 0.1


def checkpoint_step(path: str | Path) -> int | None:
    """The step in a checkpoint file name (``step_000100.safetensors`` -> 100), else None."""
    m = _CKPT.match(Path(path).name)
    return None if m is None else int(m.group(1))


_PACKAGES = (
    "llgbm-train",
    "llgbm-flora",
    "llgbm-delta",
    "llgbm-worlds",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "numpy",
    "sentence-transformers",
)


def git_info(cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the repository containing ``cwd`` (None when not a repo)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def environment() -> dict[str, Any]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "packages": versions,
    }
    try:
        import torch

        env["cuda"] = torch.version.cuda
        env["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # metadata must never stop a run
        env["devices"] = []
    return env


def file_hash(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass
class Run:
    """An existing run directory."""

    dir: Path

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def metadata_path(self) -> Path:
        return self.dir / "metadata.json"

    # creation --------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, config: Config, metadata: dict[str, Any]) -> Run:
        """Write config + metadata in a temp dir beside ``path``, then rename it into place."""
        path = Path(path)
        check_name(path.name, "run name", error=RunError)
        if path.exists():
            raise RunError(f"{path}: run directory exists (pass --resume to continue it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic.fresh_dir(path)
        try:
            (tmp / "config.yaml").write_text(dump_config(config))
            meta = {"created": _now(), "config_hash": config.hash, **metadata}
            (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
            (tmp / "metrics.jsonl").touch()
            (tmp / "checkpoints").mkdir()
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        path = Path(path)
        if not (path / "config.yaml").is_file():
            raise RunError(f"{path}: not a run directory (no config.yaml)")
        return cls(path)

    def config(self) -> Config:
        try:
            return load_config(self.config_path)
        except ConfigError as e:
            raise RunError(f"{self.config_path}: {e}") from None

    def metadata(self) -> dict[str, Any]:
        return json.loads(self.metadata_path.read_text())

    def update_metadata(self, **fields: Any) -> None:
        meta = self.metadata()
        meta.update(fields)
        atomic.write_json(self.metadata_path, meta, default=str)

    # metrics ---------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any], *, file: str = "metrics.jsonl") -> None:
        with open(self.dir / file, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def truncate_metrics(self, step: int) -> None:
        """Drop records past ``step`` (a killed run may have logged past its last checkpoint)."""
        for name in ("metrics.jsonl", "timing.jsonl"):
            p = self.dir / name
            if not p.is_file():
                continue
            keep = []
            for line in p.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
                if rec.get("step", 0) <= step:
                    keep.append(line + "\n")
            atomic.write_text(p, "".join(keep))

    # checkpoints -----------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest first (damaged ones included: loading tells them apart)."""
        if not self.checkpoint_dir.is_dir():
            return []
        names = [p.name for p in self.checkpoint_dir.iterdir()]
        if pickled := sorted(n for n in names if _PICKLE_CKPT.match(n)):
            # Never unpickled: torch.load of a file from someone else's run can run any code.
            raise RunError(
                f"{self.checkpoint_dir / pickled[-1]}: pickle checkpoint (.pt) refused, since "
                "loading one can run code; this llgbm writes .safetensors: retrain the run"
            )
        found = [(int(m.group(1)), n) for n in names if (m := _CKPT.match(n))]
        return [self.checkpoint_dir / n for _, n in sorted(found)]

    def save_checkpoint(self, state: dict[str, Any], step: int, *, keep: int = 2) -> Path:
        """Write ``state`` as ``step_<step>`` atomically; keep the newest ``keep`` checkpoints."""
        self.checkpoint_dir.mkdir(exist_ok=True)
        atomic.remove_leftovers(self.checkpoint_dir)  # a killed write's tmp file (run is locked)
        path = save_state(self.checkpoint_dir / f"step_{step:06d}{SUFFIX}", state)
        for old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, config: Config, path: Path | None = None) -> dict[str, Any]:
        """Newest intact (or the given) checkpoint; it must have been written under ``config``.

        A damaged newest checkpoint (a kill mid-write on a file system without atomic rename,
        a bad disk) is skipped with a :class:`CheckpointWarning` for the one before it.
        """
        candidates = [Path(path)] if path is not None else self.checkpoints()[::-1]
        if not candidates:
            raise RunError(f"{self.dir}: no checkpoint to resume from")
        damaged: list[str] = []
        for p in candidates:
            try:
                state = load_state(p)
            except CheckpointError as e:
                if path is not None:
                    raise RunError(str(e)) from None
                damaged.append(str(e))
                continue
            if damaged:
                warnings.warn(
                    f"{damaged[0]}; using the previous checkpoint {p.name}",
                    CheckpointWarning,
                    stacklevel=2,
                )
            if state.get("config_hash") != config.hash:
                raise RunError(
                    f"{p}: checkpoint was written by another config (hash "
                    f"{state.get('config_hash')}, this config {config.hash}); use the run's own "
                    "config.yaml or start a new run with --name"
                )
            return state
        raise RunError(f"{self.dir}: no intact checkpoint ({damaged[0]}; {len(damaged)} damaged)")


@contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold ``<runs>/.<name>.lock`` for a train, resume or evaluate of ``run_dir``.

    The lock sits beside the run directory, so it also guards a run that does not exist yet.
    A second process gets a one-line :class:`~llgbm_flora.atomic.LockHeldError` at once.
    """
    shown, run_dir = Path(run_dir), Path(run_dir).resolve()  # "runs/x/", "." and ./x: one lock
    with atomic.file_lock(run_dir.parent / f".{run_dir.name}.lock", what=f"run {shown}"):
        yield


def new_run_name(runs_dir: str | os.PathLike, base: str) -> str:
    """``base`` if free, else ``base-2``, ``base-3``... (``base`` must be a safe name)."""
    check_name(base, "run name", error=RunError)
    runs_dir = Path(runs_dir)
    if not (runs_dir / base).exists():
        return base
    i = 2
    while (runs_dir / f"{base}-{i}").exists():
        i += 1
    return f"{base}-{i}"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
