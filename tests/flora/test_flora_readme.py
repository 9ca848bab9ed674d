"""The package README's example runs as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "packages" / "llgbm-flora" / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch: pytest.MonkeyPatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    assert len(blocks[0].strip().splitlines()) <= 20
    monkeypatch.chdir(tmp_path)  # the example writes "my_adapter" to the working directory
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme_example"})
    assert printed.getvalue().strip() == "torch.Size([2, 4, 32])"
    assert (tmp_path / "my_adapter" / "adapter_config.json").is_file()
