"""Retrieval: the adapters nearest to a chosen adapter, or to what a run generates from prompts.

Exact cosine over the cached deltas (numpy): a zoo of thousands answers in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from llgbm_explorer import analysis, data, generate, ui
from llgbm_explorer.folders import ExplorerError


def neighbours(
    table: data.DeltaTable, query: np.ndarray, k: int, *, exclude: int | None = None
) -> pd.DataFrame:
    """The k nearest deltas to ``query`` with their adapter, task, family and cosine."""
    hits = analysis.nearest(table.deltas, query, k, exclude=exclude)
    rows = table.meta.iloc[hits["row"].to_numpy()].reset_index(drop=True)
    out = rows[["adapter", "source", "task", "family", "split", "accuracy"]].copy()
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    out["cosine"] = hits["cosine"].to_numpy()
    return out


def zoo_scores(table: data.DeltaTable) -> pd.DataFrame:
    """Leave-one-out precision@k of the single-task teachers: same task, same family."""
    single = (table.meta["source"] == "teacher").to_numpy()
    meta, x = table.meta[single], table.deltas[single]
    rows = []
    for k in (1, 5):
        rows.append(
            {
                "k": k,
                "same task": analysis.precision_at_k(x, list(meta["task"]), k),
                "same family": analysis.precision_at_k(x, list(meta["family"]), k),
            }
        )
    return pd.DataFrame(rows)


@st.cache_resource(show_spinner="loading the run's generator and base model", max_entries=2)
def _generator(run_dir: str, key: tuple):
    return generate.load_generator(Path(run_dir))


@st.cache_data(show_spinner="reading the task's prompts", max_entries=32)
def _task_lines(world: str, task: str, n: int, key: tuple) -> list[str]:
    from llgbm_worlds import World

    return generate.bodies(World.load(world).task(task).prompts("train")[:n])


def hits_figure(hits: pd.DataFrame):
    fig = px.bar(
        hits,
        x="cosine",
        y="adapter",
        color="family",
        orientation="h",
        hover_data=["task", "source", "accuracy"],
        height=max(260, 28 * len(hits) + 80),
        color_discrete_sequence=px.colors.qualitative.D3,
    )
    fig.update_layout(yaxis={"autorange": "reversed"}, xaxis_range=[-1, 1])
    return fig


def by_adapter(table: data.DeltaTable, k: int) -> None:
    labels = [f"{a} [{s}]" for a, s in zip(table.meta["adapter"], table.meta["source"])]
    pick = st.selectbox("adapter", labels, key="retrieval_adapter")
    i = labels.index(pick)
    row = table.meta.iloc[i]
    st.caption(
        f"task {row['task']} · family {row['family']} · {row['split']} · accuracy {row['accuracy']:.3f}"
    )
    hits = neighbours(table, table.deltas[i], k, exclude=i)
    hits["same task"] = hits["task"] == row["task"]
    hits["same family"] = hits["family"] == row["family"]
    st.plotly_chart(hits_figure(hits), key="hits_adapter")
    st.dataframe(hits.round(4), hide_index=True)


def by_prompts(table: data.DeltaTable, k: int) -> None:
    f = ui.folders()
    runs, _ = ui.load_runs()
    usable = [
        r
        for r in runs
        if (r.dir / "checkpoints").is_dir()
        and any((r.dir / "checkpoints").glob("step_*.safetensors"))
    ]
    if not usable:
        st.info(f"{f.runs}: no run with a checkpoint; `just train delta_multi` makes one")
        return
    run = {r.name: r for r in usable}[
        st.selectbox("generator of run", [r.name for r in usable], key="retrieval_run")
    ]
    world = ui.load_world()
    tasks = list(world.tasks["name"])
    start = st.selectbox(
        "start from a task's prompts", ["(type your own)", *tasks], key="retrieval_task"
    )
    n = int(run.config.get("generator", {}).get("n_prompts", 8))
    default = ""
    if start != "(type your own)":
        default = "\n".join(_task_lines(str(f.world), start, n, data.stamp(f.world / "world.json")))
    text = st.text_area(
        "prompts, one per line (`INSTRUCTION Input:INPUT`, framed like the world's items)",
        default,
        height=180,
        key=f"prompts_{start}",
    )
    if not st.button("generate an adapter and find its neighbours"):
        st.caption("generation loads the run's checkpoint and the base model (seconds, once)")
        return
    prompts = generate.frame(text.splitlines())
    if not prompts:
        st.info("type at least one prompt")
        return
    stamp = data.stamp(*sorted((run.dir / "checkpoints").glob("step_*.safetensors")))
    try:
        setup, generator = _generator(str(run.dir), stamp)
    except ValueError as e:  # llgbm-train's errors (missing world, foreign checkpoint): one line
        raise ExplorerError(f"{run.name}: {str(e).splitlines()[0]}") from None
    if setup.probes.hash != table.view.probe_hash:
        st.warning(
            f"the run's probes ({setup.probes.name}) differ from the deltas shown "
            f"({table.view.probe_name}): cosines compare different things"
        )
    delta = generate.prompt_delta(setup, generator, prompts)
    hits = neighbours(table, delta, k)
    st.plotly_chart(hits_figure(hits), key="hits_prompts")
    st.dataframe(hits.round(4), hide_index=True)


def render() -> None:
    st.title("Retrieval")
    st.caption("Nearest adapters by cosine between deltas (exact search over the cached deltas).")
    with ui.friendly():
        table = ui.view_picker(ui.load_deltas())
    c1, c2 = st.columns([2, 1])
    mode = c1.radio("query", ["an adapter", "prompts (through a run's generator)"], horizontal=True)
    k = c2.slider("k", 1, max(1, min(20, len(table.meta) - 1)), min(5, max(1, len(table.meta) - 1)))
    if mode == "an adapter":
        by_adapter(table, k)
    else:
        with ui.friendly():
            by_prompts(table, k)
    st.subheader("How well the zoo retrieves itself")
    st.caption("Leave-one-out precision@k over single-task teachers")
    st.dataframe(zoo_scores(table).round(3), hide_index=True)
    ui.delta_notes(table)
