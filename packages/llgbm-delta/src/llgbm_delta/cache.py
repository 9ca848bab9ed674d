"""DeltaCache: a directory of delta activations keyed by content, safe to share between processes.

Layout of a cache directory:

    ROOT/
      manifest.json              # format, the base model the cache is for, an index of entries
      entries/<key>.safetensors  # one file per entry: tensor "delta" [hidden] float32 + metadata
      memo.json                  # content hashes remembered by file identity (see `memo_get`)
      corrupt/                   # entries found damaged are moved here (never returned)
      .lock                      # lock (filelock) serialising manifest and memo updates

An entry key is sha256 over the base fingerprint, the probe-set hash, the probe token-id hash
(ties the tokenizer in), the DeltaSpec hash and the adapter content hash (see `fingerprint`).
Each entry file is self-describing: its metadata repeats the key parts and holds a sha256 over
all its other metadata and the delta bytes, which `get` checks, so a truncated or bit-flipped file is detected, reported
(a logged warning and `DeltaCache.problems`), moved to `corrupt/`, and treated as a miss.

Concurrency: entry files are written to a temporary file in `entries/` and moved into place with
`os.replace` (llgbm_flora.atomic), so a reader sees the old file, the new one, or none, never
half of one. The manifest is the only shared file; every update takes the lock, merges with
what is on disk and is written the same atomic way. The entry files are the truth: `entries()`
scans them, and `rebuild_manifest()` re-derives the index if a writer died between its entry
and the manifest.

A cache is made for one base model: the first `bind` records its fingerprint, and binding a
different base raises `CacheError` (use one cache directory per base). Locking uses
`filelock` (portable; the OS drops a dead process's lock).

Reading never writes: a complete cache on a read-only file system (or shared read-only) serves
every hit; nothing opens `.lock` unless an entry, the manifest or the memo changes. A write that
the file system refuses is a `CacheError` naming the cache, except memo updates, which are an
optimisation and are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from llgbm_flora.atomic import atomic_file, file_lock, write_bytes
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from llgbm_delta.errors import CacheError

log = logging.getLogger(__name__)

FORMAT = "llgbm-delta-cache"
FORMAT_VERSION = 1
ENTRY_FORMAT = "llgbm-delta-entry/1"
ENTRY_SUFFIX = ".safetensors"
MEMO_FORMAT = "llgbm-delta-memo/1"


@dataclass(frozen=True)
class BaseInfo:
    """The base model a cache is for."""

    fingerprint: str  # model_fingerprint(model)
    name: str  # id or path it was loaded from (informational)
    hidden_size: int  # length of every delta in the cache
    dtype: str  # parameter dtype the deltas were computed in (informational)


@dataclass(frozen=True)
class EntryMeta:
    """What an entry says about itself (stored in the safetensors header)."""

    key: str
    base_fingerprint: str
    probe_hash: str
    probe_name: str
    token_hash: str
    spec: str  # DeltaSpec.to_dict() as JSON
    spec_hash: str
    adapter_hash: str
    adapter_name: str  # path or label when first computed; informational (moves keep the entry)
    hidden_size: int
    sha256: str  # of every other field and the float32 delta bytes (`entry_checksum`)
    created: float


def entry_key(
    *, base_fingerprint: str, probe_hash: str, token_hash: str, spec_hash: str, adapter_hash: str
) -> str:
    """The cache key of one delta: sha256 over its content-defining parts."""
    parts = [ENTRY_FORMAT, base_fingerprint, probe_hash, token_hash, spec_hash, adapter_hash]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def entry_checksum(meta: EntryMeta, delta: np.ndarray) -> str:
    """sha256 over all metadata fields but `sha256` itself, then the delta bytes."""
    fields = {k: v for k, v in asdict(meta).items() if k != "sha256"}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    h.update(np.ascontiguousarray(delta, dtype=np.float32).tobytes())
    return h.hexdigest()


def _read_header(data: bytes) -> dict:
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("header length beyond end of file (truncated?)")
    return json.loads(data[8 : 8 + n])


class DeltaCache:
    """A content-keyed, atomic, corruption-detecting store of delta vectors (see module doc)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        # (key, reason) for every damaged entry met by this object; callers report them.
        self.problems: list[tuple[str, str]] = []
        self._memo: dict | None = None  # memo.json's entries, read once per object

    def __repr__(self) -> str:
        return f"DeltaCache({str(self.root)!r})"

    # -- paths and locking -------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def entries_dir(self) -> Path:
        return self.root / "entries"

    def entry_path(self, key: str) -> Path:
        return self.entries_dir / f"{key}{ENTRY_SUFFIX}"

    def _ensure_dirs(self) -> None:
        self._check_root()
        self.entries_dir.mkdir(parents=True, exist_ok=True)

    def _check_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise CacheError(f"{self.root}: cache path exists and is not a directory")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        held = contextlib.ExitStack()
        with self._writing():  # a lock the file system refuses is a CacheError too
            self._ensure_dirs()
            held.enter_context(
                file_lock(self.root / ".lock", what=f"delta cache {self.root}", timeout=None)
            )
        with held:
            yield

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn a refused write (read-only, permissions, disk full) into one CacheError line."""
        try:
            yield
        except OSError as e:
            what = e.strerror or type(e).__name__
            where = f" ({e.filename})" if e.filename else ""
            raise CacheError(f"cache {self.root}: cannot write: {what}{where}") from e

    # -- manifest ----------------------------------------------------------------------
    def _read_manifest(self) -> dict:
        self._check_root()
        try:
            raw = self.manifest_path.read_text()
        except FileNotFoundError:
            return {"format": FORMAT, "version": FORMAT_VERSION, "base": None, "entries": {}}
        except OSError as e:
            raise CacheError(f"{self.manifest_path}: cannot read ({e.strerror or e})") from None
        try:
            m = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CacheError(f"{self.manifest_path}: not valid JSON ({e.msg})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise CacheError(f"{self.manifest_path}: not an llgbm-delta cache manifest")
        if m.get("version") != FORMAT_VERSION:
            raise CacheError(
                f"{self.manifest_path}: cache format version {m.get('version')} is not supported "
                f"(this llgbm-delta reads version {FORMAT_VERSION})"
            )
        m.setdefault("entries", {})
        return m

    def _write_manifest(self, m: dict) -> None:
        with self._writing():
            data = (json.dumps(m, indent=1, sort_keys=True) + "\n").encode()
            write_bytes(self.manifest_path, data)

    def base_info(self) -> BaseInfo | None:
        """The base model this cache was made for, or None if nothing was bound yet."""
        base = self._read_manifest().get("base")
        return BaseInfo(**base) if base else None

    def bind(self, base: BaseInfo) -> None:
        """Record `base` as this cache's base model, or check it is the one recorded.

        A cache already bound to `base` is only read (no lock, no write)."""
        if self._check_base(self._read_manifest().get("base"), base):
            return
        with self._locked():
            m = self._read_manifest()
            if not self._check_base(m.get("base"), base):
                m["base"] = asdict(base)
                self._write_manifest(m)

    def _check_base(self, old: dict | None, base: BaseInfo) -> bool:
        """True if `old` (the manifest's record) is `base`; False if none; CacheError if another."""
        if old is None:
            return False
        if old["fingerprint"] != base.fingerprint:
            raise CacheError(
                f"cache {self.root} was written for base {old['name']!r} "
                f"(fingerprint {old['fingerprint'][:12]}, {old['dtype']}, "
                f"hidden {old['hidden_size']}), not {base.name!r} "
                f"(fingerprint {base.fingerprint[:12]}, {base.dtype}, hidden {base.hidden_size}); "
                "use one cache directory per base model"
            )
        return True

    # -- memo --------------------------------------------------------------------------
    @property
    def memo_path(self) -> Path:
        return self.root / "memo.json"

    def memo_get(self, key: str) -> dict | None:
        """A value remembered under `key` by `memo_put`, or None.

        The memo maps file identities (`fingerprint.files_identity`: names, sizes, mtimes,
        ctimes, inodes) to what was computed from those files: a base model's fingerprint and
        probe token hash, an adapter's content hash. It lets a fully cached run skip loading the
        base model and the adapters' tensors; any write to a file changes its identity, so a
        stale value is never used. A damaged memo reads as empty.
        """
        return self._read_memo().get(key)

    def _read_memo(self) -> dict:
        if self._memo is None:
            try:
                m = json.loads(self.memo_path.read_text())
                self._memo = m["entries"] if m.get("format") == MEMO_FORMAT else {}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self._memo = {}
        return self._memo

    def memo_put(self, items: dict[str, dict]) -> None:
        """Remember values (JSON objects) by key; skipped, with a debug log, where the cache
        cannot be written (a read-only cache still serves hits, only without the memo)."""
        memo = self._read_memo()
        items = {k: v for k, v in items.items() if memo.get(k) != v}
        if not items:
            return
        try:
            with self._locked():
                try:
                    on_disk = json.loads(self.memo_path.read_text())["entries"]
                except (OSError, ValueError, KeyError, TypeError):
                    on_disk = {}
                on_disk.update(items)
                blob = {"format": MEMO_FORMAT, "entries": on_disk}
                with self._writing():
                    write_bytes(self.memo_path, (json.dumps(blob, sort_keys=True) + "\n").encode())
                self._memo = on_disk
        except CacheError as e:
            log.debug("memo not written: %s", e)
            memo.update(items)

    def rebuild_manifest(self) -> int:
        """Re-derive the manifest's entry index from the entry files; returns the entry count."""
        with self._locked():
            m = self._read_manifest()
            m["entries"] = {e.key: _index_row(e) for e in self.entries()}
            self._write_manifest(m)
            return len(m["entries"])

    # -- entries -----------------------------------------------------------------------
    def _read_entry(self, path: Path) -> tuple[EntryMeta, np.ndarray]:
        """Read and fully verify one entry file; raises ValueError with the reason."""
        data = path.read_bytes()
        header = _read_header(data)
        raw_meta = header.get("__metadata__") or {}
        if raw_meta.get("format") != ENTRY_FORMAT:
            raise ValueError(f"unknown entry format {raw_meta.get('format')!r}")
        tensors = st_load(data)
        if set(tensors) != {"delta"}:
            raise ValueError(f"unexpected tensors {sorted(tensors)}")
        delta = tensors["delta"]
        meta = EntryMeta(
            key=raw_meta["key"],
            base_fingerprint=raw_meta["base_fingerprint"],
            probe_hash=raw_meta["probe_hash"],
            probe_name=raw_meta["probe_name"],
            token_hash=raw_meta["token_hash"],
            spec=raw_meta["spec"],
            spec_hash=raw_meta["spec_hash"],
            adapter_hash=raw_meta["adapter_hash"],
            adapter_name=raw_meta["adapter_name"],
            hidden_size=int(raw_meta["hidden_size"]),
            sha256=raw_meta["sha256"],
            created=float(raw_meta["created"]),
        )
        if path.name != f"{meta.key}{ENTRY_SUFFIX}":
            raise ValueError(f"entry says key {meta.key[:12]} but is stored as {path.name}")
        expect = entry_key(
            base_fingerprint=meta.base_fingerprint,
            probe_hash=meta.probe_hash,
            token_hash=meta.token_hash,
            spec_hash=meta.spec_hash,
            adapter_hash=meta.adapter_hash,
        )
        if expect != meta.key:
            raise ValueError("entry metadata does not hash to its key")
        if delta.dtype != np.float32 or delta.shape != (meta.hidden_size,):
            raise ValueError(f"delta has dtype {delta.dtype} shape {delta.shape}")
        if entry_checksum(meta, delta) != meta.sha256:
            raise ValueError("checksum mismatch")
        return meta, delta

    def _quarantine(self, key: str, path: Path, reason: str) -> None:
        self.problems.append((key, reason))
        qdir = self.root / "corrupt"
        try:
            qdir.mkdir(exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, qdir / f"{path.name}.{time.time_ns()}")
        except OSError as e:  # a read-only cache: the entry stays, and keeps being a miss
            log.warning("cache entry %s is corrupt (%s); cannot move it (%s)", path, reason, e)
            return
        log.warning(
            "cache entry %s is corrupt (%s); moved to corrupt/, will recompute", path, reason
        )

    def get(self, key: str) -> np.ndarray | None:
        """The verified delta for `key` (float32 [hidden]), or None if absent or corrupt."""
        path = self.entry_path(key)
        try:
            _, delta = self._read_entry(path)
        except FileNotFoundError:
            return None
        except Exception as e:
            # safetensors and json raise assorted error types for damaged files; all mean "miss".
            self._quarantine(key, path, f"{type(e).__name__}: {e}")
            return None
        return delta

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def put(self, meta: dict, delta: np.ndarray) -> EntryMeta:
        """Store one entry; `meta` holds the key parts and names, see `put_many`."""
        return self.put_many([(meta, delta)])[0]

    def put_many(self, items: list[tuple[dict, np.ndarray]]) -> list[EntryMeta]:
        """Store entries atomically, then index them in the manifest under the lock.

        Each `meta` dict has base_fingerprint, probe_hash, probe_name, token_hash, spec (dict),
        spec_hash, adapter_hash, adapter_name. The key is derived here, never trusted.
        """
        with self._writing():
            self._ensure_dirs()
        written = []
        for meta, delta in items:
            delta = np.ascontiguousarray(np.asarray(delta, dtype=np.float32).reshape(-1))
            if not np.isfinite(delta).all():
                raise CacheError(f"refusing to cache a non-finite delta for {meta['adapter_name']}")
            key = entry_key(
                base_fingerprint=meta["base_fingerprint"],
                probe_hash=meta["probe_hash"],
                token_hash=meta["token_hash"],
                spec_hash=meta["spec_hash"],
                adapter_hash=meta["adapter_hash"],
            )
            em = EntryMeta(
                key=key,
                base_fingerprint=meta["base_fingerprint"],
                probe_hash=meta["probe_hash"],
                probe_name=meta["probe_name"],
                token_hash=meta["token_hash"],
                spec=json.dumps(meta["spec"], sort_keys=True),
                spec_hash=meta["spec_hash"],
                adapter_hash=meta["adapter_hash"],
                adapter_name=str(meta["adapter_name"]),
                hidden_size=int(delta.shape[0]),
                sha256="",
                created=time.time(),
            )
            em = replace(em, sha256=entry_checksum(em, delta))
            header = {k: str(v) for k, v in asdict(em).items()}
            header["format"] = ENTRY_FORMAT
            with self._writing():
                write_bytes(self.entry_path(key), st_save({"delta": delta}, metadata=header))
            written.append(em)
        if written:
            with self._locked():
                m = self._read_manifest()
                for em in written:
                    m["entries"][em.key] = _index_row(em)
                self._write_manifest(m)
        return written

    def entries(self) -> list[EntryMeta]:
        """Every valid entry on disk (damaged ones are quarantined and reported), sorted by name."""
        return [meta for meta, _ in self._valid_entries()]

    def _valid_entries(self) -> list[tuple[EntryMeta, np.ndarray]]:
        """(metadata, delta) of every valid entry, each file read once, sorted as `entries`."""
        out = []
        if not self.entries_dir.is_dir():
            return out
        for path in sorted(self.entries_dir.glob(f"*{ENTRY_SUFFIX}")):
            key = path.name[: -len(ENTRY_SUFFIX)]
            try:
                meta, delta = self._read_entry(path)
            except FileNotFoundError:
                continue
            except Exception as e:
                self._quarantine(key, path, f"{type(e).__name__}: {e}")
                continue
            out.append((meta, delta))
        out.sort(key=lambda e: (e[0].adapter_name, e[0].key))
        return out

    def __len__(self) -> int:
        return len(self.entries())

    def verify(self) -> list[tuple[str, str]]:
        """Check every entry; returns (key, reason) for the damaged ones (now quarantined)."""
        before = len(self.problems)
        self.entries()
        return self.problems[before:]

    def export(self, out: str | Path) -> Path:
        """Write every valid entry to an `.npz` (atomic); returns the path.

        Arrays: `keys`, `adapter_names`, `adapter_hashes`, `probe_names`, `probe_hashes`,
        `specs` (str [n]), `deltas` (float32 [n, hidden]), `metadata` (a JSON string: format,
        base model, created).
        """
        out = Path(out)
        keep = self._valid_entries()
        base = self.base_info()
        hidden = base.hidden_size if base else (keep[0][1].shape[0] if keep else 0)
        arrays = {
            "keys": np.array([e.key for e, _ in keep], dtype=str),
            "adapter_names": np.array([e.adapter_name for e, _ in keep], dtype=str),
            "adapter_hashes": np.array([e.adapter_hash for e, _ in keep], dtype=str),
            "probe_names": np.array([e.probe_name for e, _ in keep], dtype=str),
            "probe_hashes": np.array([e.probe_hash for e, _ in keep], dtype=str),
            "specs": np.array([e.spec for e, _ in keep], dtype=str),
            "deltas": np.stack([d for _, d in keep]).astype(np.float32)
            if keep
            else np.zeros((0, hidden), np.float32),
            "metadata": np.array(
                json.dumps(
                    {
                        "format": "llgbm-delta-export/1",
                        "cache": str(self.root),
                        "base": asdict(base) if base else None,
                        "created": time.time(),
                    }
                )
            ),
        }
        with atomic_file(out) as tmp, open(tmp, "wb") as f:  # creates out's folder
            np.savez(f, **arrays)
        return out


def _index_row(e: EntryMeta) -> dict:
    return {
        "file": f"entries/{e.key}{ENTRY_SUFFIX}",
        "adapter_name": e.adapter_name,
        "adapter_hash": e.adapter_hash,
        "probe_name": e.probe_name,
        "probe_hash": e.probe_hash,
        "spec": json.loads(e.spec),
        "sha256": e.sha256,
        "created": e.created,
    }
