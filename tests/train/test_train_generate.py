"""``llgbm generate``: a run's generator -> a PEFT directory that plain PEFT loads and that behaves
exactly as the functional path does with the same generated adapter; bad input is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from llgbm_flora import functional_forward
from llgbm_train.cli import main
from llgbm_train.generate import condition_prompts, load_generator, read_prompts


def _heldout_task(world_dir):
    from llgbm_worlds import World

    world = World.load(world_dir)
    task = next(t for t in world.tasks if t.split == "heldout" and t.family != "mixture")
    return world, task


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_generated_dir_loads_with_peft_and_matches_the_functional_path(
    test_world_run, test_world_dir, tmp_path, capsys
):
    from peft import PeftModel
    from transformers import AutoTokenizer

    world, task = _heldout_task(test_world_dir)
    out = tmp_path / "gen"
    argv = ["generate", "--run", str(test_world_run), "--prompts", str(task.train_path)]
    assert main([*argv, "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"adapter: {out}")
    assert f"4 of {len(task.prompts('train'))} prompts" in line
    rec = json.loads((out / "generation.json").read_text())
    assert rec["checkpoint"] == "step_000004.safetensors" and rec["seed"] == 0
    assert len(rec["prompts"]) == 4 and set(rec["prompts"]) <= set(task.prompts("train"))

    # The functional path: the generator's in-memory LoraAdapter for the same prompts.
    adapter = load_generator(test_world_run, progress=False).adapter(rec["prompts"])
    tok = AutoTokenizer.from_pretrained(str(world.base_path))
    base = _base(world.base_path)
    peft = PeftModel.from_pretrained(_base(world.base_path), str(out)).eval()
    for text in task.prompts("test")[:3]:
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            want = functional_forward(base, adapter, **ids).logits  # [1, T, vocab]
            got = peft(**ids).logits
            plain = base(**ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # The adapter really moves the logits, so the equality above is not base == base.
        assert (want - plain).abs().max() > 1e-2

    # Another seed draws other prompts and replaces the earlier output of `generate`.
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main([*argv, "--out", str(out), "--seed", "1"]) == 0
    again = json.loads((out / "generation.json").read_text())
    assert again["seed"] == 1 and again["prompts"] != rec["prompts"]
    assert (out / "adapter_model.safetensors").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["gen"]  # no staging directory left behind


def test_prompt_files_and_the_count_rule(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "answer": "x"}\n\n{"prompt": "b"}\n{"prompt": "c"}\n')
    assert read_prompts(f) == ["a", "b", "c"]
    # Exactly N: file order; more: N drawn without replacement by the seed; same seed, same draw.
    assert condition_prompts(["a", "b", "c"], 3, seed=0) == ["a", "b", "c"]
    many = [f"p{i}" for i in range(20)]
    drawn = condition_prompts(many, 4, seed=5)
    assert len(set(drawn)) == 4 and set(drawn) <= set(many)
    assert drawn == condition_prompts(many, 4, seed=5) != condition_prompts(many, 4, seed=6)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no_run", "not a run directory"),
        ("empty", "no prompts"),
        ("bad_json", "p.jsonl:2: not valid JSON"),
        ("no_prompt_field", 'p.jsonl:1: expected an object with a "prompt" string'),
        ("too_few", "3 prompts, but the generator reads 4 per task"),
        ("out_is_file", "exists and is not a directory"),
        ("out_is_other_dir", "a directory not written by `llgbm generate`"),
        ("out_is_teacher", "a PEFT adapter not written by `llgbm generate`"),
    ],
)
def test_bad_input_is_one_line_and_leaves_files_alone(
    test_world_run, test_world_dir, tmp_path, capsys, case, needle
):
    from llgbm_worlds import World

    run, prompts, out = test_world_run, tmp_path / "p.jsonl", tmp_path / "out"
    good = "".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(8))
    prompts.write_text(good)
    if case == "no_run":
        run = tmp_path / "nope"
    elif case == "empty":
        prompts.write_text("\n")
    elif case == "bad_json":
        prompts.write_text('{"prompt": "a"}\n{"prompt": \n')
    elif case == "no_prompt_field":
        prompts.write_text('{"text": "a"}\n')
    elif case == "too_few":
        prompts.write_text("".join(good.splitlines(keepends=True)[:3]))
    elif case == "out_is_file":
        out.write_text("keep me")
    elif case == "out_is_other_dir":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    elif case == "out_is_teacher":
        shutil.copytree(World.load(test_world_dir).teachers[0].path, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.is_dir() else None
    argv = ["generate", "--run", str(run), "--prompts", str(prompts), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    if case == "out_is_file":
        assert out.read_text() == "keep me"
    elif before is not None:
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    else:
        assert not out.exists()


def test_help_names_generate_reproduce_visualize(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("generate", "reproduce", "visualize"):
        assert f"    {cmd} " in out
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # whatever the terminal width
    assert 'JSONL, one object per line with a "prompt" string' in text


def test_a_run_whose_world_is_gone_is_one_line_for_every_command(test_world_run, tmp_path, capsys):
    import yaml

    run = tmp_path / "run"
    shutil.copytree(test_world_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["world"]["dir"] = str(tmp_path / "gone")
    cfg["world"]["build_if_missing"] = True  # even so: never rebuilt behind the user's back
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p {i}"}) + "\n" for i in range(4)))
    for argv in (
        ["generate", "--run", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "o")],
        ["reproduce", str(run)],
        ["visualize", str(run)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"error: {run}: its world {tmp_path / 'gone'} has no world.json " + (
            f"(build or restore it, or fix world.dir in {run / 'config.yaml'})\n"
        ), argv
    assert not (tmp_path / "gone").exists() and not (tmp_path / "o").exists()
