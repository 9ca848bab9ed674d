"""Similarity heat map: cosine between every pair of deltas, ordered by family and task."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from llgbm_explorer import analysis, ui


def block_means(sims: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """Mean cosine within each label and to every other label (diagonal pairs excluded)."""
    lab = np.asarray(labels)
    rows = []
    for g in dict.fromkeys(labels):
        inside = lab == g
        pair = sims[np.ix_(inside, inside)]
        n = int(inside.sum())
        within = (pair.sum() - np.trace(pair)) / (n * n - n) if n > 1 else float("nan")
        across = sims[np.ix_(inside, ~inside)].mean() if (~inside).any() else float("nan")
        rows.append({"group": g, "n": n, "within": within, "to others": across})
    return pd.DataFrame(rows)


def render() -> None:
    st.title("Similarity")
    st.caption("Cosine similarity of deltas. Adapters of one family should form bright blocks.")
    with ui.friendly():
        table = ui.view_picker(ui.load_deltas())
    meta = table.meta
    c1, c2 = st.columns(2)
    families = sorted(meta["family"].unique())
    chosen = c1.multiselect("families", families, default=families)
    group = c2.radio("group by", ["family", "task"], horizontal=True)
    keep = meta["family"].isin(chosen).to_numpy()
    if not keep.any():
        st.info("pick at least one family")
        return
    m = meta[keep].reset_index(drop=True)
    sims = analysis.cosine_matrix(table.deltas[keep])
    labels = [f"{a} [{s}]" for a, s in zip(m["adapter"], m["source"])]
    fig = go.Figure(
        go.Heatmap(
            z=sims,
            x=labels,
            y=labels,
            zmin=-1,
            zmax=1,
            colorscale="RdBu_r",
            customdata=np.stack(
                [
                    np.broadcast_to(m[group].to_numpy()[None], sims.shape),
                    np.broadcast_to(m[group].to_numpy()[:, None], sims.shape),
                ],
                axis=-1,
            ),
            hovertemplate="%{y}<br>%{x}<br>cosine %{z:.3f}<extra>%{customdata[1]} vs %{customdata[0]}</extra>",
        )
    )
    fig.update_layout(
        height=720,
        xaxis={"showticklabels": len(m) <= 40},
        yaxis={"showticklabels": len(m) <= 40, "autorange": "reversed"},
    )
    st.plotly_chart(fig, key="similarity")
    st.subheader(f"Mean cosine by {group}")
    st.dataframe(block_means(sims, list(m[group])), hide_index=True)
    ui.delta_notes(table)
