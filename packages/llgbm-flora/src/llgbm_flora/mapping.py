"""Where each (layer, module) key lives in a model, discovered from module names (no per-family table).

A decoder layer's linear `<target>` is any `nn.Linear` named `...layers.<i>.(...).<target>`, which
covers Llama, Qwen2, Mistral and most HF decoder-only families, as a CausalLM or as its backbone.

    module_map(model, ["q_proj", "v_proj"])  # {(0, "q_proj"): "model.layers.0.self_attn.q_proj", ...}
    check_fits(model, spec)                  # raises LoraKeyMismatchError if the adapter cannot apply
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from .errors import LoraError, LoraKeyMismatchError

if TYPE_CHECKING:
    from .spec import LoraKey, LoraSpec

__all__ = ["Discovery", "check_fits", "discover", "module_map"]

_LAYER_RE = re.compile(
    r"^(?P<stack>(?:.*\.)?layers)\.(?P<layer>\d+)\.(?P<sub>(?:.*\.)?)(?P<mod>[^.]+)$"
)


@dataclass
class Discovery:
    """What `discover` found in one model for a set of target module names."""

    modules: dict[LoraKey, nn.Linear]  # (layer, module) -> the linear layer
    names: dict[LoraKey, str]  # (layer, module) -> qualified name inside the given model
    templates: dict[str, str]  # module -> PEFT path template relative to the CausalLM
    layers: dict[int, str]  # layer index -> qualified name of the decoder layer in the given model


def _root_prefix(model: nn.Module) -> str:
    """Prefix that makes names of `model` relative to its CausalLM (PEFT names start there).

    An HF backbone (e.g. LlamaModel) is its own `base_model`; inside the CausalLM it lives under
    `base_model_prefix` ("model"), so its names get that prefix. A CausalLM needs none.
    """
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and getattr(model, "base_model", None) is model:
        return prefix + "."
    return ""


def discover(model: nn.Module, target_modules: Iterable[str]) -> Discovery:
    """Find every decoder-layer nn.Linear whose short name is in `target_modules`."""
    targets = set(target_modules)
    root = _root_prefix(model)
    modules: dict[LoraKey, nn.Linear] = {}
    names: dict[LoraKey, str] = {}
    templates: dict[str, str] = {}
    layers: dict[int, str] = {}
    for name, module in model.named_modules():
        m = _LAYER_RE.match(name)
        if m is None or m["mod"] not in targets or not isinstance(module, nn.Linear):
            continue
        key = (int(m["layer"]), m["mod"])
        if key in names:
            raise LoraError(
                f"{type(model).__name__}: two modules map to layer {key[0]} {key[1]!r}: "
                f"{names[key]} and {name}"
            )
        template = f"{root}{m['stack']}.{{layer}}.{m['sub']}{m['mod']}"
        if templates.setdefault(m["mod"], template) != template:
            raise LoraError(
                f"{type(model).__name__}: module {m['mod']!r} sits at different paths in "
                f"different layers ({templates[m['mod']]} vs {template})"
            )
        modules[key] = module
        names[key] = name
        layers[key[0]] = f"{m['stack']}.{m['layer']}"
    return Discovery(modules, names, templates, layers)


def module_map(model: nn.Module, target_modules: Iterable[str]) -> dict[LoraKey, str]:
    """(layer, module) -> qualified module name in `model`, sorted layer-major.

    Raises LoraKeyMismatchError if a target name matches no decoder-layer nn.Linear at all.
    """
    target_modules = list(target_modules)
    found = discover(model, target_modules)
    absent = [m for m in target_modules if m not in found.templates]
    if absent:
        raise LoraKeyMismatchError(
            f"{type(model).__name__} (no nn.Linear named '...layers.<i>...<name>')", missing=absent
        )
    return dict(sorted(found.names.items()))


def check_fits(model: nn.Module, spec: LoraSpec, *, all_layers: bool = False) -> Discovery:
    """Raise LoraKeyMismatchError unless every key of `spec` is a linear of the right shape.

    `all_layers=True` also requires the adapter to cover every decoder layer of the model (an
    adapter saved without `layers_to_transform` must). Returns the discovery for reuse.
    """
    found = discover(model, spec.target_modules)
    where = f"adapter for {type(model).__name__}"
    keys = spec.keys()
    extra = [k for k in keys if k not in found.modules]
    missing: list[LoraKey] = []
    if all_layers:
        model_layers = sorted({i for i, _ in found.modules})
        missing = [
            (i, m) for i in model_layers if i not in spec.layers for m in spec.target_modules
        ]
    shapes = {m: (i, o) for m, i, o in spec.shapes}
    errors = []
    for key in keys:
        lin = found.modules.get(key)
        want = shapes.get(key[1])
        if lin is not None and want is not None and want != (lin.in_features, lin.out_features):
            errors.append(
                f"{key} adapter in/out {want} != model {(lin.in_features, lin.out_features)}"
            )
    if extra or missing or errors:
        raise LoraKeyMismatchError(where, missing=missing, extra=extra, shape_errors=errors)
    return found
