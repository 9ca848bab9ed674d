"""Wall time of `llgbm-delta ls` and `export` (whole processes) on a cache of the default world's size.

    uv run python benchmarks/delta_cli_light.py [--entries 234] [--hidden 96] [--repeats 5]

The default tiny world has 234 teachers of hidden size 96 (docs/worlds.md); `--hidden 576` gives
SmolLM2-135M's width. The cache is synthetic (`llgbm_delta.testing.synthetic_cache`, laid out as
`compute` writes it). Each repeat runs `llgbm-delta ls CACHE` and `llgbm-delta export CACHE
OUT.npz` as fresh processes and times them from outside (start-up and imports included); one
more run of each under `python -X importtime` reports the import time of numpy and of the whole
command, and checks that neither imports torch or transformers. Prints min / median / max and
writes one JSON line to `--out` if given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HEAVY = ("torch", "transformers", "peft")


def _command() -> list[str]:
    exe = shutil.which("llgbm-delta", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "llgbm_delta.cli"]


def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0


def _imports(args: list[str]) -> dict:
    """-X importtime of one run: cumulative import seconds of numpy and of everything."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "llgbm_delta.cli", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stderr
    rows = re.findall(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", out)
    top = sum(int(cum) for _, cum, indent, _ in rows if len(indent) == 1)
    numpy = next((int(cum) for _, cum, _, name in rows if name == "numpy"), 0)
    names = {name for *_, name in rows}
    return {
        "imports_s": top / 1e6,
        "numpy_import_s": numpy / 1e6,
        "heavy_imported": sorted(m for m in HEAVY if m in names),
    }


def _spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=234)
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="append a JSON line here")
    args = p.parse_args(argv)
    from llgbm_delta.testing import synthetic_cache

    with tempfile.TemporaryDirectory(prefix="llgbm-delta-cli-") as tmp:
        cache = Path(tmp) / "cache"
        synthetic_cache(cache, args.entries, args.hidden)
        npz = str(Path(tmp) / "deltas.npz")
        cmd = _command()
        ls, export = [], []
        for _ in range(args.repeats):
            ls.append(_timed([*cmd, "ls", str(cache)]))
            export.append(_timed([*cmd, "export", str(cache), npz]))
        imports = {
            "ls": _imports(["ls", str(cache)]),
            "export": _imports(["export", str(cache), npz]),
        }
    res = {
        "benchmark": "delta_cli_light",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_avg_1m": os.getloadavg()[0],
        "entries": args.entries,
        "hidden": args.hidden,
        "ls_s": _spread(ls),
        "export_s": _spread(export),
        "imports": imports,
    }
    print(
        f"| entries {args.entries}, hidden {args.hidden} | ls {res['ls_s']['min']:.2f}-"
        f"{res['ls_s']['max']:.2f} s (median {res['ls_s']['median']:.2f}) | export "
        f"{res['export_s']['min']:.2f}-{res['export_s']['max']:.2f} s (median "
        f"{res['export_s']['median']:.2f}) | imports {imports['ls']['imports_s']:.2f} s, numpy "
        f"{imports['ls']['numpy_import_s']:.2f} s | heavy modules: "
        f"{imports['ls']['heavy_imported'] + imports['export']['heavy_imported'] or 'none'} |"
    )
    if args.out is not None:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
