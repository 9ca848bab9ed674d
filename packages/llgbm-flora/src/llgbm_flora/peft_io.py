"""Read and write PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors).

    adapter = load_adapter("teachers/add_3")       # -> LoraAdapter, tensors as stored
    save_adapter(adapter, "out/generated_0")       # PeftModel.from_pretrained loads it

PEFT names a tensor `base_model.model.<module path>.lora_A.weight` on disk (in memory with the
adapter name: `...lora_A.default.weight`); both forms are read. Every (layer, module) pair that
the config implies must be present and every key must map to one, or LoraKeyMismatchError lists
what is missing and extra. PEFT features this package does not implement raise, never ignored.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import atomic
from .errors import LoraFormatError, LoraKeyMismatchError
from .spec import LoraAdapter, LoraKey, LoraSpec, module_order

__all__ = ["from_peft_state_dict", "load_adapter", "peft_key", "save_adapter", "to_peft_state_dict"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."

_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<pre>(?:.*\.)?layers)\.(?P<layer>\d+)\.(?P<sub>(?:.*\.)?)"
    r"(?P<mod>[^.]+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)

# Where the common decoder families keep their projections, for specs built by hand (no model,
# no loaded file). Specs from LoraSpec.for_model or load_adapter carry their own paths.
_DEFAULT_PATHS = {
    **{
        m: f"model.layers.{{layer}}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")
    },
    **{m: f"model.layers.{{layer}}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")},
}

# Config fields whose non-empty / true value changes what the adapter computes.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "fan_in_fan_out": "fan_in_fan_out",
    "lora_bias": "lora_bias",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "exclude_modules": "exclude_modules",
}


def peft_key(spec: LoraSpec, key: LoraKey, which: str) -> str:
    """The on-disk PEFT name of A or B (`which` = "A" | "B") for one key of `spec`."""
    template = spec.path_template(key[1]) or _DEFAULT_PATHS.get(key[1])
    if template is None:
        raise LoraFormatError(
            f"no module path known for {key[1]!r}: build the spec with LoraSpec.for_model(model, ...)"
        )
    return f"{_PEFT_PREFIX}{template.format(layer=key[0])}.lora_{which}.weight"


def to_peft_state_dict(adapter: LoraAdapter) -> dict[str, Tensor]:
    """PEFT on-disk names -> detached, contiguous CPU copies of the tensors."""
    out = {}
    keys = adapter.spec.keys()
    for key in keys:
        out[peft_key(adapter.spec, key, "A")] = adapter.A[key].detach().cpu().clone().contiguous()
        out[peft_key(adapter.spec, key, "B")] = adapter.B[key].detach().cpu().clone().contiguous()
    return out


def peft_config(spec: LoraSpec) -> dict[str, Any]:
    """The adapter_config.json contents PEFT needs to rebuild this adapter."""
    all_layers = spec.model_layers is not None and spec.layers == tuple(range(spec.model_layers))
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base_model or None,
        "r": spec.rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(spec.target_modules),
        "use_rslora": spec.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None if all_layers else list(spec.layers),
        "layers_pattern": None if all_layers else "layers",
    }


def save_adapter(adapter: LoraAdapter, path: str | os.PathLike) -> Path:
    """Write `adapter` as a PEFT LoRA directory at `path` (created or replaced atomically).

    An existing `path` is replaced only if it is a PEFT directory (holds adapter_config.json)
    or empty; anything else raises `atomic.DirectoryNotOwnedError` and is left as it is.
    """
    if not isinstance(adapter, LoraAdapter):
        raise LoraFormatError(
            f"save_adapter: expected a LoraAdapter, got {type(adapter).__name__} (save batch[i] each)"
        )
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = to_peft_state_dict(adapter)
    config = json.dumps(peft_config(adapter.spec), indent=2, sort_keys=True) + "\n"
    tmp = atomic.fresh_dir(path)
    try:
        save_file(state, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(config)
        # Replaces an existing adapter directory whole; any other folder at `path` is refused.
        atomic.replace_dir(tmp, path, marker=CONFIG_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_adapter(path: str | os.PathLike, *, model: torch.nn.Module | None = None) -> LoraAdapter:
    """Read a PEFT LoRA directory into a LoraAdapter (tensors on CPU, stored dtype).

    With `model`, also check the adapter fits it (check_fits), and that an adapter saved
    without `layers_to_transform` covers every decoder layer.
    """
    path = Path(path)
    if not path.is_dir():
        raise LoraFormatError(f"{path}: not a PEFT adapter directory (does not exist or is a file)")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise LoraFormatError(f"{config_file}: missing (not a PEFT adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraFormatError(f"{config_file}: unreadable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LoraFormatError(f"{config_file}: expected a JSON object")
    state, weights_file = _read_weights(path)
    adapter = from_peft_state_dict(
        state, config, where=str(weights_file), config_where=str(config_file)
    )
    if model is not None:
        from .mapping import check_fits

        all_layers = config.get("layers_to_transform") is None
        check_fits(model, adapter.spec, all_layers=all_layers)
    return adapter


def _read_weights(path: Path) -> tuple[dict[str, Tensor], Path]:
    st, pt = path / SAFETENSORS_NAME, path / BIN_NAME
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st), device="cpu"), st
        except Exception as exc:  # safetensors raises several types for damaged files
            raise LoraFormatError(
                f"{st}: corrupt or unreadable safetensors file ({_first_line(exc)})"
            ) from None
    if pt.is_file():
        try:
            state = torch.load(str(pt), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for damaged pickles
            raise LoraFormatError(
                f"{pt}: corrupt or unreadable torch file ({_first_line(exc)})"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise LoraFormatError(f"{pt}: expected a dict of tensors")
        return state, pt
    raise LoraFormatError(f"{path}: no {SAFETENSORS_NAME} or {BIN_NAME} (adapter weights missing)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _config_values(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate a PEFT LoRA config; returns r, alpha, rslora, targets, layers, base_model."""
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise LoraFormatError(
            f"{where}: peft_type is {peft_type!r}, only LORA adapters are supported"
        )
    for name, what in _UNSUPPORTED.items():
        if config.get(name):
            raise LoraFormatError(f"{where}: {what} is not supported ({name}={config[name]!r})")
    bias = config.get("bias", "none")
    if bias != "none":
        raise LoraFormatError(f"{where}: bias={bias!r} is not supported (only 'none')")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise LoraFormatError(f"{where}: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise LoraFormatError(f"{where}: lora_alpha must be a number, got {alpha!r}")
    targets = config.get("target_modules")
    if isinstance(targets, list | tuple) and targets and all(isinstance(t, str) for t in targets):
        targets = [t.rsplit(".", 1)[-1] for t in targets]
    elif not isinstance(targets, str):
        raise LoraFormatError(
            f"{where}: target_modules must be a list of names or a regex, got {targets!r}"
        )
    layers = config.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(i, int) and i >= 0 for i in layers)
    ):
        raise LoraFormatError(
            f"{where}: layers_to_transform must be a list of layer indices, got {layers!r}"
        )
    return {
        "r": r,
        "alpha": alpha,
        "use_rslora": bool(config.get("use_rslora", False)),
        "targets": targets,
        "layers": layers,
        "base_model": config.get("base_model_name_or_path") or "",
    }


def from_peft_state_dict(
    state: dict[str, Tensor],
    config: dict[str, Any],
    *,
    where: str = "<state dict>",
    config_where: str | None = None,
) -> LoraAdapter:
    """Build a LoraAdapter from PEFT-named tensors and an adapter_config dict (100% coverage or raise)."""
    cfg = _config_values(config, config_where or where)
    regex = cfg["targets"] if isinstance(cfg["targets"], str) else None
    targets = None if regex is not None else set(cfg["targets"])
    tensors: dict[tuple[LoraKey, str], Tensor] = {}
    templates: dict[str, set[str]] = {}
    extra: list[str] = []
    for name, value in state.items():
        m = _KEY_RE.match(name)
        if m is None or (targets is not None and m["mod"] not in targets):
            extra.append(name)
            continue
        path = f"{m['pre']}.{m['layer']}.{m['sub']}{m['mod']}"
        if regex is not None and regex != "all-linear" and not re.fullmatch(regex, path):
            extra.append(name)
            continue
        key = (int(m["layer"]), m["mod"])
        if cfg["layers"] is not None and key[0] not in cfg["layers"]:
            extra.append(name)
            continue
        if (key, m["ab"]) in tensors:
            extra.append(name)  # the same tensor under a second name (e.g. two adapter names)
            continue
        tensors[(key, m["ab"])] = value
        templates.setdefault(m["mod"], set()).add(f"{m['pre']}.{{layer}}.{m['sub']}{m['mod']}")
    modules = sorted(
        targets if targets is not None else {k[1] for k, _ in tensors}, key=module_order
    )
    found_layers = sorted({k[0] for k, _ in tensors})
    if cfg["layers"] is not None:
        layers = sorted(set(cfg["layers"]))
    else:  # all layers of the model: any gap below the highest layer seen is missing
        layers = list(range(found_layers[-1] + 1)) if found_layers else []
    missing = []
    for i in layers:
        for m in modules:
            absent = [ab for ab in "AB" if ((i, m), ab) not in tensors]
            if absent:
                missing.append(f"{(i, m)}" + ("" if len(absent) == 2 else f".lora_{absent[0]}"))
    if missing or extra or not tensors:
        if not tensors and not missing:
            missing = [
                f"any lora_A/lora_B tensor for {sorted(modules) or config.get('target_modules')}"
            ]
        raise LoraKeyMismatchError(where, missing=missing, extra=extra)
    for mod, paths in templates.items():
        if len(paths) > 1:
            raise LoraKeyMismatchError(where, extra=[f"{mod} at several paths: {sorted(paths)}"])

    r = cfg["r"]
    errors: list[str] = []
    dims: dict[str, set[tuple[int, int]]] = {}
    for i in layers:
        for mod in modules:
            a, b = tensors[((i, mod), "A")], tensors[((i, mod), "B")]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
                errors.append(f"{(i, mod)} lora_A {tuple(a.shape)} lora_B {tuple(b.shape)} (r={r})")
            else:
                dims.setdefault(mod, set()).add((a.shape[1], b.shape[0]))
    errors += [
        f"{mod} shapes differ across layers: {sorted(d)}" for mod, d in dims.items() if len(d) > 1
    ]
    if errors:
        raise LoraKeyMismatchError(where, shape_errors=errors)
    spec = LoraSpec(
        base_model=cfg["base_model"],
        target_modules=tuple(modules),
        layers=tuple(layers),
        rank=r,
        alpha=cfg["alpha"],
        use_rslora=cfg["use_rslora"],
        shapes=tuple((mod, *next(iter(dims[mod]))) for mod in modules),
        module_paths=tuple((mod, next(iter(templates[mod]))) for mod in modules),
        model_layers=len(layers) if cfg["layers"] is None else None,
    )
    keys = spec.keys()
    return LoraAdapter(
        spec, {k: tensors[(k, "A")] for k in keys}, {k: tensors[(k, "B")] for k in keys}
    )
