"""Drive Debian's headless Chromium over the DevTools protocol: open a page, wait, screenshot.

    with Explorer(["--world", W, "--runs", R]) as app, Chromium() as browser:
        shot = browser.open(app.url + "/delta_map")        # Page: .plots, .errors, .png, .seconds

``Explorer`` starts the real ``llgbm-explorer`` command on a free localhost port; ``Chromium``
starts ``/usr/bin/chromium`` (never a downloaded browser) with a fresh profile. A page counts as
drawn when Streamlit's script has finished (``data-test-script-state="notRunning"``) and no
spinner or skeleton is left; then its Plotly charts and error boxes are counted.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__test__ = False

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Evaluated in the page: its state once the script is done, else null.
PROBE = """(() => {
  const q = (s) => document.querySelectorAll(s).length;
  const done = q('[data-test-script-state="notRunning"]') > 0 && q('[data-testid="stSpinner"]') === 0
    && q('[data-testid="stSkeleton"]') === 0 && q('[data-testid="stMainBlockContainer"]') > 0;
  return done ? JSON.stringify({
    plots: [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
      .filter((e) => e.querySelector('.js-plotly-plot .main-svg')).length,
    errors: q('[data-testid="stException"]') + q('[data-testid="stAlertContentError"]'),
    infos: q('[data-testid="stAlertContentInfo"]'),
    title: (document.querySelector('h1') || {}).textContent || ''}) : null;
})()"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have_chromium() -> bool:
    return Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)


@dataclass
class Page:
    url: str
    plots: int  # drawn Plotly charts
    errors: int  # exception and st.error boxes
    infos: int  # st.info boxes
    title: str  # the page's h1
    seconds: float  # navigation start -> script finished and charts drawn
    png: bytes  # screenshot of the window


class Explorer:
    """``llgbm-explorer ARGS --port FREE`` in a subprocess, until the server answers."""

    def __init__(self, args: list[str], *, timeout: float = 180):
        self.args, self.timeout = args, timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Explorer:
        exe = Path(sys.executable).with_name("llgbm-explorer")
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [str(exe), *self.args, "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llgbm-explorer exited: {self.output()}")
            try:
                urllib.request.urlopen(self.url + "/_stcore/health", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"llgbm-explorer did not answer on {self.url}: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Chromium:
    """Headless Chromium with a DevTools websocket to one page target."""

    def __init__(self, *, width: int = 1400, height: int = 1300):
        self.width, self.height = width, height

    def __enter__(self) -> Chromium:
        from contextlib import ExitStack

        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="llgbm-chromium-")
        port = free_port()
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={self.profile}",
                f"--window-size={self.width},{self.height}",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = json.loads(
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read()
                )
                page = next(t for t in targets if t.get("type") == "page")
                break
            except (OSError, StopIteration, json.JSONDecodeError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("chromium did not start its DevTools endpoint") from None
                time.sleep(0.3)
        self._stack = ExitStack()
        self.ws = self._stack.enter_context(
            connect(page["webSocketDebuggerUrl"], max_size=64 << 20)
        )
        self._id = 0
        self.call("Page.enable")
        return self

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def open(self, url: str, title: str, *, timeout: float = 300, settle: float = 0.5) -> Page:
        """Navigate to ``url``, wait until the page titled ``title`` is drawn, then screenshot."""
        t0 = time.perf_counter()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        state, done_at = None, None
        while time.monotonic() < deadline:
            time.sleep(0.1)
            r = self.call("Runtime.evaluate", expression=PROBE, returnByValue=True)
            value = r.get("result", {}).get("value")
            seen = json.loads(value) if value else None
            if seen and (seen["title"] == title or seen["errors"]):
                state = seen
                done_at = done_at or time.monotonic()
                # A chart's SVG appears a moment after the script ends: wait for it briefly.
                if state["plots"] > 0 or time.monotonic() - done_at > 10:
                    break
        if state is None:
            raise TimeoutError(f"{url}: the page did not finish drawing in {timeout:.0f} s")
        seconds = time.perf_counter() - t0
        time.sleep(settle)  # let plotly finish its transition before the screenshot
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return Page(
            url, state["plots"], state["errors"], state["infos"], state["title"], seconds, png
        )

    def __exit__(self, *exc) -> None:
        try:
            self._stack.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


def screenshots(out: Path, args: list[str], *, visits: int = 2) -> list[tuple[str, int, float]]:
    """Open every page ``visits`` times; write ``out/explorer-<page>.png`` of the last visit.

    Returns (page, visit, seconds) rows: the first visit pays for imports and cold caches.
    """
    import llgbm_explorer

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with Explorer(args) as app, Chromium() as browser:
        for visit in range(1, visits + 1):
            for i, (name, title, _) in enumerate(llgbm_explorer.PAGES):
                page = browser.open(f"{app.url}/{name if i else ''}", title)
                if page.errors:
                    raise RuntimeError(f"{name}: {page.errors} error box(es)\n{app.output()}")
                rows.append((name, visit, page.seconds))
                (out / f"explorer-{name}.png").write_bytes(page.png)
    return rows


if __name__ == "__main__":
    # python tests/explorer/browser.py OUT [-- EXPLORER ARGS]
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    for name, visit, s in screenshots(Path(argv[0]), extra):
        print(f"{name:12s} visit {visit}: {s:6.2f} s")
