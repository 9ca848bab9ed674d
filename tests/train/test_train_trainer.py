"""The trainer on a minimal world: objectives, resume equality, NaN guard, bad input, evaluation."""

from __future__ import annotations

import json

import llgbm_train.losses as L
import pytest
import torch
from llgbm_flora.algebra import sq_norms
from llgbm_train import data as D
from llgbm_train.checkpoint import load_state
from llgbm_train.evaluate import heldout_delta_error, mean_adapter
from llgbm_train.runs import RunError
from llgbm_train.trainer import TrainingError, train


@pytest.mark.parametrize("objective", ["baseline", "delta_multi", "delta_only"])
def test_objectives_train_and_log_losses_with_baselines(make_config, tmp_path, objective):
    cfg = make_config(f"training.objective={objective}", "training.steps=3")
    result = train(cfg, tmp_path / "run", progress=False)
    recs = result.run.read_metrics()
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        for name in ("loss_w", "loss_d"):
            assert r[name] >= 0 and r[name + "_baseline"] > 0
    if objective == "delta_only":
        assert "loss_norm" in recs[0] and recs[0]["loss_norm_baseline"] == 0.0
    if objective == "baseline":
        assert recs[-1]["loss"] == pytest.approx(recs[-1]["loss_w"])
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert meta["config_hash"] == cfg.hash
    assert len(meta["world"]["hash"]) == 16 and meta["delta_cache"]["teacher_deltas_hash"]
    assert set(meta["git"]) == {"commit", "dirty"} and meta["environment"]["packages"]["torch"]
    assert [p.name for p in result.run.checkpoints()] == [
        "step_000002.safetensors",
        "step_000003.safetensors",
    ]


def test_resume_gives_identical_metrics(make_config, tmp_path):
    cfg = make_config("training.steps=6", "training.checkpoint_every=4")
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "part", stop_after=3, progress=False)
    assert part.step == 3 and part.stopped_early
    # A killed run may have logged past its checkpoint: resume must drop that line.
    part.run.append_metrics({"step": 4, "loss": -1.0})
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed.step == 6
    assert (tmp_path / "part" / "metrics.jsonl").read_text() == (
        tmp_path / "full" / "metrics.jsonl"
    ).read_text()
    for a, b in zip(full.generator.state_dict().values(), resumed.generator.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.run.metadata()["resumed_at"] == [{"step": 3}]


def test_resume_with_another_config_is_one_clear_line(make_config, tmp_path):
    cfg = make_config("training.steps=2")
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(RunError, match="started with config hash") as e:
        train(
            make_config("training.steps=2", "training.lr=0.1"),
            tmp_path / "run",
            resume=True,
            progress=False,
        )
    assert "\n" not in str(e.value)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(make_config, tmp_path, monkeypatch):
    real = L.delta_loss
    calls = {"n": 0}

    def poisoned(pred, target, **kw):
        calls["n"] += 1
        out = real(pred, target, **kw)
        return out._replace(value=out.value * float("nan")) if calls["n"] == 3 else out

    monkeypatch.setattr(L, "delta_loss", poisoned)
    cfg = make_config("training.steps=6", "training.checkpoint_every=2")
    with pytest.raises(
        TrainingError, match=r"non-finite loss or gradient at step 3 .*step_000002\.safetensors"
    ):
        train(cfg, tmp_path / "run", progress=False)
    ckpt = load_state(tmp_path / "run/checkpoints/step_000002.safetensors")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["generator"].values())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("override", "error", "needle"),
    [
        ("lora.rank=8", TrainingError, "lora.rank: config says 8 but"),
        ("generator.options={depth: 3}", ValueError, "depth"),
        ("probe.set=no_such_probes", D.DataError, "probe.set: 'no_such_probes'"),
    ],
)
def test_bad_input_leaves_no_run_dir(make_config, tmp_path, override, error, needle):
    with pytest.raises(error, match=needle):
        train(make_config(override), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_missing_world_is_one_line(make_config, tmp_path):
    cfg = make_config(f"world.dir={tmp_path / 'nowhere'}")
    with pytest.raises(D.DataError, match=r"no world\.json"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_delta_w_norms_match_dense(make_config):
    from llgbm_train.trainer import prepare

    setup = prepare(make_config(), progress=False)
    t = setup.data.teachers
    got = sq_norms(t)  # [n, n_keys]
    keys = t.spec.keys()
    for j, key in enumerate(keys):
        dense = torch.stack([t[i].delta_weight(key) for i in range(len(t))])  # [n, out, in]
        torch.testing.assert_close(got[:, j], dense.pow(2).sum((1, 2)), rtol=1e-4, atol=1e-6)
    mean = mean_adapter(t)
    for key in keys:
        want = torch.stack([t[i].delta_weight(key) for i in range(len(t))]).mean(0)
        torch.testing.assert_close(mean.delta_weight(key), want, rtol=1e-4, atol=1e-5)


def test_within_standardisation_is_fitted_per_task_by_prepare(test_world_dir, tmp_path):
    """prepare fits the "within" whitening on FIT_CONDITIONS_PER_TASK_WITHIN conditions of each
    training task: re-drawn the same way, their whitened within-task scatter has eigenvalues
    v / (v + ridge) <= 1 (identity up to the shrinkage), and training steps run through it."""
    import numpy as np
    from llgbm_train.generators.t2l import WITHIN_SHRINKAGE
    from llgbm_train.trainer import FIT_CONDITIONS_PER_TASK_WITHIN, prepare
    from train_world import small_config

    cfg = small_config(
        test_world_dir,
        tmp_path / "runs",
        "generator.options={hidden: 32, emb_dim: 8, standardize: within}",
    )
    setup = prepare(cfg, progress=False)
    gen = setup.generator
    assert gen.standardize_mode == "within"
    assert not torch.allclose(gen.cond_whiten, torch.eye(gen.cond_dim))
    rng = np.random.default_rng(0)
    tasks = sorted(setup.data.prompts)
    per = FIT_CONDITIONS_PER_TASK_WITHIN
    conds = [
        D.draw_prompts(rng, setup.data.prompts[t], cfg.generator.n_prompts)
        for t in tasks
        for _ in range(per)
    ]
    states, mask = setup.encoder.encode(conds)
    pooled = gen.pool(states, mask)
    z = (pooled - gen.cond_shift) @ gen.cond_whiten
    groups = torch.arange(len(tasks)).repeat_interleave(per)
    within = z - torch.stack([z[groups == k].mean(0) for k in range(len(tasks))])[groups]
    eigs = torch.linalg.eigvalsh(within.T.double() @ within.double() / (len(z) - len(tasks)))
    assert float(eigs.max()) <= 1.0 + 1e-4
    assert float(eigs.max()) > 1.0 / (1.0 + WITHIN_SHRINKAGE) - 1e-3  # the largest direction
    result = train(cfg, tmp_path / "within", progress=False)
    assert result.generator.standardize_mode == "within"


@pytest.mark.slow
def test_trained_generator_beats_untrained_on_heldout_delta(test_world_dir, tmp_path):
    """Done-when of issue 5, on the worlds package's test preset (held-out variants + family)."""
    from llgbm_train.trainer import prepare
    from train_world import small_config

    cfg = small_config(
        test_world_dir,
        tmp_path / "runs",
        "training.steps=40",
        "training.checkpoint_every=40",
        "training.lr=1e-2",
        "training.warmup_steps=5",
        "training.lambda_d_warmup=10",
    )
    result = train(cfg, tmp_path / "run", progress=False)
    untrained = prepare(cfg, progress=False)  # same seed: the generator the run started from
    before = heldout_delta_error(untrained, untrained.generator)
    after = heldout_delta_error(result.setup, result.generator)
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    assert after["cos"] > before["cos"] + 0.2, (before, after)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_and_gradient_checkpointing_on_cuda(make_config, tmp_path):
    cfg = make_config(
        "model.device=cuda",
        "training.precision=bf16",
        "model.gradient_checkpointing=true",
        "training.steps=3",
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.setup.device.type == "cuda"
    assert next(result.generator.parameters()).device.type == "cuda"
    recs = result.run.read_metrics()
    assert len(recs) == 3 and all(r["grad_norm"] > 0 for r in recs)


def test_missing_world_is_built_when_allowed(test_world_dir, tmp_path, monkeypatch):
    import shutil

    import llgbm_worlds.build
    from train_world import small_config

    calls = []

    def fake_build(kind, out, preset=None, seed=0, progress=True):
        calls.append((kind, str(out), preset, seed))
        shutil.copytree(test_world_dir, out)
        return out

    monkeypatch.setattr(llgbm_worlds.build, "build_world", fake_build)  # where training reads it
    target = tmp_path / "worlds" / "tiny"
    cfg = small_config(
        test_world_dir,
        tmp_path / "runs",
        f"world.dir={target}",
        "world.build_if_missing=true",
        "world.preset=test",
        "training.steps=1",
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert calls == [("tiny", str(target), "test", 0)]
    assert result.step == 1 and (target / "world.json").is_file()
