"""Training losses, each returned with the value a trivial prediction would get.

    weight_loss(pred, target, tokenizer=tok)               # MSE on DnD's normalised weight tokens
    weight_loss(pred, target, space="delta_w")             # MSE of s * B @ A, never materialised
    weight_loss(pred, target, space="delta_w_rel")         # the same, relative to ||s B' A'||^2
    delta_loss(pred_delta, teacher_delta, kind="cosine")   # on Delta Activations [n, hidden]
    behaviour_delta_loss(out.hidden, target, rows, scale)  # per-position, per-layer deltas
    kl_loss(out.logits, target, rows)                      # KL(teacher || generated) per position

`LossOut.baseline` is the same loss for the zero LoRA (weights), the zero delta (mse) or a
prediction at cosine 0 (cosine), so a log line can say "0.012 (baseline 1.31)": a loss that never
gets below its baseline has learnt nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from llgbm_flora import LoraBatch, algebra
from torch import Tensor

from llgbm_train.weight_tokens import WeightTokenizer

WEIGHT_SPACES = ("token", "delta_w", "delta_w_rel")
DELTA_KINDS = ("mse", "cosine", "combined")


class LossError(ValueError):
    """Loss inputs that do not fit together."""


class LossOut(NamedTuple):
    value: Tensor  # scalar, differentiable
    baseline: float  # the same loss for the trivial prediction


def _check_same_keys(pred: LoraBatch, target: LoraBatch) -> None:
    if set(pred.A) != set(target.A) or set(pred.B) != set(target.B):
        raise LossError("weight_loss: pred and target cover different (layer, module) keys")
    if len(pred) != len(target):
        raise LossError(f"weight_loss: {len(pred)} predicted adapters vs {len(target)} targets")


def _token_loss(
    pred: LoraBatch, target: LoraBatch, tokenizer: WeightTokenizer, token_weights: Tensor | None
) -> LossOut:
    p = tokenizer.encode(pred)  # [n, n_tokens, r, w]
    with torch.no_grad():
        t = tokenizer.encode(target)  # [n, n_tokens, r, w]
        zero = -tokenizer.mean / tokenizer.std  # [n_tokens]: where the zero LoRA lands
    valid = tokenizer.valid[None, :, None, :].to(p.dtype)  # [1, n_tokens, 1, w]
    weights = valid.expand_as(p)
    if token_weights is not None:
        if token_weights.shape != (tokenizer.n_tokens,):
            raise LossError(
                f"weight_loss token_weights: shape {list(token_weights.shape)}, "
                f"expected [{tokenizer.n_tokens}]"
            )
        weights = weights * token_weights.to(p)[None, :, None, None]
    denom = weights.sum().clamp_min(1e-12)
    value = (((p - t) ** 2) * weights).sum() / denom
    with torch.no_grad():
        base = (((zero[None, :, None, None] - t) ** 2) * weights).sum() / denom
    return LossOut(value, float(base))


def _delta_w_sq(pred: LoraBatch, target: LoraBatch) -> tuple[Tensor, Tensor, int]:
    """Per adapter: ||s B A - s' B' A'||^2 and ||s' B' A'||^2 summed over keys, and the element
    count of one adapter's dense updates. -> [n], [n] (no grad), int.

    ||X - Y||^2 = <X,X> - 2<X,Y> + <Y,Y>, each a trace of small r x r products, so no [out, in]
    matrix is built. Computed in float32 and clamped at 0 against rounding.
    """
    pp = algebra.inner(pred, pred)  # [n, n_keys]
    pt = algebra.inner(pred, target)
    with torch.no_grad():
        tt = algebra.inner(target, target)
    sq = (pp - 2 * pt + tt).clamp_min(0.0).sum(1)  # [n]
    base = tt.sum(1)
    numel = sum(target.A[k].shape[2] * target.B[k].shape[1] for k in target.spec.keys())  # noqa: SIM118
    return sq, base, numel


def _delta_w_loss(pred: LoraBatch, target: LoraBatch) -> LossOut:
    """Mean over adapters and elements of (s B A - s B' A')^2."""
    sq, base, numel = _delta_w_sq(pred, target)
    denom = len(target) * numel
    return LossOut(sq.sum() / denom, float(base.sum()) / denom)


def _delta_w_rel_loss(pred: LoraBatch, target: LoraBatch) -> LossOut:
    """Mean over adapters of ||s B A - s B' A'||^2 / ||s B' A'||^2 (all keys): baseline 1."""
    sq, base, _ = _delta_w_sq(pred, target)
    return LossOut((sq / base.clamp_min(1e-20)).mean(), 1.0)


def weight_loss(
    pred: LoraBatch,
    target: LoraBatch,
    *,
    tokenizer: WeightTokenizer | None = None,
    space: str = "token",
    token_weights: Tensor | None = None,
) -> LossOut:
    """Distance of generated adapters `pred` from teacher adapters `target` (both n adapters).

    space="token": mean squared error of the tokenizer's normalised tokens over real (unpadded)
      entries, optionally weighted per token by `token_weights` [n_tokens] (DnD weights tokens by
      how much they vary across checkpoints). Needs `tokenizer`. Baseline: the zero LoRA.
    space="delta_w": mean squared error of the dense updates s * B @ A per element (averaged over
      adapters and over all [out, in] entries of all keys), computed without building them.
      Baseline: the zero LoRA, i.e. mean of (s B' A')^2.
    space="delta_w_rel": per adapter, the squared error of the dense updates summed over keys
      divided by the teacher's squared norm, averaged over adapters: scale-free, baseline 1.
    Both delta-W spaces are blind to the LoRA gauge (B M, M^-1 A give the same loss).
    """
    if space not in WEIGHT_SPACES:
        raise LossError(f"weight_loss space: {space!r} is not one of {', '.join(WEIGHT_SPACES)}")
    _check_same_keys(pred, target)
    if space == "token":
        if tokenizer is None:
            raise LossError("weight_loss: space='token' needs a fitted WeightTokenizer")
        return _token_loss(pred, target, tokenizer, token_weights)
    if token_weights is not None:
        raise LossError("weight_loss: token_weights only apply to space='token'")
    if space == "delta_w_rel":
        return _delta_w_rel_loss(pred, target)
    return _delta_w_loss(pred, target)


def delta_loss(pred: Tensor, target: Tensor, *, kind: str, cos_weight: float = 0.5) -> LossOut:
    """Distance of generated deltas `pred` [n, hidden] from teacher deltas `target` [n, hidden].

    mse:      mean over n and hidden of (pred - target)^2; baseline mean(target^2) (zero delta).
    cosine:   mean over n of 1 - cos(pred, target); baseline 1 (cosine 0).
    combined: mse + cos_weight * cosine; baseline mean(target^2) + cos_weight.
    """
    if kind not in DELTA_KINDS:
        raise LossError(f"delta_loss kind: {kind!r} is not one of {', '.join(DELTA_KINDS)}")
    if pred.shape != target.shape or pred.dim() != 2:
        raise LossError(
            f"delta_loss: pred {list(pred.shape)} and target {list(target.shape)} must both be "
            "[n, hidden]"
        )
    pred = pred.float()
    target = target.float().to(pred.device)
    mse = ((pred - target) ** 2).mean()
    mse_base = float((target**2).mean())
    if kind == "mse":
        return LossOut(mse, mse_base)
    cos = 1.0 - torch.nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-8).mean()
    if kind == "cosine":
        return LossOut(cos, 1.0)
    return LossOut(mse + cos_weight * cos, mse_base + cos_weight)


def behaviour_delta_loss(
    hidden: Tensor,
    base_hidden: Tensor,
    target_delta: Tensor,
    mask: Tensor,
    scale: Tensor,
    *,
    kind: str,
    cos_weight: float = 0.5,
) -> LossOut:
    """`delta_loss` over every selected (row, position, layer) of behaviour targets.

    hidden, base_hidden, target_delta: [R, K, L, H] (generated states, the base's on the same
    sequences, the teacher's delta); mask [R, K] bool (real positions); scale [L] (each layer's
    deltas are divided by it, so layers of different magnitude weigh alike). Each selected
    (position, layer) is one row of `delta_loss`; baselines as there (zero delta, cosine 0).
    """
    if hidden.shape != target_delta.shape or hidden.shape != base_hidden.shape:
        raise LossError(
            f"behaviour_delta_loss: hidden {list(hidden.shape)}, base {list(base_hidden.shape)} "
            f"and target {list(target_delta.shape)} differ"
        )
    s = scale.to(hidden)[None, None, :, None]  # [1, 1, L, 1]
    pred = ((hidden.float() - base_hidden.float()) / s)[mask]  # [N, L, H]
    tgt = (target_delta.float() / s)[mask]  # [N, L, H]
    return delta_loss(pred.flatten(0, 1), tgt.flatten(0, 1), kind=kind, cos_weight=cos_weight)


def kl_loss(
    logits: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    top_ids: Tensor | None = None,
    base_kl: Tensor | None = None,
) -> LossOut:
    """Mean forward KL(teacher || generated) over the selected positions, in nats.

    logits [R, K, V] of the generated adapter; teacher_logprobs [R, K, V] (or [R, K, k] with
    top_ids [R, K, k]: see llgbm_delta.behaviour.kl_to_teacher); mask [R, K] bool. Baseline: the
    mean of `base_kl` [R, K] (the base model's KL, i.e. the zero LoRA's), when given.
    """
    from llgbm_delta.behaviour import kl_to_teacher

    if not bool(mask.any()):
        raise LossError("kl_loss: no position is selected")
    ids = None if top_ids is None else top_ids[mask]
    kl = kl_to_teacher(logits[mask], teacher_logprobs[mask], ids)  # [N]
    base = float(base_kl[mask].mean()) if base_kl is not None else float("nan")
    return LossOut(kl.mean(), base)
