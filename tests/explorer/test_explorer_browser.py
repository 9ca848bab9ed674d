"""The real thing: `llgbm-explorer` on a free localhost port, every page in headless Chromium.

Checks each page finished drawing with a Plotly chart (or, for composition without a compose
report, its message) and no exception or error box. Skipped when /usr/bin/chromium is absent;
`.ci/run` installs it.
"""

from __future__ import annotations

import llgbm_explorer
import pytest
from browser import Chromium, Explorer, have_chromium
from explorer_fixture import demo_args

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not have_chromium(), reason="needs /usr/bin/chromium (apt-get install chromium)"
    ),
]


def test_every_page_renders_in_chromium(demo, tmp_path):
    with (
        Explorer([*demo_args(demo), "--results", str(tmp_path / "results.md")]) as app,
        Chromium() as browser,
    ):
        for i, (name, title, _) in enumerate(llgbm_explorer.PAGES):
            page = browser.open(f"{app.url}/{name if i else ''}", title)
            assert page.errors == 0, (name, app.output())
            assert page.png[:8] == b"\x89PNG\r\n\x1a\n"
            if name == "composition":
                assert page.infos == 1 and page.plots == 0
            else:
                assert page.plots >= 1, name
