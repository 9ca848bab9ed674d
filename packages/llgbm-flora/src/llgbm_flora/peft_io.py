"""Read and write PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors).

    adapter = load_adapter("teachers/add_3")       # -> LoraAdapter, tensors as stored
    save_adapter(adapter, "out/generated_0")       # PeftModel.from_pretrained loads it

PEFT names a tensor `base_model.model.<module path>.lora_A.weight` on disk (in memory with the
adapter name: `...lora_A.default.weight`); both forms are read. Every (layer, module) pair that
the config implies must be present and every key must map to one, or LoraKeyMismatchError lists
what is missing and extra. Read and written besides plain LoRA: `layers_to_transform`, rsLoRA,
`rank_pattern` / `alpha_pattern` (resolved per key with PEFT's matching rule; each key's rank
must agree with its tensors) and DoRA (`use_dora`, the `lora_magnitude_vector` tensors). PEFT
features this package does not implement raise, never ignored.

    spec = inspect_adapter("teachers/add_3")       # structure from the config and the file header
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
from .peft_layout import _ST_DTYPES
from .spec import LoraAdapter, LoraKey, LoraSpec, module_order

__all__ = [
    "from_peft_state_dict",
    "inspect_adapter",
    "load_adapter",
    "peft_key",
    "save_adapter",
    "to_peft_state_dict",
]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."

_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<pre>(?:.*\.)?layers)\.(?P<layer>\d+)\.(?P<sub>(?:.*\.)?)"
    r"(?P<mod>[^.]+)\.(?:lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight"
    r"|lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?)$"
)

# Where the common decoder families keep their projections, for specs built by hand (no model,
# no loaded file). Specs from LoraSpec.for_model or load_adapter carry their own paths.
_DEFAULT_PATHS = {
    **{
        m: f"model.layers.{{layer}}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")
    },
    **{m: f"model.layers.{{layer}}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")},
}

# Config fields whose non-empty / true value changes what the adapter computes. The LoRA
# variants are PEFT's (LoraConfig fields tagged `is_lora_variant`, PEFT 0.21) other than DoRA
# (implemented) and MiCA (plain LoRA in eval; tested against PEFT in tests/delta). VeLoRA is
# plain LoRA in eval too, but saves extra `lora_velora_embed` tensors this reader does not take.
_UNSUPPORTED = {
    "modules_to_save": "modules_to_save",
    "fan_in_fan_out": "fan_in_fan_out",
    "lora_bias": "lora_bias",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "exclude_modules": "exclude_modules",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "velora_config": "VeLoRA (velora_config)",
}

# init_lora_weights values whose adapter, saved unconverted, only applies to the base as PEFT
# rewrites it on loading (residual weights): PEFT's forward is not W x + s B A x on the base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _module_path(spec: LoraSpec, key: LoraKey) -> str:
    """The module's name inside the CausalLM, e.g. `model.layers.3.self_attn.q_proj`."""
    template = spec.path_template(key[1]) or _DEFAULT_PATHS.get(key[1])
    if template is None:
        raise LoraFormatError(
            f"no module path known for {key[1]!r}: build the spec with LoraSpec.for_model(model, ...)"
        )
    return template.format(layer=key[0])


def peft_key(spec: LoraSpec, key: LoraKey, which: str) -> str:
    """The on-disk PEFT name of A, B or DoRA's magnitude (`which` = "A" | "B" | "M") of a key."""
    if which == "M":
        return f"{_PEFT_PREFIX}{_module_path(spec, key)}.lora_magnitude_vector"
    return f"{_PEFT_PREFIX}{_module_path(spec, key)}.lora_{which}.weight"


def to_peft_state_dict(adapter: LoraAdapter) -> dict[str, Tensor]:
    """PEFT on-disk names -> detached, contiguous CPU copies of the tensors."""
    out = {}
    keys = adapter.spec.keys()
    for key in keys:
        out[peft_key(adapter.spec, key, "A")] = adapter.A[key].detach().cpu().clone().contiguous()
        out[peft_key(adapter.spec, key, "B")] = adapter.B[key].detach().cpu().clone().contiguous()
        if adapter.magnitude is not None:
            m = adapter.magnitude[key].detach().cpu().clone().contiguous()
            out[peft_key(adapter.spec, key, "M")] = m
    return out


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def peft_config(spec: LoraSpec) -> dict[str, Any]:
    """The adapter_config.json contents PEFT needs to rebuild this adapter."""
    all_layers = spec.model_layers is not None and spec.layers == tuple(range(spec.model_layers))
    alpha = _number(spec.alpha)
    # PEFT matches pattern keys as regexes against module names: escaped full names match one.
    rank_pattern = {re.escape(_module_path(spec, k)): r for k, r in spec.rank_pattern}
    alpha_pattern = {re.escape(_module_path(spec, k)): _number(a) for k, a in spec.alpha_pattern}
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
        "use_dora": spec.use_dora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
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
    return _load(path, model, meta=False)


def inspect_adapter(path: str | os.PathLike, *, model: torch.nn.Module | None = None) -> LoraSpec:
    """The LoraSpec of a PEFT LoRA directory, from its config and the safetensors header only.

    Every check `load_adapter` makes on names, ranks and shapes (and with `model`, check_fits),
    without reading the tensor data: milliseconds per adapter, so a whole zoo can be validated
    before any model is loaded. `model` may live on the meta device. Damaged tensor bytes past
    an intact header are only found by `load_adapter`.
    """
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / SAFETENSORS_NAME).is_file():
        return _load(path, model, meta=True).spec  # .bin adapters, and the errors for a bad dir
    from .peft_layout import adapter_layout  # memoised on the config and header bytes

    spec = adapter_layout(path).spec
    if model is not None:
        from .mapping import check_fits

        check_fits(model, spec, all_layers=spec.model_layers is not None)
    return spec


def _load(path: str | os.PathLike, model: torch.nn.Module | None, meta: bool) -> LoraAdapter:
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
    state, weights_file = _read_weights(path, meta)
    adapter = from_peft_state_dict(
        state, config, where=str(weights_file), config_where=str(config_file)
    )
    if model is not None:
        from .mapping import check_fits

        all_layers = config.get("layers_to_transform") is None
        check_fits(model, adapter.spec, all_layers=all_layers)
    return adapter


def _read_weights(path: Path, meta: bool = False) -> tuple[dict[str, Tensor], Path]:
    """Tensors of an adapter (CPU), or with `meta` empty tensors of the stored shapes and dtypes
    read from the safetensors header (a .bin file has no header: it is loaded)."""
    st, pt = path / SAFETENSORS_NAME, path / BIN_NAME
    if st.is_file():
        from safetensors.torch import load_file

        try:
            if meta:
                return _header_tensors(st), st
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


def _header_tensors(path: Path) -> dict[str, Tensor]:
    """Meta tensors with the names, shapes and dtypes a safetensors header declares."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            sl = f.get_slice(name)
            dtype = _ST_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise ValueError(f"tensor {name}: dtype {sl.get_dtype()} is not supported")
            out[name] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
    return out


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
            value = repr(config[name])
            value = value if len(value) <= 60 else value[:57] + "..."
            raise LoraFormatError(f"{where}: {what} is not supported ({name}={value})")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise LoraFormatError(
            f"{where}: init_lora_weights={init!r} is not supported: PEFT changes the base weights "
            "when it loads such an adapter; save it converted to plain LoRA "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
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
    patterns = {}
    for name, kind in (("rank_pattern", "a positive int"), ("alpha_pattern", "a number")):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict):
            raise LoraFormatError(f"{where}: {name} must be an object, got {pattern!r}")
        for k, v in pattern.items():
            bad = isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            if name == "rank_pattern":
                bad = bad or not isinstance(v, int) or v <= 0
            if not isinstance(k, str) or bad:
                raise LoraFormatError(f"{where}: {name}[{k!r}] must be {kind}, got {v!r}")
            try:
                re.compile(k)
            except re.error as exc:
                raise LoraFormatError(f"{where}: {name} key {k!r} is not a regex ({exc})") from None
        patterns[name] = pattern
    return {
        "r": r,
        "alpha": alpha,
        "use_rslora": bool(config.get("use_rslora", False)),
        "targets": targets,
        "layers": layers,
        "base_model": config.get("base_model_name_or_path") or "",
        "use_dora": bool(config.get("use_dora", False)),
        **patterns,
    }


def _pattern_value(pattern: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rule: the first pattern key k (in order) with `(.*\\.)?(k)$` matching the name."""
    for k, v in pattern.items():
        if re.match(rf"(.*\.)?({k})$", module_path):
            return v
    return default


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
        which = m["ab"] or "M"  # M: DoRA's lora_magnitude_vector
        if which == "M" and not cfg["use_dora"]:
            extra.append(name)  # magnitude vectors belong to a DoRA config
            continue
        if (key, which) in tensors:
            extra.append(name)  # the same tensor under a second name (e.g. two adapter names)
            continue
        tensors[(key, which)] = value
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
    parts = "ABM" if cfg["use_dora"] else "AB"
    names = {"A": "lora_A", "B": "lora_B", "M": "lora_magnitude_vector"}
    for i in layers:
        for m in modules:
            absent = [ab for ab in parts if ((i, m), ab) not in tensors]
            if absent:
                whole = len(absent) == len(parts)
                missing.append(f"{(i, m)}" + ("" if whole else f".{names[absent[0]]}"))
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
    paths = {mod: next(iter(templates[mod])) for mod in modules}
    ranks: dict[LoraKey, int] = {}
    alphas: dict[LoraKey, float] = {}
    errors: list[str] = []
    dims: dict[str, set[tuple[int, int]]] = {}
    for i in layers:
        for mod in modules:
            key = (i, mod)
            module_path = paths[mod].format(layer=i)
            r_k = _pattern_value(cfg["rank_pattern"], module_path, r)
            alphas[key] = _pattern_value(cfg["alpha_pattern"], module_path, cfg["alpha"])
            ranks[key] = r_k
            a, b = tensors[(key, "A")], tensors[(key, "B")]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r_k or b.shape[1] != r_k:
                via = "" if r_k == r else " via rank_pattern"
                errors.append(
                    f"{key} lora_A {tuple(a.shape)} lora_B {tuple(b.shape)} (r={r_k}{via})"
                )
                continue
            dims.setdefault(mod, set()).add((a.shape[1], b.shape[0]))
            if cfg["use_dora"] and tuple(tensors[(key, "M")].shape) != (b.shape[0],):
                errors.append(
                    f"{key} lora_magnitude_vector {tuple(tensors[(key, 'M')].shape)} "
                    f"!= ({b.shape[0]},)"
                )
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
        module_paths=tuple(paths.items()),
        model_layers=len(layers) if cfg["layers"] is None else None,
        rank_pattern=tuple(ranks.items()),
        alpha_pattern=tuple(alphas.items()),
        use_dora=cfg["use_dora"],
    )
    keys = spec.keys()
    magnitude = {k: tensors[(k, "M")] for k in keys} if cfg["use_dora"] else None
    return LoraAdapter(
        spec, {k: tensors[(k, "A")] for k in keys}, {k: tensors[(k, "B")] for k in keys}, magnitude
    )
