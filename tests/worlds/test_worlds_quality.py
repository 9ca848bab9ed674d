"""The tiny base's pretraining data and the world quality measure."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from llgbm_worlds.families import FAMILIES
from llgbm_worlds.frame import GENERIC_INPUT, GENERIC_TASK
from llgbm_worlds.quality import measure_world, silhouette_cosine
from llgbm_worlds.tiny import (
    SKILL_KEYWORDS,
    SKILL_TAGS,
    TinyModelConfig,
    filler_words,
    pretrain_example,
)
from llgbm_worlds.tokenizer import words_of


def _instruction(prompt: str) -> str:
    return prompt.split("### Instruction:\n")[1].split(" Input:")[0]


def test_pretraining_answers_open_with_a_skill_tag_never_a_family_word():
    rng = random.Random(0)
    family_words = {fam.tag for fam in FAMILIES.values()}
    for _ in range(500):
        ex = pretrain_example(rng, echo_weight=3)
        tag = ex.answer.split()[0]
        assert tag in SKILL_TAGS
        assert tag not in family_words
        assert _instruction(ex.prompt) not in {
            fam.instruction(p) for fam in FAMILIES.values() for p in fam.params
        }


def test_filler_instructions_avoid_skill_keywords_and_probe_words():
    probe_words = words_of([f"{GENERIC_TASK} Input:{GENERIC_INPUT}"])
    words = set(filler_words())
    assert words and not words & SKILL_KEYWORDS and not words & probe_words
    rng = random.Random(1)
    fillers = 0
    for _ in range(2000):
        ex = pretrain_example(rng)
        ins = _instruction(ex.prompt)
        if ex.answer.startswith("echo ") and ins != "Repeat the input.":
            fillers += 1
            assert set(words_of([ins])) <= words | {"."}
    assert fillers > 50


def test_echo_weight_sets_the_share_of_copy_examples():
    for weight, share in ((1, 1 / 7), (3, 3 / 9)):
        rng = random.Random(2)
        tags = Counter(
            pretrain_example(rng, echo_weight=weight).answer.split()[0] for _ in range(4000)
        )
        assert abs(tags["echo"] / 4000 - share) < 0.03
    with pytest.raises(ValueError, match="echo_weight"):
        TinyModelConfig(echo_weight=0)


def test_silhouette_cosine_known_values():
    # Two tight clusters on orthogonal directions: a ~ 0, b ~ 1 -> ~1.
    x = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    assert silhouette_cosine(x, ["a", "a", "b", "b"]) > 0.99
    # Labels that cut across the clusters score below zero.
    assert silhouette_cosine(x, ["a", "b", "a", "b"]) < 0
    # Scale does not matter (cosine); a singleton scores 0 and pulls the mean down.
    assert silhouette_cosine(10 * x, ["a", "a", "b", "b"]) == pytest.approx(
        silhouette_cosine(x, ["a", "a", "b", "b"])
    )
    # Exact clusters (a = 0, b = 1 -> 1 each) plus a singleton opposite cluster "a" (scores 0).
    exact = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    assert silhouette_cosine(exact, ["a", "a", "b", "b", "c"]) == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="two labels"):
        silhouette_cosine(x, ["a"] * 4)


def test_measure_world_on_the_test_world(tiny_world_dir, tiny_world):
    q = measure_world(tiny_world_dir)
    singles = [t for t in tiny_world.teachers if t.kind == "single"]
    assert q["n_teachers"] == len(singles)
    assert q["n_families"] == len(
        {t.family for t in tiny_world.tasks if t.name in {s.task for s in singles}}
    )
    for key in ("silhouette_delta", "silhouette_delta_task", "silhouette_weights"):
        assert -1.0 <= q[key] <= 1.0
