"""Exact-match scoring: greedy decoding of each prompt, compared with the answer.

``score`` decodes with ``generate`` (the definition). ``score_fast`` gets the same booleans from
one teacher-forced forward pass: greedy decoding yields exactly ``answer + EOS`` iff at every
answer position the arg-max is the next answer token. It is used where the tokenizer spells each
answer one way only (the tiny world's word-level tokenizer), and is checked against ``score``.
``bootstrap_ci`` gives an accuracy's 95% interval over items.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from llgbm_worlds.data import IGNORE, collate, encode
from llgbm_worlds.families import Example


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
    batch_size: int = 64,
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
