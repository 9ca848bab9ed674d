"""Building, loading, resuming and showing the test-preset tiny world."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from llgbm_worlds import World, build_world, show_world
from llgbm_worlds.errors import BuildError, UnknownNameError, WorldIncompleteError
from llgbm_worlds.families import Example
from llgbm_worlds.presets import get_preset
from llgbm_worlds.scoring import score, score_fast
from llgbm_worlds.show import summary
from llgbm_worlds.testing import THREADS


def test_manifest_fields(tiny_world, tiny_world_dir):
    raw = json.loads((tiny_world_dir / "world.json").read_text())
    for key in (
        "base",
        "tasks",
        "teachers",
        "kind",
        "preset",
        "seed",
        "created_with",
        "content_hash",
    ):
        assert key in raw
    assert raw["kind"] == "tiny" and raw["preset"] == "test"
    assert (tiny_world.base_path / "config.json").is_file()
    splits = {(t.split, t.heldout_kind) for t in tiny_world.tasks}
    assert {("train", None), ("heldout", "variant"), ("heldout", "family")} <= splits
    for t in tiny_world.tasks:
        assert t.items("train") and t.items("test")
        assert all(p.endswith("### Response:") for p in t.prompts("test"))
        assert 0.0 <= t.base_accuracy <= 1.0
    kinds = {t.kind for t in tiny_world.teachers}
    assert kinds == {"single", "mixture"}
    steps = {t.step for t in tiny_world.teachers}
    assert len(steps) >= 2  # several checkpoints along one run
    splits_of = {t.data_split for t in tiny_world.teachers if t.task == "code_alpha"}
    assert splits_of == {0, 1}  # disjoint data splits
    for t in tiny_world.teachers:
        assert (t.path / "adapter_model.safetensors").is_file()


def test_test_preset_teachers_learn(tiny_world):
    # The suite's world must be able to show behaviour, not only plumbing: its teachers beat the
    # base by >= 20 points (mean exact match over single-task teachers' last checkpoints).
    s = summary(tiny_world)
    assert s["base_accuracy"] <= 0.05
    assert s["teacher_accuracy_last"] >= s["base_accuracy"] + 0.20


def test_teachers_load_in_peft_and_change_the_model(tiny_world, tiny_base):
    from peft import PeftModel

    model, tok = tiny_base
    t = tiny_world.teachers[-1]
    batch = tok([tiny_world.task(t.task).prompts("test")[0]], return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
        peft = PeftModel.from_pretrained(model, str(t.path))
        after = peft(**batch).logits
        peft.unload()
        again = model(**batch).logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(before, again)  # scoring leaves the base untouched


def test_train_splits_are_disjoint(tiny_world_dir):
    from llgbm_worlds.build import run_specs, task_items
    from llgbm_worlds.presets import get_preset

    p = get_preset("tiny", "test")
    runs = [r for r in run_specs(p, task_items(p, 0)) if r.task == "code_alpha"]
    assert len(runs) == 2
    assert not {e.prompt for e in runs[0].items} & {e.prompt for e in runs[1].items}


def test_score_fast_equals_generate(tiny_world, tiny_base):
    model, tok = tiny_base
    task = tiny_world.tasks[0]
    prompts = task.prompts("test")[:8]
    # The model's own greedy outputs are right answers for half the prompts, wrong for the rest.
    own = [Example(p, "x") for p in prompts]
    side = tok.padding_side
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    tok.padding_side = side
    gen = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    items = [
        Example(p, t.strip() if i % 2 == 0 else "coded zz")
        for i, (p, t) in enumerate(zip(prompts, texts))
    ]
    items = [e for e in items if e.answer]  # an empty greedy answer cannot be written as a label
    fast, slow = score_fast(model, tok, items), score(model, tok, items, max_new_tokens=6)
    assert fast == slow
    assert not all(slow[1::2])
    assert score(model, tok, own[:2]) == [False, False]


def test_show_world_prints_tables(tiny_world_dir, tiny_world):
    text = show_world(tiny_world_dir)
    assert "task" in text.splitlines()[4]
    for t in tiny_world.tasks:
        assert t.name in text
    assert f"{len(tiny_world.teachers)} teachers" in text


def test_interrupted_build_resumes_to_the_same_world(tmp_path, tiny_world_dir, monkeypatch):
    import llgbm_worlds.zoo as zoo

    real = zoo.train_runs
    calls = {"n": 0}

    def dies_in_the_second_chunk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            real(*a, **k)  # writes its checkpoints into the runs' tmp dirs, then "the process dies"
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "w"
    monkeypatch.setattr(zoo, "train_runs", dies_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_world("tiny", out, preset="test", progress=False, threads=THREADS)
    assert not (out / "world.json").exists()
    assert list((out / "teachers").rglob(".split*.tmp"))  # the half-written chunk's runs
    first_chunk = len(list((out / "teachers").rglob("split*/.done.json")))
    assert first_chunk == get_preset("tiny", "test").zoo.chunk
    with pytest.raises(WorldIncompleteError, match="resume it with `llgbm world build tiny"):
        World.load(out)
    calls["n"] = 10  # from here on every call trains normally
    build_world("tiny", out, preset="test", progress=False, threads=THREADS)
    assert calls["n"] == 11  # the finished chunk was not trained again
    assert not list(out.rglob("*.tmp"))
    fresh = json.loads((out / "world.json").read_text())
    cached = json.loads((tiny_world_dir / "world.json").read_text())
    assert fresh["base_sha256"] == cached["base_sha256"]  # deterministic base weights
    assert [t["sha256"] for t in fresh["teachers"]] == [t["sha256"] for t in cached["teachers"]]
    assert fresh["content_hash"] == cached["content_hash"]


def test_disk_full_is_one_line_and_resumable(tmp_path, tiny_world_dir, monkeypatch):
    import llgbm_worlds.zoo as zoo

    out = tmp_path / "w"
    shutil.copytree(tiny_world_dir, out)
    (out / "world.json").unlink()
    shutil.rmtree(out / "teachers" / "prefix_old")
    first = f"step{get_preset('tiny', 'test').zoo.checkpoints[0]:04d}"
    victim = out / "teachers" / "code_beta" / "split1" / first / "adapter_model.safetensors"
    victim.write_bytes(b"corrupt")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zoo, "save_adapter", full)
    with pytest.raises(BuildError, match="No space left on device") as e:
        build_world("tiny", out, preset="test", progress=False, threads=THREADS)
    assert "\n" not in str(e.value)
    assert not (out / "world.json").exists()
    monkeypatch.undo()
    build_world("tiny", out, preset="test", progress=False, threads=THREADS)
    w = World.load(out)
    assert {t.task for t in w.teachers} >= {"prefix_old", "code_beta"}
    cached = json.loads((tiny_world_dir / "world.json").read_text())
    assert json.loads((out / "world.json").read_text())["content_hash"] == cached["content_hash"]


def test_bad_names_and_missing_worlds(tmp_path):
    with pytest.raises(UnknownNameError, match="valid kinds: tiny, smollm2"):
        build_world("huge", tmp_path / "x")
    with pytest.raises(
        UnknownNameError,
        match="valid presets: default, default-independent, parametric, parametric-independent, test, test-independent",
    ):
        build_world("tiny", tmp_path / "x", preset="bogus")
    with pytest.raises(WorldIncompleteError, match="llgbm world build tiny"):
        World.load(tmp_path / "nothing")


@pytest.mark.parametrize("kind", ["tiny", "smollm2"])
def test_every_preset_has_an_independent_init_twin(kind):
    from dataclasses import replace

    from llgbm_worlds.presets import SMOLLM2_PRESETS, TINY_PRESETS, get_preset

    table = {"tiny": TINY_PRESETS, "smollm2": SMOLLM2_PRESETS}[kind]
    for name in [n for n in table if not n.endswith("-independent")]:
        twin = get_preset(kind, f"{name}-independent")
        assert table[name].zoo.init == "shared" and twin.zoo.init == "independent"
        # Only the init (and the name) differ: the two worlds are the same tasks and recipe.
        assert replace(twin, name=name, zoo=replace(twin.zoo, init="shared")) == table[name]


def test_missing_adapter_is_named(tmp_path, tiny_world_dir):
    out = tmp_path / "w"
    shutil.copytree(tiny_world_dir, out)
    last = f"step{get_preset('tiny', 'test').zoo.checkpoints[-1]:04d}"
    shutil.rmtree(out / "teachers" / "code_alpha" / "split0" / last)
    with pytest.raises(WorldIncompleteError, match=f"code_alpha/split0/{last}"):
        World.load(out)


def test_other_build_in_the_same_dir_is_refused(tmp_path, tiny_world_dir):
    out = tmp_path / "w"
    shutil.copytree(tiny_world_dir, out)
    with pytest.raises(BuildError, match="holds a different world"):
        build_world("tiny", out, preset="test", seed=1, progress=False, threads=THREADS)
