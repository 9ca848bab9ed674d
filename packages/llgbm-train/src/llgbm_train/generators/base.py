"""The generator interface: a condition tensor in, a batch of LoRA adapters out."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

from llgbm_flora import LoraBatch, LoraSpec
from torch import Tensor, nn


class GeneratorError(ValueError):
    """Bad generator arguments or inputs."""


class Generator(nn.Module, metaclass=ABCMeta):
    """Maps B conditions to B adapters of `spec`; gradients flow from every A and B to the
    generator's parameters (and to `cond`, so a trainable encoder learns too).

    forward(cond [B, N, L, D] float, cond_mask [B, N, L] bool) -> LoraBatch of B adapters.
    """

    spec: LoraSpec
    cond_dim: int

    def __init__(self, spec: LoraSpec, cond_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.cond_dim = int(cond_dim)

    def _check_cond(
        self, cond: Tensor, cond_mask: Tensor, n_prompts: int | None, max_tokens: int | None
    ) -> None:
        if cond.dim() != 4 or cond.shape[-1] != self.cond_dim:
            raise GeneratorError(
                f"generator condition: shape {list(cond.shape)}, expected [B, N, L, {self.cond_dim}]"
            )
        if n_prompts is not None and cond.shape[1] != n_prompts:
            raise GeneratorError(
                f"generator condition: {cond.shape[1]} prompts per task, this generator was built "
                f"for n_prompts={n_prompts}"
            )
        if max_tokens is not None and cond.shape[2] != max_tokens:
            raise GeneratorError(
                f"generator condition: {cond.shape[2]} tokens per prompt, this generator was built "
                f"for max_tokens={max_tokens}"
            )
        if cond_mask.shape != cond.shape[:3]:
            raise GeneratorError(
                f"generator condition mask: shape {list(cond_mask.shape)}, expected "
                f"{list(cond.shape[:3])}"
            )

    @abstractmethod
    def forward(self, cond: Tensor, cond_mask: Tensor) -> LoraBatch:
        """[B, N, L, D] condition and [B, N, L] mask -> B adapters."""
