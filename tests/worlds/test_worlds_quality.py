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


def test_default_pretraining_stream_and_base_fingerprint_are_unchanged_by_parametric_skills():
    # Golden values from before the parametric option existed: worlds built then stay valid.
    import hashlib
    import json

    from llgbm_worlds.build import base_fingerprint
    from llgbm_worlds.presets import TINY_PRESETS

    rng = random.Random("pretrain:0")
    first = [pretrain_example(rng, 3) for _ in range(500)]
    digest = hashlib.sha256(json.dumps([[e.prompt, e.answer] for e in first]).encode()).hexdigest()
    assert digest == "76bb92c67e01a588391f5ba5edd350ce12b9d7505e5cb4481d09a01ef9a227fd"
    default = TINY_PRESETS["default"].model
    assert base_fingerprint(default, 0) == (
        "a38875ac8e667f439d24527b5314f0306c37050d19375348fc5d52638f137215"
    )
    assert base_fingerprint(TINY_PRESETS["parametric"].model, 0) != base_fingerprint(default, 0)


def test_parametric_skills_compute_their_answer_and_never_ask_a_family_task():
    from llgbm_worlds.families import LETTERS

    rng = random.Random(3)
    family_instructions = {fam.instruction(p) for fam in FAMILIES.values() for p in fam.params}
    family_tags = {fam.tag for fam in FAMILIES.values()}
    seen: Counter = Counter()
    for _ in range(3000):
        ex = pretrain_example(rng, 3, parametric=True)
        ins, x = _instruction(ex.prompt), ex.prompt.split(" Input:")[1].split("\n")[0]
        tag, *y = ex.answer.split()
        assert tag in SKILL_TAGS and tag not in family_tags
        assert ins not in family_instructions
        words = ins.rstrip(".").split()
        if ins.startswith(("Write the number ", "Write the letter ")) and words[3].isdigit():
            k, where, kind = int(words[3]), words[4], words[2]
            sign = 1 if where == "after" else -1
            if kind == "number":
                want = [str(int(v) + sign * k) for v in x.split()]
                assert all(0 <= int(v) <= 129 for v in want)
            else:
                want = [LETTERS[(LETTERS.index(c) + sign * k) % 26] for c in x.split()]
            assert y == want, ex
            seen[f"{kind} {where}"] += 1
        elif ins.startswith("Repeat the input ") and ins != "Repeat the input.":
            k = int(words[3])
            assert y == [x] * k
            seen["repeat"] += 1
    assert set(seen) == {"number after", "number before", "letter after", "repeat"}
    assert min(seen.values()) > 150


def test_parametric_skills_need_no_new_token():
    # The tokenizer (and so every default world) is unchanged by the option.
    from llgbm_worlds.tiny import vocabulary_texts
    from llgbm_worlds.tokenizer import build_tokenizer

    tok = build_tokenizer(vocabulary_texts())
    rng = random.Random(4)
    texts = [f"{e.prompt} {e.answer}" for e in (pretrain_example(rng, 3, True) for _ in range(600))]
    assert all(tok.unk_token_id not in ids for ids in tok(texts)["input_ids"])
