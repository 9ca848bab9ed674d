"""llgbm-flora: PEFT LoRA adapters as differentiable data, applied per batch row to a frozen HF model.

from llgbm_flora import LoraBatch, functional_forward, load_adapter
adapter = load_adapter("path/to/peft_dir")
out = functional_forward(model, adapter, input_ids=ids, attention_mask=mask)
merged = refactor(mean(batch), rank=8).adapter   # delta-W algebra: llgbm_flora.algebra
"""

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
