"""Every page through Streamlit's AppTest against the real test world and runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import llgbm_explorer
import pytest
from explorer_fixture import APP, demo_args, open_app
from llgbm_explorer import ui
from llgbm_explorer.folders import Folders

PAGES = [name for name, _, _ in llgbm_explorer.PAGES]
# Pages that draw at least one chart on the demo (composition needs a compose report first).
CHARTS = {"delta_map": 1, "similarity": 1, "clusters": 1, "retrieval": 1, "runs": 4}


def chart(at, i: int = 0):
    """The i-th Plotly chart as a plotly Figure (x and y stay base64 typed arrays)."""
    import plotly.io as pio

    return pio.from_json(at.get("plotly_chart")[i].proto.spec)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_draws_on_the_demo(demo_folders, page):
    at = open_app(demo_folders, page)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) >= CHARTS.get(page, 0)
    if page == "composition":  # no compose report yet: the command that writes one
        assert "uv run llgbm compose" in at.info[0].value


def test_right_after_llgbm_train_the_map_shows_generated_adapters(demo, demo_folders):
    """The demo is `llgbm train` twice and nothing else: generated points are on the map."""
    from llgbm_explorer import data

    at = open_app(demo_folders)
    fig = chart(at)
    marks = {t.name.split(", ", 1)[-1] for t in fig.data}
    assert any(m.startswith("generated") for m in marks), marks
    assert any(m.startswith("teacher") for m in marks), marks
    runs, _ = data.read_runs(demo.runs)
    n_generated = sum(len(r.adapters) for r in runs)
    gen = [t for t in fig.data if "generated" in t.name]
    assert sum(len(t.customdata) for t in gen) == n_generated > 0  # one row per point
    # Hover shows the adapter, its task and its accuracy (customdata holds them per point).
    hover = fig.data[0].hovertemplate
    assert all(f"{c}=" in hover for c in ("adapter", "task", "accuracy"))
    names = {str(c[0]) for t in gen for c in t.customdata}
    assert names == {f"{r.name}/eval/adapters/{task}" for r in runs for task in r.adapters}
    at.radio[0].set_value("t-SNE").run()
    assert not at.exception and "t-SNE" in chart(at).layout.xaxis.title.text


def test_composition_reads_a_real_compose_report(composed, demo_folders):
    """`python -m llgbm_compose compose` on the demo world: every section drawn, none missing."""
    import dataclasses

    runs = composed.parents[2]
    f = dataclasses.replace(demo_folders, runs=runs, roots=(*demo_folders.roots, runs))
    at = open_app(f, "composition")
    assert not at.exception and not at.error
    assert not [c.value for c in at.caption if "not in this report" in c.value]
    assert len(at.get("plotly_chart")) == 2  # additivity and merges
    report = json.loads(composed.read_text())
    frames = [d.value for d in at.dataframe]
    pooled = next(df for df in frames if "same-task merges" in df.columns)
    best = report["merges"]["summary"]["same_task"]["best_teacher"]
    assert pooled.set_index("adapter").loc["best_teacher", "same-task merges"] == 100 * best
    add = next(df for df in frames if "target" in df.columns)
    cos = report["additivity"]["summary"]["delta"]["sum"]["cos"]
    row = add[(add["space"] == "delta") & (add["target"] == "d(a) + d(b)")]
    assert row["cos"].item() == pytest.approx(cos, abs=1e-3)
    # The cluster page shows the report's weight and delta-W baselines for this world.
    at = open_app(f, "clusters")
    assert not at.exception, [e.value for e in at.exception]
    frames = [d.value for d in at.dataframe]
    assert any(
        list(df.get("representation", [])) == ["delta", "weights", "delta_w"] for df in frames
    )


def test_a_report_without_some_sections_names_them(demo, demo_folders, tmp_path):
    import dataclasses

    runs = tmp_path / "runs"
    (runs / "compose").mkdir(parents=True)
    clustering = {"silhouette": {"delta": {"family": 0.4, "task": 0.2}}}
    report = {"world": str(demo.world), "clustering": clustering}
    (runs / "compose" / "old.json").write_text(json.dumps(report))
    f = dataclasses.replace(demo_folders, runs=runs, roots=(*demo_folders.roots, runs))
    at = open_app(f, "composition")
    assert not at.exception and not at.error
    missing = [c.value for c in at.caption if "not in this report" in c.value]
    assert [m.split(":")[0] for m in missing] == [
        "additivity",
        "pooled merges",
        "merges",
        "retrieval",
    ]
    assert any("representation" in d.value.columns for d in at.dataframe)


def test_weight_baseline_button_scores_flattened_weights(demo_folders):
    at = open_app(demo_folders, "clusters")
    at.button[0].click().run()
    assert not at.exception
    table = at.dataframe[0].value
    assert {"deltas", "flattened weights"} == set(table["representation"])
    d = table.set_index(["representation", "by"])["silhouette"]
    # The paper's finding in miniature: deltas group by family better than raw weights.
    assert d[("deltas", "family")] > d[("flattened weights", "family")]


def test_retrieval_of_an_adapter_ranks_itself_out_and_its_task_first(demo_folders):
    at = open_app(demo_folders, "retrieval")
    hits = at.dataframe[0].value
    chosen = at.selectbox(key="retrieval_adapter").value.split(" [")[0]
    assert chosen not in set(hits["adapter"])
    assert list(hits["rank"]) == list(range(1, len(hits) + 1))
    assert hits["cosine"].is_monotonic_decreasing


@pytest.mark.slow
def test_retrieval_from_typed_prompts_through_a_run(demo_folders):
    at = open_app(demo_folders, "retrieval")
    at.radio[0].set_value("prompts (through a run's generator)").run()
    at.selectbox(key="retrieval_run").set_value("t").run()
    at.selectbox(key="retrieval_task").set_value("code_alpha").run()
    assert "Input:" in at.text_area[0].value
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    hits = at.dataframe[0].value
    assert len(hits) == at.slider[0].value and hits["cosine"].between(-1, 1).all()


def test_missing_folders_give_messages_not_tracebacks(tmp_path):
    f = Folders.from_args(["--world", "w", "--runs", "r"], cwd=tmp_path)
    for page in PAGES:
        at = open_app(f, page)
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, page
        text = " ".join(i.value for i in at.info)
        assert text, page
        if page in ("delta_map", "similarity", "clusters", "retrieval"):
            assert "llgbm world build tiny" in text, page


def test_a_world_without_deltas_or_runs_says_what_to_run(demo, tmp_path):
    """A built world whose cache is empty, and no runs: each page says what to run next."""
    f = Folders.from_args(
        ["--world", str(demo.world), "--delta-cache", "cache", "--runs", "runs"], cwd=tmp_path
    )
    (tmp_path / "cache").mkdir()
    for page in PAGES:
        at = open_app(f, page)
        assert not at.exception and not at.error, page
        text = " ".join(i.value for i in at.info)
        want = {
            "runs": "just train delta_multi",
            "composition": "llgbm compose",
        }.get(page, "just compute-deltas --world")
        assert want in text, (page, text)


def test_teachers_only_the_map_says_how_to_add_generated_adapters(demo, tmp_path):
    f = Folders.from_args([*demo_args(demo), "--runs", str(tmp_path / "none")], cwd=tmp_path)
    at = open_app(f)
    assert not at.exception and len(at.get("plotly_chart")) == 1
    assert "just train delta_multi" in " ".join(c.value for c in at.caption)


def test_a_typed_path_outside_the_roots_is_refused(demo_folders, tmp_path):
    at = open_app(demo_folders, "runs")
    at.sidebar.text_input[2].set_value("/etc")
    at.sidebar.button[0].click().run()
    assert "outside the folders" in at.sidebar.error[0].value
    assert at.session_state[ui.KEY].runs == demo_folders.runs


def run_isolated(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


PAGE_IN_SUBPROCESS = """
    import sys
    from streamlit.testing.v1 import AppTest
    from llgbm_explorer import ui
    from llgbm_explorer.folders import Folders
    at = AppTest.from_file({app!r}, default_timeout=600)
    at.session_state[ui.KEY] = Folders.from_args({args!r})
    {switch}
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    print("plots", len(at.get("plotly_chart")), "torch", "torch" in sys.modules)
"""


def page_in_subprocess(args: list[str], page: str) -> str:
    switch = "" if page == PAGES[0] else f"at.switch_page('views/{page}.py')"
    return run_isolated(PAGE_IN_SUBPROCESS.format(app=APP, args=args, switch=switch))


@pytest.mark.parametrize("page", PAGES)
def test_drawing_a_page_does_not_import_torch(demo, page):
    """Only generating from prompts (retrieval, on a button) needs torch."""
    out = page_in_subprocess(demo_args(demo), page).split()
    assert int(out[out.index("plots") + 1]) >= CHARTS.get(page, 0), out
    assert out[out.index("torch") + 1] == "False"


def test_prompts_through_a_run_whose_world_is_gone_say_so(demo, demo_folders, tmp_path):
    import dataclasses
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(demo.runs / "t", runs / "t", ignore=shutil.ignore_patterns("adapters"))
    cfg = runs / "t" / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(demo.world), str(tmp_path / "gone")))
    f = dataclasses.replace(demo_folders, runs=runs, roots=(*demo_folders.roots, runs))
    at = open_app(f, "retrieval")
    at.radio[0].set_value("prompts (through a run's generator)").run()
    at.text_area[0].set_value("Encode the word with code alpha. Input:cat").run()
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("no world.json" in i.value for i in at.info)
