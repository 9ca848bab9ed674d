"""Exact-match scoring: greedy decoding of each prompt, compared with the answer.

``score`` decodes with ``generate`` (the definition). ``score_fast`` gets the same booleans from
one teacher-forced forward pass: greedy decoding yields exactly ``answer + EOS`` iff at every
answer position the arg-max is the next answer token. It is used where the tokenizer spells each
answer one way only (the tiny world's word-level tokenizer), and is checked against ``score``.
``score_groups`` gives, per group of items, the booleans of either under its own adapter, for many
adapters at once: adapters of one structure share each pass, one adapter per row group
(``llgbm_flora.applied``), so n adapters cost a few batched passes instead of n PEFT loads and
n ``generate`` calls (checked against ``score`` on PEFT models in the tests).
``bootstrap_ci`` gives an accuracy's 95% interval over items.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llgbm_worlds.data import IGNORE, collate, encode
from llgbm_worlds.families import Example

SCORE_BATCH = 64  # score's items per generate call; its token budget is set per such chunk


def bootstrap_ci(correct, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean accuracy of ``correct`` (booleans) and its 95% percentile-bootstrap interval over
    items; NaNs for no items."""
    x = np.asarray(correct, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    return float(x.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _normalise(text: str) -> str:
    return " ".join(text.strip().split())


@torch.no_grad()
def score(
    model,
    tokenizer,
    items: Sequence[Example],
    *,
    adapter=None,
    max_new_tokens: int | None = None,
    batch_size: int = SCORE_BATCH,
) -> list[bool]:
    """Greedy-decode every prompt and compare with its answer (whitespace-normalised exact match).

    ``adapter``: None (the model as is), a PEFT adapter directory, or an ``llgbm_flora`` adapter
    object; it is applied for this call only and the model is left unchanged.
    """
    if adapter is not None:
        return _with_adapter(model, tokenizer, items, adapter, max_new_tokens, batch_size)
    was_training = model.training
    model.eval()
    out: list[bool] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last real token
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            limit = max_new_tokens or 2 + max(
                len(tokenizer(" " + e.answer, add_special_tokens=False)["input_ids"]) for e in chunk
            )
            batch = tokenizer([e.prompt for e in chunk], return_tensors="pt", padding=True)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            gen = model.generate(
                **batch,
                max_new_tokens=limit,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            out.extend(_normalise(t) == _normalise(e.answer) for t, e in zip(texts, chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def _with_adapter(model, tokenizer, items, adapter, max_new_tokens, batch_size) -> list[bool]:
    from peft import PeftModel

    if isinstance(adapter, str | Path):
        peft_model = PeftModel.from_pretrained(model, str(adapter), adapter_name="scored")
        try:
            return score(
                peft_model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
        finally:
            # Unwrap so the caller's model carries no LoRA layers afterwards.
            peft_model.unload()
    import tempfile

    from llgbm_flora import save_adapter  # an in-memory adapter: go through a PEFT dir

    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(adapter, Path(tmp) / "adapter")
        return _with_adapter(model, tokenizer, items, path, max_new_tokens, batch_size)


@torch.no_grad()
def score_fast(
    model, tokenizer, items: Sequence[Example], *, adapter=None, batch_size: int = 256
) -> list[bool]:
    """The booleans ``score`` gives, from one teacher-forced pass (see the module docstring).

    ``adapter``: None (the model as is) or an ``llgbm_flora`` LoraAdapter, applied functionally
    (the model is not changed).
    """
    if adapter is not None:
        from llgbm_flora import functional_forward

        def forward(**batch):
            return functional_forward(model, adapter, **batch)
    else:
        forward = model
    was_training = model.training
    model.eval()
    out: list[bool] = []
    try:
        for start in range(0, len(items), batch_size):
            batch = collate(
                encode(tokenizer, items[start : start + batch_size]), tokenizer.pad_token_id
            )
            batch = {k: v.to(model.device) for k, v in batch.items()}
            logits = forward(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits  # [n, width, vocab]
            pred = logits[:, :-1].argmax(-1)  # [n, width-1]
            target = batch["labels"][:, 1:]  # [n, width-1]
            ok = (pred == target) | (target == IGNORE)
            out.extend(ok.all(-1).tolist())
    finally:
        model.train(was_training)
    return out


def _budgets(tokenizer, items: Sequence[Example], max_new_tokens: int | None) -> list[int]:
    """Per item, the new-token budget ``score`` gives it (2 + longest answer of its chunk)."""
    if max_new_tokens:
        return [max_new_tokens] * len(items)
    lens = [
        len(a)
        for a in tokenizer([" " + e.answer for e in items], add_special_tokens=False)["input_ids"]
    ]
    return [
        2 + max(lens[i - i % SCORE_BATCH : i - i % SCORE_BATCH + SCORE_BATCH])
        for i in range(len(lens))
    ]


def _partitions(n: int, adapters) -> list[tuple[list[int], Any]]:
    """[(group indices, LoraBatch of their adapters or None for the base)]: one per structure."""
    from llgbm_flora import LoraAdapter, LoraBatch, load_adapter

    if adapters is None:
        return [(list(range(n)), None)]
    if isinstance(adapters, LoraBatch):
        if len(adapters) != n:
            raise ValueError(f"score_groups: {len(adapters)} adapters for {n} groups")
        return [(list(range(n)), adapters)]
    adapters = list(adapters)
    if len(adapters) != n:
        raise ValueError(f"score_groups: {len(adapters)} adapters for {n} groups")
    by_spec: dict[Any, tuple[list[int], list]] = {}
    base: list[int] = []
    for i, a in enumerate(adapters):
        if a is None:
            base.append(i)
            continue
        if isinstance(a, str | Path):
            a = load_adapter(a)
        if not isinstance(a, LoraAdapter):
            raise TypeError(
                f"score_groups: adapter {i} is a {type(a).__name__}; expected None, a PEFT "
                "directory or a LoraAdapter"
            )
        idx, items = by_spec.setdefault(a.spec, ([], []))
        idx.append(i)
        items.append(a)
    out: list[tuple[list[int], Any]] = [([*base], None)] if base else []
    out += [(idx, LoraBatch.from_adapters(items)) for idx, items in by_spec.values()]
    return out


def score_groups(
    model,
    tokenizer,
    groups: Sequence[Sequence[Example]],
    adapters=None,
    *,
    fast: bool = False,
    max_new_tokens: int | None = None,
    max_rows: int = 512,
) -> list[list[bool]]:
    """``[score(model, tokenizer, groups[i], adapter=adapters[i]) for i]``, in batched passes.

    ``adapters``: None (the model as is, for every group), a LoraBatch of ``len(groups)``
    adapters, or a list of ``len(groups)`` entries, each None (the base), a PEFT directory or a
    LoraAdapter. ``fast``: ``score_fast``'s teacher-forced booleans instead of generation.
    ``max_rows``: item rows per pass (memory); a group's items are padded to the longest group of
    its pass by repeating its last item (the copies are not scored). Greedy budgets are
    ``score``'s (per chunk of 64 items), so the booleans equal its own; the model is not changed.
    """
    from llgbm_flora.algebra import take

    groups = [list(g) for g in groups]
    out: list[list[bool]] = [[] for _ in groups]
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    try:
        for members, batch in _partitions(len(groups), adapters):
            row_of = {i: r for r, i in enumerate(members)}  # group -> its row in `batch`
            todo = sorted((i for i in members if groups[i]), key=lambda i: len(groups[i]))
            start = 0
            while start < len(todo):  # sorted by size: similar groups share a pass
                stop = start + 1
                while stop < len(todo) and len(groups[todo[stop]]) * (stop + 1 - start) <= max_rows:
                    stop += 1
                chunk = todo[start:stop]
                per = len(groups[chunk[-1]])
                rows = [groups[i][min(j, len(groups[i]) - 1)] for i in chunk for j in range(per)]
                sub = None if batch is None else take(batch, [row_of[i] for i in chunk])
                ok = (_fast_rows if fast else _generated_rows)(
                    model, tokenizer, rows, sub, max_new_tokens
                )
                for c, i in enumerate(chunk):
                    out[i] = ok[c * per : c * per + len(groups[i])]
                start = stop
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def _in_context(model, adapters):
    import contextlib

    if adapters is None:
        return contextlib.nullcontext()
    from llgbm_flora import applied

    return applied(model, adapters)


@torch.no_grad()
def _generated_rows(model, tokenizer, rows: list[Example], adapters, max_new_tokens) -> list[bool]:
    """Greedy exact match of each row; rows are adapter-major when ``adapters`` is a batch."""
    n = 1 if adapters is None else len(adapters)
    per = len(rows) // n
    budgets = [
        b
        for a in range(n)
        for b in _budgets(tokenizer, rows[a * per : (a + 1) * per], max_new_tokens)
    ]
    tokenizer.padding_side = "left"  # generation continues from the last real token
    batch = tokenizer([e.prompt for e in rows], return_tensors="pt", padding=True)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with _in_context(model, adapters):
        gen = model.generate(
            **batch,
            max_new_tokens=max(budgets),
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new = gen[:, batch["input_ids"].shape[1] :].tolist()
    # Greedy decoding is causal: a row's first b tokens are those a budget of b would give.
    texts = tokenizer.batch_decode([t[:b] for t, b in zip(new, budgets)], skip_special_tokens=True)
    return [_normalise(t) == _normalise(e.answer) for t, e in zip(texts, rows)]


@torch.no_grad()
def _fast_rows(model, tokenizer, rows: list[Example], adapters, max_new_tokens) -> list[bool]:
    """``score_fast``'s booleans of each row under its adapter (``max_new_tokens``: unused)."""
    batch = collate(encode(tokenizer, rows), tokenizer.pad_token_id)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if adapters is None:
        logits = model(**inputs).logits
    else:
        from llgbm_flora import functional_forward

        logits = functional_forward(model, adapters, **inputs).logits  # [rows, width, vocab]
    pred = logits[:, :-1].argmax(-1)  # [rows, width-1]
    target = batch["labels"][:, 1:]  # [rows, width-1]
    return ((pred == target) | (target == IGNORE)).all(-1).tolist()
