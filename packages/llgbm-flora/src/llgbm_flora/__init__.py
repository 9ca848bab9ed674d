"""llgbm-flora: PEFT LoRA adapters as differentiable data, applied per batch row to a frozen HF model.

from llgbm_flora import LoraBatch, functional_forward, load_adapter
adapter = load_adapter("path/to/peft_dir")
out = functional_forward(model, adapter, input_ids=ids, attention_mask=mask)
merged = refactor(mean(batch), rank=8).adapter   # delta-W algebra: llgbm_flora.algebra
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Names are imported on first use (PEP 562), so `import llgbm_flora` and its torch-free modules
# (atomic, cli_errors) cost nothing: torch, and the GPU kernels, load only when a name needs them.
_EXPORTS = {
    "algebra": None,
    **dict.fromkeys(
        [
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
        ],
        "algebra",
    ),
    **dict.fromkeys(("LoraError", "LoraFormatError", "LoraKeyMismatchError"), "errors"),
    "functional_forward": "functional",
    "check_fits": "mapping",
    "module_map": "mapping",
    **dict.fromkeys(
        [
            "from_peft_state_dict",
            "inspect_adapter",
            "load_adapter",
            "peft_key",
            "save_adapter",
            "to_peft_state_dict",
        ],
        "peft_io",
    ),
    **dict.fromkeys(
        ("STANDARD_MODULES", "LoraAdapter", "LoraBatch", "LoraKey", "LoraSpec"), "spec"
    ),
}

if TYPE_CHECKING:
    from . import algebra
    from .algebra import (
        Refactored,
        check_same_structure,
        concat,
        delta_weight,
        delta_weights,
        factor,
        gram,
        inner,
        mean,
        refactor,
        sq_norms,
        take,
        weighted_sum,
    )
    from .errors import LoraError, LoraFormatError, LoraKeyMismatchError
    from .functional import functional_forward
    from .mapping import check_fits, module_map
    from .peft_io import (
        from_peft_state_dict,
        inspect_adapter,
        load_adapter,
        peft_key,
        save_adapter,
        to_peft_state_dict,
    )
    from .spec import STANDARD_MODULES, LoraAdapter, LoraBatch, LoraKey, LoraSpec


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _EXPORTS[name]
    value = (
        importlib.import_module(f".{name}", __name__)
        if where is None
        else getattr(importlib.import_module(f".{where}", __name__), name)
    )
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [
    "STANDARD_MODULES",
    "LoraAdapter",
    "LoraBatch",
    "LoraError",
    "LoraFormatError",
    "LoraKey",
    "LoraKeyMismatchError",
    "LoraSpec",
    "Refactored",
    "algebra",
    "check_fits",
    "check_same_structure",
    "concat",
    "delta_weight",
    "delta_weights",
    "factor",
    "from_peft_state_dict",
    "functional_forward",
    "gram",
    "inner",
    "inspect_adapter",
    "load_adapter",
    "mean",
    "module_map",
    "peft_key",
    "refactor",
    "save_adapter",
    "sq_norms",
    "take",
    "to_peft_state_dict",
    "weighted_sum",
]
