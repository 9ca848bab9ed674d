"""The zoo's LoRA init: shared (one init for every teacher) or independent (one per run)."""

from __future__ import annotations

import json
import shutil

import pytest
from llgbm_worlds import World, build_world, show_world, testing
from llgbm_worlds.cli import main
from llgbm_worlds.errors import BuildError, UnknownNameError
from llgbm_worlds.quality import weight_cosines
from llgbm_worlds.testing import THREADS


@pytest.fixture(scope="module")
def independent_world_dir():
    return testing.test_world(preset="test-independent")


def test_init_is_recorded_shown_and_hashed(tiny_world_dir, independent_world_dir):
    shared, indep = World.load(tiny_world_dir), World.load(independent_world_dir)
    assert (shared.init, indep.init) == ("shared", "independent")
    assert json.loads((tiny_world_dir / "world.json").read_text())["init"] == "shared"
    assert "init=shared" in show_world(tiny_world_dir).splitlines()[0]
    assert "init=independent" in show_world(independent_world_dir).splitlines()[0]
    assert shared.content_hash != indep.content_hash
    assert shared.raw["base_sha256"] == indep.raw["base_sha256"]  # same base, other zoo


def test_shared_init_aligns_the_zoo(tiny_world, independent_world_dir):
    # Teachers of different tasks start from one A in the shared zoo and stay near it; with one
    # init per run their A's are unrelated random matrices (|cosine| ~ 1/sqrt(n_params)).
    singles = lambda w: [t for t in w.teachers if t.kind == "single"]  # noqa: E731
    shared = weight_cosines(singles(tiny_world))
    indep = weight_cosines(singles(World.load(independent_world_dir)))
    assert shared["A"]["different_tasks"] > 0.5
    assert abs(indep["A"]["different_tasks"]) < 0.05
    for c in (shared, indep):  # two checkpoints of one run are close whatever the init
        assert c["A"]["same_run"] > 0.9


def test_unknown_init_is_one_line_listing_valid_ones(tmp_path, capsys):
    with pytest.raises(UnknownNameError, match="valid: shared, independent"):
        build_world("tiny", tmp_path / "w", preset="test", init="aligned")
    assert not (tmp_path / "w").exists()
    rc = main(["build", "tiny", "--out", str(tmp_path / "w"), "--preset", "test", "--init", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "valid: shared, independent" in err


@pytest.mark.parametrize("finished", [True, False])
def test_resuming_with_the_other_init_is_refused(tmp_path, tiny_world_dir, finished):
    out = tmp_path / "w"
    shutil.copytree(tiny_world_dir, out)
    if not finished:  # a killed build: no world.json, its .build.json names the init
        state = json.loads((out / "world.json").read_text())
        (out / "world.json").unlink()
        (out / ".build.json").write_text(
            json.dumps({k: state[k] for k in ("kind", "preset", "seed", "init")})
        )
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(BuildError, match="zoo init 'shared', this build uses 'independent'"):
        build_world("tiny", out, preset="test", init="independent", threads=THREADS)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_weight_cosines_delta_w_equals_dense_delta_w(tiny_world):
    """The delta-W cosines come from r x r Gram products; they equal the cosines of dense B @ A
    (what the quality report used to form, ~100 GB for the smollm2 zoo)."""
    import numpy as np
    from llgbm_flora import load_adapter

    teachers = [t for t in tiny_world.teachers if t.kind == "single"][:6]
    got = weight_cosines(teachers)["delta_w"]
    dense = []
    for t in teachers:
        a = load_adapter(t.path)
        dense.append(
            np.concatenate([a.delta_weight(k).double().flatten().numpy() for k in a.spec.keys()])  # noqa: SIM118
        )
    x = np.stack(dense)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cos = x @ x.T
    by: dict[str, list[float]] = {"same_run": [], "same_task": [], "different_tasks": []}
    for i in range(len(teachers)):
        for j in range(i + 1, len(teachers)):
            a, b = teachers[i], teachers[j]
            key = (
                "different_tasks"
                if a.task != b.task
                else ("same_run" if a.data_split == b.data_split else "same_task")
            )
            by[key].append(cos[i, j])
    for key, vals in by.items():
        if vals:
            assert got[key] == pytest.approx(float(np.mean(vals)), abs=1e-9)
    assert any(by.values())
