"""What every page shares: the chosen folders, the sidebar, cached loaders, friendly errors.

The folders live in ``st.session_state["folders"]`` (a ``Folders``), set from the command line
on a session's first run and changed only through the sidebar's checked text inputs. Loaders are
``st.cache_data`` functions keyed by the files' stamps, so a page redraw reads nothing again and
a file the CLI rewrote is read afresh.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import streamlit as st

from llgbm_explorer import analysis, data
from llgbm_explorer.folders import ExplorerError, Folders

KEY = "llgbm_explorer_folders"


def folders() -> Folders:
    """This session's folders (from the command line on first use)."""
    if KEY not in st.session_state:
        st.session_state[KEY] = Folders.from_args(sys.argv[1:])
    return st.session_state[KEY]


@contextlib.contextmanager
def friendly() -> Iterator[None]:
    """Show an ExplorerError as one info box and stop the page (never a traceback)."""
    try:
        yield
    except ExplorerError as e:
        st.info(str(e))
        st.stop()


# -- sidebar -----------------------------------------------------------------------------
def _status(path: Path, marker: str) -> str:
    return "found" if (path / marker).exists() else "not found"


def sidebar() -> None:
    f = folders()
    with st.sidebar:
        st.markdown("**Folders**")
        with st.form("folders"):
            world = st.text_input("world", str(f.world), help="a world directory (world.json)")
            cache = st.text_input(
                "delta cache", str(f.delta_cache), help="default: WORLD/delta_cache"
            )
            runs = st.text_input("runs", str(f.runs), help="a folder of run directories")
            if st.form_submit_button("apply"):
                try:
                    typed = {"world": world, "runs": runs}
                    if cache != str(f.delta_cache):
                        typed["delta_cache"] = cache
                    st.session_state[KEY] = f.with_typed(**typed)
                    st.rerun()
                except ExplorerError as e:
                    st.error(str(e))
        f = folders()
        n_runs = len(data.run_dirs(f.runs))
        st.caption(
            f"world.json {_status(f.world, 'world.json')} · delta cache "
            f"{_status(f.delta_cache, 'manifest.json')} · {n_runs} run(s)"
        )


# -- cached loaders ----------------------------------------------------------------------
def _run_files(runs_dir: Path) -> tuple:
    paths: list[Path] = [runs_dir]
    for d in data.run_dirs(runs_dir):
        paths += [
            d / "config.yaml",
            d / "metadata.json",
            d / "metrics.jsonl",
            d / "eval",
            d / "eval" / data.GENERATED_DELTAS,
        ]
    return data.stamp(*paths)


# Each loader's last argument is the stamp of the files it reads: the cache key changes with them.
@st.cache_data(show_spinner="reading world.json", max_entries=8)
def _world(root: str, key: tuple) -> data.WorldView:
    return data.read_world(Path(root))


@st.cache_data(show_spinner="reading runs", max_entries=8)
def _runs(runs_dir: str, key: tuple) -> tuple[list[data.RunView], list[tuple[str, str]]]:
    return data.read_runs(Path(runs_dir))


@st.cache_data(show_spinner="reading the delta cache", max_entries=8)
def _deltas(world: str, cache: str, runs_dir: str, view: int | None, key: tuple) -> data.DeltaTable:
    # key holds the stamps of world.json, the cache and the runs: a new entry is read afresh.
    w = _world(world, data.stamp(Path(world) / "world.json"))
    runs, _ = _runs(runs_dir, _run_files(Path(runs_dir)))
    return data.read_deltas(w, Path(cache), runs, view)


def load_world() -> data.WorldView:
    f = folders()
    return _world(str(f.world), data.stamp(f.world / "world.json"))


def load_runs() -> tuple[list[data.RunView], list[tuple[str, str]]]:
    f = folders()
    return _runs(str(f.runs), _run_files(f.runs))


def load_deltas(view: int | None = None) -> data.DeltaTable:
    f = folders()
    key = (
        data.stamp(
            f.world / "world.json", f.delta_cache / "manifest.json", f.delta_cache / "entries"
        ),
        _run_files(f.runs),
    )
    try:
        return _deltas(str(f.world), str(f.delta_cache), str(f.runs), view, key)
    except ExplorerError as e:
        used = run_caches()
        if used and f.delta_cache not in used:
            hint = ", ".join(str(p) for p in used)
            raise ExplorerError(f"{e}. Your runs used: {hint}") from None
        raise


def run_caches() -> list[Path]:
    """Delta cache directories the runs' metadata name (where `llgbm train` put deltas)."""
    runs, _ = load_runs()
    out: list[Path] = []
    for r in runs:
        d = (r.metadata.get("delta_cache") or {}).get("dir")
        if d and Path(d).resolve() not in out:
            out.append(Path(d).resolve())
    return out


def view_picker(table: data.DeltaTable) -> data.DeltaTable:
    """A selectbox over the cache's (probes, spec) views when it holds more than one."""
    if len(table.views) < 2:
        return table
    labels = [v.label for v in table.views]
    pick = st.selectbox("deltas", labels, index=labels.index(table.view.label))
    return load_deltas(labels.index(pick)) if pick != table.view.label else table


def delta_notes(table: data.DeltaTable) -> None:
    """One caption line about what the table holds and what is missing."""
    f = folders()
    parts = [f"{len(table.meta)} deltas [{table.deltas.shape[1]}] · {table.view.label}"]
    if table.missing:
        parts.append(
            f"{len(table.missing)} world adapter(s) have no delta here (add them with "
            f"`just compute-deltas --world {f.world}`)"
        )
    if table.other_view:
        parts.append(
            f"generated deltas of {', '.join(table.other_view)} are of other probes or spec "
            "(pick their view above, if the cache holds it)"
        )
    elif table.n_generated == 0:
        runs, _ = load_runs()
        if not runs:
            parts.append(
                f"no runs in {f.runs} yet: `just train delta_multi` adds generated adapters"
            )
        else:
            parts.append(
                "no generated adapters' deltas: `llgbm evaluate RUN` writes them "
                "(RUN/eval/deltas.safetensors)"
            )
    st.caption(" · ".join(parts))
    for p in table.problems:
        st.warning(p)


@st.cache_data(show_spinner="projecting", max_entries=32)
def projection(x: np.ndarray, method: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(coords [n, 2], PCA explained variance [2] or empty) for ``method`` "PCA" | "t-SNE"."""
    if method == "PCA":
        return analysis.pca_2d(x)
    return analysis.tsne_2d(x, seed=seed), np.zeros(0)
