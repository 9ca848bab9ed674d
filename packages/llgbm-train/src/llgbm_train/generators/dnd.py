"""DnD-style hyper-convolutional decoder: prompt-token states -> normalised LoRA weight tokens.

The condition [B, N, L, D] is read as an image batch with N channels (prompts) and an L x D
plane (tokens x features). A cascade of blocks reshapes it to [B, n_tokens, rank, slab_width],
the WeightTokenizer's token tensor, which `decode` turns into LoRA matrices. Each block:

    LayerNorm over the feature axis
    branch 1: conv along width  -> resize width  -> GELU -> conv along height -> resize height
    branch 2: conv along height -> resize height -> GELU -> conv along width  -> resize width
    1x1 conv across the channel (prompt) axis: C_in -> C_out, on the sum of the branches
    GELU and a residual connection (not after the last block, whose output is the tokens)

Height goes from L to rank and width from D to slab_width by geometric steps. Channels go from
N to n_tokens by geometric steps over the first n_blocks - 1 blocks, and the last block keeps
n_tokens: its output is a linear mix of its input channels, so from one condition it can only
reach token matrices of rank <= its input channel count, and fewer than n_tokens channels there
cannot express an arbitrary adapter. `channels` overrides the intermediate counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from llgbm_flora import LoraBatch, LoraSpec
from torch import Tensor, nn

from llgbm_train.generators.base import Generator, GeneratorError
from llgbm_train.weight_tokens import WeightTokenizer


def _groups(channels: int, max_group_channels: int) -> int:
    """The fewest groups (a divisor of `channels`) with at most `max_group_channels` per group."""
    for g in range(1, channels + 1):
        if channels % g == 0 and channels // g <= max_group_channels:
            return g
    return channels


def _geometric(start: int, end: int, steps: int) -> list[int]:
    """`steps` sizes going from `start` (excluded) to `end` (included) by a constant ratio."""
    return [
        max(1, round(math.exp(math.log(start) + (math.log(end) - math.log(start)) * i / steps)))
        for i in range(1, steps + 1)
    ]


class _Resize(nn.Module):
    """A learned linear map along one axis (-1 width, -2 height) of [B, C, H, W]."""

    def __init__(self, n_in: int, n_out: int, axis: int) -> None:
        super().__init__()
        self.axis = axis
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.axis == -1:
            return self.linear(x)
        return self.linear(x.transpose(-1, -2)).transpose(-1, -2)


class HyperConvBlock(nn.Module):
    """[B, c_in, h_in, w_in] -> [B, c_out, h_out, w_out]; see the module docstring."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        hw_in: tuple[int, int],
        hw_out: tuple[int, int],
        *,
        kernel: int,
        max_group_channels: int,
        last: bool,
    ) -> None:
        super().__init__()
        (h_in, w_in), (h_out, w_out) = hw_in, hw_out
        groups = _groups(c_in, max_group_channels)

        def conv(k: tuple[int, int]) -> nn.Conv2d:
            return nn.Conv2d(c_in, c_in, k, padding="same", groups=groups)

        self.norm = nn.LayerNorm(w_in)
        self.wh = nn.ModuleList(
            [
                conv((1, kernel)),
                _Resize(w_in, w_out, -1),
                conv((kernel, 1)),
                _Resize(h_in, h_out, -2),
            ]
        )
        self.hw = nn.ModuleList(
            [
                conv((kernel, 1)),
                _Resize(h_in, h_out, -2),
                conv((1, kernel)),
                _Resize(w_in, w_out, -1),
            ]
        )
        self.mix = nn.Conv2d(c_in, c_out, 1)  # across the prompt / token channel axis
        self.act = nn.GELU()
        self.last = last
        self.residual = not last and (c_in, h_in, w_in) == (c_out, h_out, w_out)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(x)  # [B, c_in, h_in, w_in]
        a = self.wh[3](self.wh[2](self.act(self.wh[1](self.wh[0](y)))))  # [B, c_in, h_out, w_out]
        b = self.hw[3](self.hw[2](self.act(self.hw[1](self.hw[0](y)))))  # [B, c_in, h_out, w_out]
        out = self.mix(a + b)  # [B, c_out, h_out, w_out]
        if self.last:
            return out
        out = self.act(out)
        return x + out if self.residual else out


class DnDGenerator(Generator):
    """Condition [B, N, L, D] -> hyper-conv cascade -> tokens [B, n_tokens, r, w] -> LoraBatch."""

    def __init__(
        self,
        *,
        spec: LoraSpec,
        cond_dim: int,
        n_prompts: int,
        max_tokens: int,
        weight_tokenizer: WeightTokenizer,
        n_blocks: int = 4,
        kernel: int = 5,
        channels: Sequence[int] | None = None,
        max_group_channels: int = 64,
    ) -> None:
        super().__init__(spec, cond_dim)
        if weight_tokenizer is None:
            raise GeneratorError("generator 'dnd': needs a weight_tokenizer (its output is tokens)")
        if n_blocks < 1:
            raise GeneratorError(f"generator n_blocks: {n_blocks} must be >= 1")
        if kernel < 1 or kernel % 2 == 0:
            raise GeneratorError(f"generator kernel: {kernel} must be a positive odd number")
        if max_group_channels < 1:
            raise GeneratorError(f"generator max_group_channels: {max_group_channels} must be >= 1")
        self.n_prompts = int(n_prompts)
        self.max_tokens = int(max_tokens)
        self.tokenizer = weight_tokenizer
        n_tokens, rank, width = weight_tokenizer.token_shape
        if channels is None:
            # reach n_tokens before the last block, so its linear channel mix is not a bottleneck
            chans = [*_geometric(n_prompts, n_tokens, n_blocks - 1), n_tokens]
        else:
            chans = [int(c) for c in channels]
            if len(chans) != n_blocks - 1 or any(c < 1 for c in chans):
                raise GeneratorError(
                    f"generator channels: {list(channels)} must be {n_blocks - 1} positive ints "
                    "(the outputs of every block but the last, which gives n_tokens)"
                )
            chans.append(n_tokens)
        heights = _geometric(max_tokens, rank, n_blocks)
        widths = _geometric(cond_dim, width, n_blocks)
        blocks = []
        c, h, w = n_prompts, max_tokens, cond_dim
        for i in range(n_blocks):
            blocks.append(
                HyperConvBlock(
                    c,
                    chans[i],
                    (h, w),
                    (heights[i], widths[i]),
                    kernel=kernel,
                    max_group_channels=max_group_channels,
                    last=i == n_blocks - 1,
                )
            )
            c, h, w = chans[i], heights[i], widths[i]
        self.blocks = nn.ModuleList(blocks)
        self.shapes = [(n_prompts, max_tokens, cond_dim), *zip(chans, heights, widths)]

    def tokens(self, cond: Tensor, cond_mask: Tensor) -> Tensor:
        """Normalised weight tokens [B, n_tokens, rank, slab_width]."""
        self._check_cond(cond, cond_mask, self.n_prompts, self.max_tokens)
        x = cond * cond_mask[..., None].to(cond.dtype)  # [B, N, L, D]
        for block in self.blocks:
            x = block(x)
        return x  # [B, n_tokens, r, w]

    def forward(self, cond: Tensor, cond_mask: Tensor) -> LoraBatch:
        return self.tokenizer.decode(self.tokens(cond, cond_mask))
