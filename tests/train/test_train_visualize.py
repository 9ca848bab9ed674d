"""``llgbm visualize``: the figures of a run and of a world are real, non-blank PNGs; the pieces
that decide what is drawn are tested directly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from llgbm_train.cli import main
from llgbm_train.visualize import DeltaPoints, curve_terms, embed, plot_delta_map

RUN_FIGURES = ("curves.png", "deltas_pca.png", "deltas_tsne.png", "accuracy.png")


def _check_png(path, min_size=(500, 350)):
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    # Not blank: many colours, and a good share of the pixels not background white.
    assert len(np.unique(pixels, axis=0)) > 50
    assert (pixels.min(axis=1) < 200).mean() > 0.005


def test_visualize_a_run(test_world_run, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["visualize", str(test_world_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / f) for f in RUN_FIGURES]
    for f in RUN_FIGURES:
        _check_png(out / f)
    assert not (test_world_run / "plots").exists()  # --out respected
    # The delta maps draw the run's generated adapters (eval/adapters/<task>), not teachers only.
    from llgbm_train.runs import Run
    from llgbm_train.visualize import generated_adapters

    gen = generated_adapters(Run(test_world_run))
    assert gen and all(p.parent == test_world_run / "eval" / "adapters" for p in gen.values())


def test_visualize_a_world(test_world_dir, tmp_path, capsys):
    world = tmp_path / "world"
    shutil.copytree(test_world_dir, world)  # the world's delta cache is filled on the way
    assert main(["visualize", str(world)]) == 0
    assert capsys.readouterr().out.split() == [
        str(world / "plots" / "deltas_pca.png"),
        str(world / "plots" / "deltas_tsne.png"),
    ]
    for f in ("deltas_pca.png", "deltas_tsne.png"):
        _check_png(world / "plots" / f)
    assert (world / "delta_cache" / "manifest.json").is_file()


def test_curve_terms_are_the_logged_losses_with_baselines():
    rec = {"step": 1, "loss": 1.0, "loss_w": 1.0, "loss_w_baseline": 2.0, "lr": 0.1}
    assert curve_terms([rec]) == ["loss_w"]
    rec |= {"loss_norm": 0.1, "loss_norm_baseline": 0.0, "loss_d": 3.0, "loss_d_baseline": 4.0}
    assert curve_terms([rec]) == ["loss_w", "loss_norm", "loss_d"]


def test_delta_maps_use_directions_and_keep_clusters_apart(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 64))
    # Two families far apart in direction; the scale of each row must not matter.
    x = np.concatenate([centres[i] + 0.05 * rng.normal(size=(10, 64)) for i in range(3)])
    x *= rng.uniform(0.1, 10.0, size=(len(x), 1))
    for method in ("pca", "tsne"):
        xy, note = embed(x, method)
        assert xy.shape == (30, 2) and note
        d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
        same = d[:10, :10].mean()
        other = d[:10, 10:].mean()
        assert other > 3 * same, method
    pts = DeltaPoints(
        x.astype(np.float32),
        [f"t{i // 5}" for i in range(30)],
        [f"f{i // 10}" for i in range(30)],
        ["train teacher"] * 27 + ["generated"] * 3,
    )
    _check_png(plot_delta_map(pts, tmp_path / "m.png", "pca"))
    with pytest.raises(ValueError, match="too few adapters"):
        plot_delta_map(
            DeltaPoints(x[:3], ["a"] * 3, ["f"] * 3, ["generated"] * 3), tmp_path / "n.png", "pca"
        )


def test_visualize_refuses_what_is_neither_run_nor_world(tmp_path, capsys):
    assert main(["visualize", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "neither a run (config.yaml) nor a world" in err
    assert err.count("\n") == 1


def test_run_maps_read_the_evaluations_stored_deltas(test_world_run, tmp_path, capsys, monkeypatch):
    """The generated points come from eval/deltas.safetensors when its probes and delta spec are
    the run's (no forward of the generated adapters); a damaged or mismatched file is recomputed,
    with a note, and gives the same points."""
    import llgbm_delta
    from llgbm_train import visualize as V
    from llgbm_train.evaluate import load_generated_deltas
    from llgbm_train.runs import Run
    from safetensors.numpy import save_file

    run_dir = tmp_path / "run"
    shutil.copytree(test_world_run, run_dir)
    run = Run(run_dir)
    cfg, gen = run.config(), V.generated_adapters(run)
    stored_path = run_dir / "eval" / "deltas.safetensors"
    stored, header = load_generated_deltas(stored_path)
    assert set(gen) <= set(stored)

    computed = V.collect_deltas(cfg, gen, progress=False)  # no stored file given: computed
    calls = []
    real = llgbm_delta.compute_deltas
    monkeypatch.setattr(
        llgbm_delta, "compute_deltas", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    read = V.collect_deltas(cfg, gen, stored=stored_path, progress=False)
    assert calls == []
    n_gen = len(gen)
    np.testing.assert_array_equal(read.deltas[-n_gen:], np.stack([stored[t] for t in gen]))
    np.testing.assert_allclose(read.deltas[-n_gen:], computed.deltas[-n_gen:], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(read.deltas[:-n_gen], computed.deltas[:-n_gen])

    # Another probe set's file: recomputed, with a note.
    save_file(stored, str(stored_path), metadata={**header, "probe_hash": "0" * 16})
    again = V.collect_deltas(cfg, gen, stored=stored_path, progress=False)
    assert calls == [1] and "other probes" in capsys.readouterr().err
    np.testing.assert_allclose(again.deltas, computed.deltas, rtol=1e-5, atol=1e-6)
    stored_path.write_bytes(b"not safetensors")
    V.collect_deltas(cfg, gen, stored=stored_path, progress=False)
    assert calls == [1, 1] and "unreadable" in capsys.readouterr().err
