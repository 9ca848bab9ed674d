"""A compose report as Markdown tables (``report.md`` beside ``report.json``)."""

from __future__ import annotations

from typing import Any


def _f(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _acc(s: dict[str, Any]) -> str:
    lo, hi = s["ci95"]
    return f"{_f(s['accuracy'], True)} [{_f(lo, True)}, {_f(hi, True)}]"


def markdown(report: dict[str, Any]) -> str:
    c = report["clustering"]
    lines = [
        f"# Composition on {report['world']} ({report['kind']}, preset {report['preset']}, "
        f"init {report.get('init') or 'unrecorded'})",
        "",
        f"## Clustering (silhouette, cosine; {c['n_teachers']} single-task teachers, "
        f"{c['n_families']} families, {c['n_tasks']} tasks)",
        "",
    ]
    names = {"delta": "Delta Activations", "weights": "flattened A, B", "delta_w": "delta-W (B·A)"}
    rows = [[names[r], _f(v["family"]), _f(v["task"])] for r, v in c["silhouette"].items()]
    lines += _table(["representation", "by family", "by task"], rows)
    lines += ["", "Paper (Table 1, average of three 7-9B bases): deltas 0.614, weights -0.043.", ""]

    a = report["additivity"]
    lines += [f"## Additivity ({a['summary'].get('n', 0)} mixture teachers)", ""]
    if a["mixtures"]:
        s = a["summary"]
        spaces = ("delta", "delta_centred", "delta_w")
        rows = [
            [t, *(f"{_f(s[sp][t]['cos'])} / {_f(s[sp][t]['rel_err'])}" for sp in spaces)]
            for t in ("sum", "mean", "a", "b", "fit")
        ]
        lines += _table(["target", "delta", "delta - mean delta", "delta-W"], rows)
        lines += ["", "Each cell: cosine to the mixture teacher / relative error."]
        lines += ["", "Delta of merged adapters (the parts' best teachers):", ""]
        rows = [[k, _f(v["cos"]), _f(v["rel_err"])] for k, v in s["merged"].items()]
        lines += _table(["comparison", "cos", "rel. err"], rows)
    lines.append("")

    r = report["retrieval"]
    lines += [f"## Retrieval ({r['kind']} index over {r['n']} single-task teachers)", ""]
    rows = [[k, _f(v)] for k, v in r.items() if "@" in k]
    rows.append(["self-retrieval at rank 1", f"{r.get('self_rank1', '—')} / {r['n']}"])
    lines += _table(["measure", "value"], rows)
    lines.append("")

    m = report.get("merges")
    if m:
        lines += ["## Merges scored on their tasks (exact match %, 95% bootstrap CI)", ""]
        for row in m["mixtures"]:
            a_name, b_name = row["parts"]
            lines += [f"### {row['task']}", ""]
            rows = []
            for name, sc in row["scores"].items():
                err = row["merges"].get(name, {}).get("refactor_relative_error")
                rows.append([name, _acc(sc["a"]), _acc(sc["b"]), _acc(sc["mix"]), _f(err)])
            lines += _table(["adapter", a_name, b_name, "mixture items", "refactor rel. err"], rows)
            lines.append("")
        if m["same_task"]:
            lines += ["### Same task, teachers of different data splits merged", ""]
            names = list(m["same_task"][0]["scores"])
            rows = [
                [row["task"], *(_f(row["scores"][n]["accuracy"], True) for n in names)]
                for row in m["same_task"]
            ]
            pooled = m["summary"]["same_task"]
            rows.append(["**mean**", *(f"**{_f(pooled[n], True)}**" for n in names)])
            lines += _table(["task", *names], rows)
            lines.append("")
    t = report.get("timings_s", {})
    lines.append("Timings (s): " + ", ".join(f"{k} {v}" for k, v in t.items()))
    return "\n".join(lines) + "\n"
