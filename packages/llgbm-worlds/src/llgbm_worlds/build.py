"""Build a world directory: base model, task items, teacher zoo, then ``world.json``.

Every step is resumable. The base is written to a temporary directory and moved into place with
a ``.done.json`` marker; task files are written atomically; each teacher run is atomic (see
:mod:`llgbm_worlds.zoo`); ``world.json`` is written last, so a directory with a ``world.json`` is
complete and one without it is resumable by running the same command again (``.build.json`` names
the command).
"""

from __future__ import annotations

import contextlib
import json
import platform
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from llgbm_worlds.errors import BuildError, UnknownNameError
from llgbm_worlds.families import FAMILIES, Example, TaskSpec, make_items
from llgbm_worlds.io import (
    DONE,
    fresh_tmp_dir,
    read_json,
    replace_dir,
    sha256_file,
    sha256_json,
    write_json_atomic,
    write_jsonl_atomic,
)
from llgbm_worlds.presets import KINDS, Preset, get_preset
from llgbm_worlds.tiny import TinyModelConfig
from llgbm_worlds.world import BUILD_STATE, FORMAT
from llgbm_worlds.zoo import RunSpec, Scorer, build_zoo, split_items

WEIGHTS = "model.safetensors"


def versions() -> dict[str, str]:
    """Versions of the packages a world's content depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("llgbm-worlds", "torch", "transformers", "peft", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def task_specs(preset: Preset) -> list[TaskSpec]:
    """The world's tasks in a fixed order: per family its train then held-out variants, then mixtures."""
    specs: list[TaskSpec] = []
    for fname in preset.families:
        fam = FAMILIES[fname]
        if fname in preset.heldout_families:
            params = fam.params[: max(2, preset.max_heldout_params or 0)]
            specs += [TaskSpec(fam.task_name(p), fname, "heldout", "family", p) for p in params]
            continue
        train = fam.train_params[: preset.max_train_params]
        held = fam.heldout_params[: preset.max_heldout_params]
        specs += [TaskSpec(fam.task_name(p), fname, "train", None, p) for p in train]
        specs += [TaskSpec(fam.task_name(p), fname, "heldout", "variant", p) for p in held]
    names = {s.name: s for s in specs}
    for a, b in preset.mixtures:
        for part in (a, b):
            if part not in names or names[part].split != "train":
                raise UnknownNameError(
                    f"preset {preset.name}: mixture part {part!r} is not a train task of the world"
                )
        specs.append(TaskSpec(f"mix-{a}-{b}", "mixture", "train", None, "", (a, b)))
    return specs


def _interleave(a: list[Example], b: list[Example]) -> list[Example]:
    out: list[Example] = []
    for x, y in zip(a, b):
        out += [x, y]
    return out


def task_items(preset: Preset, seed: int) -> dict[str, tuple[list[Example], list[Example]]]:
    """(train, test) items of every task of ``preset``, deterministic for ``seed``."""
    items: dict[str, tuple[list[Example], list[Example]]] = {}
    for spec in task_specs(preset):
        if spec.family == "mixture":
            (atr, ate), (btr, bte) = items[spec.parts[0]], items[spec.parts[1]]
            items[spec.name] = (_interleave(atr, btr), _interleave(ate, bte))
        else:
            fam = FAMILIES[spec.family]
            items[spec.name] = make_items(
                fam, spec.param, seed=seed, n_train=preset.n_train, n_test=preset.n_test
            )
    return items


def run_specs(
    preset: Preset, items: dict[str, tuple[list[Example], list[Example]]]
) -> list[RunSpec]:
    runs: list[RunSpec] = []
    for spec in task_specs(preset):
        train, test = items[spec.name]
        if spec.family == "mixture":
            n, kind = preset.zoo.mixture_splits, "mixture"
        else:
            n = preset.zoo.train_splits if spec.split == "train" else preset.zoo.heldout_splits
            kind = "single"
        for d, part in enumerate(split_items(train, n)):
            runs.append(RunSpec(spec.name, kind, d, tuple(part), tuple(test)))
    return runs


def _command(kind: str, out: Path, preset: Preset, seed: int) -> str:
    cmd = f"llgbm world build {kind} --out {shlex.quote(str(out))}"
    if preset.name != "default":
        cmd += f" --preset {preset.name}"
    if preset.zoo.init != get_preset(kind, preset.name).zoo.init:
        cmd += f" --init {preset.zoo.init}"
    if seed:
        cmd += f" --seed {seed}"
    return cmd


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that holds something other than a world (it could be overwritten)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BuildError(f"{out}: exists and is not a directory; choose another --out")
    ours = ("world.json", BUILD_STATE, f"base/{DONE}")  # files only a world build writes
    if not any(out.iterdir()) or any((out / f).is_file() for f in ours):
        return
    raise BuildError(
        f"{out}: exists and is not a world directory (no {', '.join(ours)}); "
        "choose a new or empty --out"
    )


def _start(out: Path, kind: str, preset: Preset, seed: int) -> None:
    """Record what is being built; refuse to mix two different builds in one directory."""
    check_out_dir(out)
    state = {"kind": kind, "preset": preset.name, "seed": seed, "init": preset.zoo.init}
    for f in (out / "world.json", out / BUILD_STATE):
        if f.is_file():
            try:
                old = read_json(f)
            except (OSError, ValueError):
                continue
            # Builds from before the init was recorded drew one init per run.
            old_init = old.get("init", "independent")
            if old_init != state["init"]:
                raise BuildError(
                    f"{out}: holds a world whose teachers use zoo init {old_init!r}, this build "
                    f"uses {state['init']!r}; use another --out or delete it"
                )
            if {k: old.get(k) for k in state if k != "init"} != {
                k: v for k, v in state.items() if k != "init"
            }:
                raise BuildError(
                    f"{out}: holds a different world ({old.get('kind')}/{old.get('preset')}, "
                    f"seed {old.get('seed')}); use another --out or delete it"
                )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"{out}: cannot create world directory ({e.strerror or e})") from e
    state["command"] = _command(kind, out, preset, seed)
    write_json_atomic(out / BUILD_STATE, state)


def _base_done(base_dir: Path, fingerprint: str) -> str | None:
    """sha256 of the finished base's weights, or None when it must be (re)built."""
    marker = base_dir / ".done.json"
    try:
        done = read_json(marker)
        weights = base_dir / WEIGHTS
        if done.get("fingerprint") == fingerprint and sha256_file(weights) == done["sha256"]:
            return done["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a missing or broken marker means the base is rebuilt, never trusted
    return None


def save_base(model, tokenizer, base_dir: Path, fingerprint: str) -> str:
    """Write model + tokenizer to ``base_dir`` atomically; returns the weights' sha256."""
    tmp = fresh_tmp_dir(base_dir)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise BuildError(f"{tmp}: cannot write base model ({e.strerror or e})") from e
    digest = sha256_file(tmp / WEIGHTS)
    write_json_atomic(tmp / ".done.json", {"fingerprint": fingerprint, "sha256": digest})
    replace_dir(tmp, base_dir)
    return digest


def load_local_base(base_dir: Path, device: str | torch.device | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def base_fingerprint(model: TinyModelConfig, seed: int) -> str:
    """What a built tiny base depends on: its recipe, the seed and the tokenizer's texts."""
    from llgbm_worlds.tiny import vocabulary_texts

    recipe = asdict(model)
    if not recipe["parametric"]:
        del recipe["parametric"]  # bases built before the option existed keep their fingerprint
    return sha256_json(["tiny-base", recipe, seed, vocabulary_texts()])


def _tiny_base(out: Path, preset: Preset, seed: int, progress: bool):
    from llgbm_worlds.tiny import build_base

    assert preset.model is not None
    fp = base_fingerprint(preset.model, seed)
    base_dir = out / "base"
    digest = _base_done(base_dir, fp)
    if digest is None:
        model, tok = build_base(preset.model, seed=seed, progress=progress)
        digest = save_base(model, tok, base_dir, fp)
    model, tok = load_local_base(base_dir)
    return model, tok, digest


def write_tasks(
    out: Path,
    preset: Preset,
    items: dict[str, tuple[list[Example], list[Example]]],
    base_model,
    tokenizer,
    scorer: Scorer,
) -> list[dict]:
    """Write every task's jsonl files and score the base on its test items; the task rows."""
    rows = []
    specs = task_specs(preset)
    base_ok = scorer(base_model, tokenizer, [items[s.name][1] for s in specs], None)
    for spec, ok in zip(specs, base_ok):
        train, test = items[spec.name]
        rel = f"tasks/{spec.name}"
        for split, exs in (("train", train), ("test", test)):
            write_jsonl_atomic(
                out / rel / f"{split}.jsonl",
                ({"prompt": e.prompt, "answer": e.answer} for e in exs),
            )
        fam = FAMILIES.get(spec.family)
        rows.append(
            {
                "name": spec.name,
                "family": spec.family,
                "param": spec.param,
                "split": spec.split,
                "heldout_kind": spec.heldout_kind,
                "instruction": fam.instruction(spec.param) if fam else "",
                "parts": list(spec.parts),
                "base_accuracy": sum(ok) / max(1, len(ok)),
                "n_train": len(train),
                "n_test": len(test),
                "train": f"{rel}/train.jsonl",
                "test": f"{rel}/test.jsonl",
            }
        )
    return rows


def content_hash(
    base_sha: str, tasks: list[dict], teachers: list[dict], out: Path, init: str
) -> str:
    files = {
        t["name"]: [sha256_file(out / t["train"]), sha256_file(out / t["test"])] for t in tasks
    }
    return sha256_json([base_sha, tasks, files, teachers, init])


def finish(
    out: Path,
    *,
    kind: str,
    preset: Preset,
    seed: int,
    base_rel: str,
    base_sha: str,
    tasks: list[dict],
    teachers: list[dict],
    timings: dict[str, float],
    extra: dict | None = None,
    init: str | None = None,
) -> Path:
    """Write world.json. ``init``: the teachers' LoRA init (default: the preset's zoo init)."""
    init = init or preset.zoo.init
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "preset": preset.name,
        "seed": seed,
        "init": init,
        "base": base_rel,
        "base_sha256": base_sha,
        "created_with": versions(),
        "recipe": {
            "zoo": asdict(preset.zoo),
            "model": asdict(preset.model) if preset.model else None,
            "mixtures": [list(m) for m in preset.mixtures],
        },
        **(extra or {}),
        "tasks": tasks,
        "teachers": teachers,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "content_hash": content_hash(base_sha, tasks, teachers, out, init),
    }
    write_json_atomic(out / "world.json", manifest)
    (out / BUILD_STATE).unlink(missing_ok=True)
    return out / "world.json"


def _scorer_for(kind: str) -> Scorer:
    """Teacher-forced on the tiny world (one spelling per answer), greedy generation elsewhere."""
    from functools import partial

    from llgbm_worlds.scoring import score_groups

    return partial(score_groups, fast=kind == "tiny")


def build_world(
    kind: str,
    out: str | Path,
    preset: str | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    device: str | None = None,
    threads: int | None = None,
    init: str | None = None,
) -> Path:
    """Build (or resume) the world ``kind`` ("tiny" | "smollm2") in ``out``; returns ``out``.

    A finished world is re-validated and left as it is. ``device``: where the zoo trains
    (default: cuda when available for smollm2, cpu for tiny). ``threads``: torch CPU threads
    during the build (restored after). CPU results are bitwise reproducible for the same
    thread count, torch version and machine type. ``init``: the zoo's LoRA init ("shared" |
    "independent"; default: the preset's), recorded in world.json and its content hash.
    """
    if kind not in KINDS:
        raise UnknownNameError(
            f"unknown world kind {kind!r}; valid kinds: {', '.join(KINDS)} (hf worlds: import_hf)"
        )
    p = get_preset(kind, preset)
    if init is not None:
        p = p.with_init(init)
    out = Path(out)
    _start(out, kind, p, seed)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    builder: Callable = _build_tiny if kind == "tiny" else _build_smollm2
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        builder(out, p, seed, progress, device, timings)
    finally:
        torch.set_num_threads(before)
    timings["total"] = time.perf_counter() - t0
    # Timings of a resumed build cover only its last session; keep the manifest's if present.
    manifest = read_json(out / "world.json")
    manifest.setdefault("timings_s", {}).update({"last_session_total": round(timings["total"], 2)})
    write_json_atomic(out / "world.json", manifest)
    return out


def _build_tiny(out: Path, p: Preset, seed: int, progress: bool, device, timings: dict) -> None:
    t = time.perf_counter()
    model, tok, base_sha = _tiny_base(out, p, seed, progress)
    if device:
        model.to(device)
    timings["base"] = time.perf_counter() - t
    _build_rest(out, "tiny", p, seed, progress, model, tok, base_sha, "base", timings)


def _build_rest(out, kind, p, seed, progress, model, tok, base_sha, base_rel, timings, extra=None):
    scorer = _scorer_for(kind)
    t = time.perf_counter()
    items = task_items(p, seed)
    tasks = write_tasks(out, p, items, model, tok, scorer)
    timings["tasks"] = time.perf_counter() - t
    t = time.perf_counter()
    teachers = build_zoo(
        out,
        model,
        tok,
        run_specs(p, items),
        p.zoo,
        seed=seed,
        base_hash=base_sha,
        scorer=scorer,
        base_name=base_rel,
        progress=progress,
    )
    timings["zoo"] = time.perf_counter() - t
    _remove_stale(out, {t["path"].split("/")[1] for t in teachers})
    finish(
        out,
        kind=kind,
        preset=p,
        seed=seed,
        base_rel=base_rel,
        base_sha=base_sha,
        tasks=tasks,
        teachers=teachers,
        timings=timings,
        extra=extra,
    )


def _remove_stale(out: Path, task_dirs: set[str]) -> None:
    """Delete teacher runs of tasks the world no longer has (none after a clean build).

    Only what the zoo wrote goes: finished runs (``split<d>`` carrying the :data:`DONE` marker)
    and its own ``.split<d>.tmp`` leftovers; a task folder is removed once that leaves it empty,
    so files someone else put there stay.
    """
    root = out / "teachers"
    for d in root.iterdir() if root.is_dir() else ():
        if d.name in task_dirs or d.is_symlink() or not d.is_dir():
            continue
        for run in d.iterdir():
            ours = run.name.startswith("split") and (run / DONE).is_file()
            ours = ours or (run.name.startswith(".split") and run.name.endswith(".tmp"))
            if ours and run.is_dir() and not run.is_symlink():
                shutil.rmtree(run)
        with contextlib.suppress(OSError):  # not empty: someone else's files stay
            d.rmdir()


def _build_smollm2(out: Path, p: Preset, seed: int, progress: bool, device, timings: dict) -> None:
    from llgbm_worlds.smollm2 import convert_smollm2

    t = time.perf_counter()
    base_dir = convert_smollm2(out / "base", progress=progress)
    base_sha = json.loads((base_dir / ".done.json").read_text())["sha256"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_local_base(base_dir, device)
    timings["base"] = time.perf_counter() - t
    _build_rest(out, "smollm2", p, seed, progress, model, tok, base_sha, "base", timings)
