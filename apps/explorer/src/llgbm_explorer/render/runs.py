"""Runs: training curves beside their trivial baselines, run comparison, evaluation tables, the
experiment's results page. Reads only run directories and docs/results.md; never imports torch."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from llgbm_explorer import analysis, data, ui


def curve_figure(metrics: pd.DataFrame, metric: str, baseline: str | None) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(x=metrics["step"], y=metrics[metric], mode="lines+markers", name=metric)
    if baseline:
        fig.add_scatter(
            x=metrics["step"],
            y=metrics[baseline],
            mode="lines",
            name="trivial baseline",
            line={"dash": "dash", "color": "gray"},
        )
    fig.update_layout(
        title=metric,
        height=300,
        margin={"t": 40, "b": 30},
        xaxis_title="step",
        legend={"orientation": "h"},
    )
    return fig


def comparison_table(runs: list[data.RunView]) -> pd.DataFrame:
    """One row per run: objective, steps, last value of each loss, evaluation accuracies."""
    rows = []
    for r in runs:
        row = {"run": r.name, "objective": r.objective}
        if "step" in r.metrics:
            row["steps"] = int(r.metrics["step"].max())
            last = r.metrics.iloc[-1]
            for m, base in analysis.curves(r.metrics):
                if m.startswith("loss"):
                    row[m] = last[m]
                    if base:
                        row[f"{m} / baseline"] = last[m] / last[base] if last[base] else None
        rep = data.main_report(r)
        if rep:
            stem, report = rep
            row["eval"] = stem
            for method, s in (report.get("summary") or {}).items():
                if isinstance(s, dict) and s.get("accuracy") is not None:
                    row[f"{method} acc %"] = 100 * s["accuracy"]
        rows.append(row)
    return pd.DataFrame(rows)


def accuracy_figure(summary: pd.DataFrame) -> go.Figure:
    s = summary.dropna(subset=["accuracy %"])
    fig = go.Figure(
        go.Bar(
            x=s["method"],
            y=s["accuracy %"],
            error_y={
                "type": "data",
                "symmetric": False,
                "array": (s["CI high %"] - s["accuracy %"]).tolist(),
                "arrayminus": (s["accuracy %"] - s["CI low %"]).tolist(),
            },
        )
    )
    fig.update_layout(
        height=320, yaxis_title="accuracy % (95% CI)", yaxis_range=[0, 100], margin={"t": 20}
    )
    return fig


def render_results() -> None:
    f = ui.folders()
    st.header("Experiment")
    if not f.results.is_file():
        st.info(f"{f.results}: no results page yet; `just experiment tiny` writes it")
        return
    st.caption(str(f.results))
    st.markdown(f.results.read_text(encoding="utf-8"))


def render() -> None:
    st.title("Runs")
    f = ui.folders()
    runs, bad = ui.load_runs()
    for name, msg in bad:
        st.warning(f"{name}: {msg}")
    if not runs:
        st.info(f"{f.runs}: no runs yet; `just train delta_multi` makes one")
        render_results()
        return
    names = [r.name for r in runs]
    by_name = {r.name: r for r in runs}
    tab_curves, tab_compare, tab_eval, tab_results = st.tabs(
        ["training curves", "comparison", "evaluation", "experiment"]
    )
    with tab_curves:
        run = by_name[st.selectbox("run", names, key="run_curves")]
        for p in run.problems:
            st.warning(p)
        meta = run.metadata
        git = meta.get("git") or {}
        st.caption(
            f"objective {run.objective} · config {meta.get('config_hash', '?')} · git "
            f"{str(git.get('commit') or '?')[:10]}{' (dirty)' if git.get('dirty') else ''} · "
            f"world {(meta.get('world') or {}).get('dir', '?')}"
        )
        if "step" not in run.metrics or run.metrics.empty:
            st.info(f"{run.dir / 'metrics.jsonl'}: no logged steps yet")
        else:
            pairs = analysis.curves(run.metrics)
            cols = st.columns(2)
            for i, (m, base) in enumerate(pairs):
                cols[i % 2].plotly_chart(curve_figure(run.metrics, m, base), key=f"curve_{m}")
    with tab_compare:
        chosen = st.multiselect("runs", names, default=names[:4])
        picked = [by_name[n] for n in chosen]
        st.dataframe(comparison_table(picked).round(4), hide_index=True)
        metrics = sorted({m for r in picked for m, _ in analysis.curves(r.metrics)})
        if metrics:
            m = st.selectbox(
                "metric", metrics, index=metrics.index("loss") if "loss" in metrics else 0
            )
            fig = go.Figure()
            for r in picked:
                if m in r.metrics:
                    fig.add_scatter(x=r.metrics["step"], y=r.metrics[m], mode="lines", name=r.name)
            fig.update_layout(height=380, xaxis_title="step", yaxis_title=m)
            st.plotly_chart(fig, key="compare")
    with tab_eval:
        run = by_name[st.selectbox("run", names, key="run_eval")]
        if not run.reports:
            st.info(
                f"{run.dir / 'eval'}: no evaluation report; `llgbm evaluate {run.dir}` writes one"
            )
        else:
            stem = st.selectbox("report", sorted(run.reports))
            report = run.reports[stem]
            summary, per_task = data.report_tables(report)
            st.caption(
                f"{report.get('n_tasks', '?')} {report.get('tasks_evaluated', '?')} tasks; "
                "greedy exact match, 95% bootstrap CI over items"
            )
            st.plotly_chart(accuracy_figure(summary), key="eval_bars")
            st.dataframe(summary.round(3), hide_index=True)
            st.subheader("Per task")
            st.dataframe(per_task.round(1), hide_index=True)
    with tab_results:
        render_results()
