"""The Markdown report of an experiment (docs/results.md), generated from its results.json.

    text = results_markdown(results, spec)

Sections: setup, the honesty checks measured on this experiment's data, per world the accuracy
table by generalisation kind (reference adapters and every objective's generated adapters), the
per-task table, the ablations, findings computed from the numbers against the issue's targets,
and a hand-written discussion (``spec.discussion``) stamped with the results it was written for:
when the numbers change, the report says the discussion has to be re-read.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from llgbm_train.evaluate import LABELS, REFERENCE_METHODS
from llgbm_train.generalisation import KINDS
from llgbm_train.generalisation import LABELS as GROUP_LABELS

COLUMNS = ("heldout", *KINDS, "seen")
STAMP = re.compile(r"<!--\s*results:\s*([0-9a-f]+)\s*-->")
DEFAULT_OBJECTIVE = "delta_multi"  # the targets of issue 11 name this one for seen tasks


def results_hash(results: dict[str, Any]) -> str:
    """sha256 (12 hex) of the measured numbers (not timings): what a discussion is written for."""
    blob = json.dumps(results["results"], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def _acc(cell: dict | None) -> str:
    if cell is None:
        return "—"
    lo, hi = cell["ci95"]
    return f"{_pct(cell['accuracy'])} [{_pct(lo)}, {_pct(hi)}]"


def _cos(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _columns(entries: list[dict]) -> list[str]:
    return [c for c in COLUMNS if any(c in e["groups"] for e in entries)]


def _n_tasks(entries: list[dict], col: str) -> int:
    for e in entries:
        for cell in e["groups"].get(col, {}).values():
            return cell["n_tasks"]
    return 0


def _world_table(world: str, labels: dict[str, dict]) -> list[str]:
    objectives = {k: v for k, v in labels.items() if v["role"] == "objective"}
    if not objectives:
        return []
    entries = list(objectives.values())
    cols = _columns(entries)
    head = [f"{GROUP_LABELS[c]} ({_n_tasks(entries, c)})" for c in cols]
    lines = [
        "| adapter | " + " | ".join(head) + " | delta cos held-out | delta cos seen |",
        "|---|" + "---|" * (len(cols) + 2),
    ]
    ref = entries[0]["groups"]
    for m in REFERENCE_METHODS:
        cells = [_acc(ref.get(c, {}).get(m)) for c in cols]
        cos = [_cos((ref.get(g, {}).get(m) or {}).get("delta_cos")) for g in ("heldout", "seen")]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells + cos) + " |")
    for label, e in objectives.items():
        g = e["groups"]
        cells = [_acc(g.get(c, {}).get("generated")) for c in cols]
        cos = [
            _cos((g.get(x, {}).get("generated") or {}).get("delta_cos"))
            for x in ("heldout", "seen")
        ]
        how = " (b2: retrieved teachers, merged)" if e.get("variant") == "b2" else ""
        lines.append(f"| generated: **{label}**{how} | " + " | ".join(cells + cos) + " |")
    return lines


def _task_table(labels: dict[str, dict]) -> list[str]:
    objectives = {k: v for k, v in labels.items() if v["role"] == "objective"}
    if not objectives:
        return []
    first = next(iter(objectives.values()))["per_task"]
    names = list(objectives)
    lines = [
        "| task | kind | oracle | mean of teachers | nearest teacher (its task) | "
        + " | ".join(f"gen. {n}" for n in names)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for task, row in first.items():
        if row["split"] != "heldout":
            continue

        def acc(entry):
            return "—" if entry is None else _pct(entry["accuracy"])

        nearest = row.get("nearest_teacher")
        gens = [acc(objectives[n]["per_task"][task]["generated"]) for n in names]
        lines.append(
            f"| {task} | {GROUP_LABELS[row['kind']]} | {acc(row['teacher'])} | "
            f"{acc(row['mean_teachers'])} | {acc(nearest)} ({row['nearest'] or '—'}) | "
            + " | ".join(gens)
            + " |"
        )
    return lines


def _ablation_table(results: dict, spec) -> list[str]:
    world = results["results"].get(spec.ablation_world, {})
    abl = {k: v for k, v in world.items() if v["role"] == "ablation"}
    if not abl:
        return []
    cols = _columns(list(abl.values()))
    lines = [
        "| variant | overrides on "
        + f"`{spec.ablations.base}` | "
        + " | ".join(GROUP_LABELS[c] for c in cols)
        + " | delta cos held-out |",
        "|---|---|" + "---|" * (len(cols) + 1),
    ]
    for label, e in abl.items():
        g = e["groups"]
        ov = ", ".join(f"`{o}`" for o in e["overrides"]) or "(none: the base config)"
        cells = [_acc(g.get(c, {}).get("generated")) for c in cols]
        cos = _cos((g.get("heldout", {}).get("generated") or {}).get("delta_cos"))
        lines.append(f"| {label} | {ov} | " + " | ".join(cells) + f" | {cos} |")
    return lines


def findings(results: dict) -> list[str]:
    """Sentences computed from the numbers, against issue 11's targets."""
    out = []
    for world, labels in results["results"].items():
        objectives = {k: v for k, v in labels.items() if v["role"] == "objective"}
        if not objectives:
            continue
        seen = {k: v["groups"].get("seen", {}) for k, v in objectives.items()}
        for label, g in seen.items():
            gen, orc = g.get("generated"), g.get("teacher")
            if not gen or not orc or not orc["accuracy"]:
                continue
            ratio = gen["accuracy"] / orc["accuracy"]
            target = " (target >= 90% for delta_multi: " + ("met)" if ratio >= 0.9 else "not met)")
            out.append(
                f"- {world}, seen tasks, {label}: generated {_pct(gen['accuracy'])}% = "
                f"{100 * ratio:.0f}% of the oracle's {_pct(orc['accuracy'])}%"
                + (target if label == DEFAULT_OBJECTIVE else "")
                + "."
            )
        interp = {k: v["groups"].get("interpolated", {}) for k, v in objectives.items()}
        interp = {k: v for k, v in interp.items() if v.get("generated")}
        if interp:
            best = max(interp, key=lambda k: interp[k]["generated"]["accuracy"])
            g = interp[best]
            gen = g["generated"]
            beats = [
                m
                for m in ("mean_teachers", "nearest_teacher")
                if g.get(m) and gen["ci95"][0] > g[m]["ci95"][1]
            ]
            ok = gen["accuracy"] >= 0.5 and len(beats) == 2
            out.append(
                f"- {world}, interpolated variants: best objective {best}, generated "
                f"{_acc(gen)}% vs mean of teachers {_acc(g.get('mean_teachers'))}% and nearest "
                f"teacher {_acc(g.get('nearest_teacher'))}%; its interval lies above "
                + (" and ".join(LABELS[m] for m in beats) if beats else "neither")
                + f" (target: >= 50% and above both: {'met' if ok else 'not met'})."
            )
    return out


def _checks_table(results: dict) -> list[str]:
    runs = [e for labels in results["results"].values() for e in labels.values()]
    n = results["n_runs"]
    leaked = sum(e["checks"]["heldout_tasks_in_training"] for e in runs)
    overlap = sum(e["checks"]["condition_prompts_in_scored_items"] for e in runs)
    diffs = [
        e["checks"]["teacher_vs_world_max_abs_diff"]
        for e in runs
        if e["checks"]["teacher_vs_world_max_abs_diff"] is not None
    ]
    n_tw = max((e["checks"]["teacher_vs_world_tasks"] for e in runs), default=0)
    tw = (
        f"max abs difference {max(diffs):.4f} over {n_tw} tasks per run"
        if diffs
        else "not comparable (fewer items scored than world.json's accuracy used)"
    )
    return [
        "| check (on this experiment's data, every run) | result |",
        "|---|---|",
        f"| held-out tasks among training samples; held-out prompts among training conditions "
        f"| {leaked} found in {n} runs (the evaluation stops on any) |",
        f"| a task's condition prompts among its scored items | {overlap} found |",
        f"| oracle teacher accuracy measured here vs recorded in world.json | {tw} |",
        "| zero adapter scores exactly as the base; the table equals a re-score of the saved "
        "adapters with plain `PeftModel.from_pretrained` + `generate` | tested on the test "
        "preset (`tests/train/test_train_evaluate.py`) |",
    ]


def _discussion(spec, digest: str) -> list[str]:
    if not spec.discussion:
        return []
    path = Path(spec.discussion)
    if not path.is_file():
        return ["## Discussion", "", f"(no discussion yet: write it in `{path}`)"]
    text = path.read_text()
    m = STAMP.search(text)
    lines = ["## Discussion", ""]
    if m is None or m.group(1) != digest:
        lines += [
            f"> **Stale:** written for results `{m.group(1) if m else 'unknown'}`, these are "
            f"`{digest}`; re-read it against the tables above.",
            "",
        ]
    return [*lines, STAMP.sub("", text).strip()]


def results_markdown(results: dict[str, Any], spec) -> str:
    digest = results_hash(results)
    git = results.get("git") or {}
    ev = results["eval"]
    t = results["timing"]
    worlds = ", ".join(
        f"**{w}** (`{' '.join(v['overrides'])}`; content hash "
        + (", ".join(f"`{h[:12]}`" for h in v.get("content_hash") or []) or "unknown")
        + ("; **rebuilt between runs**" if len(v.get("content_hash") or []) > 1 else "")
        + ")"
        for w, v in results["worlds"].items()
    )
    labels0 = next(iter(results["results"].values()))
    steps = sorted({e["steps"] for labels in results["results"].values() for e in labels.values()})
    lines = [
        f"# Results: experiment `{results['name']}`",
        "",
        f"Generated by `llgbm experiment {results['name']}` (`just experiment "
        f"{results['name']}`) at commit `{(git.get('commit') or 'unknown')[:10]}`"
        + (" (dirty tree)" if git.get("dirty") else "")
        + f"; results `{digest}`. Do not edit by hand: rerun the command (finished runs are "
        "reused). Machine-readable: "
        f"`{spec.results}`.",
        "",
        "## Setup",
        "",
        f"- Worlds: {worlds}.",
        f"- Objectives: {', '.join(f'`{k}`' for k, v in labels0.items() if v['role'] == 'objective')}"
        f", each with generator seeds {', '.join(map(str, spec.seeds))}; "
        f"{'/'.join(map(str, steps))} training steps; every run's overrides: "
        f"{', '.join(f'`{o}`' for o in spec.overrides) or 'none'}.",
        f"- Evaluation: up to the first {ev['max_items']} test items of every task (test inputs never "
        "seen in training), greedy exact match; the condition is N prompts of the task's own "
        "train items (no answers). Held-out kinds are derived from the world's train parameters "
        "of each family (`llgbm_train.generalisation`).",
        f"- Intervals: {results['interval']}. Reference adapters (base, oracle, mean of "
        "teachers, nearest teacher) do not depend on the generator seed: items only.",
        f"- Time: {results['n_runs']} runs, {(t['prepare_train_s'] + t['eval_s']) / 60:.1f} min "
        f"wall: loading and training {t['prepare_train_s'] / 60:.1f} min (of which optimiser "
        f"steps {t['train_s'] / 60:.1f}), evaluation {t['eval_s'] / 60:.1f} min (sums over runs"
        + (f"; budget {spec.budget_minutes:g} min" if spec.budget_minutes else "")
        + "), measured on "
        + (
            "; ".join(results["machines"])
            if results.get("machines")
            else "a machine this results file does not record"
        )
        + (f", {results['jobs']} runs at a time" if (results.get("jobs") or 1) > 1 else "")
        + ".",
        "",
        "## Honesty checks",
        "",
        *_checks_table(results),
    ]
    for world, labels in results["results"].items():
        table = _world_table(world, labels)
        if not table:
            continue
        lines += [
            "",
            f"## World `{world}`: accuracy % [95% CI]",
            "",
            *table,
            "",
            f"### World `{world}`: held-out tasks one by one (accuracy %, generated: mean over "
            "seeds)",
            "",
            *_task_table(labels),
        ]
    abl = _ablation_table(results, spec)
    if abl:
        lines += [
            "",
            f"## Ablations (world `{spec.ablation_world}`, generator seeds "
            f"{', '.join(map(str, spec.ablation_seeds))}, generated adapters, accuracy % "
            "[95% CI])",
            "",
            *abl,
        ]
    found = findings(results) or ["- None: no oracle above 0% to compare with."]
    lines += ["", "## Findings (computed from the tables)", "", *found, ""]
    lines += _discussion(spec, digest)
    return "\n".join(lines).rstrip() + "\n"
