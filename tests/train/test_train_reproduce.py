"""``llgbm reproduce``: a run's saved numbers come back exactly on CPU, and a changed number is
named; the comparison is generic over the report's JSON."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from llgbm_train.cli import main
from llgbm_train.reproduce import Tolerance, compare_documents, reproduce_training, verdict


def _snapshot(d):
    return {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_compare_walks_every_leaf_and_names_the_first_difference():
    saved = {
        "summary": {"generated": {"accuracy": 0.5, "ci95": [0.25, 0.75], "delta_cos": None}},
        "per_task": [{"task": "add_3", "acc": 0.5, "nan": math.nan}],
        "tasks_evaluated": "heldout",
        "new_table": {"variant": {"n": 3}},
    }
    exact = Tolerance()
    same = compare_documents("r", saved, json.loads(json.dumps(saved)), exact)
    assert same.agrees and same.n_values == 9  # NaN equals NaN; None equals None

    got = json.loads(json.dumps(saved))
    got["per_task"][0]["acc"] = 0.5 + 1e-12
    c = compare_documents("r", saved, got, exact)
    assert [d.path for d in c.differences] == ["per_task[add_3].acc"]
    assert compare_documents("r", saved, got, Tolerance(rtol=1e-9)).agrees
    ok, line = verdict([c])
    assert not ok and line.startswith("disagree: r per_task[add_3].acc: saved 0.5, reproduced")
    assert "only float noise" in line  # a 2e-12 relative change: thread-count noise, named so
    got["per_task"][0]["acc"] = 0.75
    ok, line = verdict([compare_documents("r", saved, got, exact)])
    assert not ok and "float noise" not in line

    got = json.loads(json.dumps(saved))
    got["summary"]["generated"]["ci95"] = [0.25]
    del got["new_table"]["variant"]["n"]
    got["tasks_evaluated"] = "train"
    got["extra"] = 1
    paths = [d.path for d in compare_documents("r", saved, got, exact).differences]
    assert paths == [
        "summary.generated.ci95 (length)",
        "tasks_evaluated",
        "new_table.variant.n",
        "extra",
    ]
    with pytest.raises(ValueError, match="--rtol: must be a finite number >= 0"):
        Tolerance(rtol=-1.0)


def test_an_untampered_run_agrees_and_is_left_untouched(test_world_run, capsys):
    before = _snapshot(test_world_run)
    assert main(["reproduce", str(test_world_run)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("agree: eval/report.json (") and line.endswith("reproduced (exact)")
    assert _snapshot(test_world_run) == before


def test_a_tampered_report_disagrees_naming_the_metric(test_world_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(test_world_run, run)
    path = run / "eval" / "report.json"
    report = json.loads(path.read_text())
    row = report["per_task"][1]
    saved = row["methods"]["generated"]["delta_cos"]
    row["methods"]["generated"]["delta_cos"] = saved + 1e-9
    path.write_text(json.dumps(report, indent=2))
    assert main(["reproduce", str(run)]) == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    where = f"per_task[{row['task']}].methods.generated.delta_cos"
    assert line.startswith(f"disagree: eval/report.json {where}: saved {saved + 1e-9!r}")
    assert "(1 of " in line
    # The same change is within a stated relative tolerance.
    assert main(["reproduce", str(run), "--rtol", "1e-6"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("(rtol=1e-06, atol=0)")


@pytest.mark.slow
def test_retrain_reproduces_metrics_exactly_and_catches_a_changed_record(test_world_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(test_world_run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["loss_d"] *= 1.001
    lines[1] = json.dumps(rec, sort_keys=True)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    comparisons = reproduce_training(run, out=tmp_path / "again", progress=False)
    metrics, report = comparisons
    assert metrics.name == "metrics.jsonl" and metrics.n_values == 4 * len(rec)
    assert [d.path for d in metrics.differences] == ["[step=2].loss_d"]
    assert report.name == "eval/report.json" and report.agrees
    ok, line = verdict(comparisons)
    assert not ok and line.startswith("disagree: metrics.jsonl [step=2].loss_d: saved")
    assert (tmp_path / "again" / "checkpoints" / "step_000004.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["reproduce", "{tmp}/none"], "not a run directory"),
        (["reproduce", "{run}", "--out", "{tmp}/x"], "--out: only with --retrain"),
        (["reproduce", "{norep}"], "no eval/report*.json to reproduce"),
        (["reproduce", "{run}", "--rtol", "nan"], "--rtol: must be a finite number >= 0"),
    ],
)
def test_reproduce_errors_are_one_line(test_world_run, tmp_path, capsys, argv, needle):
    norep = tmp_path / "norep"
    shutil.copytree(test_world_run, norep)
    shutil.rmtree(norep / "eval")
    subs = {"{tmp}": str(tmp_path), "{run}": str(test_world_run), "{norep}": str(norep)}
    for k, v in subs.items():
        argv = [a.replace(k, v) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
