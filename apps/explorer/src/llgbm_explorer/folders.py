"""The folders an explorer session may read, and the containment check for typed paths.

    f = Folders.from_args(["--world", "worlds/tiny", "--runs", "runs"])
    f = f.with_typed(world="worlds/other")     # ExplorerError unless inside f.roots

The command line chooses the folders (and so the roots: the working directory, plus every folder
given on it). A path typed in the sidebar is resolved (symlinks followed) and accepted only when
it lies inside one of those roots, so the page can never be made to read ``/etc`` or ``~/.ssh``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path


class ExplorerError(ValueError):
    """Something the explorer was pointed at is missing, foreign or not allowed; one line."""


DEFAULT_WORLD = "worlds/tiny"  # configs/*.yaml's world.dir
DEFAULT_RUNS = "runs"  # configs' runs_dir
DEFAULT_RESULTS = "docs/results.md"  # written by `llgbm experiment`
CACHE_IN_WORLD = "delta_cache"  # the delta cache's default place inside a world


@dataclass(frozen=True)
class Folders:
    """Where the explorer reads from (all absolute)."""

    world: Path  # a world directory (world.json)
    delta_cache: Path  # a DeltaCache directory (default: <world>/delta_cache)
    runs: Path  # a folder of run directories (runs/<name>/config.yaml)
    results: Path  # docs/results.md (its .json sibling holds the numbers)
    roots: tuple[Path, ...]  # typed paths must resolve inside one of these

    def __post_init__(self) -> None:
        for name in ("world", "delta_cache", "runs", "results"):
            if not getattr(self, name).is_absolute():
                raise ValueError(f"Folders.{name}: must be absolute, got {getattr(self, name)}")
        if not self.roots:
            raise ValueError("Folders.roots: at least one root is needed")

    @classmethod
    def from_args(cls, argv: list[str], cwd: Path | None = None) -> Folders:
        """Folders from the explorer's command line (see ``parser``); relative to ``cwd``."""
        a = parser().parse_args(argv)
        cwd = (cwd or Path.cwd()).resolve()

        def at(p: str) -> Path:
            return (cwd / p).resolve()

        world = at(a.world)
        chosen = [world, at(a.runs), at(a.results).parent]
        cache = at(a.delta_cache) if a.delta_cache else world / CACHE_IN_WORLD
        if a.delta_cache:
            chosen.append(cache)
        roots = _unique([cwd, *(at(r) for r in a.root), *chosen])
        return cls(world, cache, at(a.runs), at(a.results), roots)

    def check(self, typed: str | Path) -> Path:
        """``typed`` resolved against the first root; ExplorerError unless inside a root."""
        p = Path(typed).expanduser()
        p = (p if p.is_absolute() else self.roots[0] / p).resolve()
        if not any(p.is_relative_to(r) for r in self.roots):
            allowed = ", ".join(str(r) for r in self.roots)
            raise ExplorerError(
                f"{typed}: outside the folders this explorer may read ({allowed}); "
                "restart it with `just explorer --root DIR` to allow another"
            )
        return p

    def with_typed(self, **typed: str) -> Folders:
        """A copy with the given fields replaced by checked typed paths.

        Changing the world moves a delta cache that sat in the old world along with it.
        """
        new = {k: self.check(v) for k, v in typed.items() if v and str(v).strip()}
        if "world" in new and "delta_cache" not in new and self.cache_in_world:
            new["delta_cache"] = new["world"] / CACHE_IN_WORLD
        return dataclasses.replace(self, **new)

    @property
    def cache_in_world(self) -> bool:
        return self.delta_cache == self.world / CACHE_IN_WORLD


def inside(path: Path, folder: Path) -> Path:
    """``path`` resolved, if it lies inside ``folder`` (for files a manifest or listing names)."""
    p = Path(path).resolve()
    if not p.is_relative_to(Path(folder).resolve()):
        raise ExplorerError(f"{path}: points outside {folder}; not read")
    return p


def _unique(paths: list[Path]) -> tuple[Path, ...]:
    out: list[Path] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return tuple(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llgbm-explorer",
        description="Look at a world's deltas, composition results and training runs in a "
        "browser (Streamlit, bound to 127.0.0.1). Example: llgbm-explorer --world worlds/tiny "
        "--runs runs",
    )
    p.add_argument("--world", default=DEFAULT_WORLD, help="world directory (default: %(default)s)")
    p.add_argument(
        "--delta-cache",
        help="delta cache directory (default: WORLD/delta_cache, where the CLI puts it)",
    )
    p.add_argument(
        "--runs", default=DEFAULT_RUNS, help="folder of run directories (default: %(default)s)"
    )
    p.add_argument(
        "--results",
        default=DEFAULT_RESULTS,
        help="the experiment's results page, from `llgbm experiment` (default: %(default)s)",
    )
    p.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="DIR",
        help="another folder whose contents may be chosen in the sidebar (repeatable; the "
        "working directory and the folders above are always allowed)",
    )
    return p
