"""A real test-preset world and real runs for the explorer tests (and its screenshots).

    python tests/explorer/explorer_fixture.py OUT     # world from llgbm_worlds.testing, runs in OUT

Uses the worlds package's cached ``test``-preset world and the training tests' fast config
(``tests/train/train_world.small_config``); trains two objectives through the ``llgbm`` CLI, as
a user would, and nothing else: ``llgbm train`` fills the delta cache with the teachers' deltas
and its evaluation writes the generated adapters' (``eval/deltas.safetensors``).
``compose(world, out)`` adds a real ``python -m llgbm_compose compose`` report.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))  # train_world.small_config

__test__ = False

RUNS = ("t", "t-baseline")
APP = str(Path(__file__).parents[2] / "apps" / "explorer" / "src" / "llgbm_explorer" / "app.py")


@dataclasses.dataclass(frozen=True)
class Demo:
    world: Path  # a built test-preset world (shared, read-only here)
    runs: Path  # runs/ with the two runs
    cache: Path  # the delta cache the runs used


def build_demo(out: Path, world: Path | None = None) -> Demo:
    """Train the two runs of RUNS on ``world`` (default: the cached test world) into ``out``."""
    from llgbm_train.cli import main as llgbm
    from llgbm_train.config import save_config
    from llgbm_worlds.testing import test_world
    from train_world import small_config

    out = Path(out)
    world = Path(world) if world is not None else test_world()
    runs = out / "runs"
    cfg = small_config(world, runs, "training.steps=6")
    cache = Path(cfg.delta.cache_dir)
    # The second run evaluates every task (eval/report-all.json), the first the held-out ones.
    extras = ([], ["training.objective=baseline", "eval.tasks=all"])
    for name, extra in zip(RUNS, extras):
        if any((runs / name / "eval").glob("report*.json")):
            continue
        path = save_config(
            dataclasses.replace(cfg.override(extra), name=name), out / f"{name}.yaml"
        )
        if llgbm(["train", str(path)]) != 0:
            raise RuntimeError(f"llgbm train {path} failed")
    return Demo(world=world, runs=runs, cache=cache)


def compose(world: Path, runs: Path) -> Path:
    """``python -m llgbm_compose compose WORLD`` (small settings) into RUNS/compose/<world name>/.

    Returns the report file. Its retrieval step writes WORLD/delta_index/, as it does for a user.
    """
    from llgbm_compose.cli import main as compose_main

    out = Path(runs) / "compose" / Path(world).name
    if not (out / "report.json").is_file():
        argv = ["compose", str(world), "--out", str(out), "--max-items", "2", "--dare-seeds", "0"]
        if compose_main([*argv, "--threads", "1", "--no-progress"]) != 0:
            raise RuntimeError(f"llgbm_compose compose {world} failed")
    return out / "report.json"


def demo_args(demo: Demo) -> list[str]:
    """The explorer's command line for ``demo``."""
    return ["--world", str(demo.world), "--delta-cache", str(demo.cache), "--runs", str(demo.runs)]


def open_app(folders, page: str | None = None):
    """Streamlit's AppTest of the explorer with ``folders`` chosen, run on ``page``."""
    import llgbm_explorer
    from llgbm_explorer import ui
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=300)
    at.session_state[ui.KEY] = folders
    if page is not None and page != llgbm_explorer.PAGES[0][0]:
        at.switch_page(f"views/{page}.py")
    return at.run()


if __name__ == "__main__":
    # python tests/explorer/explorer_fixture.py OUT [--compose]: the demo (+ a compose report)
    demo = build_demo(Path(sys.argv[1]))
    if "--compose" in sys.argv[2:]:
        compose(demo.world, demo.runs)
    print(f"--world {demo.world} --delta-cache {demo.cache} --runs {demo.runs}")
