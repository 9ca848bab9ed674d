"""Turn examples into padded token batches with response-only labels, and the loss on them.

The prompt is tokenized on its own and the answer appended (``" " + answer`` plus EOS), so the
prompt tokens a model sees in training are exactly those it sees when asked to answer. Prompt and
padding positions get label -100: the loss is on the response only. :func:`response_loss` is
that loss for the tiny base's pretraining and for every teacher of a zoo (one mean per adapter).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from llgbm_worlds.families import Example

IGNORE = -100


def encode(tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + answer + EOS and the prompt length, per example."""
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    answers = tokenizer([" " + e.answer for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [(list(p) + list(a) + [eos], len(p)) for p, a in zip(prompts, answers)]


def collate(
    encoded: Sequence[tuple[list[int], int]], pad_id: int, width: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and response-only ``labels``.

    ``width``: columns of the batch (default: its longest row).
    """
    lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)  # [n]
    prompt = np.array([n_prompt for _, n_prompt in encoded], dtype=np.int64)  # [n]
    width = int(lengths.max()) if width is None else width
    pos = np.arange(width)[None, :]  # [1, width]
    real = pos < lengths[:, None]  # [n, width]
    input_ids = np.full(real.shape, pad_id, dtype=np.int64)  # [n, width]
    # Row-major order of the True cells of `real` is the order of the concatenated rows.
    input_ids[real] = np.fromiter(chain.from_iterable(i for i, _ in encoded), np.int64)
    labels = np.where(real & (pos >= prompt[:, None]), input_ids, IGNORE)  # [n, width]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(real.astype(np.int64)),
        "labels": torch.from_numpy(labels),
    }


def hidden_states(model, lora, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [N, T, H] of right-padded rows, under per-row LoRAs (or none).

    ``lora``: None, or an ``llgbm_flora`` LoraBatch (adapter-major rows). Right padding and causal
    attention: a real token never reads a pad, so no mask is needed, and llgbm-flora's fused
    Llama-family forward serves when it supports the model (packing the rows, so no work is
    spent on padding, when every adapter's rows have the same lengths, e.g. with no adapter).
    Gradients reach the adapter and, where they require it, the model's weights.
    """
    from llgbm_flora import functional_forward
    from llgbm_flora.fused import fused_hidden_states, fused_unsupported

    if fused_unsupported(model, input_ids.shape[1]) is None:
        return fused_hidden_states(model, lora, input_ids, lengths=lengths)
    mask = (torch.arange(input_ids.shape[1], device=lengths.device) < lengths[:, None]).long()
    if lora is None:
        return model.base_model(input_ids=input_ids, attention_mask=mask)[0]
    return functional_forward(model.base_model, lora, input_ids=input_ids, attention_mask=mask)[0]


def response_loss(model, hidden: torch.Tensor, labels: torch.Tensor, groups: int = 1):
    """Mean next-token loss on the response tokens of each of ``groups`` equal row groups. -> [groups]

    hidden: [N, T, H] final-norm states; labels: [N, T] (IGNORE off the response). Logits are
    computed at response positions only; the mean of a group is over its response tokens, as
    HF's ``model(**batch).loss`` takes it over one batch.
    """
    target = labels[:, 1:]  # [N, T-1]: token t+1 is predicted at position t
    sel = target != IGNORE  # [N, T-1]
    logits = model.get_output_embeddings()(hidden[:, :-1][sel])  # [M, V]
    ce = F.cross_entropy(logits.float(), target[sel], reduction="none")  # [M]
    if groups == 1:
        return ce.mean().unsqueeze(0)
    rows = labels.shape[0] // groups
    owner = torch.arange(groups, device=ce.device).repeat_interleave(rows)  # [N]
    owner = owner.unsqueeze(1).expand_as(sel)[sel]  # [M]
    total = torch.zeros(groups, device=ce.device).index_add_(0, owner, ce)  # [groups]
    count = torch.zeros(groups, device=ce.device).index_add_(0, owner, torch.ones_like(ce))
    return total / count
