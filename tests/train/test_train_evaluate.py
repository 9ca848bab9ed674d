"""Evaluation: generalisation kinds, the seed x item bootstrap, and the honesty checks on data.

The honesty checks run on the worlds package's test-preset world (a copy, where a test rewrites
items): held-out tasks never reach training, condition prompts and scored items are disjoint, a
zero adapter scores as the base, the oracle reproduces world.json, and the table's generated
accuracy is a re-score of the saved adapters with plain ``PeftModel.from_pretrained`` + ``generate``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from llgbm_train import evaluate as E
from llgbm_train.generalisation import classify, generalisation_kinds
from llgbm_train.stats import bits, bootstrap_accuracy, unbits
from llgbm_train.trainer import prepare, train
from train_world import small_config

# --- generalisation kinds -----------------------------------------------------------------------


def _tasks(split: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]):
    out = []
    for fam, (train_p, held_p) in split.items():
        out += [
            SimpleNamespace(name=f"{fam}_{p}", family=fam, param=p, split="train") for p in train_p
        ]
        out += [
            SimpleNamespace(name=f"{fam}_{p}", family=fam, param=p, split="heldout") for p in held_p
        ]
    return out


def test_kinds_of_every_family_split():
    """Every held-out task of the families' documented split, classified from the split alone."""
    from llgbm_worlds.families import FAMILIES

    kinds = generalisation_kinds(
        _tasks({f.name: (f.train_params, f.heldout_params) for f in FAMILIES.values()})
    )
    want = {
        "add_4": "interpolated",
        "subtract_3": "interpolated",
        "subtract_5": "interpolated",
        "shift_4": "interpolated",
        "repeat_4": "interpolated",
        "add_8": "extrapolated",
        "mod_6": "extrapolated",
        "shift_7": "extrapolated",
        "code_omega": "new_symbol",
        "code_sigma": "new_symbol",
        "prefix_old": "new_symbol",
        "prefix_wet": "new_symbol",
        "surround_old": "new_symbol",
        "suffix_red": "new_family",
        "suffix_green": "new_family",
        "suffix_hot": "new_family",
        "add_2": "seen",
        "code_alpha": "seen",
    }
    assert {k: kinds[k] for k in want} == want
    for fam in FAMILIES.values():  # every task gets a kind, train tasks are all "seen"
        assert all(kinds[fam.task_name(p)] == "seen" for p in fam.train_params)
        assert all(kinds[fam.task_name(p)] != "seen" for p in fam.heldout_params)


def test_kind_follows_the_worlds_own_train_parameters():
    # A world that kept fewer train parameters: 4 is no longer between two of them.
    kinds = generalisation_kinds(_tasks({"add": (("2", "3"), ("4", "1"))}))
    assert kinds["add_4"] == "extrapolated" and kinds["add_1"] == "extrapolated"
    assert classify("add", "4", ["2", "5"]) == "interpolated"
    assert classify("add", "5", ["2", "5.0", "7"]) == "interpolated"
    assert classify("prefix", "4", ["red", "blue"]) == "new_symbol"  # symbols: not a range
    assert classify("", "", ["x"]) == "unclassified"  # an imported hf task
    with pytest.raises(ValueError, match="also a train parameter"):
        classify("add", "3", ["2", "3"])
    mix = SimpleNamespace(name="mix", family="mixture", param="", split="train")
    assert "mix" not in generalisation_kinds([mix])


# --- bootstrap ------------------------------------------------------------------------------------


def test_bootstrap_point_is_the_item_weighted_mean():
    a = np.array([[1] * 3 + [0] * 7])  # [1 seed, 10 items]
    b = np.array([[1] * 30])  # [1 seed, 30 items]
    acc, lo, hi = bootstrap_accuracy([a, b], n_boot=200, seed=0)
    assert acc == pytest.approx(33 / 40)
    assert lo < acc < hi
    assert bootstrap_accuracy([np.ones((1, 5))], n_boot=50) == (1.0, 1.0, 1.0)


def test_bootstrap_resamples_seeds_as_well_as_items():
    """Two seeds that disagree completely: the items alone show no spread, the seeds do."""
    x = np.stack([np.ones(200), np.zeros(200)])  # [2 seeds, 200 items]
    acc, lo, hi = bootstrap_accuracy([x], n_boot=2000, seed=0)
    assert acc == 0.5 and lo == 0.0 and hi == 1.0
    one_seed = np.tile([1.0, 0.0], 200)[None]  # same mean, 1 seed, 400 items
    _, lo1, hi1 = bootstrap_accuracy([one_seed], n_boot=2000, seed=0)
    assert 0.4 < lo1 < 0.5 < hi1 < 0.6
    with pytest.raises(ValueError, match="seed counts"):
        bootstrap_accuracy([np.ones((2, 3)), np.ones((1, 3))])


def test_bits_round_trip():
    c = [True, False, False, True]
    assert bits(c) == "1001" and unbits(bits(c)).tolist() == c


# --- the evaluation on a test-preset world --------------------------------------------------------

MAX_NEW = 6  # one decoding budget for llgbm's scorer and the plain re-score below


def _config(world: Path, runs: Path, *overrides: str):
    return small_config(
        world,
        runs,
        "training.steps=4",
        "eval.tasks=all",
        "eval.max_items=16",  # every test item of the test preset: world.json is comparable
        f"eval.max_new_tokens={MAX_NEW}",
        *overrides,
    )


@pytest.fixture(scope="module")
def world_copy(test_world_dir, tmp_path_factory) -> Path:
    """A private copy of the test world (tests rewrite its items)."""
    dst = tmp_path_factory.mktemp("wcopy") / "world"
    shutil.copytree(test_world_dir, dst)
    return dst


@pytest.fixture(scope="module")
def trained(world_copy, tmp_path_factory):
    """A short run on the world copy, evaluated on every task: (cfg, report)."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = _config(world_copy, runs)
    result = train(cfg, runs / "r", progress=False)
    report = E.evaluate(
        result.setup,
        result.generator,
        out_dir=runs / "r",
        checkpoint={"step": result.step, "steps": 4},
        progress=False,
    )
    return cfg, report


def _plain_outputs(base: Path, prompts: list[str], adapter: Path | None = None) -> list[str]:
    """Greedy continuations with plain transformers (+ PEFT): nothing of llgbm involved."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]


def _rewrite_answers(world: Path, task: str, answers: list[str]) -> None:
    path = world / "tasks" / task / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    for row, a in zip(rows, answers, strict=False):
        row["answer"] = a
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_heldout_tasks_never_reach_training(world_copy, tmp_path, monkeypatch):
    """Assert on what training read: every condition prompt the encoder saw, every sample."""
    from llgbm_train.encoders import ConditionEncoder
    from llgbm_worlds import World

    world = World.load(world_copy)
    heldout = [t for t in world.tasks if t.split == "heldout"]
    heldout_prompts = {p for t in heldout for s in ("train", "test") for p in t.prompts(s)}
    seen: list[str] = []
    encode = ConditionEncoder.encode

    def spy(self, prompts):
        seen.extend(p for task in prompts for p in task)
        return encode(self, prompts)

    monkeypatch.setattr(ConditionEncoder, "encode", spy)
    result = train(_config(world_copy, tmp_path / "runs"), tmp_path / "r", progress=False)
    monkeypatch.setattr(ConditionEncoder, "encode", encode)
    from llgbm_train.trainer import FIT_CONDITIONS_PER_TASK

    cfg = result.setup.cfg
    n = cfg.generator.n_prompts
    fit = len(result.setup.data.prompts) * FIT_CONDITIONS_PER_TASK * n  # the standardisation fit
    assert len(seen) == 4 * cfg.training.batch_size * n + fit  # steps x batch x prompts + fit
    assert not set(seen) & heldout_prompts
    train_prompts = {p for t in world.tasks if t.split == "train" for p in t.prompts("train")}
    assert set(seen) <= train_prompts
    assert not set(result.setup.data.tasks) & {t.name for t in heldout}
    # The evaluation checks the same on its data and refuses a run that trained on a held-out task.
    setup = result.setup
    leaked = heldout[0].name
    setup.data.tasks.append(leaked)
    with pytest.raises(E.EvalError, match=f"held-out tasks {leaked} are training samples"):
        E.evaluate(setup, result.generator, progress=False)
    setup.data.tasks.pop()
    setup.data.prompts["x"] = [heldout[1].prompts("test")[0]]
    with pytest.raises(E.EvalError, match="prompts are training conditions or probes"):
        E.evaluate(setup, result.generator, progress=False)


def test_condition_prompts_and_scored_items_are_disjoint(trained, world_copy, monkeypatch):
    from llgbm_worlds import World

    cfg, report = trained
    world = World.load(world_copy)
    for row in report["per_task"]:
        task = world.task(row["task"])
        scored = {e.prompt for e in task.items("test")[: row["n_items"]]}
        assert len(row["condition"]) == cfg.generator.n_prompts
        assert set(row["condition"]) <= set(task.prompts("train"))
        assert not set(row["condition"]) & scored
    # Scoring a condition prompt is refused, not reported.
    setup = prepare(cfg, progress=False)
    real = E.scored_items
    monkeypatch.setattr(
        E,
        "scored_items",
        lambda s, t: [
            *real(s, t),
            *(e for e in t.items("train") if e.prompt in E.condition_prompts(s, t)),
        ],
    )
    with pytest.raises(E.EvalError, match="condition prompts are also scored items"):
        E.evaluate(setup, setup.generator, progress=False)


def test_zero_adapter_scores_exactly_as_the_base(trained, world_copy, tmp_path):
    """On items whose answers are the base's own outputs, so that any change would show."""
    from llgbm_flora import LoraAdapter, save_adapter
    from llgbm_worlds.families import Example

    cfg, _ = trained
    setup = prepare(cfg, progress=False)
    task = next(t for t in setup.world.tasks if t.name == "code_omega")
    prompts = [e.prompt for e in task.items("test")]
    items = [
        Example(p, a)
        for p, a in zip(prompts, _plain_outputs(setup.world.base_path, prompts), strict=True)
    ]
    base = E.score_items(setup, items, None)
    assert all(base)  # the rigged items: the base is right on every one
    spec = setup.data.teachers.spec
    gen = torch.Generator().manual_seed(0)
    a = {k: torch.randn(spec.rank, spec.in_out(k[1])[0], generator=gen) for k in spec.keys()}  # noqa: SIM118 (LoraSpec.keys)
    b = {k: torch.zeros(spec.in_out(k[1])[1], spec.rank) for k in spec.keys()}  # noqa: SIM118 (LoraSpec.keys)
    zero = LoraAdapter(spec, a, b)  # random A, zero B: a LoRA whose update is exactly zero
    assert E.score_items(setup, items, zero) == base
    assert E.score_items(setup, items, save_adapter(zero, tmp_path / "zero")) == base
    # The check can fail: an adapter that changes outputs scores differently on these items.
    teacher = E.oracle_teacher(setup, "code_omega")
    assert E.score_items(setup, items, teacher) != base


def test_oracle_reproduces_world_json_accuracy(trained, world_copy, tmp_path):
    _, report = trained
    tw = report["checks"]["teacher_vs_world"]
    assert tw["n_compared"] == len(report["per_task"]) and tw["max_abs_diff"] == 0.0
    for row in report["per_task"]:
        assert row["methods"]["teacher"]["accuracy"] == row["teacher"]["world_accuracy"]
    # A world.json that claims another accuracy is reported as a mismatch.
    bad = tmp_path / "bad_world"
    shutil.copytree(world_copy, bad)
    manifest = json.loads((bad / "world.json").read_text())
    # Every teacher of the task: the oracle is the best of them, so lowering one moves it.
    for t in manifest["teachers"]:
        if t["task"] == "prefix_old":
            t["accuracy"] = 0.5
    (bad / "world.json").write_text(json.dumps(manifest))
    setup = prepare(_config(bad, tmp_path / "runs"), progress=False)
    rep = E.evaluate(setup, setup.generator, tasks="heldout", progress=False)
    assert rep["checks"]["teacher_vs_world"]["mismatched"] == ["prefix_old"]
    row = next(r for r in rep["per_task"] if r["task"] == "prefix_old")
    measured = row["methods"]["teacher"]["accuracy"]
    assert measured != 0.5
    assert rep["checks"]["teacher_vs_world"]["max_abs_diff"] == pytest.approx(abs(measured - 0.5))


def test_table_equals_plain_peft_rescore_of_the_saved_adapters(test_world_dir, tmp_path):
    """Answers of even items := the saved adapter's plain-PEFT output; re-evaluate; compare."""
    from llgbm_train.cli import main
    from llgbm_worlds import World

    world_dir = tmp_path / "w"
    shutil.copytree(test_world_dir, world_dir)
    cfg = _config(world_dir, tmp_path / "runs")
    run = tmp_path / "runs" / "r"
    result = train(cfg, run, progress=False)
    report = E.evaluate(result.setup, result.generator, out_dir=run, progress=False)
    world = World.load(world_dir)
    adapters = run / "eval" / "adapters"
    first = {p.name: (p / "adapter_model.safetensors").read_bytes() for p in adapters.iterdir()}
    plain = {}
    for row in report["per_task"]:
        items = world.task(row["task"]).items("test")
        outs = _plain_outputs(world.base_path, [e.prompt for e in items], adapters / row["task"])
        plain[row["task"]] = outs
        _rewrite_answers(
            world_dir,
            row["task"],
            [
                o if i % 2 == 0 else e.answer
                for i, (o, e) in enumerate(zip(outs, items, strict=True))
            ],
        )
    # The same checkpoint and conditions, scored against the rewritten items by `llgbm evaluate`.
    assert main(["evaluate", str(run)]) == 0
    again = json.loads((run / "eval" / "report.json").read_text())
    world = World.load(world_dir)
    n_right = 0
    for row in again["per_task"]:
        items = world.task(row["task"]).items("test")
        want = [
            o == " ".join(e.answer.split()) for o, e in zip(plain[row["task"]], items, strict=True)
        ]
        assert unbits(row["methods"]["generated"]["correct"]).tolist() == want, row["task"]
        saved = adapters / row["task"] / "adapter_model.safetensors"
        assert saved.read_bytes() == first[row["task"]]  # the adapters re-scored are the ones saved
        n_right += sum(want)
    n_items = sum(r["n_items"] for r in again["per_task"])
    assert n_right >= n_items / 2  # every even item by construction: not a 0 == 0 comparison
    assert again["summary"]["heldout"]["generated"]["accuracy"] > 0


def test_generated_deltas_are_saved_beside_the_adapters(trained):
    """eval/deltas.safetensors holds each saved adapter's delta, as llgbm-delta computes it."""
    from llgbm_delta import compute_deltas
    from safetensors import safe_open

    cfg, report = trained
    setup = prepare(cfg, progress=False)
    run = Path(cfg.runs_dir) / "r"
    with safe_open(str(run / "eval" / E.GENERATED_DELTAS), "np") as f:
        meta = f.metadata()
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    assert meta["format"] == E.GENERATED_DELTAS_FORMAT
    assert (meta["probe_hash"], meta["spec_hash"]) == (setup.probes.hash, setup.delta_spec.hash)
    tasks = [row["task"] for row in report["per_task"]]
    assert sorted(saved) == sorted(tasks)
    paths = [str(run / "eval" / "adapters" / t) for t in tasks]
    again = compute_deltas(
        (setup.model, setup.tokenizer), paths, setup.probes, None, spec=setup.delta_spec,
        progress=False,
    )  # fmt: skip
    for i, t in enumerate(tasks):
        assert saved[t].shape == (setup.base_act.shape[0],)
        np.testing.assert_allclose(saved[t], np.asarray(again[i]), rtol=1e-4, atol=1e-5)
    assert len({saved[t].tobytes() for t in tasks}) > 1  # one per task, not one copied


def test_nearest_teacher_is_the_train_task_with_the_closest_condition(trained):
    cfg, report = trained
    setup = prepare(cfg, progress=False)

    def embedding(prompts):  # masked mean over prompts and tokens, computed here on its own
        states, mask = setup.encoder.encode([prompts])  # [1, N, L, D], [1, N, L]
        m = mask[0].reshape(-1).bool()
        return states[0].reshape(-1, states.shape[-1])[m].mean(0)

    train_tasks = [t for t in setup.world.tasks if t.split == "train" and t.family != "mixture"]
    train_emb = {t.name: embedding(E.condition_prompts(setup, t)) for t in train_tasks}
    rows = [r for r in report["per_task"] if r["split"] == "heldout"]
    assert rows and all(r["methods"]["nearest_teacher"] is not None for r in rows)
    for row in rows:
        e = embedding(row["condition"])
        sims = {n: float(torch.cosine_similarity(e, v, dim=0)) for n, v in train_emb.items()}
        best = max(sims, key=sims.get)
        assert row["nearest"]["task"] == best
        assert row["nearest"]["similarity"] == pytest.approx(sims[best], abs=1e-5)
        assert row["nearest"]["path"] == str(E.oracle_teacher(setup, best))
    by_task = {r["task"]: r["nearest"]["task"] for r in rows}
    assert by_task["code_omega"].startswith("code_")  # its instruction differs in one word
    assert all(
        r["methods"].get("nearest_teacher") is None
        for r in report["per_task"]
        if r["split"] == "train"
    )


def test_evaluate_names_its_checkpoint_and_replaces_eval_whole(
    world_copy, tmp_path, monkeypatch, capsys
):
    import dataclasses

    from llgbm_train.cli import main
    from llgbm_train.config import save_config

    cfg = _config(world_copy, tmp_path / "runs")
    cfg_file = save_config(dataclasses.replace(cfg, name=None), tmp_path / "c.yaml")
    assert main(["train", str(cfg_file), "--name", "r", "--stop-after", "2"]) == 0
    run = tmp_path / "runs" / "r"
    assert not (run / "eval").exists()  # stopped early: nothing evaluated
    assert main(["evaluate", str(run)]) == 0
    assert "checkpoint step 2 of 4 (unfinished run)" in capsys.readouterr().out
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["checkpoint"] == {"step": 2, "steps": 4}
    assert "checkpoint step 2 of 4 (unfinished run)" in (run / "eval" / "report.md").read_text()

    def snapshot():
        return {
            str(p.relative_to(run)): p.read_bytes()
            for p in sorted((run / "eval").rglob("*"))
            if p.is_file()
        }

    before = snapshot()
    # An evaluation interrupted half-way leaves the previous eval/ exactly as it was.
    real = E.score_many

    def dies(setup, groups, adapters):
        if any(isinstance(a, Path) and a.parent.name == "adapters" for a in adapters):
            raise KeyboardInterrupt  # scoring the generated adapters: all of them are saved
        return real(setup, groups, adapters)

    monkeypatch.setattr(E, "score_many", dies)
    with pytest.raises(KeyboardInterrupt):
        E.evaluate_run(run, progress=False)
    monkeypatch.setattr(E, "score_many", real)
    assert snapshot() == before
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no half-written eval dir
    # The finished run's evaluation replaces it whole: every adapter is the step-4 one.
    assert main(["train", str(cfg_file), "--name", "r", "--resume", "--no-eval"]) == 0
    assert main(["evaluate", str(run)]) == 0
    assert "checkpoint step 4 of 4" in capsys.readouterr().out
    after = snapshot()
    assert after.keys() == before.keys()
    changed = [
        k for k in after if k.endswith("adapter_model.safetensors") and after[k] != before[k]
    ]
    assert len(changed) == len(report["per_task"])
    assert after["eval/deltas.safetensors"] != before["eval/deltas.safetensors"]
    # A directory the tool did not write is refused, not replaced.
    shutil.rmtree(run / "eval")
    (run / "eval").mkdir()
    (run / "eval" / "mine.txt").write_text("keep me")
    assert main(["evaluate", str(run)]) == 2
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("error: ") and "not an evaluation directory" in last
    assert (run / "eval" / "mine.txt").read_text() == "keep me"


def test_batched_and_peft_scorers_give_the_same_report(world_copy, tmp_path):
    """eval.scorer=batched (shared passes) and =peft (one PEFT model per adapter) agree exactly."""
    runs = tmp_path / "runs"
    result = train(_config(world_copy, runs), runs / "r", progress=False)
    batched = E.evaluate(result.setup, result.generator, progress=False)
    setup = prepare(_config(world_copy, runs, "eval.scorer=peft"), progress=False)
    peft = E.evaluate(setup, result.generator, progress=False)
    assert "batched" in batched["scorer"] and "peft" in peft["scorer"]
    n = 0
    for a, b in zip(batched["per_task"], peft["per_task"], strict=True):
        assert a["task"] == b["task"]
        for m in E.METHODS:
            if a["methods"][m] is None:
                assert b["methods"][m] is None
                continue
            assert a["methods"][m]["correct"] == b["methods"][m]["correct"], (a["task"], m)
            n += 1
    assert n > 3 * len(batched["per_task"])  # every method was scored, not only a few
    bits = {r["methods"][m]["correct"] for r in batched["per_task"] for m in ("base", "teacher")}
    assert len(bits) > 2  # the tasks' answers differ between base and teachers
