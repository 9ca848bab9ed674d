"""The hf world: bring your own base model, PEFT adapters and prompt files; nothing is trained.

A manifest (JSON or YAML) lists the base and the tasks::

    base: Qwen/Qwen2.5-1.5B          # HF id or a local model directory (relative to the manifest)
    tasks:
      - name: arc_e
        family: commonsense
        split: train                 # train | heldout
        heldout_kind: null           # null | variant | family
        train: prompts/arc_e_train.jsonl
        test: prompts/arc_e_test.jsonl
        teachers:                    # PEFT adapter directories (relative to the manifest)
          - {path: adapters/arc_e_s0, step: 500, data_split: 0, accuracy: 0.71}

Each jsonl row is ``{"prompt", "answer"}`` (a full prompt) or Alpaca-style
``{"instruction", "input", "output"}`` (formatted with :func:`format_prompt`).
``import_hf(manifest, out)`` copies the items into ``out/tasks`` and writes ``out/world.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llgbm_worlds.build import finish
from llgbm_worlds.errors import ManifestError
from llgbm_worlds.frame import format_prompt
from llgbm_worlds.io import read_jsonl, sha256_file, write_jsonl_atomic
from llgbm_worlds.presets import Preset
from llgbm_worlds.world import HELDOUT_KINDS, SPLITS


def _read_manifest(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"{path}: cannot read manifest ({e.strerror or e})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml  # installed with transformers; JSON manifests need nothing
            except ImportError:
                raise ManifestError(f"{path}: YAML manifests need pyyaml; or write JSON") from None
            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as e:  # yaml and json raise unrelated types
        raise ManifestError(f"{path}: cannot parse manifest ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ManifestError(f"{path}: manifest must be a mapping with 'base' and 'tasks'")
    return d


def _rows(path: Path, where: str) -> list[dict]:
    if not path.is_file():
        raise ManifestError(f"{where}: prompt file {path} is missing")
    try:
        raw = read_jsonl(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid jsonl ({e})") from None
    rows = []
    for i, r in enumerate(raw):
        if isinstance(r, dict) and "prompt" in r:
            rows.append({"prompt": str(r["prompt"]), "answer": str(r.get("answer", ""))})
        elif isinstance(r, dict) and "instruction" in r:
            prompt = format_prompt(str(r["instruction"]), str(r.get("input", "")))
            rows.append({"prompt": prompt, "answer": str(r.get("output", ""))})
        else:
            raise ManifestError(f"{path}: row {i} needs 'prompt' or 'instruction'")
    return rows


def import_hf(manifest: str | Path, out: str | Path) -> Path:
    """Write ``out/world.json`` for the base, tasks and adapters listed in ``manifest``."""
    manifest = Path(manifest)
    out = Path(out)
    d = _read_manifest(manifest)
    here = manifest.parent
    base = d.get("base")
    if not isinstance(base, str) or not base:
        raise ManifestError(f"{manifest}: 'base' must be an HF model id or a model directory")
    local = (here / base) if not Path(base).is_absolute() else Path(base)
    if local.exists():
        if not (local / "config.json").is_file():
            raise ManifestError(f"{manifest}: base directory {local} has no config.json")
        base_ref = os.path.relpath(local.resolve(), out.resolve())
        base_sha = sha256_file(local / "config.json")
    else:
        base_ref, base_sha = base, ""
    tasks_in = d.get("tasks")
    if not isinstance(tasks_in, list) or not tasks_in:
        raise ManifestError(f"{manifest}: 'tasks' must be a non-empty list")
    tasks: list[dict[str, Any]] = []
    teachers: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, t in enumerate(tasks_in):
        where = f"{manifest}: tasks[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ManifestError(f"{where}: needs a 'name'")
        name = t["name"]
        where += f" ({name})"
        if name in names:
            raise ManifestError(f"{where}: duplicate task name")
        names.add(name)
        split = t.get("split", "train")
        if split not in SPLITS:
            raise ManifestError(f"{where}: split must be one of {SPLITS}, got {split!r}")
        hk = t.get("heldout_kind")
        if hk not in HELDOUT_KINDS:
            raise ManifestError(f"{where}: heldout_kind must be one of {HELDOUT_KINDS}, got {hk!r}")
        rel = f"tasks/{name}"
        for s in ("train", "test"):
            if s not in t:
                raise ManifestError(f"{where}: missing '{s}' prompt file")
            write_jsonl_atomic(out / rel / f"{s}.jsonl", _rows(here / t[s], where))
        tasks.append(
            {
                "name": name,
                "family": str(t.get("family", name)),
                "param": "",
                "split": split,
                "heldout_kind": hk,
                "instruction": "",
                "parts": list(t.get("parts", [])),
                "base_accuracy": t.get("base_accuracy"),
                "train": f"{rel}/train.jsonl",
                "test": f"{rel}/test.jsonl",
            }
        )
        for j, te in enumerate(t.get("teachers", [])):
            tw = f"{where} teachers[{j}]"
            p = te.get("path") if isinstance(te, dict) else te
            if not isinstance(p, str):
                raise ManifestError(f"{tw}: needs a 'path'")
            adir = here / p
            weights = [adir / "adapter_model.safetensors", adir / "adapter_model.bin"]
            if not (adir / "adapter_config.json").is_file() or not any(
                w.is_file() for w in weights
            ):
                raise ManifestError(
                    f"{tw}: adapter directory {adir} is missing or has no PEFT files"
                )
            te = te if isinstance(te, dict) else {}
            teachers.append(
                {
                    "task": name,
                    "path": os.path.relpath(adir.resolve(), out.resolve()),
                    "accuracy": te.get("accuracy"),
                    "step": int(te.get("step", 0)),
                    "data_split": int(te.get("data_split", j)),
                    "kind": te.get("kind", "single"),
                    "sha256": sha256_file(next(w for w in weights if w.is_file())),
                }
            )
    preset = Preset(
        name="manifest",
        families=(),
        heldout_families=(),
        max_train_params=None,
        max_heldout_params=None,
        mixtures=(),
        n_train=0,
        n_test=0,
        model=None,
    )
    finish(
        out,
        kind="hf",
        preset=preset,
        seed=0,
        base_rel=base_ref,
        base_sha=base_sha,
        tasks=tasks,
        teachers=teachers,
        timings={},
        extra={"manifest": str(manifest.resolve())},
        init="unknown",  # adapters brought in, not trained here
    )
    return out
