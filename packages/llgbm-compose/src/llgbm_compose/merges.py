"""Merges of LoRA adapters in delta-W space, refactored to a LoRA rank by SVD.

    from llgbm_compose import merges
    m = merges.average([a, b])                          # mean of dW, then the best rank-r fit
    m = merges.task_arithmetic([a, b, c], [1, 1, -0.5]) # add, subtract, scale task vectors
    m = merges.ties([a, b], density=0.2)                # trim, elect sign, disjoint mean
    m = merges.dare([a, b], drop=0.5, seed=0)           # drop and rescale, then average
    m.adapter, m.error, m.relative_error                # LoraAdapter; what the rank cut lost
    m.save("out/merged")                                # PEFT dir (+ merge.json) PeftModel loads

A LoRA's task vector is its update dW = s·B·A per (layer, module); every merge works on dW, never
on A and B apart (B·A = (B M)(M⁻¹ A) for any invertible M, so factor averages mean nothing).
Average and task arithmetic are exact sums of factors (llgbm_flora.algebra) until the final
refactoring; TIES and DARE are element-wise, so they are computed on dense dW one key at a time.
TIES trims per tensor (each key's top `density` share of entries by magnitude, as mergekit does)
rather than over the flattened model, which keeps memory to one key's [n, out, in] at a time.

`rank` of the result: None (default) is the largest input rank, "exact" keeps every singular
value (rank min(sum r_i, in, out), padded to one rank for all keys). The error reported is the
Frobenius norm of what the truncation dropped, sqrt(sum of dropped singular values squared).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from llgbm_flora import LoraAdapter, LoraBatch, LoraError, algebra, load_adapter, save_adapter
from torch import Tensor

from llgbm_compose.errors import ComposeError

METHODS = ("average", "task_arithmetic", "ties", "dare")
MERGE_FILE = "merge.json"

AdapterLike = LoraAdapter | str | os.PathLike
Rank = int | Literal["exact"] | None


@dataclass
class Merge:
    """A merged adapter and how it was made."""

    adapter: LoraAdapter  # the result at `rank`, scale 1
    method: str  # one of METHODS
    params: dict[str, Any]  # the method's parameters (weights, density, drop, seed, ...)
    n_inputs: int  # adapters merged
    error: float  # ||dW - dW_rank||_F over all keys: the dropped singular values
    relative_error: float  # error / ||dW||_F
    sources: list[str] = field(default_factory=list)  # input paths or labels

    @property
    def rank(self) -> int:
        return self.adapter.spec.rank

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": self.params,
            "n_inputs": self.n_inputs,
            "rank": self.rank,
            "refactor_error": self.error,
            "refactor_relative_error": self.relative_error,
            "sources": self.sources,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """A PEFT adapter directory, plus ``merge.json`` saying how it was made."""
        from llgbm_worlds.io import write_json_atomic

        out = save_adapter(self.adapter, path)
        write_json_atomic(out / MERGE_FILE, self.summary())
        return out


def load_inputs(adapters: Sequence[AdapterLike] | LoraBatch) -> tuple[list[LoraAdapter], list[str]]:
    """LoraAdapters (PEFT dirs are loaded) and a label for each; one structure or one line."""
    if isinstance(adapters, LoraBatch):
        items = [adapters[i] for i in range(len(adapters))]
        labels = [f"adapter[{i}]" for i in range(len(items))]
    else:
        items, labels = [], []
        for i, a in enumerate(adapters):
            if isinstance(a, LoraAdapter):
                items.append(a)
                labels.append(f"adapter[{i}]")
            else:
                items.append(load_adapter(a))
                labels.append(str(a))
    if not items:
        raise ComposeError("merge: no adapters given")
    try:
        algebra.check_same_structure([a.spec for a in items], "merge")
    except LoraError as e:
        raise ComposeError(str(e)) from None
    return items, labels  # type: ignore[return-value]


def _target_rank(items: list[LoraAdapter], rank: Rank) -> int | None:
    if rank == "exact":
        return None
    if rank is None:
        return max(a.spec.rank for a in items)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ComposeError(f"merge rank: must be a positive int, 'exact' or None, got {rank!r}")
    return rank


def _finish(refactored, method, params, items, labels) -> Merge:
    return Merge(
        adapter=refactored.adapter,
        method=method,
        params=params,
        n_inputs=len(items),
        error=refactored.total_error(),
        relative_error=refactored.relative_error(),
        sources=labels,
    )


def task_arithmetic(
    adapters: Sequence[AdapterLike] | LoraBatch, weights: Sequence[float], *, rank: Rank = None
) -> Merge:
    """sum_i w_i dW_i (negative weights subtract, one weight scales), refactored to `rank`."""
    items, labels = load_inputs(adapters)
    weights = [float(w) for w in weights]
    if len(weights) != len(items):
        raise ComposeError(f"task_arithmetic: {len(weights)} weights for {len(items)} adapters")
    exact = algebra.weighted_sum(items, weights)
    out = algebra.refactor(exact, _target_rank(items, rank))
    return _finish(out, "task_arithmetic", {"weights": weights}, items, labels)


def average(adapters: Sequence[AdapterLike] | LoraBatch, *, rank: Rank = None) -> Merge:
    """(1/n) sum_i dW_i, refactored to `rank`."""
    items, labels = load_inputs(adapters)
    out = algebra.refactor(algebra.mean(items), _target_rank(items, rank))
    return _finish(out, "average", {}, items, labels)


def _stack(items: list[LoraAdapter], key) -> Tensor:
    """Dense dW of one key for every input, widened to at least float32: [n, out, in]."""
    dws = [algebra.delta_weight(a, key) for a in items]
    dtype = torch.promote_types(dws[0].dtype, torch.float32)
    return torch.stack([d.to(dtype) for d in dws])


def ties_dense(task_vectors: Tensor, density: float, lam: float = 1.0) -> Tensor:
    """TIES on stacked task vectors [n, ...]: trim, elect sign, disjoint mean -> [...].

    Trim: keep each vector's ceil(density * numel) largest-magnitude entries (others 0). Elect:
    the sign of the sum of trimmed values (the sign with more total mass). Disjoint mean: per
    entry, the mean of the trimmed values whose sign agrees with the elected one (0 if none).
    """
    n = task_vectors.shape[0]
    flat = task_vectors.reshape(n, -1)  # [n, P]
    keep = max(1, math.ceil(density * flat.shape[1]))
    idx = flat.abs().topk(keep, dim=1).indices  # [n, keep]
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    trimmed = flat * mask  # [n, P]
    elected = torch.sign(trimmed.sum(0))  # [P]
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)  # [n, P]
    count = agree.sum(0).clamp_min(1)  # [P]
    merged = (trimmed * agree).sum(0) / count  # [P]
    return (lam * merged).reshape(task_vectors.shape[1:])


def ties(
    adapters: Sequence[AdapterLike] | LoraBatch,
    *,
    density: float = 0.2,
    lam: float = 1.0,
    rank: Rank = None,
) -> Merge:
    """TIES-merging (Yadav et al. 2023) of dW per key (see `ties_dense`), refactored to `rank`."""
    if not 0 < density <= 1:
        raise ComposeError(f"ties density: must be in (0, 1], got {density}")
    items, labels = load_inputs(adapters)
    spec = items[0].spec
    dense = {k: ties_dense(_stack(items, k), density, lam) for k in spec.keys()}  # noqa: SIM118
    out = algebra.factor(spec, dense, _target_rank(items, rank))
    return _finish(out, "ties", {"density": density, "lam": lam}, items, labels)


def dare_dense(task_vector: Tensor, drop: float, generator: torch.Generator) -> Tensor:
    """DARE on one task vector: each entry dropped with probability `drop`, survivors scaled by
    1 / (1 - drop), so the expectation is the input."""
    if drop == 0:
        return task_vector.clone()
    keep = torch.rand(task_vector.shape, generator=generator, dtype=torch.float64) >= drop
    return task_vector * keep.to(task_vector.dtype) / (1.0 - drop)


def dare(
    adapters: Sequence[AdapterLike] | LoraBatch,
    *,
    drop: float = 0.5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    rank: Rank = None,
) -> Merge:
    """DARE (Yu et al. 2023): independent seeded drop-and-rescale masks per adapter and key, then
    sum_i w_i dW~_i (default w_i = 1/n, an average whose expectation is `average`'s input)."""
    if not 0 <= drop < 1:
        raise ComposeError(f"dare drop: must be in [0, 1), got {drop}")
    items, labels = load_inputs(adapters)
    w = [1.0 / len(items)] * len(items) if weights is None else [float(x) for x in weights]
    if len(w) != len(items):
        raise ComposeError(f"dare: {len(w)} weights for {len(items)} adapters")
    spec = items[0].spec
    g = torch.Generator().manual_seed(seed)
    dense = {}
    for key in spec.keys():  # noqa: SIM118 (LoraSpec.keys)
        stack = _stack(items, key)  # [n, out, in]
        dense[key] = sum(wi * dare_dense(stack[i], drop, g) for i, wi in enumerate(w))
    out = algebra.factor(spec, dense, _target_rank(items, rank))
    return _finish(out, "dare", {"drop": drop, "seed": seed, "weights": w}, items, labels)


def merge(method: str, adapters: Sequence[AdapterLike] | LoraBatch, **params: Any) -> Merge:
    """Dispatch by name: "average", "task_arithmetic" (needs weights=), "ties", "dare"."""
    if method == "average":
        return average(adapters, **params)
    if method == "task_arithmetic":
        if "weights" not in params:
            raise ComposeError("task_arithmetic needs weights=[...], one per adapter")
        weights = params.pop("weights")
        return task_arithmetic(adapters, weights, **params)
    if method == "ties":
        return ties(adapters, **params)
    if method == "dare":
        return dare(adapters, **params)
    raise ComposeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
