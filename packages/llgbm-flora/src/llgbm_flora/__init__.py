"""llgbm-flora: PEFT LoRA adapters as differentiable data, applied per batch row to a frozen HF model.

from llgbm_flora import LoraBatch, functional_forward, load_adapter
adapter = load_adapter("path/to/peft_dir")
out = functional_forward(model, adapter, input_ids=ids, attention_mask=mask)
merged = refactor(mean(batch), rank=8).adapter   # delta-W algebra: llgbm_flora.algebra
"""

from __future__ import annotations

from .lazy import lazy_exports

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
    **dict.fromkeys(("applied", "functional_forward"), "functional"),
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
        [
            "AdapterLayout",
            "adapter_from_data",
            "adapter_layout",
            "batch_from_data",
            "read_adapter_data",
        ],
        "peft_layout",
    ),
    **dict.fromkeys(
        ("STANDARD_MODULES", "LoraAdapter", "LoraBatch", "LoraKey", "LoraSpec"), "spec"
    ),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)
