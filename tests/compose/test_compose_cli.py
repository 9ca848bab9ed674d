"""`python -m llgbm_compose` end to end on the test world, and mounted in another CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from llgbm_compose.cli import add_commands, main, run
from llgbm_compose.zoo import single_teachers


@pytest.fixture(scope="module")
def composed(world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compose") / "report"
    argv = [
        "compose",
        str(world_dir),
        "--out",
        str(out),
        "--max-items",
        "2",
        "--dare-seeds",
        "0",
        "--no-same-task",
        "--threads",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 0
    return out


def test_compose_writes_report_plots_adapters_and_index(composed, world, capsys):
    report = json.loads((composed / "report.json").read_text())
    assert {"clustering", "additivity", "retrieval", "merges"} <= set(report)
    for png in ("clustering.png", "additivity.png", "merges.png"):
        assert (composed / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Clustering" in (composed / "report.md").read_text()
    mix = report["merges"]["mixtures"][0]
    assert {"average", "task_arithmetic", "ties", "dare_s0"} <= set(mix["merges"])
    assert (composed / "adapters" / mix["task"] / "ties" / "adapter_config.json").is_file()
    assert report["retrieval"]["self_rank1"] == report["retrieval"]["n"]
    assert (world.root / "delta_index" / "index.json").is_file()


def test_retrieve_by_adapter_prints_the_teacher_first(composed, world, capsys):
    capsys.readouterr()
    teacher = single_teachers(world)[2]
    index = str(world.root / "delta_index")
    code = main(["retrieve", "--index", index, "--adapter", str(teacher.path), "-k", "3", "--json"])
    assert code == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"] == teacher.path.relative_to(world.root).as_posix()
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5) and len(hits) == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--adapter", "X", "-k", "1000"], "larger than the index"),
        (["--prompts", "P"], "needs a delta predictor"),
    ],
)
def test_retrieve_errors_are_one_line(composed, world, capsys, extra, message):
    capsys.readouterr()
    code = main(["retrieve", "--index", str(world.root / "delta_index"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [([], "no such world directory"), (["--density", "0"], "density: must be in (0, 1]")],
)
def test_bad_compose_input_is_one_line(tmp_path, capsys, extra, message):
    assert main(["compose", str(tmp_path / "nope"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_commands_mount_in_a_host_cli_with_a_predictor(
    composed, world, world_deltas, tmp_path, capsys
):
    teacher = single_teachers(world)[4]
    delta = world_deltas.teachers([teacher]).deltas[0]
    host = argparse.ArgumentParser(prog="llgbm")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true")
    sub = host.add_subparsers(dest="command", required=True)
    sub.add_parser("train")  # the host's own commands live beside the mounted ones
    calls = []

    def predictor(args):
        calls.append(args.prompts)
        return lambda prompts: np.asarray(delta)

    add_commands(sub, parents=[common], predictor=predictor)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Encode the word."}) + "\n")
    index = str(world.root / "delta_index")
    args = host.parse_args(
        ["retrieve", "--index", index, "--prompts", str(prompts), "-k", "1", "--json", "--debug"]
    )
    capsys.readouterr()
    assert run(args) == 0
    assert json.loads(capsys.readouterr().out)[0]["task"] == teacher.task
    assert calls == [str(prompts)]


def test_merge_scores_are_the_saved_adapters_scores(composed, world, world_deltas):
    """The report's accuracies are real scores: re-scoring a saved merge (PEFT dir) and a teacher
    on the same items with llgbm_worlds.score gives the same numbers."""
    from llgbm_worlds import score

    report = json.loads((composed / "report.json").read_text())
    mix = report["merges"]["mixtures"][0]
    model, tok = world_deltas.base()
    for name, path in (
        ("ties", composed / "adapters" / mix["task"] / "ties"),
        ("teacher_a", world.root / mix["teachers"]["a"]),
    ):
        for which, task in (("a", mix["parts"][0]), ("mix", mix["task"])):
            items = world.task(task).items("test")[:2]
            got = report["merges"]["mixtures"][0]["scores"][name][which]
            assert got["n_items"] == 2
            assert got["accuracy"] == pytest.approx(np.mean(score(model, tok, items, adapter=path)))
