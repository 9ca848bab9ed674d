"""Delta map: PCA or t-SNE of teacher and generated deltas, coloured by family, marked by split."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from llgbm_explorer import ui

HOVER = ["adapter", "task", "accuracy", "step", "data_split", "run"]
# Marker per (source, split): teachers filled, generated adapters as crosses.
SYMBOLS = {
    ("teacher", "train"): "circle",
    ("teacher", "heldout"): "diamond",
    ("mixture", "train"): "square",
    ("mixture", "heldout"): "square-open",
    ("generated", "train"): "x",
    ("generated", "heldout"): "cross",
}


def points(meta: pd.DataFrame, coords) -> pd.DataFrame:
    """The plot's table: meta plus x, y and a ``mark`` (source and split) per point."""
    df = meta.copy()
    df["x"], df["y"] = coords[:, 0], coords[:, 1]
    split = df["split"].where(
        df["heldout_kind"] == "", df["split"] + " (" + df["heldout_kind"] + ")"
    )
    df["mark"] = df["source"] + " · " + split
    df["accuracy"] = df["accuracy"].round(3)
    return df


def symbol_map(df: pd.DataFrame) -> dict[str, str]:
    return {
        m: SYMBOLS.get((src, split), "circle")
        for m, src, split in zip(df["mark"], df["source"], df["split"])
    }


def render() -> None:
    st.title("Delta map")
    st.caption(
        "Each point is one adapter's Delta Activations (the base model's last-token hidden "
        "state shift on the probes), projected to 2-D. Colour: task family; marker: teacher or "
        "generated, train or held-out."
    )
    with ui.friendly():
        table = ui.view_picker(ui.load_deltas())
    c1, c2, c3 = st.columns(3)
    method = c1.radio("projection", ["PCA", "t-SNE"], horizontal=True)
    show_gen = c2.checkbox("generated adapters", value=True, disabled=table.n_generated == 0)
    show_mix = c3.checkbox("mixture teachers", value=True)
    keep = pd.Series(True, index=table.meta.index)
    if not show_gen:
        keep &= table.meta["source"] != "generated"
    if not show_mix:
        keep &= table.meta["source"] != "mixture"
    meta, x = table.meta[keep].reset_index(drop=True), table.deltas[keep.to_numpy()]
    if len(meta) == 0:
        st.info("nothing to show with these filters")
        return
    coords, var = ui.projection(x, method)
    df = points(meta, coords)
    fig = px.scatter(
        df,
        x="x",
        y="y",
        color="family",
        symbol="mark",
        symbol_map=symbol_map(df),
        color_discrete_sequence=px.colors.qualitative.D3,
        hover_data={c: True for c in HOVER} | {"x": False, "y": False, "mark": False},
        height=620,
    )
    fig.update_traces(marker={"size": 11, "line": {"width": 0.5, "color": "white"}})
    if method == "PCA":
        fig.update_layout(
            xaxis_title=f"PC1 ({100 * var[0]:.0f}% of variance)",
            yaxis_title=f"PC2 ({100 * var[1]:.0f}%)",
        )
    else:
        fig.update_layout(xaxis_title="t-SNE 1 (cosine)", yaxis_title="t-SNE 2")
    st.plotly_chart(fig, key="delta_map")
    ui.delta_notes(table)
