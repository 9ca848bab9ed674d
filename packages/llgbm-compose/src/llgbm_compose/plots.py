"""PNG figures of a compose report (matplotlib, Agg backend, written atomically).

write_plots(report, deltas, out_dir)   # clustering.png, additivity.png, merges.png
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np


def _save(fig, path: Path) -> Path:
    from llgbm_worlds.io import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())
    return path


def _pca2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T  # [n, 2]


def clustering_figure(report: dict[str, Any], deltas: np.ndarray):
    import matplotlib.pyplot as plt

    c = report["clustering"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    reps = list(c["silhouette"])
    pos = np.arange(len(reps))
    for j, g in enumerate(("family", "task")):
        vals = [c["silhouette"][r][g] or 0.0 for r in reps]
        ax1.bar(pos + (j - 0.5) * 0.38, vals, 0.38, label=f"by {g}")
    ax1.axhline(0, color="k", lw=0.6)
    ax1.set_xticks(pos, ["deltas", "flattened A,B", "delta-W"])
    ax1.set_ylabel("silhouette (cosine)")
    ax1.set_ylim(-1, 1)
    ax1.set_title(f"clustering of {c['n_teachers']} teachers")
    ax1.legend()
    fams = c["labels"]["family"]
    xy = _pca2(deltas) if len(deltas) > 2 else np.zeros((len(deltas), 2))
    for f in sorted(set(fams)):
        idx = [i for i, v in enumerate(fams) if v == f]
        ax2.scatter(xy[idx, 0], xy[idx, 1], s=18, label=f)
    ax2.set_title("teacher deltas, PCA (colour: family)")
    ax2.legend(fontsize=7, ncol=2)
    return fig


def additivity_figure(report: dict[str, Any]):
    import matplotlib.pyplot as plt

    rows = report["additivity"]["mixtures"]
    spaces = ("delta", "delta_centred", "delta_w")
    titles = {"delta": "deltas", "delta_centred": "deltas - mean delta", "delta_w": "delta-W"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    targets = ["sum", "mean", "a", "b", "fit"]
    pos = np.arange(len(targets))
    for ax, space in zip(axes, spaces):
        width = 0.8 / max(len(rows), 1)
        for j, r in enumerate(rows):
            vals = [r[space][t]["cos"] for t in targets]
            label = f"{r['mixture']} @ {r['step']}"
            ax.bar(pos + (j - (len(rows) - 1) / 2) * width, vals, width, label=label)
        ax.set_xticks(pos, ["a + b", "(a + b)/2", "a", "b", "fit αa + βb"])
        ax.set_title(f"mixture vs parts: {titles[space]}")
        ax.axhline(0, color="k", lw=0.6)
    axes[0].set_ylabel("cosine to the mixture teacher")
    axes[-1].legend(fontsize=7)
    return fig


def merges_figure(report: dict[str, Any]):
    import matplotlib.pyplot as plt

    m = report["merges"]
    panels = [(row["task"], row) for row in m["mixtures"]]
    n = len(panels) + (1 if m["same_task"] else 0)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(5.5 * max(n, 1), 4.2), squeeze=False)
    for ax, (title, row) in zip(axes[0], panels):
        names = list(row["scores"])
        pos = np.arange(len(names))
        for j, e in enumerate(("a", "b", "mix")):
            acc = np.array([row["scores"][n_][e]["accuracy"] for n_ in names])
            ci = np.array([row["scores"][n_][e]["ci95"] for n_ in names])
            err = np.clip(np.stack([acc - ci[:, 0], ci[:, 1] - acc]), 0, None)
            label = {"a": row["parts"][0], "b": row["parts"][1], "mix": "mixture"}[e]
            ax.bar(pos + (j - 1) * 0.27, 100 * acc, 0.27, yerr=100 * err, label=label, capsize=2)
        ax.set_xticks(pos, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("exact match % (95% CI)")
    if m["same_task"]:
        ax = axes[0][-1]
        pooled = m["summary"]["same_task"]
        names = list(pooled)
        ax.bar(np.arange(len(names)), [100 * pooled[k] for k in names], 0.6)
        ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(f"same-task merges, mean over {len(m['same_task'])} tasks", fontsize=9)
    return fig


def write_plots(report: dict[str, Any], deltas: np.ndarray, out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    written = []
    figs = [("clustering.png", clustering_figure(report, deltas))]
    if report["additivity"]["mixtures"]:
        figs.append(("additivity.png", additivity_figure(report)))
    if report.get("merges") and (report["merges"]["mixtures"] or report["merges"]["same_task"]):
        figs.append(("merges.png", merges_figure(report)))
    for name, fig in figs:
        written.append(_save(fig, out / name))
        plt.close(fig)
    return written
