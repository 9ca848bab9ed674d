"""The `llgbm-delta` command: compute deltas into a cache, list it, export it.

    llgbm-delta compute --base MODEL --adapters DIR|HUB_ID [...] --cache CACHE [--probes generic]
    llgbm-delta ls CACHE
    llgbm-delta export CACHE OUT.npz

`ls` and `export` import neither torch nor transformers (they read the cache's files only).
Exit codes: 0 success; 1 some adapters failed under --keep-going (the others were computed and
cached), or `ls` / `export` found corrupt entries (moved to corrupt/, listed on stderr);
2 bad input or any other error (one line on stderr, `--debug` for the traceback); 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

from llgbm_flora.cli_errors import run_command

from llgbm_delta.errors import DeltaError, DeltaWarning

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR = 0, 1, 2
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _is_checkpoint(p: Path) -> bool:
    return (p / "config.json").is_file() and (
        any((p / w).exists() for w in WEIGHTS) or any(p.glob("*.safetensors"))
    )


def discover_adapters(paths: list[str]) -> tuple[list[Path | str], list[tuple[str, str]]]:
    """What to embed under `paths`, in order, and (path, problem) for paths with nothing.

    A directory holding `adapter_config.json` is one PEFT adapter; one holding `config.json`
    and model weights is one full checkpoint; any other directory is searched (recursively,
    sorted) for both. A path that does not exist but reads `org/name[@revision]` is a hub id
    (kept as a string, resolved by compute).
    """
    from llgbm_delta.sources import looks_like_hub_id

    found: list[Path | str] = []
    problems: list[tuple[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            if looks_like_hub_id(raw):
                found.append(raw)
            else:
                problems.append((raw, f"{raw}: no such file or directory"))
        elif not p.is_dir():
            problems.append((raw, f"{raw}: not a directory (expected a PEFT adapter directory)"))
        elif (p / "adapter_config.json").is_file() or _is_checkpoint(p):
            found.append(p)
        else:
            inner = {c.parent for c in p.rglob("adapter_config.json")}
            inner |= {c.parent for c in p.rglob("config.json") if _is_checkpoint(c.parent)}
            if not inner:
                problems.append(
                    (raw, f"{raw}: no PEFT adapter (adapter_config.json) or checkpoint found")
                )
            found.extend(sorted(inner))
    seen, unique = set(), []
    for p in found:
        ident = p.resolve() if isinstance(p, Path) else p
        if ident not in seen:
            seen.add(ident)
            unique.append(p)
    return unique, problems


def _cmd_compute(args: argparse.Namespace) -> int:
    with _quiet_transformers(args.debug), _warnings_as_lines():
        return _compute(args)


def _compute(args: argparse.Namespace) -> int:
    from llgbm_delta.cache import DeltaCache
    from llgbm_delta.compute import run_deltas
    from llgbm_delta.probes import resolve_probes
    from llgbm_delta.spec import DeltaSpec

    probes = resolve_probes(args.probes)
    spec = DeltaSpec(layer=args.layer, token=args.token)
    adapters, problems = discover_adapters(args.adapters)
    if problems and not args.keep_going:
        raise DeltaError(problems[0][1])
    if not adapters and not problems:
        raise DeltaError("no adapters given")
    result = None
    if adapters:
        result = run_deltas(
            args.base,
            [str(a) for a in adapters],
            probes,
            DeltaCache(args.cache),
            spec=spec,
            device=args.device,
            dtype=args.dtype,
            adapters_per_batch=args.batch,
            method=args.method,
            progress=not args.no_progress,
            keep_going=args.keep_going,
            compile=args.compile,
        )
    failures = [msg for _, msg in problems]
    if result is not None:
        b = result.base
        print(
            f"base: {b.name} (fingerprint {b.fingerprint[:12]}, {b.dtype}, hidden {b.hidden_size})"
        )
        print(f"probes: {result.probe_name} (hash {result.probe_hash[:12]}); cache: {args.cache}")
        for key, reason in result.corrupt:
            print(f"warning: cache entry {key[:12]} was corrupt ({reason}); recomputed")
        n_cached = sum(result.cached)
        rate = result.n_computed / result.seconds if result.seconds > 0 else float("nan")
        print("| adapters | cached | computed | failed | seconds | computed/s |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        print(
            f"| {len(result.names)} | {n_cached} | {result.n_computed} | "
            f"{len(result.failures)} | {result.seconds:.2f} | {rate:.1f} |"
        )
        failures += [f.error for f in result.failures]
    if failures:
        print(f"{len(failures)} failed:", file=sys.stderr)
        for msg in failures:
            print(f"  {msg}", file=sys.stderr)
    computed = result.n_computed if result else 0
    cached = result.n_cached if result else 0
    seconds = f" in {result.seconds:.2f} s" if result else ""
    print(f"done: {computed} computed, {cached} cached, {len(failures)} failed{seconds}")
    return EXIT_PARTIAL if failures else EXIT_OK


def _open_existing(path: str):
    from llgbm_delta.cache import DeltaCache

    cache = DeltaCache(path)
    if not cache.manifest_path.is_file():
        raise DeltaError(f"{path}: not a delta cache (no manifest.json)")
    return cache


def _cmd_ls(args: argparse.Namespace) -> int:
    cache = _open_existing(args.cache)
    base = cache.base_info()
    entries = cache.entries()
    if base is not None:
        print(
            f"base: {base.name} (fingerprint {base.fingerprint[:12]}, {base.dtype}, "
            f"hidden {base.hidden_size})"
        )
    print(f"{len(entries)} entries")
    if entries:
        print("| adapter | key | adapter hash | probes | spec | created |")
        print("| --- | --- | --- | --- | --- | --- |")
        for e in entries:
            created = datetime.fromtimestamp(e.created).strftime("%Y-%m-%d %H:%M")
            print(
                f"| {e.adapter_name} | {e.key[:12]} | {e.adapter_hash[:12]} | "
                f"{e.probe_name} | {e.spec} | {created} |"
            )
    for key, reason in cache.problems:
        print(
            f"warning: entry {key[:12]} is corrupt ({reason}); moved to corrupt/", file=sys.stderr
        )
    if cache.problems:
        print(
            f"error: {len(cache.problems)} corrupt entries in {args.cache} (moved to corrupt/; "
            "`llgbm-delta compute` recomputes them)",
            file=sys.stderr,
        )
        return EXIT_PARTIAL
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    cache = _open_existing(args.cache)
    t0 = time.perf_counter()
    out = cache.export(args.out)
    import numpy as np

    with np.load(out) as z:
        n = len(z["keys"])
    print(f"wrote {n} deltas to {out} ({time.perf_counter() - t0:.2f} s)")
    for key, reason in cache.problems:
        print(f"warning: entry {key[:12]} is corrupt ({reason}); skipped", file=sys.stderr)
    return EXIT_PARTIAL if cache.problems else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    parser = argparse.ArgumentParser(
        prog="llgbm-delta",
        description="Delta Activations of PEFT LoRA adapters: compute into a cache, list, export.",
        parents=[debug],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "compute",
        parents=[debug],
        help="compute deltas of adapters into a cache",
        description="Compute the delta activation of each adapter on the base model and store it "
        "in CACHE (one cache directory per base model). Cached adapters are not recomputed. "
        "Example: llgbm-delta compute --base ./base --adapters ./adapters --cache ./deltas",
    )
    c.add_argument("--base", required=True, help="HF model id or local path of the base model")
    c.add_argument(
        "--adapters",
        required=True,
        nargs="+",
        metavar="DIR",
        help="PEFT adapter directories (LoRA, DoRA, rank/alpha patterns), full fine-tuned "
        "checkpoint directories (safetensors), hub ids org/name[@revision], or folders "
        "searched for adapters and checkpoints",
    )
    c.add_argument("--cache", required=True, metavar="DIR", help="delta cache directory")
    c.add_argument(
        "--probes",
        default="generic",
        help="generic (default), math, code, commonsense, or a .txt/.json probe file",
    )
    c.add_argument(
        "--keep-going",
        action="store_true",
        help="compute the other adapters when one fails, list failures at the end (exit 1)",
    )
    c.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    c.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    c.add_argument("--batch", type=int, default=16, help="adapters per forward (default 16)")
    c.add_argument(
        "--method",
        default="flora",
        choices=("flora", "peft"),
        help="flora: batched functional path (default); peft: slow reference path",
    )
    c.add_argument(
        "--layer", type=int, default=-1, help="hidden_states index (default -1: last, post-norm)"
    )
    c.add_argument("--token", default="last", choices=("last", "mean"), help="token rule")
    c.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the fused forward (default: on CUDA)",
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_compute)

    ls = sub.add_parser("ls", parents=[debug], help="list the entries of a cache")
    ls.add_argument("cache", metavar="CACHE")
    ls.set_defaults(func=_cmd_ls)

    ex = sub.add_parser("export", parents=[debug], help="export every entry of a cache to .npz")
    ex.add_argument("cache", metavar="CACHE")
    ex.add_argument("out", metavar="OUT.npz")
    ex.set_defaults(func=_cmd_export)
    return parser


@contextlib.contextmanager
def _warnings_as_lines():
    """llgbm-delta's own warnings as `warning: ...` lines on stderr, others as Python shows them."""
    show = warnings.showwarning

    def line(message, category, filename, lineno, file=None, text=None):
        if issubclass(category, DeltaWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, text)

    with warnings.catch_warnings():
        warnings.simplefilter("always", DeltaWarning)
        warnings.showwarning = line
        yield


@contextlib.contextmanager
def _quiet_transformers(debug: bool):
    """No HF loading bars or info logs on the console (our own progress bar is enough).

    A run that finds everything cached never imports transformers, so it is not imported here:
    before its import the same is asked for through its environment variables."""
    if debug:
        yield
        return
    if "transformers" not in sys.modules:
        env = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update({k: v for k, v in env.items() if saved[k] is None})
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
        return
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    args.debug = debug
    return run_command(lambda: args.func(args), debug=debug, catch_all=True)


if __name__ == "__main__":
    sys.exit(main())
