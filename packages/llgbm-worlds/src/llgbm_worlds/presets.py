"""Named build presets: which families and variants, the base model recipe and the zoo recipe.

``default`` is the full tiny world (every family, the documented split, mixtures). ``test`` is a
cut-down world built in well under a minute for test suites: same file layout, same code paths,
small model, few teachers (its teachers learn: they beat its base by >= 20 points). Both start every teacher from
one shared LoRA init; ``default-independent`` and ``test-independent`` are the same worlds with one
init per run. ``smollm2`` presets train on the real SmolLM2-135M-Instruct (GPU work).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from llgbm_worlds.errors import UnknownNameError
from llgbm_worlds.families import FAMILIES
from llgbm_worlds.tiny import TinyModelConfig
from llgbm_worlds.zoo import ZooConfig

KINDS = ("tiny", "smollm2")
# Every family a rank-8 LoRA learned to >= 80% on the tiny base in trials; `suffix` is held out.
DEFAULT_FAMILIES = (
    "add",
    "subtract",
    "shift",
    "code",
    "prefix",
    "repeat",
    "surround",
    "mod",
    "suffix",
)
DEFAULT_MIXTURES = (
    ("add_3", "code_alpha"),
    ("shift_2", "prefix_red"),
    ("repeat_3", "mod_3"),
    ("subtract_4", "surround_blue"),
)


@dataclass(frozen=True)
class Preset:
    """What a world build makes."""

    name: str  # preset name
    families: tuple[str, ...]  # families in the world (held-out families included)
    heldout_families: tuple[str, ...]  # families whose every task is held out
    max_train_params: int | None  # train variants kept per family (None: all)
    max_heldout_params: int | None  # held-out variants kept per family (None: all)
    mixtures: tuple[tuple[str, str], ...]  # pairs of train task names to interleave
    n_train: int  # train items per task (split among its data splits)
    n_test: int  # test items per task
    zoo: ZooConfig = field(default_factory=ZooConfig)
    model: TinyModelConfig | None = None  # tiny base recipe (None: the base is not built)

    def __post_init__(self) -> None:
        for f in self.families:
            if f not in FAMILIES:
                raise UnknownNameError(
                    f"preset {self.name}: unknown family {f!r}; valid: {', '.join(sorted(FAMILIES))}"
                )
        for f in self.heldout_families:
            if f not in self.families:
                raise ValueError(f"preset {self.name}: held-out family {f!r} is not in families")

    def with_init(self, init: str, name: str | None = None) -> Preset:
        """The same preset with the zoo's LoRA init set to ``init`` (see world.INITS)."""
        return replace(self, name=name or self.name, zoo=replace(self.zoo, init=init))


TINY_PRESETS: dict[str, Preset] = {
    "default": Preset(
        name="default",
        families=DEFAULT_FAMILIES,
        heldout_families=("suffix",),
        max_train_params=None,
        max_heldout_params=1,
        mixtures=DEFAULT_MIXTURES,
        # 480 items (240 per data split) and 320 steps: with 240 items and 160 steps the same
        # recipe gave 94% teachers on one machine and 74% on another (docs/worlds.md). lr 5e-3:
        # in a trial on one answer-style base (72 teachers), 1e-2 gave 95% teachers and family
        # silhouette 0.86, 5e-3 98% and 0.98.
        n_train=480,
        n_test=48,
        model=TinyModelConfig(),
        zoo=ZooConfig(steps=320, lr=5e-3, batch=32, checkpoints=(160, 240, 320)),
    ),
    "test": Preset(
        name="test",
        families=("code", "prefix", "suffix"),
        heldout_families=("suffix",),
        max_train_params=2,
        max_heldout_params=1,
        mixtures=(("code_alpha", "prefix_red"),),
        n_train=64,
        n_test=16,
        # Hidden 64 and 600 pretraining steps: the smallest base trials found whose teachers learn
        # (60 zoo steps: base 0%, teachers 60% at their last checkpoint); hidden 32 and 120 steps
        # left every teacher at 0%. Two chunks, so the suite resumes a build past a finished one.
        model=TinyModelConfig(hidden=64, layers=2, heads=4, intermediate=192, steps=600, batch=64),
        zoo=ZooConfig(steps=60, lr=1e-2, batch=16, checkpoints=(40, 60), chunk=7),
    ),
}
# The default world on a base that also has parametric skills (tiny.TinyModelConfig.parametric):
# it can add, subtract, shift and repeat by a k its instruction names, so a held-out variant's
# adapter (add_4 between add_3 and add_5) has a skill to steer, as on a real LLM.
TINY_PRESETS["parametric"] = replace(
    TINY_PRESETS["default"], name="parametric", model=TinyModelConfig(parametric=True)
)
# The same worlds with one LoRA init per run: the unaligned zoo of adapters collected from the wild.
for _name in ("default", "test", "parametric"):
    TINY_PRESETS[f"{_name}-independent"] = TINY_PRESETS[_name].with_init(
        "independent", f"{_name}-independent"
    )

SMOLLM2_PRESETS: dict[str, Preset] = {
    "default": Preset(
        name="default",
        families=DEFAULT_FAMILIES,
        heldout_families=("suffix",),
        max_train_params=None,
        max_heldout_params=1,
        mixtures=DEFAULT_MIXTURES,
        n_train=240,
        n_test=48,
        zoo=ZooConfig(steps=200, lr=5e-4, batch=16, checkpoints=(100, 150, 200)),
    ),
    "smoke": Preset(
        name="smoke",
        families=("code",),
        heldout_families=(),
        max_train_params=1,
        max_heldout_params=0,
        mixtures=(),
        n_train=8,
        n_test=4,
        zoo=ZooConfig(steps=2, lr=5e-4, batch=2, checkpoints=(2,), train_splits=1),
    ),
}
# The unaligned zoo on the real model too (issue 16: both inits); smoke-independent for tests.
for _name in ("default", "smoke"):
    SMOLLM2_PRESETS[f"{_name}-independent"] = SMOLLM2_PRESETS[_name].with_init(
        "independent", f"{_name}-independent"
    )


def get_preset(kind: str, name: str | None) -> Preset:
    """The preset ``name`` (None: "default") of world ``kind``; unknown names list valid ones."""
    table = {"tiny": TINY_PRESETS, "smollm2": SMOLLM2_PRESETS}.get(kind)
    if table is None:
        raise UnknownNameError(
            f"unknown world kind {kind!r}; valid kinds: {', '.join(KINDS)} (hf worlds are imported with import_hf)"
        )
    name = name or "default"
    if name not in table:
        raise UnknownNameError(
            f"unknown {kind} preset {name!r}; valid presets: {', '.join(sorted(table))}"
        )
    return table[name]
