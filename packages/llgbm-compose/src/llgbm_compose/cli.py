"""``python -m llgbm_compose``: composition experiments and retrieval by delta.

    python -m llgbm_compose compose worlds/tiny                  # -> runs/compose/tiny/
    python -m llgbm_compose index worlds/tiny                    # -> worlds/tiny/delta_index/
    python -m llgbm_compose retrieve --index worlds/tiny/delta_index --adapter out/merged -k 5

The commands are added by ``add_commands(subparsers)``, so another command line (``llgbm``) can
mount them as they are; ``retrieve --prompts`` needs a delta predictor, which such a host passes
in as ``predictor=`` (a function of the parsed arguments returning ``prompts -> delta``).
Errors print one line (``error: ...``) and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llgbm_flora.cli_errors import run_command

from llgbm_compose.errors import ComposeError, RetrievalError

Predictor = Callable[[argparse.Namespace], Callable[[list[str]], Any]]


def add_commands(
    sub, *, parents: Sequence[argparse.ArgumentParser] = (), predictor: Predictor | None = None
) -> None:
    """Add ``compose``, ``index`` and ``retrieve`` to an argparse ``add_subparsers()`` object."""
    parents = list(parents)
    c = sub.add_parser(
        "compose",
        parents=parents,
        help="clustering, additivity, merges and retrieval on a world (JSON + PNG report)",
        description="Measure how a world's teacher deltas cluster, add up, merge and retrieve.",
    )
    c.add_argument("world", help="world directory (holding world.json)")
    c.add_argument("--out", help="report directory (default: runs/compose/<world name>)")
    c.add_argument("--rank", type=int, help="rank of merged adapters (default: the teachers')")
    c.add_argument("--max-items", type=int, help="test items scored per task (default: all)")
    c.add_argument("--density", type=float, default=0.2, help="TIES: share of entries kept")
    c.add_argument("--drop", type=float, default=0.5, help="DARE: drop probability")
    c.add_argument(
        "--dare-seeds", type=int, nargs="+", default=[0, 1, 2], help="DARE seeds (one merge each)"
    )
    c.add_argument("--no-merges", action="store_true", help="skip scoring merges (fast)")
    c.add_argument("--no-same-task", action="store_true", help="skip same-task merges")
    c.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only")
    _device_options(c)
    c.set_defaults(compose_command=cmd_compose)

    i = sub.add_parser(
        "index",
        parents=parents,
        help="build the retrieval index over a world's teacher deltas",
        description="A faiss index of a world's teacher deltas, saved beside its delta cache.",
    )
    i.add_argument("world", help="world directory")
    i.add_argument("--out", help="index directory (default: <world>/delta_index)")
    i.add_argument("--kind", choices=["auto", "flat", "ivf"], default="auto", help="index kind")
    _device_options(i)
    i.set_defaults(compose_command=cmd_index)

    r = sub.add_parser(
        "retrieve",
        parents=parents,
        help="the k teachers nearest to an adapter's (or prompts') delta",
        description="Query a delta index by an adapter directory or by a task's prompts.",
    )
    r.add_argument("--index", required=True, help="index directory (e.g. worlds/tiny/delta_index)")
    q = r.add_mutually_exclusive_group(required=True)
    q.add_argument("--adapter", help="PEFT adapter directory to embed and query with")
    q.add_argument("--prompts", help="prompts of a task: .jsonl with 'prompt' rows, or text lines")
    r.add_argument(
        "--predictor",
        metavar="SOURCE",
        help="with --prompts: what the host's delta predictor loads (under `llgbm retrieve`: a "
        "trained run directory, a b2 predictor or a generator)",
    )
    r.add_argument("-k", type=int, default=5, help="neighbours to return (default: 5)")
    r.add_argument("--world", help="world to embed the adapter on (default: the index's)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _device_options(r)
    r.set_defaults(compose_command=cmd_retrieve, compose_predictor=predictor)


def _device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="torch device for the base model (default: auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress output")


def _setup(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def cmd_compose(args) -> int:
    from llgbm_compose.experiment import ComposeConfig, run_compose

    cfg = ComposeConfig(
        rank=args.rank,
        max_items=args.max_items,
        density=args.density,
        drop=args.drop,
        dare_seeds=tuple(args.dare_seeds),
        merges=not args.no_merges,
        same_task=not args.no_same_task,
        plots=not args.no_plots,
    )
    out = Path(args.out) if args.out else Path("runs/compose") / Path(args.world).resolve().name
    report = run_compose(args.world, out, cfg, device=args.device, progress=not args.no_progress)
    s = report["clustering"]["silhouette"]
    r = report["retrieval"]
    print(
        f"silhouette by family: deltas {s['delta']['family']:.3f}, weights "
        f"{s['weights']['family']:.3f}, delta-W {s['delta_w']['family']:.3f}"
    )
    if "family_p@1" in r:
        print(
            f"retrieval: self rank-1 {r['self_rank1']}/{r['n']}, same-family p@1 "
            f"{r['family_p@1']:.3f}"
        )
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_index(args) -> int:
    from llgbm_worlds.deltas import WorldDeltas

    from llgbm_compose.retrieval import index_world

    wd = WorldDeltas(args.world, device=args.device, progress=not args.no_progress)
    index = index_world(wd.world, kind=args.kind, world_deltas=wd)
    path = index.save(args.out)
    print(f"index: {path} ({index.kind}, {len(index)} teachers, {index.dim} dims)")
    return 0


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .jsonl file (rows with "prompt") or a text file (one per line)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ComposeError(f"{p}: no such prompts file") from None
    except UnicodeDecodeError:
        raise ComposeError(f"{p}: not UTF-8 text") from None
    if p.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(str(row["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ComposeError(
                    f"{p}:{n}: each line needs a JSON object with 'prompt'"
                ) from None
    else:
        out = [line for line in text.splitlines() if line.strip()]
    if not out:
        raise ComposeError(f"{p}: no prompts in the file")
    return out


def check_same_deltas(index, source: dict | None) -> None:
    """A predictor's deltas and the index's must come from one probe set and delta spec."""
    if not source:
        return
    for key, what in (("probe_hash", "probe set"), ("spec_hash", "delta spec")):
        have, want = index.source.get(key), source.get(key)
        if have and want and have != want:
            raise RetrievalError(
                f"the index's deltas use another {what} ({have}) than the predictor's ({want}); "
                "rebuild the index with the predictor's probes, or use a matching predictor"
            )


def cmd_retrieve(args) -> int:
    from llgbm_compose.retrieval import DeltaIndex

    index = DeltaIndex.load(args.index)
    index.check_k(args.k)
    if args.adapter:
        world = None
        if args.world:
            from llgbm_worlds.deltas import WorldDeltas

            world = WorldDeltas(args.world, device=args.device)
        hits = index.query_adapter(args.adapter, args.k, world=world)
    else:
        factory = getattr(args, "compose_predictor", None)
        if factory is None:
            raise RetrievalError(
                "querying by prompts needs a delta predictor: use `llgbm retrieve` with a "
                "trained predictor run (llgbm-train), or query with --adapter"
            )
        prompts = read_prompts(args.prompts)
        predictor = factory(args)
        check_same_deltas(index, getattr(predictor, "source", None))
        hits = index.query_prompts(prompts, predictor, args.k)
    if args.json:
        print(json.dumps([{"rank": h.rank, "score": h.score, **h.row} for h in hits], indent=2))
        return 0
    print(f"{'rank':>4}  {'cos':>6}  {'task':<24} {'family':<12} adapter")
    for h in hits:
        print(
            f"{h.rank:>4}  {h.score:6.3f}  {h.row.get('task', ''):<24} "
            f"{h.row.get('family', ''):<12} {h.row.get('path', h.row.get('name', ''))}"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the compose command that ``args`` (parsed by a parser with `add_commands`) names."""
    _setup(args)
    return args.compose_command(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m llgbm_compose",
        description="Composition and retrieval of LoRA adapters by their Delta Activations.",
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if not args.debug:
        import warnings

        # A deprecation notice PEFT triggers inside transformers while scoring; not actionable.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    return run_command(lambda: run(args), debug=args.debug)
