"""Task families, the prompt frame and the tiny tokenizer."""

from __future__ import annotations

import pytest
from llgbm_worlds import FAMILIES, format_prompt, generic_probe_texts, get_family, make_items
from llgbm_worlds.build import task_items, task_specs
from llgbm_worlds.errors import UnknownNameError
from llgbm_worlds.presets import get_preset


def test_enough_families_and_variants():
    default = get_preset("tiny", "default")
    assert len(default.families) >= 8
    for name in default.families:
        assert len(FAMILIES[name].params) >= 4, name
    specs = task_specs(default)
    kinds = {s.heldout_kind for s in specs}
    assert {None, "variant", "family"} <= kinds
    assert any(s.family == "mixture" for s in specs)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_items_deterministic_disjoint_and_framed(name):
    fam = FAMILIES[name]
    p = fam.params[0]
    train, test = make_items(fam, p, seed=3, n_train=60, n_test=20)
    again = make_items(fam, p, seed=3, n_train=60, n_test=20)
    assert (train, test) == again
    assert make_items(fam, p, seed=4, n_train=60, n_test=20) != (train, test)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    inputs = lambda xs: {e.prompt.split("Input:")[1] for e in xs}  # noqa: E731
    assert not inputs(train) & inputs(test)
    for e in train + test:
        assert e.prompt.endswith("\n\n### Response:")
        assert fam.instruction(p) in e.prompt
        assert e.answer.split()[0] == fam.tag
    # different parameters give different answers on the same input
    q = fam.params[1]
    shared = set(fam.domain(p)) & set(fam.domain(q))
    assert any(fam.answer(p, x) != fam.answer(q, x) for x in shared)


def test_frame_matches_generic_probes():
    from llgbm_delta import generic_probes

    assert tuple(generic_probe_texts()) == generic_probes().texts
    assert format_prompt("Do it.", "x").endswith(
        "### Instruction:\nDo it. Input:x\n\n### Response:"
    )


def test_unknown_family_lists_valid_ones():
    with pytest.raises(UnknownNameError, match=r"valid families: .*add"):
        get_family("nope")


def test_mixture_items_interleave_parts():
    p = get_preset("tiny", "test")
    items = task_items(p, 0)
    mix = next(s for s in task_specs(p) if s.family == "mixture")
    a, b = mix.parts
    train = items[mix.name][0]
    assert train[0] == items[a][0][0] and train[1] == items[b][0][0]


def test_tiny_tokenizer_covers_probes_and_frame(tmp_path):
    from llgbm_worlds.tiny import vocabulary_texts
    from llgbm_worlds.tokenizer import build_tokenizer
    from transformers import AutoTokenizer

    tok = build_tokenizer(vocabulary_texts())
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for text in generic_probe_texts():
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert len(ids) == 13  # <s> header tag please provide a response . input : input . tag
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    for fam in FAMILIES.values():
        train, _ = make_items(fam, fam.params[0], seed=0, n_train=5, n_test=2)
        for e in train:
            ids = tok(" " + e.answer, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids).strip() == e.answer


def test_task_frame_is_the_probe_frame():
    """Tasks and llgbm-delta's probes share one frame: a task prompt is a probe text."""
    from llgbm_delta.probes import PROBE_FRAME, generic_probes
    from llgbm_worlds.frame import GENERIC_INPUT, GENERIC_TASK, HEADERS, format_prompt

    for i, h in enumerate(HEADERS):
        want = PROBE_FRAME.format(header=h, task="Reverse the words.", input="a b")
        assert format_prompt("Reverse the words.", "a b", header=i) == want
    generic = [format_prompt(GENERIC_TASK, GENERIC_INPUT, header=i) for i in range(len(HEADERS))]
    assert generic == list(generic_probes().texts)
