"""A world's teacher deltas as a service: llgbm-delta's cache at a stable place, joined to world.json.

    from llgbm_worlds.deltas import WorldDeltas
    wd = WorldDeltas("worlds/tiny")          # cache at worlds/tiny/delta_cache; generic probes
    td = wd.teachers()                       # every teacher: only cache misses are computed
    td.deltas, td.teachers, td.keys          # float32 [n, hidden], TeacherInfo rows, entry keys
    wd.cached()                              # the same from the cache alone (no model), or None
    wd.adapters(["out/merged"])              # any adapter on the world's base, same cache
    model, tok = wd.base()                   # the base the deltas are computed on (loaded once)

Training, ``quality`` and llgbm-compose all read teacher deltas through this class, so they use
the same cache entries. Deltas are llgbm-delta's (``compute_deltas`` with a ``DeltaCache``): one
definition, keyed by content (base fingerprint, probe hash, probe token hash, DeltaSpec hash,
adapter content hash).

The join. world.json names a teacher by ``path`` and the sha256 of its weight file; the cache keys
on the adapter's *content* hash, which needs the adapter loaded. The index file
``<cache>/world_index.json`` records the link, so the cache can be read without loading a model
or an adapter::

    {"format": "llgbm-world-delta-index/1",
     "teachers": {"teachers/add_3/split0/step0150":        # path relative to the world
                    {"sha256": "...",                     # = world.json's sha256 of the weights
                     "config_sha256": "...",              # of adapter_config.json (rank, alpha)
                     "adapter_hash": "..."}},             # llgbm_delta.adapter_content_hash
     "views": [{"probe_name": "generic", "probe_hash": "...", "token_hash": "...",
                "spec": {...}, "spec_hash": "...", "base_fingerprint": "...",
                "base_sha256": "..."}]}                   # world.json's base_sha256

A teacher's entry key is ``llgbm_delta.entry_key(view's parts, adapter_hash)``. A row counts only
while its ``sha256`` equals world.json's (or the file's, where world.json records none) and its
``config_sha256`` the config file's; otherwise the adapter is hashed again. Every computed key is
checked against the key llgbm-delta itself used, so a broken join raises instead of mixing
deltas. The index is written atomically under a file lock; the cache's own files are
llgbm-delta's business.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llgbm_worlds.errors import ManifestError, WorldError
from llgbm_worlds.io import sha256_file, write_json_atomic
from llgbm_worlds.world import TeacherInfo, World

INDEX_NAME = "world_index.json"
INDEX_FORMAT = "llgbm-world-delta-index/1"
CACHE_DIR = "delta_cache"  # default cache location inside a world
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def default_cache_dir(world: World | str | Path) -> Path:
    """``<world>/delta_cache``: where a world's deltas live unless told otherwise."""
    root = world.root if isinstance(world, World) else Path(world)
    return root / CACHE_DIR


@dataclass
class TeacherDeltas:
    """Deltas of some of a world's teachers, in the order asked for."""

    teachers: list[TeacherInfo]  # world.json rows
    deltas: np.ndarray  # [n, hidden] float32
    keys: list[str]  # delta-cache entry key per row
    adapter_hashes: list[str]  # adapter content hash per row
    computed: int  # rows computed by this call (0: all from the cache)

    def __len__(self) -> int:
        return len(self.teachers)


class WorldDeltas:
    """Teacher (and any adapter's) deltas of one world through one delta cache (see module doc)."""

    def __init__(
        self,
        world: World | str | Path,
        *,
        cache_dir: str | Path | None = None,
        probes=None,
        spec=None,
        base: tuple | None = None,
        device: str | None = None,
        dtype: str | None = None,
        adapters_per_batch: int = 16,
        progress: bool = False,
    ):
        """``probes``: a ProbeSet, "generic" (default), a domain name or a probe file; ``spec``: a
        DeltaSpec (default: the paper's); ``base``: an already loaded (model, tokenizer) of the
        world's base, else it is loaded on first need onto ``device`` in ``dtype``."""
        from llgbm_delta import DeltaCache, DeltaSpec, resolve_probes

        self.world = world if isinstance(world, World) else World.load(world)
        self.cache = DeltaCache(cache_dir or default_cache_dir(self.world))
        self.probes = resolve_probes(probes)
        self.spec = spec if spec is not None else DeltaSpec()
        self._base = base
        self.device = device
        self.dtype = dtype
        self.adapters_per_batch = adapters_per_batch
        self.progress = progress

    def __repr__(self) -> str:
        return f"WorldDeltas({str(self.world.root)!r}, cache={str(self.cache.root)!r})"

    @property
    def index_path(self) -> Path:
        return self.cache.root / INDEX_NAME

    # -- the base model ------------------------------------------------------------------
    def base(self) -> tuple:
        """(model, tokenizer) of the world's base, loaded once (float32 unless ``dtype``)."""
        if self._base is None:
            from llgbm_delta import load_base

            self._base = load_base(str(self.world.base_path), device=self.device, dtype=self.dtype)[
                :2
            ]
        return self._base

    # -- reading -------------------------------------------------------------------------
    def _select(self, teachers: Sequence[TeacherInfo] | None) -> list[TeacherInfo]:
        chosen = list(self.world.teachers if teachers is None else teachers)
        if not chosen:
            raise WorldError(f"{self.world.root}/world.json: no teachers to give deltas of")
        return chosen

    def _rel(self, t: TeacherInfo) -> str:
        path = Path(t.path)
        try:
            return path.relative_to(self.world.root).as_posix()
        except ValueError:
            return str(path)

    def _file_sha(self, t: TeacherInfo) -> tuple[str, str]:
        """(weights sha256, config sha256): world.json's weights hash where it records one."""
        path = Path(t.path)
        try:
            weights = t.sha256 or sha256_file(path / WEIGHTS)
            config = sha256_file(path / CONFIG)
        except FileNotFoundError as e:
            raise ManifestError(f"teacher {self._rel(t)}: {e.filename} is missing") from None
        return weights, config

    def _view(self, index: dict) -> dict | None:
        for v in index.get("views", []):
            if v.get("probe_hash") == self.probes.hash and v.get("spec_hash") == self.spec.hash:
                return v
        return None

    def _read_index(self) -> dict:
        try:
            raw = self.index_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"format": INDEX_FORMAT, "teachers": {}, "views": []}
        try:
            index = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ManifestError(
                f"{self.index_path}: not valid JSON ({e.msg}); delete it to rebuild"
            ) from None
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
            raise ManifestError(
                f"{self.index_path}: not a {INDEX_FORMAT} file; delete it to rebuild"
            )
        index.setdefault("teachers", {})
        index.setdefault("views", [])
        return index

    def _hashes(self, chosen: list[TeacherInfo], index: dict) -> tuple[list[str | None], dict]:
        """Adapter hash per teacher from valid index rows (None where stale), and fresh rows."""
        out: list[str | None] = []
        fresh: dict[str, dict] = {}
        for t in chosen:
            weights, config = self._file_sha(t)
            row = index["teachers"].get(self._rel(t))
            ok = row and row.get("sha256") == weights and row.get("config_sha256") == config
            out.append(row["adapter_hash"] if ok else None)
            if not ok:
                fresh[self._rel(t)] = {"sha256": weights, "config_sha256": config}
        return out, fresh

    def _key(self, view: dict, adapter_hash: str) -> str:
        from llgbm_delta import entry_key

        return entry_key(
            base_fingerprint=view["base_fingerprint"],
            probe_hash=view["probe_hash"],
            token_hash=view["token_hash"],
            spec_hash=view["spec_hash"],
            adapter_hash=adapter_hash,
        )

    def _view_usable(self, view: dict | None) -> bool:
        if view is None:
            return False
        base = self.cache.base_info()
        if base is None or base.fingerprint != view["base_fingerprint"]:
            return False
        recorded = self.world.raw.get("base_sha256")
        return not (recorded and view.get("base_sha256") and recorded != view["base_sha256"])

    def cached(self, teachers: Sequence[TeacherInfo] | None = None) -> TeacherDeltas | None:
        """The teachers' deltas read from the cache alone, or None if any is not there yet.

        Loads no model and no adapter (hashes the small config files only), so a dashboard can
        call it on page load.
        """
        chosen = self._select(teachers)
        index = self._read_index()
        view = self._view(index)
        if not self._view_usable(view):
            return None
        hashes, _ = self._hashes(chosen, index)
        if any(h is None for h in hashes):
            return None
        keys = [self._key(view, h) for h in hashes]  # type: ignore[arg-type]
        rows = [self.cache.get(k) for k in keys]
        if any(r is None for r in rows):
            return None
        return TeacherDeltas(chosen, np.stack(rows), keys, list(hashes), 0)  # type: ignore[arg-type]

    # -- computing -----------------------------------------------------------------------
    def teachers(self, teachers: Sequence[TeacherInfo] | None = None) -> TeacherDeltas:
        """Deltas of ``teachers`` (default: all of the world's), computing only cache misses."""
        hit = self.cached(teachers)
        if hit is not None:
            return hit
        from llgbm_delta import adapter_content_hash, encode_probes
        from llgbm_flora import load_adapter

        chosen = self._select(teachers)
        index = self._read_index()
        hashes, fresh = self._hashes(chosen, index)
        for i, t in enumerate(chosen):
            if hashes[i] is None:
                hashes[i] = adapter_content_hash(load_adapter(t.path))
                fresh[self._rel(t)]["adapter_hash"] = hashes[i]
        result = self._run([str(t.path) for t in chosen])
        _, tok = self.base()
        view = {
            "probe_name": self.probes.name,
            "probe_hash": self.probes.hash,
            "token_hash": encode_probes(tok, self.probes).token_hash,
            "spec": self.spec.to_dict(),
            "spec_hash": self.spec.hash,
            "base_fingerprint": result.base.fingerprint,
            "base_sha256": str(self.world.raw.get("base_sha256", "")),
        }
        keys = [self._key(view, h) for h in hashes]  # type: ignore[arg-type]
        for t, mine, theirs in zip(chosen, keys, result.keys):
            if mine != theirs:
                raise WorldError(
                    f"teacher {self._rel(t)}: world delta index and delta cache disagree on its "
                    f"key ({mine[:12]} vs {str(theirs)[:12]}); delete {self.index_path}"
                )
        self._update_index(fresh, view)
        return TeacherDeltas(
            chosen,
            result.deltas,
            keys,
            list(hashes),
            result.n_computed,  # type: ignore[arg-type]
        )

    def adapters(self, adapters: Sequence[Any]) -> np.ndarray:
        """Deltas [n, hidden] of any adapters (PEFT dirs or LoraAdapters) on the world's base,
        through the same cache (a merged adapter is keyed by its content like a teacher)."""
        if not adapters:
            raise WorldError("no adapters to give deltas of")
        return self._run(list(adapters)).deltas

    def _run(self, adapters: list):
        from llgbm_delta import run_deltas

        return run_deltas(
            self.base(),
            adapters,
            self.probes,
            self.cache,
            spec=self.spec,
            adapters_per_batch=self.adapters_per_batch,
            progress=self.progress,
        )

    def _update_index(self, fresh: dict[str, dict], view: dict) -> None:
        from llgbm_flora.atomic import file_lock

        lock = Path(str(self.index_path) + ".lock")  # file_lock creates the cache folder
        with file_lock(lock, what=f"world delta index {self.index_path}", timeout=None):
            index = self._read_index()  # merge with what other processes wrote meanwhile
            index["teachers"].update(fresh)
            views = [
                v
                for v in index["views"]
                if (v.get("probe_hash"), v.get("spec_hash"))
                != (view["probe_hash"], view["spec_hash"])
            ]
            index["views"] = [*views, view]
            write_json_atomic(self.index_path, index)


def world_teacher_deltas(
    world: World | str | Path, teachers: Sequence[TeacherInfo] | None = None, **kwargs: Any
) -> TeacherDeltas:
    """``WorldDeltas(world, **kwargs).teachers(teachers)``: the one-call form."""
    return WorldDeltas(world, **kwargs).teachers(teachers)


__all__ = [
    "CACHE_DIR",
    "INDEX_NAME",
    "TeacherDeltas",
    "WorldDeltas",
    "default_cache_dir",
    "world_teacher_deltas",
]
