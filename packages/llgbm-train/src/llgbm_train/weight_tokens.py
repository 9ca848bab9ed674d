"""DnD's weight tokens: every LoRA matrix cut into rank x width slabs, each slab normalised.

A LoRA `A` [r, in] is cut along `in` into ceil(in / w) slabs of [r, w]; a `B` [out, r] is
transposed to [r, out] and cut the same way; the last slab of a matrix is zero-padded. Tokens are
ordered by `spec.keys()` (layer-major), A's slabs before B's. Each token has its own mean and std,
fitted over a set of teacher adapters (all teachers, ranks and real columns of that slab), so the
generator predicts values of unit scale whatever the magnitude of the LoRA matrix.

    tok = WeightTokenizer(spec, slab_width=128).fit(teachers)   # teachers: LoraBatch
    t = tok.encode(teachers)                                    # [n, n_tokens, rank, 128]
    back = tok.decode(t)                                        # LoraBatch, differentiable

The tokenizer is an nn.Module whose buffers (mean, std, fitted) travel in `state_dict()`, so a
generator that holds it saves and restores the statistics with its own weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from llgbm_flora import LoraBatch, LoraSpec
from torch import Tensor, nn

# A slab whose values do not vary across the fitted teachers keeps std 1: dividing by ~0 would
# blow its (constant) value up to infinity.
_MIN_STD = 1e-12


class WeightTokenError(ValueError):
    """Adapters or token tensors that do not match the tokenizer's LoRA spec."""


@dataclass(frozen=True)
class _Segment:
    """One LoRA matrix's run of tokens."""

    key: tuple[int, str]
    side: str  # "A" or "B"
    offset: int  # index of its first token
    n_slabs: int
    length: int  # in_features for A, out_features for B (unpadded slab axis)


class WeightTokenizer(nn.Module):
    """Maps a LoraBatch to normalised tokens [n, n_tokens, rank, slab_width] and back.

    Before `fit`, mean is 0 and std is 1 (the tokens are the raw slabs); `fitted` says which.
    """

    def __init__(self, spec: LoraSpec, slab_width: int = 128) -> None:
        super().__init__()
        if slab_width <= 0:
            raise WeightTokenError(f"slab_width: {slab_width} must be positive")
        self.spec = spec
        self.slab_width = int(slab_width)
        self.rank = int(spec.rank)
        segments: list[_Segment] = []
        offset = 0
        keys = spec.keys()
        for key in keys:
            d_in, d_out = spec.in_out(key[1])
            for side, length in (("A", d_in), ("B", d_out)):
                n_slabs = math.ceil(length / slab_width)
                segments.append(_Segment(key, side, offset, n_slabs, length))
                offset += n_slabs
        self.segments: tuple[_Segment, ...] = tuple(segments)
        self.n_tokens = offset
        valid = torch.zeros(offset, slab_width, dtype=torch.bool)  # [n_tokens, w]
        for seg in segments:
            cols = torch.arange(seg.n_slabs * slab_width).view(seg.n_slabs, slab_width)
            valid[seg.offset : seg.offset + seg.n_slabs] = cols < seg.length
        self.register_buffer("valid", valid, persistent=False)
        self.register_buffer("mean", torch.zeros(offset))
        self.register_buffer("std", torch.ones(offset))
        self.register_buffer("fitted_flag", torch.tensor(False))
        # Per module type: its keys (spec order) and each key's token ids, A's slabs then B's.
        self._module_keys: dict[str, list] = {}
        rows: dict[str, list[list[int]]] = {}
        for seg in segments:
            if seg.side == "A":
                self._module_keys.setdefault(seg.key[1], []).append(seg.key)
                rows.setdefault(seg.key[1], []).append([])
            rows[seg.key[1]][-1].extend(range(seg.offset, seg.offset + seg.n_slabs))
        for m, r in rows.items():
            self.register_buffer(f"_tokens_{m}", torch.tensor(r), persistent=False)  # [L, n_tok]

    @property
    def fitted(self) -> bool:
        return bool(self.fitted_flag)

    @property
    def token_shape(self) -> tuple[int, int, int]:
        """(n_tokens, rank, slab_width): the shape of one adapter's tokens."""
        return (self.n_tokens, self.rank, self.slab_width)

    def _check(self, lora: LoraBatch) -> None:
        want = set(self.spec.keys())
        for side, tensors in (("A", lora.A), ("B", lora.B)):
            got = set(tensors)
            if got != want:
                missing = sorted(want - got)[:3]
                extra = sorted(got - want)[:3]
                raise WeightTokenError(
                    f"LoraBatch.{side}: keys differ from the tokenizer's spec "
                    f"(missing {missing}, extra {extra})"
                )
        for seg in self.segments:
            t = (lora.A if seg.side == "A" else lora.B)[seg.key]
            r_axis, len_axis = (1, 2) if seg.side == "A" else (2, 1)
            if t.dim() != 3 or t.shape[r_axis] != self.rank or t.shape[len_axis] != seg.length:
                want_shape = (
                    f"[n, {self.rank}, {seg.length}]"
                    if seg.side == "A"
                    else f"[n, {seg.length}, {self.rank}]"
                )
                raise WeightTokenError(
                    f"LoraBatch.{seg.side}[{seg.key}]: shape {list(t.shape)}, expected {want_shape}"
                )

    def raw_tokens(self, lora: LoraBatch) -> Tensor:
        """Unnormalised slabs [n, n_tokens, rank, w] (padding is 0), float32."""
        self._check(lora)
        w = self.slab_width
        parts = []
        for seg in self.segments:
            if seg.side == "A":
                m = lora.A[seg.key]  # [n, r, in]
            else:
                m = lora.B[seg.key].transpose(1, 2)  # [n, r, out]
            m = m.float()
            pad = seg.n_slabs * w - seg.length
            if pad:
                m = nn.functional.pad(m, (0, pad))
            n = m.shape[0]
            parts.append(m.reshape(n, self.rank, seg.n_slabs, w).permute(0, 2, 1, 3))
        return torch.cat(parts, dim=1)  # [n, n_tokens, r, w]

    @torch.no_grad()
    def fit(self, teachers: LoraBatch) -> WeightTokenizer:
        """Per-token mean and std over all teachers, ranks and real (unpadded) columns."""
        raw = self.raw_tokens(teachers).to(self.mean.device)  # [n, n_tokens, r, w]
        valid = self.valid[None, :, None, :].expand_as(raw)  # [n, n_tokens, r, w]
        count = valid.sum(dim=(0, 2, 3)).clamp_min(1)  # [n_tokens]
        mean = (raw * valid).sum(dim=(0, 2, 3)) / count
        var = (((raw - mean[None, :, None, None]) * valid) ** 2).sum(dim=(0, 2, 3)) / count
        std = var.sqrt()
        std = torch.where(std > _MIN_STD, std, torch.ones_like(std))
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.fitted_flag.fill_(True)
        return self

    def encode(self, lora: LoraBatch) -> Tensor:
        """Normalised tokens [n, n_tokens, rank, w], float32; padded columns are exactly 0."""
        raw = self.raw_tokens(lora).to(self.mean.device)
        mean = self.mean[None, :, None, None]
        std = self.std[None, :, None, None]
        return (raw - mean) / std * self.valid[None, :, None, :]

    def decode(self, tokens: Tensor) -> LoraBatch:
        """Inverse of `encode` (padding dropped); differentiable; keeps the tokens' dtype."""
        if tokens.dim() != 4 or tuple(tokens.shape[1:]) != self.token_shape:
            raise WeightTokenError(
                f"tokens: shape {list(tokens.shape)}, expected [n, {self.n_tokens}, "
                f"{self.rank}, {self.slab_width}]"
            )
        mean = self.mean.to(tokens.dtype)[None, :, None, None]
        std = self.std.to(tokens.dtype)[None, :, None, None]
        raw = tokens * std + mean  # [n, n_tokens, r, w]
        n = tokens.shape[0]
        A: dict = {}
        B: dict = {}
        # One split (the segments tile the tokens in order): its backward is one cat, where
        # each slice's backward would zero-fill and add a raw-sized gradient.
        parts = raw.split([seg.n_slabs for seg in self.segments], dim=1)
        for seg, s in zip(self.segments, parts, strict=True):  # s: [n, k, r, w]
            m = s.permute(0, 2, 1, 3).reshape(n, self.rank, seg.n_slabs * self.slab_width)
            m = m[:, :, : seg.length]  # [n, r, length]
            if seg.side == "A":
                A[seg.key] = m
            else:
                B[seg.key] = m.transpose(1, 2)  # [n, out, r]
        return LoraBatch(spec=self.spec, A=A, B=B)

    def module_keys(self, module: str) -> list:
        """The (layer, module) keys of one module type, in spec order."""
        return self._module_keys[module]

    def decode_module(self, module: str, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """`decode` of one module type's keys at once: tokens [n, L, n_tok, r, w] (its L keys'
        tokens in `module_keys` order, A's slabs then B's) -> A [n, L, r, in], B [n, L, out, r].

        The same arithmetic as `decode` in about ten ops for all L layers, instead of a handful
        per key: on a 30-layer model that is most of a generator's forward and backward ops.
        """
        ids = getattr(self, f"_tokens_{module}")  # [L, n_tok]
        if tokens.dim() != 5 or tuple(tokens.shape[1:]) != (*ids.shape, self.rank, self.slab_width):
            raise WeightTokenError(
                f"{module} tokens: shape {list(tokens.shape)}, expected [n, {ids.shape[0]}, "
                f"{ids.shape[1]}, {self.rank}, {self.slab_width}]"
            )
        mean = self.mean.to(tokens.dtype)[ids][None, :, :, None, None]
        std = self.std.to(tokens.dtype)[ids][None, :, :, None, None]
        raw = tokens * std + mean  # [n, L, n_tok, r, w]
        d_in, d_out = self.spec.in_out(module)
        w = self.slab_width
        n_a = math.ceil(d_in / w)
        a, b = raw.split([n_a, ids.shape[1] - n_a], dim=2)  # [n, L, k, r, w] each
        n, L = raw.shape[:2]
        a = a.permute(0, 1, 3, 2, 4).reshape(n, L, self.rank, -1)[..., :d_in]  # [n, L, r, in]
        b = b.permute(0, 1, 3, 2, 4).reshape(n, L, self.rank, -1)[..., :d_out]  # [n, L, r, out]
        return a, b.transpose(2, 3)  # B: [n, L, out, r]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        got = state_dict.get(prefix + "mean")
        if got is not None and got.shape != self.mean.shape:
            raise WeightTokenError(
                f"weight tokenizer state: {got.shape[0]} tokens, this spec with slab_width "
                f"{self.slab_width} has {self.n_tokens}"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
