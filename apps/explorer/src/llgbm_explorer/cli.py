"""The ``llgbm-explorer`` command: check the folders, then serve the app on 127.0.0.1.

    llgbm-explorer --world worlds/tiny --runs runs          # http://127.0.0.1:8501
    llgbm-explorer --port 8600 --delta-cache worlds/tiny/delta_cache

Streamlit runs in this process's place (exec), bound to ``--address`` (127.0.0.1 unless told
otherwise), headless, without usage statistics.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llgbm_explorer.folders import Folders, parser

APP = Path(__file__).parent / "app.py"
DEFAULT_ADDRESS = "127.0.0.1"
DEFAULT_PORT = 8501


def _parser():
    p = parser()
    p.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help="address to bind (default: %(default)s; another address lets anyone who reaches it "
        "read these folders)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    return p


def streamlit_argv(argv: list[str]) -> list[str]:
    """The ``python -m streamlit run ...`` command line for the explorer's own ``argv``."""
    args = _parser().parse_args(argv)
    f = Folders.from_args(_folder_args(args))
    app_args = [
        "--world",
        str(f.world),
        "--delta-cache",
        str(f.delta_cache),
        "--runs",
        str(f.runs),
        "--results",
        str(f.results),
    ]
    for r in f.roots:
        app_args += ["--root", str(r)]
    return [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.address", args.address,
        "--server.port", str(args.port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer",
        "--", *app_args,
    ]  # fmt: skip


def _folder_args(args) -> list[str]:
    out = ["--world", args.world, "--runs", args.runs, "--results", args.results]
    if args.delta_cache:
        out += ["--delta-cache", args.delta_cache]
    for r in args.root:
        out += ["--root", r]
    return out


def main(argv: list[str] | None = None) -> int:
    cmd = streamlit_argv(sys.argv[1:] if argv is None else argv)
    print(
        f"llgbm explorer: http://{cmd[cmd.index('--server.address') + 1]}:{cmd[cmd.index('--server.port') + 1]}"
    )
    os.execv(cmd[0], cmd)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
