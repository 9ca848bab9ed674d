"""Turn examples into padded token batches with response-only labels.

The prompt is tokenized on its own and the answer appended (``" " + answer`` plus EOS), so the
prompt tokens a model sees in training are exactly those it sees when asked to answer. Prompt and
padding positions get label -100: the loss is on the response only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llgbm_worlds.families import Example

IGNORE = -100


def encode(tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + answer + EOS and the prompt length, per example."""
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    answers = tokenizer([" " + e.answer for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(list(p) + list(a) + [eos], len(p)) for p, a in zip(prompts, answers)]


def collate(encoded: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and response-only ``labels``."""
    width = max(len(ids) for ids, _ in encoded)
    n = len(encoded)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)  # [n, width]
    attention = torch.zeros((n, width), dtype=torch.long)  # [n, width]
    labels = torch.full((n, width), IGNORE, dtype=torch.long)  # [n, width]
    for i, (ids, n_prompt) in enumerate(encoded):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = t
        attention[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = t[n_prompt:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
