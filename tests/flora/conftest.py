"""Shared fixtures for the llgbm-flora tests: one table of model families drives them all."""

from __future__ import annotations

import pytest
import torch
from llgbm_flora.testing import MODEL_BUILDERS

FAMILIES = ["llama", "qwen2", "mistral"]


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODEL_BUILDERS[family](seed=0)


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    """4 rows x 7 tokens with padding on both sides, so masks matter."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}
