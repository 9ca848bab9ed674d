"""Check that a run's reported numbers come back: re-evaluate, or retrain from scratch.

    llgbm reproduce runs/delta_multi             # re-evaluate the newest checkpoint
    llgbm reproduce runs/delta_multi --retrain   # retrain into a temporary run, then re-evaluate

Re-evaluation runs ``evaluate_run`` (the run's own ``config.yaml``: same world, probes, eval
seed; its newest checkpoint) again for every ``eval/report*.json`` the run has, on a mirror of the
run in a temporary directory, so nothing in the run is written. ``--retrain`` trains the same config from scratch (one process) to
the newest checkpoint's step in a temporary run directory, compares ``metrics.jsonl`` record by
record, then evaluates that generator and compares the reports.

Comparison is generic over the JSON: every number (at any depth: summary, per-task rows, tables
added later) within ``|a - b| <= atol + rtol * |a|``, NaN equal to NaN, every other leaf and the
structure itself (keys, list lengths) exactly. The default tolerance is zero on CPU: evaluation
and training there are deterministic for a fixed config, seed, CPU and thread count, so any
difference means the code, the world, the environment or the file changed. Another thread count
changes the order of float sums (measured on the test world, 1 vs 2 threads: 11 of 125 report
values differ, by at most 2.4e-6 relative, accuracies not at all); the verdict then says the differences are float noise and that ``--rtol 1e-5`` accepts
them. On CUDA the default is rtol 1e-4 and atol 1e-6, because cuBLAS reductions and atomics are
not bitwise reproducible from run to run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llgbm_train.runs import Run

REPORT_GLOB = "report*.json"
_LABEL_KEYS = ("task", "name", "step")  # list rows are named by one of these when they have it


class ReproduceError(ValueError):
    """A run cannot be reproduced (no report, no checkpoint, unreadable file); one-line message."""


@dataclass(frozen=True)
class Tolerance:
    """How close two reported numbers must be: ``|saved - got| <= atol + rtol * |saved|``."""

    rtol: float = 0.0  # relative tolerance
    atol: float = 0.0  # absolute tolerance

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ReproduceError(f"--{name}: must be a finite number >= 0, got {v!r}")

    @classmethod
    def default(cls, device_type: str) -> Tolerance:
        return cls() if device_type == "cpu" else cls(rtol=1e-4, atol=1e-6)

    def close(self, a: float, b: float) -> bool:
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        if a == b:  # also equal infinities
            return True
        return abs(a - b) <= self.atol + self.rtol * abs(a)

    def __str__(self) -> str:
        return "exact" if self.rtol == self.atol == 0 else f"rtol={self.rtol:g}, atol={self.atol:g}"


@dataclass
class Difference:
    path: str  # where in the document, e.g. "summary.generated.accuracy"
    saved: Any
    got: Any

    def __str__(self) -> str:
        return f"{self.path}: saved {_short(self.saved)}, reproduced {_short(self.got)}"


@dataclass
class Comparison:
    """One document (a report, metrics.jsonl) compared with its reproduction."""

    name: str  # e.g. "eval/report.json"
    tol: Tolerance
    n_values: int = 0  # leaves compared
    differences: list[Difference] = field(default_factory=list)

    @property
    def agrees(self) -> bool:
        return not self.differences


def _short(x: Any) -> str:
    if isinstance(x, (dict, list)):
        text = json.dumps(x)
        return text if len(text) <= 40 else text[:37] + "..."
    return repr(x)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _label(row: Any, i: int) -> str:
    if isinstance(row, dict):
        for k in _LABEL_KEYS:
            if isinstance(row.get(k), (str, int)) and not isinstance(row.get(k), bool):
                return f"[{k}={row[k]}]" if k == "step" else f"[{row[k]}]"
    return f"[{i}]"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def compare(saved: Any, got: Any, tol: Tolerance, path: str = "") -> Iterator[Difference | None]:
    """Walk two JSON documents; yields None per matching leaf and a Difference per mismatch."""
    if _is_number(saved) and _is_number(got):
        yield None if tol.close(float(saved), float(got)) else Difference(path, saved, got)
    elif isinstance(saved, dict) and isinstance(got, dict):
        for k, v in saved.items():
            if k not in got:
                yield Difference(_join(path, k), v, "<missing>")
            else:
                yield from compare(v, got[k], tol, _join(path, k))
        for k in got:
            if k not in saved:
                yield Difference(_join(path, k), "<missing>", got[k])
    elif isinstance(saved, list) and isinstance(got, list):
        if len(saved) != len(got):
            yield Difference(f"{path} (length)", len(saved), len(got))
            return
        for i, (a, b) in enumerate(zip(saved, got)):
            yield from compare(a, b, tol, path + _label(a, i))
    else:
        yield None if saved == got else Difference(path or "<document>", saved, got)


def compare_documents(name: str, saved: Any, got: Any, tol: Tolerance) -> Comparison:
    # Round-trip through JSON so tuples, numpy scalars and NaN compare as the saved file does.
    got = json.loads(json.dumps(got))
    c = Comparison(name, tol)
    for d in compare(saved, got, tol):
        c.n_values += 1
        if d is not None:
            c.differences.append(d)
    return c


def saved_reports(run: Run) -> dict[str, dict[str, Any]]:
    """eval/report*.json of a run: file name -> report (its ``tasks_evaluated`` checked)."""
    out = {}
    for p in sorted((run.dir / "eval").glob(REPORT_GLOB)):
        try:
            report = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReproduceError(f"{p}: unreadable report ({e})") from None
        tasks = report.get("tasks_evaluated") if isinstance(report, dict) else None
        if tasks not in ("heldout", "train", "all"):
            raise ReproduceError(f"{p}: not an evaluation report (no tasks_evaluated)")
        out[p.name] = report
    if not out:
        raise ReproduceError(
            f"{run.dir}: no eval/report*.json to reproduce (run `llgbm evaluate {run.dir}` first)"
        )
    return out


def _evaluate_again(run_dir: Path, reports: dict[str, dict], tol: Tolerance, progress: bool):
    """``evaluate_run`` on ``run_dir`` for each saved report; each rewritten report compared."""
    from llgbm_train.evaluate import evaluate_run

    out = []
    for name, saved in reports.items():
        evaluate_run(run_dir, tasks=saved["tasks_evaluated"], progress=progress)
        path = run_dir / "eval" / name
        if not path.is_file():
            raise ReproduceError(
                f"{name}: evaluation of {saved['tasks_evaluated']} wrote no {path}"
            )
        out.append(compare_documents(f"eval/{name}", saved, json.loads(path.read_text()), tol))
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # no symlinks here (some Windows setups)
        shutil.copy2(src, dst)


def mirror_run(run: Run, where: Path) -> Path:
    """A run directory at ``where/<name>`` with the run's config, metadata, metrics and newest
    checkpoint (linked, not copied) and nothing else: evaluating it writes only there."""
    target = where / run.dir.name
    (target / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metadata.json", "metrics.jsonl"):
        if (run.dir / name).is_file():
            shutil.copy2(run.dir / name, target / name)
    newest = run.checkpoints()[-1]
    _link_or_copy(newest, target / "checkpoints" / newest.name)
    return target


def _step(path: Path) -> int:
    from llgbm_train.runs import SUFFIX, checkpoint_step

    step = checkpoint_step(path)
    if step is None:
        raise ReproduceError(f"{path}: not a checkpoint name (step_NNNNNN{SUFFIX})")
    return step


def reproduce_evaluation(
    run_dir: str | Path, *, tol: Tolerance | None = None, progress: bool = True
) -> list[Comparison]:
    """Evaluate the run's newest checkpoint again; compare with each saved report.

    The evaluation is the public ``evaluate_run``, on a mirror of the run in a temporary
    directory, so the run itself (its reports and adapters) is never rewritten.
    """
    from llgbm_train.generate import require_world
    from llgbm_train.trainer import resolve_device

    run = Run.open(run_dir)
    reports = saved_reports(run)
    if not run.checkpoints():
        raise ReproduceError(f"{run.dir}: no checkpoint to evaluate")
    require_world(run)
    tol = tol or Tolerance.default(resolve_device(run.config()).type)
    with tempfile.TemporaryDirectory(prefix="llgbm-reproduce-") as tmp:
        return _evaluate_again(mirror_run(run, Path(tmp)), reports, tol, progress)


def reproduce_training(
    run_dir: str | Path,
    *,
    tol: Tolerance | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> list[Comparison]:
    """Retrain the run's config from scratch (to its newest checkpoint's step) into ``out``
    (default: a temporary directory, removed afterwards); compare metrics.jsonl, then reports."""
    from llgbm_train.trainer import resolve_device, train

    run = Run.open(run_dir)
    saved_metrics = run.read_metrics()
    ckpts = run.checkpoints()
    if not saved_metrics or not ckpts:
        raise ReproduceError(f"{run.dir}: no metrics.jsonl records or checkpoint to compare with")
    reports = saved_reports(run) if list((run.dir / "eval").glob(REPORT_GLOB)) else {}
    cfg = run.config()
    tol = tol or Tolerance.default(resolve_device(cfg).type)
    if out is not None and Path(out).exists():
        raise ReproduceError(f"{out}: exists; --out must name a new directory")
    with tempfile.TemporaryDirectory(prefix="llgbm-reproduce-") as tmp:
        target = Path(out) if out is not None else Path(tmp) / run.dir.name
        train(cfg, target, stop_after=_step(ckpts[-1]), progress=progress)
        got = Run(target).read_metrics()
        comparisons = [compare_documents("metrics.jsonl", saved_metrics, got, tol)]
        comparisons += _evaluate_again(target, reports, tol, progress)
    return comparisons


def _relative(d: Difference) -> float | None:
    """|saved - got| / |saved| of a numeric difference; None for any other kind."""
    if not (_is_number(d.saved) and _is_number(d.got)):
        return None
    a, b = float(d.saved), float(d.got)
    if math.isnan(a) or math.isnan(b):
        return None
    return abs(a - b) / max(abs(a), 1e-30)


def verdict(comparisons: list[Comparison]) -> tuple[bool, str]:
    """(agree, one line naming the first differing value when they do not)."""
    import torch

    tol = comparisons[0].tol
    n = sum(c.n_values for c in comparisons)
    names = ", ".join(f"{c.name} ({c.n_values} values)" for c in comparisons)
    diffs = [d for c in comparisons for d in c.differences]
    if not diffs:
        return True, f"agree: {names} reproduced ({tol})"
    first = next(c for c in comparisons if c.differences)
    line = (
        f"disagree: {first.name} {first.differences[0]} ({len(diffs)} of {n} values differ; {tol})"
    )
    rel = [_relative(d) for d in diffs]
    if all(r is not None for r in rel) and max(rel) < 1e-5:
        # Float noise, not a changed result: CPU kernels sum in an order that depends on the
        # thread count (and the CPU), so only the same setting reproduces bit for bit.
        line += (
            f"; only float noise (max relative {max(rel):.1e}): a different thread count or "
            f"machine than the run's (this one: {torch.get_num_threads()} threads) changes "
            "float sums; --rtol 1e-5 accepts it"
        )
    return False, line
