"""A built world on disk: ``DIR/world.json`` and the typed view ``World.load(DIR)`` gives of it.

world.json (format ``llgbm-world/1``; paths are relative to DIR)::

    {"format": "llgbm-world/1", "kind": "tiny", "preset": "default", "seed": 0,
     "init": "shared",                                 # teachers' LoRA init: shared | independent
     "base": "base",                                   # HF model + tokenizer directory
     "created_with": {"llgbm-worlds": ..., "torch": ..., "transformers": ..., "peft": ...},
     "tasks": [{"name": "add_3", "family": "add", "param": "3", "split": "train",
                "heldout_kind": null, "instruction": "Add 3 to each number.",
                "base_accuracy": 0.0, "train": "tasks/add_3/train.jsonl",
                "test": "tasks/add_3/test.jsonl", "parts": []}, ...],
     "teachers": [{"task": "add_3", "path": "teachers/add_3/split0/step0150",
                   "accuracy": 0.97, "step": 150, "data_split": 0, "kind": "single",
                   "sha256": "..."}, ...],
     "content_hash": "..."}                            # over base weights, items and adapters

Each jsonl row is ``{"prompt": ..., "answer": ...}``.

A world may come from someone else, so ``World.load`` trusts none of it: ``kind`` must be a
known one, task names must be safe as one path component (they become ``adapters/<task>``), and
every relative path must resolve inside DIR. An hf world may name a base model or adapter folder
outside DIR, but only explicitly, by an absolute path (``import_hf`` records them so); tiny and
smollm2 worlds never reach outside. With ``verify=True`` (the default) each teacher's recorded
sha256 is checked against its file, so an adapter changed after the build is named instead of
trained on; the digests are cached in ``DIR/.sha256-cache.json`` by file identity (size, mtime,
ctime, inode), so a reload costs a ``stat`` per file.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llgbm_flora.names import check_name, inside

from llgbm_worlds.errors import BuildError, ChecksumError, ManifestError, WorldIncompleteError
from llgbm_worlds.families import Example
from llgbm_worlds.io import read_jsonl, sha256_file, write_json_atomic

FORMAT = "llgbm-world/1"
WORLD_KINDS = ("tiny", "smollm2", "hf")  # tiny and smollm2 are built here, hf is imported
DIGEST_CACHE = ".sha256-cache.json"  # teacher digests keyed by file identity (see verify)
BUILD_STATE = ".build.json"  # written when a build starts; names the command that resumes it
SPLITS = ("train", "heldout")
HELDOUT_KINDS = (None, "variant", "family")
TEACHER_KINDS = ("single", "mixture")
# How a zoo's teachers start. "shared": every teacher from one LoRA init drawn from the world seed
# (A as PEFT draws it, B zero), so the zoo's weights share one coordinate system, as in DnD's zoo
# (LLaMA-Factory's fixed seed). "independent": each run draws its own, as adapters collected from
# the wild do. An hf world's imported adapters have init "unknown".
INITS = ("shared", "independent")


@dataclass
class TaskInfo:
    """One task of a world."""

    name: str  # unique, e.g. "add_3"
    family: str  # family name, or "mixture"
    split: str  # "train" | "heldout"
    heldout_kind: str | None  # None (train) | "variant" | "family"
    base_accuracy: float  # exact-match accuracy of the base model on the test items
    train_path: Path  # jsonl of train items
    test_path: Path  # jsonl of test items
    param: str = ""  # family parameter ("" for mixtures and foreign tasks)
    instruction: str = ""  # the instruction text ("" when items carry their own)
    parts: tuple[str, ...] = ()  # the two tasks a mixture interleaves
    _cache: dict[str, list[Example]] = field(default_factory=dict, repr=False, compare=False)

    def items(self, split: str = "train") -> list[Example]:
        """The task's items of ``split`` ("train" or "test")."""
        if split not in ("train", "test"):
            raise ValueError(f"split: must be 'train' or 'test', got {split!r}")
        if split not in self._cache:
            path = self.train_path if split == "train" else self.test_path
            try:
                rows = read_jsonl(path)
            except FileNotFoundError:
                raise WorldIncompleteError(
                    f"{path}: items file of task {self.name} is missing"
                ) from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ManifestError(f"{path}: not valid jsonl ({e})") from None
            try:
                self._cache[split] = [Example(str(r["prompt"]), str(r["answer"])) for r in rows]
            except (KeyError, TypeError):
                raise ManifestError(f"{path}: each row needs 'prompt' and 'answer'") from None
        return list(self._cache[split])

    def prompts(self, split: str = "train") -> list[str]:
        """The formatted prompt texts of ``split`` (no answers): what a generator reads."""
        return [e.prompt for e in self.items(split)]


@dataclass
class TeacherInfo:
    """One teacher adapter (a PEFT directory) of a world."""

    task: str  # the task it was trained on
    path: Path  # absolute path of its PEFT directory
    accuracy: float  # exact match on its task's test items (nan when unknown)
    step: int  # training step of this checkpoint (0 when unknown)
    data_split: int  # which disjoint slice of the task's train items it saw
    kind: str  # "single" | "mixture"
    sha256: str = ""  # of adapter_model.safetensors ("" when not recorded)


@dataclass
class World:
    """A loaded, validated world."""

    root: Path
    kind: str  # "tiny" | "smollm2" | "hf"
    preset: str
    seed: int
    base_path: Path | str  # local model directory (absolute), or an HF id for hf worlds
    tasks: list[TaskInfo]
    teachers: list[TeacherInfo]
    created_with: dict[str, str]
    content_hash: str
    raw: dict[str, Any]  # the whole world.json, for fields this class does not model
    # Teachers' LoRA init: "shared" (one init for the zoo), "independent" (one per run), or
    # "unknown" (imported adapters).
    init: str = "unknown"

    def task(self, name: str) -> TaskInfo:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ManifestError(
            f"{self.root / 'world.json'}: no task {name!r}; tasks: {', '.join(t.name for t in self.tasks)}"
        )

    def teachers_of(self, task: str) -> list[TeacherInfo]:
        return [t for t in self.teachers if t.task == task]

    @classmethod
    def load(cls, root: str | Path, *, verify: bool = True) -> World:
        """Read and validate ``root/world.json``; one clear line on anything missing.

        ``verify``: check every teacher file against its recorded sha256 (:meth:`verify`).
        """
        root = Path(root)
        manifest = root / "world.json"
        if not manifest.is_file():
            raise WorldIncompleteError(_missing_message(root))
        try:
            d = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{manifest}: not valid JSON ({e})") from None
        world = _parse(root, d)
        if verify:
            world.verify()
        return world

    def verify(self) -> None:
        """Raise :class:`ChecksumError` naming the first teacher file whose sha256 changed.

        A digest is recomputed only when the file's size, mtime, ctime or inode differ from the
        cached ones (ctime and inode cannot be set back by hand, and differ in a copied world, so
        a cache shipped with a world vouches for nothing). The cache is best effort: a read-only
        world is verified in full on every load.
        """
        cache_path = self.root / DIGEST_CACHE
        try:
            cache = json.loads(cache_path.read_text())
            if not isinstance(cache, dict):
                cache = {}
        except (OSError, ValueError):
            cache = {}
        fresh: dict[str, Any] = {}
        for t in self.teachers:
            if not t.sha256:
                continue  # an hf adapter imported without a digest: nothing to compare with
            f = teacher_weights(t.path)
            if f is None:
                raise WorldIncompleteError(f"{t.path}: teacher of {t.task} has no adapter weights")
            st = f.stat()
            ident = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            key = str(f)
            old = cache.get(key)
            if isinstance(old, dict) and old.get("id") == ident and old.get("sha256") == t.sha256:
                fresh[key] = old
                continue
            if sha256_file(f) != t.sha256:
                raise ChecksumError(
                    f"{f}: teacher of {t.task} (step {t.step}) changed since the world was built "
                    f"(sha256 differs from {self.root / 'world.json'}); restore it or rebuild "
                    "the world"
                )
            fresh[key] = {"id": ident, "sha256": t.sha256}
        if fresh != cache:
            with contextlib.suppress(BuildError):  # a read-only world stays uncached
                write_json_atomic(cache_path, fresh)


def teacher_weights(adapter_dir: Path) -> Path | None:
    """The weights file of a PEFT adapter directory (safetensors preferred), or None."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter_dir / name).is_file():
            return adapter_dir / name
    return None


def _missing_message(root: Path) -> str:
    state = root / BUILD_STATE
    if state.is_file():
        try:
            s = json.loads(state.read_text())
            cmd = s.get("command", "")
            return f"{root}: world build did not finish (no world.json); resume it with `{cmd}`"
        except (json.JSONDecodeError, OSError):
            pass  # an unreadable build state only loses the resume hint; the messages below hold
    if not root.exists():
        return (
            f"{root}: no such world directory; build one with `llgbm world build tiny --out {root}`"
        )
    return f"{root}: no world.json; build a world with `llgbm world build tiny --out {root}`"


def _need(d: dict, key: str, where: str, types: type | tuple) -> Any:
    if key not in d:
        raise ManifestError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, types):
        raise ManifestError(f"{where}: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def _local_path(root: Path, rel: str, what: str, *, external: bool) -> Path:
    """A path of world.json: inside ``root``, or (``external``: hf worlds) an absolute path."""
    if external and Path(rel).is_absolute():
        return Path(rel).resolve()
    try:
        return inside(root, rel, what, error=ManifestError)
    except ManifestError as e:
        hint = "; run import-hf again (it writes outside folders as absolute paths)"
        raise ManifestError(f"{e}{hint if external else ''}") from None


def _base(root: Path, base: str, kind: str, where: str) -> Path | str:
    """The base model: a local directory, or for hf worlds also an HF hub id (``org/name``)."""
    hf = kind == "hf"
    if hf and not Path(base).is_absolute() and not (root / base).exists():
        if not is_hub_id(base):
            raise ManifestError(f"{where}: base {base!r} is neither a model directory nor an HF id")
        return base
    path = _local_path(root, base, f"{where}: base", external=hf)
    if not (path / "config.json").is_file():
        raise WorldIncompleteError(f"{where}: base model directory {path} has no config.json")
    return path


def is_hub_id(ref: str) -> bool:
    """``name`` or ``org/name`` made of safe names (so it cannot be read as a path elsewhere)."""
    parts = ref.split("/")
    try:
        return len(parts) <= 2 and all(check_name(p, "hub id") == p for p in parts)
    except ValueError:
        return False


def _parse(root: Path, d: Any) -> World:
    where = str(root / "world.json")
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: top level must be an object")
    fmt = d.get("format")
    if fmt != FORMAT:
        raise ManifestError(f"{where}: format is {fmt!r}, expected {FORMAT!r}")
    kind = _need(d, "kind", where, str)
    if kind not in WORLD_KINDS:
        raise ManifestError(f"{where}: kind must be one of {', '.join(WORLD_KINDS)}, got {kind!r}")
    base_path = _base(root, _need(d, "base", where, str), kind, where)

    tasks: list[TaskInfo] = []
    seen: set[str] = set()
    for i, t in enumerate(_need(d, "tasks", where, list)):
        w = f"{where}: tasks[{i}]"
        if not isinstance(t, dict):
            raise ManifestError(f"{w}: must be an object")
        name = check_name(_need(t, "name", w, str), f"{w}: task name", error=ManifestError)
        if name in seen:
            raise ManifestError(f"{w}: duplicate task name {name!r}")
        seen.add(name)
        split = _need(t, "split", w, str)
        if split not in SPLITS:
            raise ManifestError(f"{w}: split must be one of {SPLITS}, got {split!r}")
        hk = t.get("heldout_kind")
        if hk not in HELDOUT_KINDS:
            raise ManifestError(f"{w}: heldout_kind must be one of {HELDOUT_KINDS}, got {hk!r}")
        paths = {}
        for s in ("train", "test"):
            p = inside(root, _need(t, s, w, str), f"{w} ({name}): {s} path", error=ManifestError)
            if not p.is_file():
                raise WorldIncompleteError(f"{w} ({name}): {s} items file {p} is missing")
            paths[s] = p
        acc = t.get("base_accuracy")
        tasks.append(
            TaskInfo(
                name=name,
                family=_need(t, "family", w, str),
                split=split,
                heldout_kind=hk,
                base_accuracy=float("nan") if acc is None else float(acc),
                train_path=paths["train"],
                test_path=paths["test"],
                param=str(t.get("param", "")),
                instruction=str(t.get("instruction", "")),
                parts=tuple(t.get("parts", ())),
            )
        )
    teachers: list[TeacherInfo] = []
    for i, t in enumerate(_need(d, "teachers", where, list)):
        w = f"{where}: teachers[{i}]"
        if not isinstance(t, dict):
            raise ManifestError(f"{w}: must be an object")
        task = _need(t, "task", w, str)
        if task not in seen:
            raise ManifestError(f"{w}: task {task!r} is not among the world's tasks")
        path = _local_path(root, _need(t, "path", w, str), f"{w}: path", external=kind == "hf")
        if not (path / "adapter_config.json").is_file():
            raise WorldIncompleteError(f"{w}: adapter directory {path} is missing or incomplete")
        kind_t = t.get("kind", "single")
        if kind_t not in TEACHER_KINDS:
            raise ManifestError(f"{w}: kind must be one of {TEACHER_KINDS}, got {kind_t!r}")
        acc = t.get("accuracy")
        teachers.append(
            TeacherInfo(
                task=task,
                path=path,
                accuracy=float("nan") if acc is None else float(acc),
                step=int(t.get("step", 0)),
                data_split=int(t.get("data_split", 0)),
                kind=kind_t,
                sha256=str(t.get("sha256", "")),
            )
        )
    return World(
        root=root.resolve(),
        kind=kind,
        preset=str(d.get("preset", "")),
        seed=int(d.get("seed", 0)),
        base_path=base_path,
        tasks=tasks,
        teachers=teachers,
        created_with=dict(d.get("created_with", {})),
        content_hash=str(d.get("content_hash", "")),
        raw=d,
        init=_init_of(d, kind, where),
    )


def _init_of(d: dict, kind: str, where: str) -> str:
    init = d.get("init")
    if init is None:  # built before the init was recorded: every run drew its own
        return "independent" if kind in ("tiny", "smollm2") else "unknown"
    if init not in (*INITS, "unknown"):
        raise ManifestError(
            f"{where}: field 'init' must be one of {', '.join((*INITS, 'unknown'))}, got {init!r}"
        )
    return init
