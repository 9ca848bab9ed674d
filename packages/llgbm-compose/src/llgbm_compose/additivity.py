"""Additivity: is the delta of an adapter trained on mixed data the sum of the parts' deltas?

    from llgbm_compose.additivity import additivity
    report = additivity(world_deltas)     # {"mixtures": [row per mixture teacher], "summary": ...}

For each mixture teacher M of tasks (a, b) the parts are the single-task teachers of a and of b
at M's training step (all data splits; every checkpoint of the part if none matches), averaged:
d_a, d_b. M's delta is compared with each target t in {sum d_a + d_b, mean (d_a + d_b) / 2,
a alone, b alone, fit α d_a + β d_b (least squares)} by cosine and relative error
||d_M - t|| / ||d_M||. Raw deltas of one world share a large common direction (any
fine-tuning moves the last hidden state alike), which makes every cosine high; ``delta_centred``
repeats the comparison after subtracting the mean delta mu of all single-task teachers, testing
d_M - mu ~ (d_a - mu) + (d_b - mu). The same comparisons are made in delta-W space (dW = s·B·A,
parts averaged in dW, inner products by the Gram trick), which says whether the weights add up
where the deltas do.

Merged adapters: for the parts' best teachers A and B (accuracy, then later step), the delta of
their exact delta-W sum is compared with d_A + d_B, of their exact average with the mean, and of
the sum refactored to the merge rank with d_A + d_B: how linear the map dW -> delta is here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

TARGETS = ("sum", "mean", "a", "b", "fit")
SPACES = ("delta", "delta_centred", "delta_w")


def cos(x: np.ndarray, y: np.ndarray) -> float:
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    return float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else float("nan")


def rel_err(x: np.ndarray, target: np.ndarray) -> float:
    """||x - target|| / ||x||: how much of x the target misses (0 = exact)."""
    nx = float(np.linalg.norm(x))
    return float(np.linalg.norm(x - target)) / nx if nx > 0 else float("nan")


def _fit(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    coef, *_ = np.linalg.lstsq(np.stack([a, b], axis=1).astype(np.float64), x, rcond=None)
    return float(coef[0]), float(coef[1])


def compare_deltas(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Cosine and relative error of x against sum / mean / a / b / least-squares fit of a, b."""
    x, a, b = (np.asarray(v, dtype=np.float64) for v in (x, a, b))
    alpha, beta = _fit(x, a, b)
    targets = {"sum": a + b, "mean": (a + b) / 2, "a": a, "b": b, "fit": alpha * a + beta * b}
    out = {t: {"cos": cos(x, v), "rel_err": rel_err(x, v)} for t, v in targets.items()}
    out["fit"]["coef"] = [alpha, beta]
    return out


def compare_delta_w(mix, part_a, part_b) -> dict[str, Any]:
    """The same comparisons for adapters in delta-W space, from Frobenius inner products only."""
    from llgbm_flora import algebra

    def ip(x, y) -> float:
        return float(algebra.inner(x, y).double().sum())

    xx, aa, bb = ip(mix, mix), ip(part_a, part_a), ip(part_b, part_b)
    xa, xb, ab = ip(mix, part_a), ip(mix, part_b), ip(part_a, part_b)
    g = np.array([[aa, ab], [ab, bb]])
    alpha, beta = np.linalg.lstsq(g, np.array([xa, xb]), rcond=None)[0]
    coefs = {"sum": (1.0, 1.0), "mean": (0.5, 0.5), "a": (1.0, 0.0), "b": (0.0, 1.0)}
    coefs["fit"] = (float(alpha), float(beta))
    out: dict[str, Any] = {}
    for t, (p, q) in coefs.items():
        tt = p * p * aa + 2 * p * q * ab + q * q * bb  # <t, t>
        xt = p * xa + q * xb  # <x, t>
        dist2 = max(xx - 2 * xt + tt, 0.0)
        out[t] = {
            "cos": xt / math.sqrt(xx * tt) if xx > 0 and tt > 0 else float("nan"),
            "rel_err": math.sqrt(dist2 / xx) if xx > 0 else float("nan"),
        }
    out["fit"]["coef"] = [float(alpha), float(beta)]
    return out


def additivity(world_deltas, *, rank: int | None = None) -> dict[str, Any]:
    """Mixture teachers against their parts, in delta and delta-W space, and merged adapters."""
    from llgbm_flora import algebra, load_adapter

    from llgbm_compose.merges import average, task_arithmetic
    from llgbm_compose.zoo import best_teacher, part_teachers, rel_path, single_teachers

    world = world_deltas.world
    tasks = {t.name: t for t in world.tasks}
    mixtures = [t for t in world.teachers if t.kind == "mixture"]
    rows: list[dict[str, Any]] = []
    if not mixtures:
        return {"mixtures": rows, "summary": summarise(rows)}
    mu = world_deltas.teachers(single_teachers(world)).deltas.mean(0)  # [hidden]
    for m in mixtures:
        parts = tasks[m.task].parts
        if len(parts) != 2:
            continue
        pa, pb = (part_teachers(world, p, m.step) for p in parts)
        if not pa or not pb:
            continue
        d = world_deltas.teachers([m, *pa, *pb]).deltas
        d_m, d_a, d_b = d[0], d[1 : 1 + len(pa)].mean(0), d[1 + len(pa) :].mean(0)
        w_m = load_adapter(m.path)
        w_a = algebra.mean([load_adapter(t.path) for t in pa])
        w_b = algebra.mean([load_adapter(t.path) for t in pb])
        best_a, best_b = best_teacher(pa), best_teacher(pb)
        ex_sum = task_arithmetic([best_a.path, best_b.path], [1.0, 1.0], rank="exact")
        ex_avg = average([best_a.path, best_b.path], rank="exact")
        r_sum = task_arithmetic([best_a.path, best_b.path], [1.0, 1.0], rank=rank)
        dd = world_deltas.teachers([best_a, best_b]).deltas
        merged = world_deltas.adapters([ex_sum.adapter, ex_avg.adapter, r_sum.adapter])
        pair_sum, pair_mean = dd[0] + dd[1], (dd[0] + dd[1]) / 2
        rows.append(
            {
                "mixture": m.task,
                "teacher": rel_path(world, m.path),
                "step": m.step,
                "parts": list(parts),
                "n_part_teachers": [len(pa), len(pb)],
                "delta_norms": {
                    "mix": float(np.linalg.norm(d_m)),
                    "a": float(np.linalg.norm(d_a)),
                    "b": float(np.linalg.norm(d_b)),
                },
                "delta": compare_deltas(d_m, d_a, d_b),
                "delta_centred": compare_deltas(d_m - mu, d_a - mu, d_b - mu),
                "delta_w": compare_delta_w(w_m, w_a, w_b),
                "merged": {
                    "adapters": [rel_path(world, best_a.path), rel_path(world, best_b.path)],
                    "exact_sum_vs_sum_of_deltas": _pair(merged[0], pair_sum),
                    "exact_average_vs_mean_of_deltas": _pair(merged[1], pair_mean),
                    f"rank{r_sum.rank}_sum_vs_sum_of_deltas": {
                        **_pair(merged[2], pair_sum),
                        "refactor_relative_error": r_sum.relative_error,
                    },
                },
            }
        )
    return {"mixtures": rows, "summary": summarise(rows)}


def _pair(x: np.ndarray, target: np.ndarray) -> dict[str, float]:
    x, target = np.asarray(x, np.float64), np.asarray(target, np.float64)
    return {"cos": cos(x, target), "rel_err": rel_err(x, target)}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over mixture teachers of each cosine / relative error."""
    if not rows:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(rows)}
    for space in SPACES:
        out[space] = {
            t: {m: float(np.mean([r[space][t][m] for r in rows])) for m in ("cos", "rel_err")}
            for t in TARGETS
        }
    keys = [k for k in rows[0]["merged"] if k != "adapters"]
    out["merged"] = {
        k: {m: float(np.mean([r["merged"][k][m] for r in rows])) for m in ("cos", "rel_err")}
        for k in keys
    }
    return out
