"""Cluster quality: do deltas group adapters by family better than their flattened weights?"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from llgbm_explorer import analysis, data, ui
from llgbm_explorer.folders import ExplorerError, inside

# Delta Activations, Table 1 (average over three 7-9B bases): silhouette by domain, cosine.
PAPER = {"Delta Activations": 0.614, "flattened weights": -0.043}


@st.cache_data(show_spinner="reading the teachers' LoRA weights", max_entries=4)
def flat_weights(paths: tuple[str, ...], key: tuple) -> np.ndarray:
    """[n, n_params] flattened A and B of the teacher adapters (llgbm_worlds.quality's)."""
    from llgbm_worlds.quality import flat_weights as flatten

    return flatten([Path(p) for p in paths])


def compose_clustering(f) -> tuple[str, pd.DataFrame] | None:
    """The newest compose report's clustering table for this world, if there is one."""
    from llgbm_explorer.render.composition import clustering_table, compose_reports, read_report

    for path in compose_reports(f.runs):
        try:
            report = read_report(path, f.runs)
            if Path(str(report.get("world", ""))).resolve() == f.world:
                return path.parent.name, clustering_table(report)
        except (ExplorerError, KeyError, TypeError, AttributeError):
            continue
    return None


def per_group(x: np.ndarray, labels: list[str], name: str) -> pd.DataFrame:
    s = analysis.silhouettes(x, labels)
    df = pd.DataFrame({"group": labels, "silhouette": s})
    out = df.groupby("group", sort=True)["silhouette"].mean().reset_index()
    out["representation"] = name
    return out


def render() -> None:
    st.title("Cluster quality")
    st.caption(
        "Silhouette (cosine distance) of single-task teachers grouped by family and by task: "
        "1 is tight separate clusters, 0 no structure. The weight baseline is the same score on "
        "the teachers' flattened LoRA A and B. Paper (Delta Activations, Table 1, 7-9B bases): "
        f"deltas {PAPER['Delta Activations']}, flattened weights {PAPER['flattened weights']}."
    )
    with ui.friendly():
        table = ui.view_picker(ui.load_deltas())
    single = (table.meta["source"] == "teacher").to_numpy()
    meta, x = table.meta[single].reset_index(drop=True), table.deltas[single]
    if meta["family"].nunique() < 2:
        st.info(
            f"{len(meta)} single-task teacher deltas from {meta['family'].nunique()} family: "
            "a silhouette needs two families or more"
        )
        return
    groups = {
        "deltas by family": (x, list(meta["family"])),
        "deltas by task": (x, list(meta["task"])),
    }
    f = ui.folders()
    world = ui.load_world()
    paths = world.teachers.set_index("adapter").loc[meta["adapter"], "path"].tolist()
    weights_key = ("weights", f.world, tuple(paths))
    if st.button(f"compute the weight baseline (reads {len(paths)} adapter files)"):
        st.session_state[weights_key] = True
    w = None
    if st.session_state.get(weights_key):
        with ui.friendly():
            for p in paths:
                inside(p, world.root)
            w = flat_weights(tuple(paths), data.stamp(*(Path(p) for p in paths)))
        groups["flattened weights by family"] = (w, list(meta["family"]))
        groups["flattened weights by task"] = (w, list(meta["task"]))
    scores = analysis.cluster_table(groups)
    st.dataframe(scores.round(3), hide_index=True)
    composed = compose_clustering(f)
    if composed is not None:
        name, composed_table = composed
        st.caption(f"from llgbm-compose ({name}): deltas, flattened weights and delta-W = B·A")
        st.dataframe(composed_table.round(3), hide_index=True)
    bars = [per_group(x, list(meta["family"]), "deltas")]
    if w is not None:
        bars.append(per_group(w, list(meta["family"]), "flattened weights"))
    fig = px.bar(
        pd.concat(bars),
        x="group",
        y="silhouette",
        color="representation",
        barmode="group",
        range_y=[-1, 1],
        color_discrete_sequence=px.colors.qualitative.D3,
        labels={"group": "family", "silhouette": "mean silhouette"},
        height=420,
    )
    st.plotly_chart(fig, key="clusters")
    ui.delta_notes(table)
