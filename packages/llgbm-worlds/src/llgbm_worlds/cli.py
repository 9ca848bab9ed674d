"""``python -m llgbm_worlds``: build, show, import and measure worlds.

    python -m llgbm_worlds build tiny --out worlds/tiny            # the default tiny world
    python -m llgbm_worlds build tiny --out /tmp/w --preset test   # seconds; what tests use
    python -m llgbm_worlds build tiny --out worlds/tiny-ind --init independent  # one init per run
    python -m llgbm_worlds show worlds/tiny
    python -m llgbm_worlds import-hf manifest.yaml --out worlds/mine
    python -m llgbm_worlds quality worlds/tiny                     # accuracy + delta silhouette

Errors print one line (``error: ...``) and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json

from llgbm_flora.cli_errors import run_command

from llgbm_worlds.presets import SMOLLM2_PRESETS, TINY_PRESETS


def build_parser(prog: str = "python -m llgbm_worlds") -> argparse.ArgumentParser:
    """The worlds CLI; ``llgbm world`` mounts this same parser (``prog="llgbm world"``)."""
    ap = argparse.ArgumentParser(prog=prog, description="Build and inspect llgbm worlds.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser("build", help="build (or resume) a world: tiny | smollm2")
    b.add_argument("kind", help="world kind: tiny | smollm2")
    b.add_argument("--out", default=None, help="world directory to write (default: worlds/<kind>)")
    b.add_argument(
        "--preset",
        default=None,
        help=f"tiny: {' | '.join(TINY_PRESETS)}; smollm2: {' | '.join(SMOLLM2_PRESETS)}",
    )
    b.add_argument(
        "--init",
        default=None,
        help="teachers' LoRA init: shared (one for the whole zoo) | independent (one per run); "
        "default: the preset's",
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the base, items and teachers")
    b.add_argument("--device", default=None, help="torch device for training (default: auto)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")
    s = sub.add_parser("show", help="print a world's tasks and teachers as a table")
    s.add_argument("dir", help="world directory (holding world.json)")
    h = sub.add_parser("import-hf", help="make an hf world from a manifest (json or yaml)")
    h.add_argument("manifest", help="manifest file")
    h.add_argument("--out", required=True, help="world directory to write")
    q = sub.add_parser("quality", help="teacher accuracy and family silhouettes (delta vs weights)")
    q.add_argument("dir", help="world directory")
    q.add_argument("--device", default=None, help="torch device")
    return ap


def run(args: argparse.Namespace) -> int:
    from llgbm_worlds.build import build_world
    from llgbm_worlds.hf import import_hf
    from llgbm_worlds.quality import measure_world
    from llgbm_worlds.show import show_world

    if args.command == "build":
        out = build_world(
            args.kind,
            args.out or f"worlds/{args.kind}",
            preset=args.preset,
            seed=args.seed,
            progress=not args.no_progress,
            device=args.device,
            threads=args.threads,
            init=args.init,
        )
        print(show_world(out))
    elif args.command == "show":
        print(show_world(args.dir))
    elif args.command == "import-hf":
        print(f"world: {import_hf(args.manifest, args.out) / 'world.json'}")
    elif args.command == "quality":
        print(json.dumps(measure_world(args.dir, device=args.device), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        lambda: run(args),
        debug=args.debug,
        interrupted="interrupted: rerun the same command to resume",
    )
