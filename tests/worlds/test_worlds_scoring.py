"""score_groups: many adapters' greedy exact match in batched passes equals score on PEFT models."""

from __future__ import annotations

import pytest
import torch
from llgbm_flora import LoraBatch, LoraError, applied, load_adapter
from llgbm_worlds.scoring import score, score_fast, score_groups


def _cases(world):
    """Teachers of every task on groups of different sizes, the base, a repeat, an empty group."""
    paths, groups = [], []
    for k, t in enumerate(world.tasks):
        for te in world.teachers_of(t.name)[:2]:
            paths.append(te.path)
            groups.append(t.items("test")[: max(1, 16 - 3 * k)])
    paths += [None, paths[0]]
    groups += [world.tasks[0].items("test")[:5], []]
    return paths, groups


def test_score_groups_equals_score_on_peft_models(tiny_world, tiny_base):
    model, tok = tiny_base
    paths, groups = _cases(tiny_world)
    want = [score(model, tok, g, adapter=p) for g, p in zip(groups, paths)]  # PEFT, one by one
    # max_rows 20: several passes, groups padded to their pass's largest.
    got = score_groups(model, tok, groups, paths, max_rows=20)
    assert got == want
    assert score_groups(model, tok, groups, paths, max_rows=1000) == want  # one pass per spec
    # The comparison means something: right and wrong answers, and adapters that differ.
    flat = [b for g in want for b in g]
    assert 0.2 < sum(flat) / len(flat) < 0.9
    assert len({tuple(g) for g in want if len(g) == 16}) > 1
    assert want[-1] == [] and got[-1] == []
    fast = score_groups(model, tok, groups, paths, fast=True, max_rows=20)
    adapters = [None if p is None else load_adapter(p) for p in paths]
    assert fast == [score_fast(model, tok, g, adapter=a) for g, a in zip(groups, adapters)]


def test_score_groups_takes_a_batch_and_the_base(tiny_world, tiny_base):
    model, tok = tiny_base
    paths, groups = _cases(tiny_world)
    paths, groups = paths[:4], groups[:4]
    batch = LoraBatch.from_adapters([load_adapter(p) for p in paths])
    want = [score(model, tok, g, adapter=p) for g, p in zip(groups, paths)]
    assert score_groups(model, tok, groups, batch, max_rows=24) == want
    assert score_groups(model, tok, groups) == [score(model, tok, g) for g in groups]
    assert score_groups(model, tok, groups, max_new_tokens=1) == [
        score(model, tok, g, max_new_tokens=1) for g in groups
    ]
    with pytest.raises(ValueError, match="3 adapters for 4 groups"):
        score_groups(model, tok, groups, paths[:3])
    with pytest.raises(TypeError, match="adapter 0 is a int"):
        score_groups(model, tok, groups[:1], [7])


def test_applied_checks_rows_and_leaves_the_model_clean(tiny_world, tiny_base):
    model, _ = tiny_base
    paths, _ = _cases(tiny_world)
    batch = LoraBatch.from_adapters([load_adapter(p) for p in paths[:2]])
    ids = torch.tensor([[5, 6, 7], [5, 6, 7], [8, 9, 10]])
    before = model(input_ids=ids).logits
    rows = "3 input rows is not a multiple of 2 adapters"
    with pytest.raises(LoraError, match=rows), applied(model, batch):
        model(input_ids=ids)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    with applied(model, batch):
        two = model(input_ids=ids[:2]).logits
    assert not torch.allclose(two[0], two[1])  # row 0 under adapter 0, row 1 under adapter 1
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
