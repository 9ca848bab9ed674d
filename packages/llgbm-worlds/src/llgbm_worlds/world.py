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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llgbm_worlds.errors import ManifestError, WorldIncompleteError
from llgbm_worlds.families import Example
from llgbm_worlds.io import read_jsonl

FORMAT = "llgbm-world/1"
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
    def load(cls, root: str | Path) -> World:
        """Read and validate ``root/world.json``; one clear line on anything missing."""
        root = Path(root)
        manifest = root / "world.json"
        if not manifest.is_file():
            raise WorldIncompleteError(_missing_message(root))
        try:
            d = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{manifest}: not valid JSON ({e})") from None
        return _parse(root, d)


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


def _parse(root: Path, d: Any) -> World:
    where = str(root / "world.json")
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: top level must be an object")
    fmt = d.get("format")
    if fmt != FORMAT:
        raise ManifestError(f"{where}: format is {fmt!r}, expected {FORMAT!r}")
    kind = _need(d, "kind", where, str)
    base = _need(d, "base", where, str)
    base_path: Path | str = root / base
    if kind == "hf" and not Path(base_path).exists():
        base_path = base  # an HF hub id
    elif not (Path(base_path) / "config.json").is_file():
        raise WorldIncompleteError(f"{where}: base model directory {base_path} has no config.json")
    else:
        base_path = Path(base_path).resolve()

    tasks: list[TaskInfo] = []
    seen: set[str] = set()
    for i, t in enumerate(_need(d, "tasks", where, list)):
        w = f"{where}: tasks[{i}]"
        if not isinstance(t, dict):
            raise ManifestError(f"{w}: must be an object")
        name = _need(t, "name", w, str)
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
            p = root / _need(t, s, w, str)
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
        path = root / _need(t, "path", w, str)
        if not (path / "adapter_config.json").is_file():
            raise WorldIncompleteError(f"{w}: adapter directory {path} is missing or incomplete")
        kind_t = t.get("kind", "single")
        if kind_t not in TEACHER_KINDS:
            raise ManifestError(f"{w}: kind must be one of {TEACHER_KINDS}, got {kind_t!r}")
        acc = t.get("accuracy")
        teachers.append(
            TeacherInfo(
                task=task,
                path=path.resolve(),
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
