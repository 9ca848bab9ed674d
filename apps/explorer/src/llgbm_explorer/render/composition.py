"""Composition: additivity of deltas and merges scored on their tasks, from llgbm-compose.

Reads ``RUNS/compose/<world name>/report.json`` (written by ``python -m llgbm_compose compose
WORLD``, llgbm_compose.experiment.run_compose; a ``report.json`` or
any ``*.json`` report directly in ``RUNS/compose`` is read too). Sections the report lacks, or
lays out differently, are named instead of drawn.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from llgbm_explorer import ui
from llgbm_explorer.folders import ExplorerError, inside

COMPOSE_DIR = (
    "compose"  # under the runs folder; `python -m llgbm_compose compose WORLD` writes there
)
TARGETS = {
    "sum": "d(a) + d(b)",
    "mean": "(d(a) + d(b)) / 2",
    "fit": "best a·d(a) + b·d(b)",
    "a": "d(a) alone",
    "b": "d(b) alone",
}


def compose_reports(runs_dir: Path) -> list[Path]:
    """Compose report files under ``runs_dir/compose``, newest first."""
    d = runs_dir / COMPOSE_DIR
    if not d.is_dir():
        return []
    found = [*d.glob("*/report.json"), *d.glob("*.json")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def read_report(path: Path, runs_dir: Path) -> dict:
    p = inside(path, runs_dir)
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExplorerError(f"{path}: not a readable JSON report ({type(e).__name__})") from None
    if not isinstance(report, dict):
        raise ExplorerError(f"{path}: not a compose report (top level is not an object)")
    return report


def clustering_table(report: dict) -> pd.DataFrame:
    """representation x grouping silhouettes of a report's clustering section."""
    sil = report["clustering"]["silhouette"]
    return pd.DataFrame(
        [{"representation": rep, **{g: v for g, v in by.items()}} for rep, by in sil.items()]
    )


def additivity_table(report: dict) -> pd.DataFrame:
    """Mean cosine / relative error of each mixture's delta to each target, per space."""
    s = report["additivity"]["summary"]
    rows = []
    for space, targets in s.items():
        if not isinstance(targets, dict) or space == "merged":
            continue
        for t, v in targets.items():
            rows.append(
                {
                    "space": space,
                    "target": TARGETS.get(t, t),
                    "cos": v["cos"],
                    "rel_err": v["rel_err"],
                }
            )
    return pd.DataFrame(rows)


def merge_table(report: dict) -> pd.DataFrame:
    """Accuracy of each adapter (teachers and merges) per mixture and eval set, long form."""
    rows = []
    for row in report["merges"]["mixtures"]:
        a, b = row["parts"]
        names = {"a": a, "b": b, "mix": f"{row['task']} (mixture)"}
        for adapter, by_set in row["scores"].items():
            for e, sc in by_set.items():
                lo, hi = sc.get("ci95", [None, None])
                rows.append(
                    {
                        "mixture": row["task"],
                        "items of": names.get(e, e),
                        "adapter": adapter,
                        "accuracy %": 100 * sc["accuracy"],
                        "CI low %": None if lo is None else 100 * lo,
                        "CI high %": None if hi is None else 100 * hi,
                    }
                )
    return pd.DataFrame(rows)


def pooled_table(report: dict) -> pd.DataFrame:
    """Accuracy % of each adapter pooled over mixtures (items of a, b, the mix) and same-task merges."""
    s = report["merges"]["summary"]
    cols = {f"mixtures: items of {e}": by for e, by in (s.get("mixtures") or {}).items()}
    if s.get("same_task"):
        cols["same-task merges"] = s["same_task"]
    adapters = list(dict.fromkeys(a for by in cols.values() for a in by))
    return pd.DataFrame(
        [
            {"adapter": a, **{c: 100 * by[a] if a in by else None for c, by in cols.items()}}
            for a in adapters
        ]
    )


def compose_command(world: Path, runs: Path) -> str:
    """The command that writes the report this page reads for ``world``."""
    return f"uv run llgbm compose {world} --out {runs / COMPOSE_DIR / world.name}"


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    """Draw one section; a report without it (or laid out otherwise) gets a caption."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError) as e:
        st.caption(f"{name}: not in this report, or laid out differently ({type(e).__name__}: {e})")


def render() -> None:
    st.title("Composition")
    f = ui.folders()
    files = compose_reports(f.runs)
    if not files:
        st.info(
            f"{f.runs / COMPOSE_DIR}: no composition results yet. `{compose_command(f.world, f.runs)}` "
            "writes them (clustering, additivity, merges, retrieval; minutes on CPU for the "
            "tiny world)"
        )
        return
    names = [p.relative_to(f.runs / COMPOSE_DIR).as_posix() for p in files]
    pick = st.selectbox("report", names)
    with ui.friendly():
        report = read_report(files[names.index(pick)], f.runs)
    st.caption(
        f"world {report.get('world', '?')} · kind {report.get('kind', '?')} · preset "
        f"{report.get('preset', '?')}"
    )
    st.header("Additivity")
    st.caption(
        "Delta of a teacher trained on two tasks' mixed data, against the deltas of the two "
        "single-task teachers: additive deltas put 'sum' at cosine 1, relative error 0."
    )
    with section("additivity"):
        add = additivity_table(report)
        fig = px.bar(
            add, x="target", y="cos", color="space", barmode="group", range_y=[-1, 1], height=380,
            color_discrete_sequence=px.colors.qualitative.D3,
            hover_data=["rel_err"],
        )  # fmt: skip
        st.plotly_chart(fig, key="additivity")
        st.dataframe(add.round(3), hide_index=True)
        merged = report["additivity"]["summary"].get("merged") or {}
        if merged:
            st.dataframe(
                pd.DataFrame([{"comparison": k, **v} for k, v in merged.items()]).round(3),
                hide_index=True,
            )
    st.header("Merges scored on their tasks")
    st.caption(
        "A mixture's two part teachers merged (average, task arithmetic, TIES, DARE), scored with "
        "the teachers on the items of each part and of the mixture; same-task merges combine one "
        "task's teachers of different data splits."
    )
    with section("pooled merges"):
        st.dataframe(pooled_table(report).round(1), hide_index=True)
    with section("merges"):
        m = merge_table(report)
        mix = st.selectbox("mixture", sorted(m["mixture"].unique()))
        sub = m[m["mixture"] == mix]
        fig = px.bar(
            sub, x="adapter", y="accuracy %", color="items of", barmode="group",
            range_y=[0, 100], height=400, color_discrete_sequence=px.colors.qualitative.D3,
        )  # fmt: skip
        st.plotly_chart(fig, key="merges")
        st.dataframe(sub.round(1), hide_index=True)
    st.header("Clustering and retrieval")
    with section("clustering"):
        st.dataframe(clustering_table(report).round(3), hide_index=True)
    with section("retrieval"):
        r = report["retrieval"]
        st.dataframe(
            pd.DataFrame(
                [{"measure": k, "value": v} for k, v in r.items() if "@" in k or k == "self_rank1"]
            ),
            hide_index=True,
        )
