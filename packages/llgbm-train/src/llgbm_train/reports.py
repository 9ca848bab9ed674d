"""Tables of evaluation reports and experiment results: Markdown files and the terminal.

print_summary(report, "runs/x")           # the closing table of `llgbm train` / `evaluate`
text = report_markdown(report)            # eval/report.md
"""

from __future__ import annotations

from typing import Any

from llgbm_train.evaluate import GROUPS, LABELS, METHODS
from llgbm_train.generalisation import LABELS as GROUP_LABELS


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None or x != x:
        return "—"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def _group_label(group: str, s: dict) -> str:
    any_m = next(iter(s.values()))
    return f"{GROUP_LABELS[group]} ({any_m['n_tasks']})"


def summary_rows(report: dict[str, Any], groups=("heldout", "seen")) -> list[list[str]]:
    rows = []
    for g in groups:
        s = report["summary"].get(g)
        if not s:
            continue
        for m in METHODS:
            if m not in s:
                continue
            lo, hi = s[m]["ci95"]
            rows.append(
                [
                    _group_label(g, s),
                    LABELS[m],
                    _fmt(s[m]["accuracy"], True),
                    f"[{_fmt(lo, True)}, {_fmt(hi, True)}]",
                    _fmt(s[m]["delta_cos"]),
                    str(s[m]["n_items"]),
                ]
            )
    return rows


SUMMARY_HEADER = ["tasks (n)", "adapter", "accuracy %", "95% CI", "delta cos", "items"]


def checkpoint_text(report: dict[str, Any]) -> str:
    c = report.get("checkpoint") or {}
    if c.get("step") is None:
        return "checkpoint step unknown"
    text = f"checkpoint step {c['step']}"
    if c.get("steps"):
        text += f" of {c['steps']}"
        if c["step"] < c["steps"]:
            text += " (unfinished run)"
    return text


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation at {checkpoint_text(report)}: {report['tasks_evaluated']} tasks "
        f"({report['n_tasks']})",
        "",
        f"Accuracy: {report['scorer']}, {report['interval']}. Delta cos: to the task's own "
        "(oracle) teacher's delta. Mean of teachers: delta-W average of "
        f"{report['mean_of_teachers']['n_adapters']} training teachers. Nearest teacher: the "
        "best teacher of the train task with the closest condition embedding. Seen: train "
        "tasks, on their test items.",
        "",
        "| " + " | ".join(SUMMARY_HEADER) + " |",
        "|" + "---|" * len(SUMMARY_HEADER),
    ]
    groups = [g for g in GROUPS if g in report["summary"]]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(report, groups)]
    lines += [
        "",
        "## Per task",
        "",
        "| task | kind | " + " | ".join(LABELS[m] for m in METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for row in report["per_task"]:
        cells = []
        for m in METHODS:
            r = row["methods"].get(m)
            cells.append(
                "—" if r is None else f"{_fmt(r['accuracy'], True)} (cos {_fmt(r['delta_cos'])})"
            )
        lines.append(f"| {row['task']} | {row['kind']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_summary(report: dict[str, Any], where: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"evaluation at {checkpoint_text(report)}" + (f": {where}" if where else "")
    table = Table(title=title)
    for h in SUMMARY_HEADER:
        left = h in SUMMARY_HEADER[:2]
        table.add_column(h, justify="left" if left else "right", no_wrap=left)
    last = None
    for r in summary_rows(report):
        if last is not None and r[0] != last:
            table.add_section()
        last = r[0]
        table.add_row(*r)
    console = Console()
    # Piped output (logs, CI) has no terminal width to fit; keep the rows whole.
    (console if console.is_terminal else Console(width=120)).print(table)


def print_experiment(results: dict[str, Any]) -> None:
    """Generated adapters of every objective next to the oracle, per world: the closing table."""
    from rich.console import Console
    from rich.table import Table

    cols = ("heldout", "interpolated", "seen")
    table = Table(title=f"experiment {results['name']}: accuracy % [95% CI] over seeds and items")
    for h in ("world", "adapter", *(GROUP_LABELS[c] for c in cols)):
        table.add_column(h, justify="left" if h in ("world", "adapter") else "right", no_wrap=True)

    def cell(c):
        if c is None:
            return "—"
        lo, hi = c["ci95"]
        return f"{_fmt(c['accuracy'], True)} [{_fmt(lo, True)}, {_fmt(hi, True)}]"

    for world, labels in results["results"].items():
        objectives = {k: v for k, v in labels.items() if v["role"] == "objective"}
        if not objectives:
            continue
        ref = next(iter(objectives.values()))["groups"]
        for m in ("teacher", "mean_teachers", "nearest_teacher"):
            table.add_row(world, LABELS[m], *(cell(ref.get(c, {}).get(m)) for c in cols))
        for label, e in labels.items():
            g = e["groups"]
            table.add_row(
                world,
                f"{label} ({e['role']})",
                *(cell(g.get(c, {}).get("generated")) for c in cols),
            )
        table.add_section()
    console = Console()
    (console if console.is_terminal else Console(width=140)).print(table)
