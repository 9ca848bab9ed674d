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


def compose_report(world) -> dict:
    """A report in llgbm-compose's layout (branch i14's run_compose), small numbers."""
    acc = lambda a: {"accuracy": a, "ci95": [max(0.0, a - 0.1), min(1.0, a + 0.1)]}  # noqa: E731
    return {
        "world": str(world),
        "kind": "tiny",
        "preset": "test",
        "clustering": {
            "n_teachers": 16,
            "silhouette": {
                "delta": {"family": 0.41, "task": 0.2},
                "weights": {"family": -0.02, "task": -0.05},
                "delta_w": {"family": 0.3, "task": 0.1},
            },
        },
        "additivity": {
            "mixtures": [],
            "summary": {
                "n": 1,
                "delta": {
                    t: {"cos": c, "rel_err": 1 - c}
                    for t, c in (("sum", 0.8), ("mean", 0.8), ("a", 0.5), ("b", 0.4), ("fit", 0.85))
                },
                "delta_w": {
                    t: {"cos": c, "rel_err": 1 - c}
                    for t, c in (("sum", 0.7), ("mean", 0.7), ("a", 0.4), ("b", 0.4), ("fit", 0.75))
                },
                "merged": {"rank8_sum_vs_sum_of_deltas": {"cos": 0.9, "rel_err": 0.2}},
            },
        },
        "retrieval": {
            "kind": "flat",
            "n": 16,
            "task_p@1": 0.75,
            "family_p@1": 1.0,
            "self_rank1": 16,
        },
        "merges": {
            "mixtures": [
                {
                    "task": "code_alpha+prefix_red",
                    "parts": ["code_alpha", "prefix_red"],
                    "scores": {
                        n: {"a": acc(x), "b": acc(x / 2), "mix": acc(x / 3)}
                        for n, x in (("teacher_a", 0.9), ("ties", 0.6), ("average", 0.5))
                    },
                }
            ]
        },
    }


@pytest.mark.parametrize("page", PAGES)
def test_every_page_draws_on_the_demo(demo_folders, page):
    at = open_app(demo_folders, page)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) >= CHARTS.get(page, 0)
    if page == "composition":
        assert "llgbm compose" in at.info[0].value


def test_composition_reads_the_compose_report(demo, demo_folders, tmp_path):
    import dataclasses

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "compose" / "tiny").mkdir(parents=True)
    (runs / "compose" / "tiny" / "report.json").write_text(json.dumps(compose_report(demo.world)))
    f = dataclasses.replace(demo_folders, runs=runs, roots=(*demo_folders.roots, runs))
    at = open_app(f, "composition")
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 2  # additivity and merges
    frames = [d.value for d in at.dataframe]
    assert any("ties" in set(df.get("adapter", [])) for df in frames)
    # The cluster page shows the report's weight and delta-W baselines for this world.
    at = open_app(dataclasses.replace(f, runs=runs), "clusters")
    assert not at.exception, [e.value for e in at.exception]
    frames = [d.value for d in at.dataframe]
    assert any(
        list(df.get("representation", [])) == ["delta", "weights", "delta_w"] for df in frames
    )


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
    # An empty world folder with a world but an empty cache: the cache message.


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


@pytest.mark.parametrize(
    "page",
    [
        "runs",
        "composition",
    ],
)
def test_pages_without_deltas_do_not_import_torch(demo, page):
    out = page_in_subprocess(demo_args(demo), page)
    assert "torch False" in out


def test_the_delta_map_does_not_import_torch(demo):
    out = page_in_subprocess(demo_args(demo), "delta_map")
    assert "plots 1" in out and "torch False" in out


def test_a_warm_delta_map_redraw_is_fast(demo_folders):
    """After the first visit the loaders are cached: a redraw reads and computes nothing."""
    import time

    at = open_app(demo_folders)
    at.run()  # the second visit fills the projection cache for this selection
    t0 = time.perf_counter()
    at.run()
    assert time.perf_counter() - t0 < 2.0
    assert len(at.get("plotly_chart")) == 1


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
