"""World deltas as a service: the world's cache, joined to world.json, shared with plain llgbm-delta."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from llgbm_delta import DeltaCache, adapter_content_hash, compute_deltas, run_deltas
from llgbm_flora import load_adapter
from llgbm_worlds.deltas import INDEX_NAME, WorldDeltas, default_cache_dir
from llgbm_worlds.errors import ManifestError


@pytest.fixture
def service(tiny_world, tiny_base, tmp_path):
    return WorldDeltas(tiny_world, cache_dir=tmp_path / "cache", base=tiny_base)


def test_teacher_deltas_equal_compute_deltas_and_are_cached(service, tiny_world, tiny_base):
    first = service.teachers()
    assert len(first) == len(tiny_world.teachers) and first.computed == len(tiny_world.teachers)
    direct = compute_deltas(tiny_base, [str(t.path) for t in tiny_world.teachers], progress=False)
    np.testing.assert_array_equal(first.deltas, direct)
    again = service.teachers()
    assert again.computed == 0 and again.keys == first.keys
    np.testing.assert_array_equal(again.deltas, first.deltas)


def test_cached_reads_need_no_model(service, tiny_world, tmp_path):
    assert service.cached() is None  # nothing computed yet
    computed = service.teachers()
    reader = WorldDeltas(tiny_world, cache_dir=tmp_path / "cache")  # no base given
    hit = reader.cached()
    assert hit is not None and reader._base is None
    np.testing.assert_array_equal(hit.deltas, computed.deltas)
    assert [t.path for t in hit.teachers] == [t.path for t in tiny_world.teachers]
    some = tiny_world.teachers[1:3]
    np.testing.assert_array_equal(reader.cached(some).deltas, computed.deltas[1:3])


def test_index_joins_world_json_rows_to_cache_entries(service, tiny_world, tmp_path):
    td = service.teachers()
    index = json.loads((tmp_path / "cache" / INDEX_NAME).read_text())
    entries = {e.key: e for e in DeltaCache(tmp_path / "cache").entries()}
    for t, key, h in zip(td.teachers, td.keys, td.adapter_hashes):
        row = index["teachers"][t.path.relative_to(tiny_world.root).as_posix()]
        assert row["sha256"] == t.sha256 and t.sha256  # world.json's file hash is the join column
        assert row["adapter_hash"] == h == adapter_content_hash(load_adapter(t.path))
        assert entries[key].adapter_hash == h  # ... and the cache entry carries the same hash
    assert [v["probe_name"] for v in index["views"]] == ["generic"]


def test_training_style_compute_deltas_hits_the_same_entries(service, tiny_world, tiny_base):
    td = service.teachers()
    r = run_deltas(
        tiny_base, [str(t.path) for t in tiny_world.teachers], cache=service.cache, progress=False
    )
    assert all(r.cached) and r.keys == td.keys


def test_a_changed_weight_hash_is_not_trusted(service, tiny_world):
    service.teachers()
    t = dataclasses.replace(tiny_world.teachers[0], sha256="0" * 64)
    assert service.cached([t]) is None  # the index row no longer matches world.json
    again = service.teachers([t])  # re-hashed from the adapter: same content, same entry
    assert again.computed == 0
    assert again.keys[0] == service.teachers().keys[0]


def test_any_adapter_goes_through_the_same_cache(service, tiny_world):
    td = service.teachers()
    adapter = load_adapter(tiny_world.teachers[2].path)
    np.testing.assert_array_equal(service.adapters([adapter])[0], td.deltas[2])


def test_damaged_index_is_one_clear_line(service, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / INDEX_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="delete it to rebuild") as info:
        service.cached()
    assert "\n" not in str(info.value)


def test_default_cache_is_inside_the_world(tiny_world):
    assert default_cache_dir(tiny_world) == tiny_world.root / "delta_cache"
    assert WorldDeltas(tiny_world).cache.root == tiny_world.root / "delta_cache"
