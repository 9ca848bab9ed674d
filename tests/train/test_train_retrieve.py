"""delta_only b2 ("delta -> retrieve -> merge") on the test world: a delta predictor trained
from prompts, its adapter the merge of the training teachers it retrieves, evaluated and tabled
like every objective; and the llgbm command line's compose / index / retrieve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from llgbm_train.cli import main
from llgbm_train.config import ConfigError
from train_world import small_config

B2 = ("training.objective=delta_only", "training.variant=b2", "retrieval.k=2", "eval.tasks=all")


@pytest.fixture(scope="module")
def b2_run(test_world_dir, tmp_path_factory):
    """A b2 run on the test world, trained and evaluated like `llgbm train`; read-only."""
    from llgbm_train.evaluate import evaluate
    from llgbm_train.trainer import train

    runs = tmp_path_factory.mktemp("runs")
    cfg = small_config(test_world_dir, runs, *B2, "training.steps=60")
    result = train(cfg, runs / "b2", progress=False)
    report = evaluate(
        result.setup,
        result.generator,
        out_dir=runs / "b2",
        checkpoint={"step": result.step, "steps": cfg.training.steps},
        progress=False,
    )
    return result, report


def dense(adapter) -> dict:
    """s * B @ A per key, float64 (written here, not through flora's algebra)."""
    return {
        k: adapter.spec.scale * (adapter.B[k].double() @ adapter.A[k].double())
        for k in adapter.spec.keys()  # noqa: SIM118 (LoraSpec.keys)
    }


def test_config_b2_section_and_hashes(test_world_dir, tmp_path):
    base = small_config(test_world_dir, tmp_path)
    # The retrieval section is b2's: other objectives keep the hash they had without it.
    assert base.override(["retrieval.k=7"]).hash == base.hash
    b2 = base.override(list(B2))
    assert b2.retrieves and not b2.uses_behaviour
    assert b2.override(["retrieval.k=3"]).hash != b2.hash
    for bad, needle in (
        (["training.lambda_kl=1"], "b2 predicts the paper's pooled delta"),
        (["training.delta_target=behaviour"], "b2 predicts the paper's pooled delta"),
        (["retrieval.k=0"], "retrieval.k: 0 must be >= 1"),
        (["retrieval.merge=ties", "retrieval.weights=score"], "use weights=uniform"),
        (["retrieval.merge=slerp"], "not allowed"),
    ):
        with pytest.raises(ConfigError, match=needle) as info:
            b2.override(bad)
        assert "\n" not in str(info.value)


def test_predictor_learns_the_teacher_deltas(b2_run):
    result, _ = b2_run
    rows = [json.loads(x) for x in (result.run.dir / "metrics.jsonl").read_text().splitlines()]
    assert "loss_w" not in rows[-1]  # no weights in b2's objective
    first = np.mean([r["loss_d"] for r in rows[:5]])
    last = np.mean([r["loss_d"] for r in rows[-5:]])
    # Far below where it started and below the trivial baseline (the zero delta).
    assert last < 0.2 * first and last < 0.2 * rows[-1]["loss_d_baseline"]


def test_retrieval_is_over_training_teachers_by_predicted_delta(b2_run):
    from llgbm_train.evaluate import condition_prompts
    from llgbm_train.predictor import predict_delta, training_index

    result, report = b2_run
    setup, predictor = result.setup, result.generator
    index = training_index(setup)
    assert len(index) == len(setup.data) and {r["task"] for r in index.rows} == set(
        setup.data.tasks
    )
    train = np.asarray(setup.data.deltas, dtype=np.float64)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    for row in report["per_task"]:
        task = setup.world.task(row["task"])
        d = predict_delta(setup, predictor, condition_prompts(setup, task)).astype(np.float64)
        cos = train @ (d / np.linalg.norm(d))
        top = np.argsort(-cos, kind="stable")[:2]
        got = row["retrieved"]["retrieved"]
        assert [h["cos"] for h in got] == pytest.approx(list(cos[top]), abs=1e-5)
        assert [h["task"] for h in got] == [setup.data.tasks[i] for i in top]
        if row["split"] == "heldout":  # its own teachers are not in the index
            assert all(h["task"] != row["task"] for h in got)
        else:  # a seen task's predicted delta finds its own teachers
            assert got[0]["task"] == row["task"]


def test_generated_adapter_is_the_merge_of_the_retrieved_teachers(b2_run):
    from llgbm_flora import load_adapter

    result, report = b2_run
    root = Path(result.setup.world_root).resolve()
    for row in report["per_task"]:
        saved = dense(load_adapter(result.run.dir / "eval" / "adapters" / row["task"]))
        parts = [dense(load_adapter(root / h["path"])) for h in row["retrieved"]["retrieved"]]
        for k, dw in saved.items():
            ref = sum(p[k] for p in parts) / len(parts)  # average, exact rank: no SVD cut
            torch.testing.assert_close(dw, ref, atol=1e-6, rtol=1e-4)
        assert row["retrieved"]["merge"]["refactor_error"] == pytest.approx(0.0, abs=1e-6)


def test_b2_scores_on_seen_tasks_and_is_reported_like_the_others(b2_run):
    from llgbm_train.reports import report_markdown

    _, report = b2_run
    seen = report["summary"]["seen"]
    # Its own teachers, merged: above the base and the mean of all teachers on seen tasks.
    assert seen["generated"]["accuracy"] > seen["base"]["accuracy"]
    assert seen["generated"]["accuracy"] > seen["mean_teachers"]["accuracy"]
    assert seen["generated"]["delta_cos"] > 0.9
    assert "| generated |" in report_markdown(report)


def test_train_delta_only_b2_from_the_command_line_and_retrieve_by_prompts(
    b2_run, test_world_dir, tmp_path, capsys
):
    from llgbm_train.config import save_config

    result, _ = b2_run
    cfg = small_config(test_world_dir, tmp_path / "runs", "eval.tasks=train", "training.steps=2")
    path = save_config(cfg, tmp_path / "c.yaml")
    assert main(["train-delta-only", "--variant", "b2", str(path), "--name", "cli"]) == 0
    assert "variant: b2" in (tmp_path / "runs" / "cli" / "config.yaml").read_text()
    rep = json.loads((tmp_path / "runs" / "cli" / "eval" / "report.json").read_text())
    assert all("retrieved" in row for row in rep["per_task"])

    # llgbm index / retrieve: the trained predictor maps a seen task's prompts to its teachers.
    run = tmp_path / "b2"
    shutil.copytree(result.run.dir, run)
    world = tmp_path / "world"
    shutil.copytree(test_world_dir, world)
    assert main(["index", str(world), "--no-progress"]) == 0
    task = result.setup.world.task("code_beta")
    prompts = tmp_path / "p.jsonl"
    from llgbm_train.evaluate import condition_prompts

    rows = condition_prompts(result.setup, task)
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    capsys.readouterr()
    argv = ["retrieve", "--index", str(world / "delta_index"), "--prompts", str(prompts)]
    assert main([*argv, "--predictor", str(run), "-k", "2", "--json", "--no-progress"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["task"] == "code_beta" and len(hits) == 2
    assert main([*argv, "-k", "2"]) == 2
    err = capsys.readouterr().err
    assert "--predictor RUN" in err and err.count("\n") == 1


def test_compose_is_mounted_in_llgbm(tmp_path, capsys):
    assert main(["compose", str(tmp_path / "nope"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no such world directory" in err and err.count("\n") == 1


def test_b2_in_an_experiment_and_its_results_table(test_world_dir, tmp_path):
    from llgbm_train import experiment as X
    from llgbm_train.config import save_config

    d = tmp_path / "configs"
    d.mkdir()
    for name, extra in (("delta_multi", ()), ("delta_retrieve", B2)):
        cfg = small_config(test_world_dir, tmp_path / "unused", *extra, "training.steps=4")
        save_config(cfg.__class__.from_dict({**cfg.to_dict(), "name": None}), d / f"{name}.yaml")
    body = {
        "name": "t",
        "objectives": ["delta_multi", "delta_retrieve"],
        "worlds": {"shared": [f"world.dir={test_world_dir}"]},
        "seeds": [0],
        "overrides": ["eval.tasks=all", "eval.max_items=4", "eval.bootstrap=50"],
        "configs_dir": str(d),
        "out": str(tmp_path / "out"),
        "report": str(tmp_path / "results.md"),
        "results": str(tmp_path / "results.json"),
        "n_boot": 100,
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(body))
    spec, _ = X.load_spec(str(tmp_path / "spec.yaml"))
    results = X.run_experiment(spec, progress=False)
    entry = results["results"]["shared"]["delta_retrieve"]
    assert entry["objective"] == "delta_only" and entry["variant"] == "b2"
    run = next(r for r in X.plan(spec) if r.label == "delta_retrieve")
    rep = json.loads((run.dir / "eval" / "report.json").read_text())
    for group in ("heldout", "seen"):
        got = entry["groups"][group]["generated"]["accuracy"]
        assert got == pytest.approx(rep["summary"][group]["generated"]["accuracy"])
    md = Path(spec.report).read_text()
    assert "| generated: **delta_retrieve** (b2: retrieved teachers, merged) |" in md
    assert "| generated: **delta_multi** |" in md and "| oracle teacher |" in md
