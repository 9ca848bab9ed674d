"""Adapter arithmetic in delta-W space: the dense update `dW = scale * B @ A` of each key is what an
adapter computes, so sums, means, norms and merges are defined on it, never on A and B apart
(`B A = (B M)(M^-1 A)` for any invertible M: averaging factors averages a gauge, not behaviour).

    from llgbm_flora import algebra as alg
    merged = alg.weighted_sum([a, b], [0.5, 0.5])     # exact: factors stacked, rank r_a + r_b
    merged = alg.mean(teachers)                       # LoraBatch -> its delta-W mean, exact
    small = alg.refactor(merged, rank=8)              # best rank-8 fit (Eckart-Young), by SVD
    small.adapter, small.dropped[key]                 # the adapter; singular values it dropped
    alg.sq_norms(batch)                               # [n, n_keys] ||dW||_F^2, no B @ A formed
    alg.inner(x, y)                                   # [n, n_keys] <dW_x, dW_y>_F, row-paired
    alg.gram(batch)                                   # [n, n] sum over keys of <dW_i, dW_j>_F
    alg.take(batch, [0, 0, 3]); alg.concat([b1, b2])  # rows (repeats allowed); stacking

Exact sums keep every factor: the sum of n rank-r adapters is one adapter of rank n r with scale 1
(alpha = rank), `B = [w_1 s_1 B_1, ...]`, `A = [A_1; ...]`. `refactor` then reduces the rank from
the factors alone (QR of B and A^T, SVD of the small core), so no [out, in] matrix is built; only
`delta_weight(s)` and `factor` (for element-wise merges such as TIES/DARE, done by the caller on
dense matrices) touch dense updates. Refactoring computes in float64 and returns the input dtype.
Inputs must share a structure (target modules, layers, in/out shapes, and base model when both
name one); rank and scale may differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import LoraError
from .spec import LoraAdapter, LoraBatch, LoraKey, LoraSpec

__all__ = [
    "Refactored",
    "check_same_structure",
    "concat",
    "delta_weight",
    "delta_weights",
    "factor",
    "gram",
    "inner",
    "mean",
    "refactor",
    "sq_norms",
    "take",
    "weighted_sum",
]

Lora = LoraAdapter | LoraBatch


@dataclass
class Refactored:
    """An adapter refactored to one rank, and what the truncation dropped."""

    adapter: LoraAdapter
    dropped: dict[LoraKey, Tensor]  # singular values of dW left out, per key, descending [m]
    norms: dict[LoraKey, float]  # ||dW||_F of the update before truncation, per key

    def error(self, key: LoraKey) -> float:
        """||dW - dW_rank||_F of one key: the root sum of squares of the dropped values."""
        return float(self.dropped[key].double().pow(2).sum().sqrt())

    def total_error(self) -> float:
        """Frobenius error over all keys together: sqrt(sum of every dropped value squared)."""
        return math.sqrt(sum(self.error(k) ** 2 for k in self.dropped))

    def relative_error(self) -> float:
        """total_error / ||dW||_F over all keys (0 for a zero update)."""
        total = math.sqrt(sum(v**2 for v in self.norms.values()))
        return self.total_error() / total if total > 0 else 0.0


def _plain(spec: LoraSpec, where: str) -> LoraSpec:
    """`spec`, if its update is `scale * B @ A` with one rank and scale for every key.

    DoRA's update depends on the base weight (the magnitude rescales W + dW row by row), and
    per-key ranks/alphas do not fit one output rank; both are refused rather than mis-added.
    """
    if spec.use_dora:
        raise LoraError(
            f"{where}: DoRA adapters have no base-free delta-W (the magnitude rescales W + dW); "
            "adapter algebra takes plain LoRA"
        )
    if not spec.uniform:
        raise LoraError(
            f"{where}: adapters with rank_pattern/alpha_pattern are not supported by adapter "
            "algebra; refactor each key to one rank first"
        )
    return spec


def _structure(spec: LoraSpec) -> tuple:
    return (spec.target_modules, spec.layers, spec.shapes)


def check_same_structure(specs: Sequence[LoraSpec], where: str) -> LoraSpec:
    """The first spec, after checking that all cover the same keys and shapes and base model.

    Rank and scale may differ (sums stack factors). A base_model of "" means unknown and matches
    any; two different non-empty names raise, as do different modules, layers or shapes.
    """
    if not specs:
        raise LoraError(f"{where}: no adapters given")
    for spec in specs:
        _plain(spec, where)
    first = specs[0]
    bases = {s.base_model for s in specs if s.base_model}
    if len(bases) > 1:
        raise LoraError(
            f"{where}: adapters are for different base models ({', '.join(sorted(bases))}); "
            "combine adapters of one base"
        )
    for j, s in enumerate(specs[1:], start=1):
        if _structure(s) != _structure(first):
            what = (
                "target modules"
                if s.target_modules != first.target_modules
                else "layers"
                if s.layers != first.layers
                else "module shapes"
            )
            raise LoraError(
                f"{where}: adapter {j} has different {what} than adapter 0 "
                f"({_describe(s, what)} vs {_describe(first, what)}); combine adapters of one "
                "structure"
            )
    return first


def _describe(spec: LoraSpec, what: str) -> str:
    if what == "target modules":
        return ",".join(spec.target_modules)
    if what == "layers":
        return ",".join(map(str, spec.layers))
    return ",".join(f"{m}[{i}->{o}]" for m, i, o in spec.shapes)


def _unit_spec(spec: LoraSpec, rank: int) -> LoraSpec:
    """`spec` at `rank` with scale 1 (alpha = rank, no rsLoRA): the factors carry the update."""
    return spec.replace(rank=rank, alpha=float(rank), use_rslora=False)


def _as_adapters(x: Lora | Sequence[LoraAdapter]) -> list[LoraAdapter]:
    if isinstance(x, LoraAdapter):
        return [x]
    if isinstance(x, LoraBatch):
        return [x[i] for i in range(len(x))]  # type: ignore[misc]
    return list(x)


def delta_weight(x: Lora, key: LoraKey) -> Tensor:
    """The dense update `scale * B @ A` of one key: [out, in] (adapter) or [n, out, in] (batch)."""
    return _plain(x.spec, "delta_weight").scale * (x.B[key] @ x.A[key])


def delta_weights(x: Lora) -> dict[LoraKey, Tensor]:
    """`delta_weight` of every key, in `spec.keys()` order."""
    return {k: delta_weight(x, k) for k in x.spec.keys()}  # noqa: SIM118 (LoraSpec.keys)


def weighted_sum(
    adapters: Lora | Sequence[LoraAdapter], weights: Sequence[float] | Tensor
) -> LoraAdapter:
    """sum_i w_i dW_i as one adapter, exactly (rank sum r_i, scale 1; see module doc).

    Weights may be negative (task arithmetic subtracts) and are differentiable when a tensor.
    """
    items = _as_adapters(adapters)
    spec = check_same_structure([a.spec for a in items], "weighted_sum")
    if len(weights) != len(items):
        raise LoraError(f"weighted_sum: {len(weights)} weights for {len(items)} adapters")
    rank = sum(a.spec.rank for a in items)
    A, B = {}, {}
    for key in spec.keys():  # noqa: SIM118 (LoraSpec.keys)
        A[key] = torch.cat([a.A[key] for a in items], dim=0)  # [sum r, in]
        B[key] = torch.cat(
            [(w * a.spec.scale) * a.B[key] for a, w in zip(items, weights)], dim=1
        )  # [out, sum r]
    return LoraAdapter(_unit_spec(spec, rank), A, B)


def mean(adapters: Lora | Sequence[LoraAdapter]) -> LoraAdapter:
    """The delta-W mean (1/n) sum_i dW_i, exactly (rank sum r_i; `refactor` to shrink it)."""
    items = _as_adapters(adapters)
    if not items:
        raise LoraError("mean: no adapters given")
    return weighted_sum(items, [1.0 / len(items)] * len(items))


def _factor_svd(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split the top `rank` singular triplets evenly into (B [out, rank], A [rank, in]), padding
    with zeros where fewer exist; returns the dropped singular values too."""
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    b = u[:, :k] * root  # [out, k]
    a = root[:, None] * vh[:k]  # [k, in]
    if k < rank:
        b = torch.nn.functional.pad(b, (0, rank - k))
        a = torch.nn.functional.pad(a, (0, 0, 0, rank - k))
    return b, a, s[k:]


def _lowrank_svd(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of b @ a from its factors b [out, R], a [R, in]: (u [out, m], s [m], vh [m, in])."""
    qb, rb = torch.linalg.qr(b)  # [out, m1], [m1, R]
    qa, ra = torch.linalg.qr(a.T)  # [in, m2], [m2, R]
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core [m1, m2]
    return qb @ u, s, vh @ qa.T


def _exact_rank(shapes: list[tuple[int, ...]]) -> int:
    """The smallest rank that is exact for every key: max over keys of min(dims)."""
    return max(min(s) for s in shapes)


def refactor(adapter: LoraAdapter, rank: int | None = None) -> Refactored:
    """The best rank-`rank` adapter for each key's dW (truncated SVD), and what it dropped.

    `rank=None`: exact, at the smallest rank that loses nothing for any key. Keys with fewer
    singular values than `rank` are zero-padded (one LoraSpec has one rank). Scale 1 on output.
    """
    spec = adapter.spec
    if rank is None:
        rank = _exact_rank(
            [(spec.rank, *adapter.A[k].shape[1:], adapter.B[k].shape[0]) for k in adapter.A]
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"refactor: rank must be a positive int, got {rank!r}")
    A, B, dropped, norms = {}, {}, {}, {}
    for key in spec.keys():  # noqa: SIM118 (LoraSpec.keys)
        a, b = adapter.A[key], adapter.B[key]  # [R, in], [out, R]
        u, s, vh = _lowrank_svd(_plain(spec, "refactor").scale * b.double(), a.double())
        bk, ak, rest = _factor_svd(u, s, vh, rank)
        A[key], B[key] = ak.to(a.dtype), bk.to(b.dtype)
        dropped[key] = rest.to(a.dtype)
        norms[key] = float(s.pow(2).sum().sqrt())
    return Refactored(LoraAdapter(_unit_spec(spec, rank), A, B), dropped, norms)


def factor(spec: LoraSpec, dense: dict[LoraKey, Tensor], rank: int | None = None) -> Refactored:
    """A rank-`rank` adapter of `spec`'s structure for dense updates `dense[key]` [out, in].

    For merges computed element-wise on dW (TIES, DARE). `rank=None`: exact (min(in, out)).
    """
    missing = [k for k in spec.keys() if k not in dense]  # noqa: SIM118 (LoraSpec.keys)
    extra = [k for k in dense if k not in set(spec.keys())]
    if missing or extra:
        from .errors import LoraKeyMismatchError

        raise LoraKeyMismatchError("factor", missing=missing, extra=extra)
    if rank is None:
        rank = _exact_rank([tuple(d.shape) for d in dense.values()])
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"factor: rank must be a positive int, got {rank!r}")
    A, B, dropped, norms = {}, {}, {}, {}
    for key in spec.keys():  # noqa: SIM118 (LoraSpec.keys)
        d = dense[key]
        i, o = spec.in_out(key[1]) if spec.shapes else (d.shape[1], d.shape[0])
        if tuple(d.shape) != (o, i):
            raise LoraError(f"factor: dW of {key} is {list(d.shape)}, expected [{o}, {i}]")
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        bk, ak, rest = _factor_svd(u, s, vh, rank)
        A[key], B[key] = ak.to(d.dtype), bk.to(d.dtype)
        dropped[key] = rest.to(d.dtype)
        norms[key] = float(s.pow(2).sum().sqrt())
    return Refactored(LoraAdapter(_unit_spec(spec, rank), A, B), dropped, norms)


def _rows(x: Lora) -> tuple[dict, dict, bool]:
    """A and B of every key with a leading row axis; whether x was a single adapter."""
    if isinstance(x, LoraAdapter):
        return (
            {k: v.unsqueeze(0) for k, v in x.A.items()},
            {k: v.unsqueeze(0) for k, v in x.B.items()},
            True,
        )
    return x.A, x.B, False


def _wide(t: Tensor) -> Tensor:
    """Half precision is widened to float32 for Gram products (sums of many small terms)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def inner(x: Lora, y: Lora) -> Tensor:
    """<dW_x, dW_y>_F per row and key: [n, n_keys] (batches of n) or [n_keys] (adapters).

    From two r x r products, tr(B_x^T B_y A_y A_x^T), never forming [out, in]. Differentiable.
    """
    check_same_structure([x.spec, y.spec], "inner")
    ax, bx, single_x = _rows(x)
    ay, by, single_y = _rows(y)
    nx, ny = next(iter(ax.values())).shape[0], next(iter(ay.values())).shape[0]
    if nx != ny:
        raise LoraError(f"inner: {nx} adapters vs {ny}; rows are paired, give equal counts")
    keys = x.spec.keys()
    cols, order = [], []
    # Keys whose four factors share shapes (a module across layers) go through one batched
    # product: ~7 groups instead of one einsum pair per key (210 on a 30-layer model), which
    # is what bounds a training step's launch overhead on a GPU.
    for idx in _shape_groups(keys, ax, bx, ay, by):
        group = [keys[j] for j in idx]
        a_x, b_x = _stacked(ax, group), _stacked(bx, group)  # [n, G, r, in], [n, G, out, r]
        a_y, b_y = (
            (a_x, b_x) if ay is ax and by is bx else (_stacked(ay, group), _stacked(by, group))
        )
        gb = torch.einsum("ngor,ngos->ngrs", b_x, b_y)  # [n, G, rx, ry]
        ga = torch.einsum("ngri,ngsi->ngrs", a_x, a_y)  # [n, G, rx, ry]
        cols.append((gb * ga).sum(dim=(2, 3)))  # [n, G]
        order += idx
    res = torch.cat(cols, dim=1)  # [n, n_keys], in group order
    if order != sorted(order):
        res = res[:, torch.as_tensor(order, device=res.device).argsort()]  # spec.keys() order
    res = res * (x.spec.scale * y.spec.scale)
    return res[0] if single_x and single_y else res


def _shape_groups(keys: list, *factors: dict) -> list[list[int]]:
    """Indices of ``keys`` grouped by the shapes and dtypes of their factors (first-seen order)."""
    groups: dict[tuple, list[int]] = {}
    for j, k in enumerate(keys):
        sig = tuple((tuple(f[k].shape), f[k].dtype) for f in factors)
        groups.setdefault(sig, []).append(j)
    return list(groups.values())


def _stacked(factors: dict, keys: list) -> Tensor:
    """The keys' factors stacked on a new axis 1, widened like ``_wide``: [n, G, ...]."""
    return _wide(
        factors[keys[0]].unsqueeze(1)
        if len(keys) == 1
        else torch.stack([factors[k] for k in keys], 1)
    )


def sq_norms(x: Lora) -> Tensor:
    """||dW||_F^2 per row and key, [n, n_keys] (or [n_keys]): tr(B^T B A A^T), no B @ A formed."""
    return inner(x, x)


def gram(x: LoraBatch, y: LoraBatch | None = None) -> Tensor:
    """All-pairs <dW_i, dW_j>_F summed over keys: [n, m] (y defaults to x). Differentiable."""
    y = x if y is None else y
    check_same_structure([x.spec, y.spec], "gram")
    ax, bx, _ = _rows(x)
    ay, by, _ = _rows(y)
    total = None
    for key in x.spec.keys():  # noqa: SIM118 (LoraSpec.keys)
        gb = torch.einsum("nor,mos->nmrs", _wide(bx[key]), _wide(by[key]))  # [n, m, rx, ry]
        ga = torch.einsum("nri,msi->nmrs", _wide(ax[key]), _wide(ay[key]))  # [n, m, rx, ry]
        g = (gb * ga).sum(dim=(2, 3))  # [n, m]
        total = g if total is None else total + g
    return total * (x.spec.scale * y.spec.scale)


def take(batch: LoraBatch, rows: Sequence[int] | Tensor) -> LoraBatch:
    """The given rows of a batch (repeats allowed, negative indices count from the end)."""
    n = len(batch)
    device = next(iter(batch.A.values())).device
    # Rows given on the host are checked there (no device sync per call).
    host = [int(r) for r in rows] if not isinstance(rows, Tensor) else rows.reshape(-1).tolist()
    if not host:
        raise LoraError("take: no rows given (a LoraBatch holds at least one adapter)")
    bad = [r for r in host if not -n <= r < n]
    if bad:
        raise LoraError(f"take: row {bad[0]} out of range for {n} adapters")
    idx = torch.as_tensor(host, dtype=torch.long, device=device)
    return LoraBatch(
        batch.spec,
        {k: v[idx] for k, v in batch.A.items()},
        {k: v[idx] for k, v in batch.B.items()},
    )


def concat(batches: Sequence[Lora]) -> LoraBatch:
    """Batches (and single adapters) stacked in order; structures and scales must match."""
    if not batches:
        raise LoraError("concat: no batches given")
    spec = batches[0].spec
    for j, b in enumerate(batches[1:], start=1):
        if not spec.compatible(b.spec):
            raise LoraError(
                f"concat: item {j} has a different structure, rank or scale than item 0 "
                f"(rank {b.spec.rank} scale {b.spec.scale:g} vs rank {spec.rank} scale "
                f"{spec.scale:g}); refactor to one rank first"
            )
    check_same_structure([b.spec for b in batches], "concat")
    parts = [_rows(b)[:2] for b in batches]
    return LoraBatch(
        spec,
        {k: torch.cat([a[k] for a, _ in parts]) for k in spec.keys()},  # noqa: SIM118
        {k: torch.cat([b[k] for _, b in parts]) for k in spec.keys()},  # noqa: SIM118
    )
