"""Explorer page load: the delta map (or any page) in headless Chromium, first visit and after.

    python benchmarks/explorer_page_load.py --visits 6 -- --world worlds/tiny --runs runs
    python benchmarks/explorer_page_load.py --pages delta_map similarity --out load.jsonl -- ARGS

Starts the real ``llgbm-explorer ARGS`` on a free localhost port and opens each page ``--visits``
times in Debian's ``/usr/bin/chromium`` (tests/explorer/browser.py drives it over DevTools). A
visit is a fresh navigation, so a new Streamlit session: the time runs from ``Page.navigate``
until the script has finished, no spinner is left and the page's Plotly charts have drawn (polled
every 0.1 s). Visit 1 pays for the server's imports and cold loaders; later visits are what a
researcher waits for once the explorer is up ("after the first visit"). The same pages are
also run ``--visits`` times through Streamlit's ``AppTest`` in this process (the server-side
script alone, no browser), to split the time between Python and the browser. Prints markdown
rows; ``--out`` appends one JSON line per run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "explorer"))


def chromium_version() -> str:
    from browser import CHROMIUM

    out = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


def script_times(explorer_args: list[str], pages: list[str], visits: int) -> dict[str, list[float]]:
    """Seconds of each AppTest run of each page (run 1 cold, then warm caches)."""
    import time

    from explorer_fixture import open_app
    from llgbm_explorer.folders import Folders

    folders = Folders.from_args(_folder_argv(explorer_args))
    out: dict[str, list[float]] = {}
    for name in pages:
        t0 = time.perf_counter()
        at = open_app(folders, name)
        out[name] = [time.perf_counter() - t0]
        for _ in range(max(1, visits - 1)):
            t0 = time.perf_counter()
            at.run()
            out[name].append(time.perf_counter() - t0)
    return out


def _folder_argv(argv: list[str]) -> list[str]:
    """The explorer's argv without --port/--address and their values (Folders parses the rest)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--port", "--address"):
            skip = True
            continue
        out.append(a)
    return out


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", nargs="+", default=["delta_map"])
    p.add_argument("--visits", type=int, default=6)
    p.add_argument("--out", help="append one JSON line per run here")
    args = p.parse_args(own)

    import llgbm_explorer
    from browser import Chromium, Explorer, have_chromium

    if not have_chromium():
        print("needs /usr/bin/chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    pages = {name: (i, title) for i, (name, title, _) in enumerate(llgbm_explorer.PAGES)}
    unknown = [n for n in args.pages if n not in pages]
    if unknown:
        print(f"--pages: unknown {unknown}; pages are {list(pages)}", file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {n: [] for n in args.pages}
    plots: dict[str, int] = {}
    with Explorer(extra) as app, Chromium() as browser:
        for _ in range(args.visits):
            for name in args.pages:
                i, title = pages[name]
                page = browser.open(f"{app.url}/{name if i else ''}", title, settle=0)
                if page.errors:
                    raise SystemExit(f"{name}: {page.errors} error box(es)\n{app.output()}")
                times[name].append(page.seconds)
                plots[name] = page.plots
    script = script_times(extra, args.pages, args.visits)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    date = datetime.date.today().isoformat()
    print("| page | plots | visit 1 (s) | later visits (s): min / median / max |")
    print("| --- | ---: | ---: | --- |")
    for name, t in times.items():
        later = sorted(t[1:])
        spread = (
            f"{later[0]:.2f} / {later[len(later) // 2]:.2f} / {later[-1]:.2f}" if later else "-"
        )
        print(f"| {name} | {plots[name]} | {t[0]:.2f} | {spread} |")
    print("\n| page | script, run 1 (s) | script, later runs (s): min / median / max |")
    print("| --- | ---: | --- |")
    for name, t in script.items():
        later = sorted(t[1:])
        print(
            f"| {name} | {t[0]:.2f} | {later[0]:.3f} / {later[len(later) // 2]:.3f} / {later[-1]:.3f} |"
        )
    if args.out:
        row = {
            "date": date,
            "machine": machine,
            "chromium": chromium_version(),
            "explorer_args": extra,
            "seconds": times,
            "script_seconds": script,
            "plots": plots,
        }
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    print(f"{date} · {machine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
