"""Adapters as data: `LoraSpec` (structure), `LoraAdapter` (one adapter), `LoraBatch` (n stacked).

A LoRA adds `scale * B (A x)` to a linear layer's output, with A `[r, in]`, B `[out, r]` and
`scale = alpha / r` (`alpha / sqrt(r)` with rsLoRA). Tensors are keyed by `(layer, module)`,
e.g. `(3, "q_proj")`, which does not depend on whether a CausalLM or its backbone is used.

    spec = LoraSpec.for_model(model, rank=8, alpha=16, target_modules=("q_proj", "v_proj"))
    batch = LoraBatch(spec, A={k: ... [n, r, in]}, B={k: ... [n, out, r]})
    batch[0]  # -> LoraAdapter
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import LoraError, LoraKeyMismatchError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["STANDARD_MODULES", "LoraAdapter", "LoraBatch", "LoraKey", "LoraSpec"]

LoraKey = tuple[int, str]

# The Llama/Qwen2/Mistral projection names in the order a decoder layer runs them. Only used to
# give `target_modules` one canonical order (so equal structures compare equal); any other
# module name is allowed and sorts after these.
STANDARD_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_order(name: str) -> tuple[int, str]:
    """Sort key giving target modules their canonical order."""
    return (STANDARD_MODULES.index(name), "") if name in STANDARD_MODULES else (99, name)


@dataclass(frozen=True)
class LoraSpec:
    """The structure of an adapter, without tensors. Orders are normalised on construction."""

    base_model: str  # base_model_name_or_path written to adapter_config.json ("" if unknown)
    target_modules: tuple[str, ...]  # short module names ("q_proj", ...), canonical order
    layers: tuple[int, ...]  # decoder layer indices covered, ascending
    rank: int  # r
    alpha: float  # lora_alpha
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    shapes: tuple[tuple[str, int, int], ...] = ()  # (module, in_features, out_features)
    # (module, PEFT path template relative to the CausalLM, e.g. "model.layers.{layer}.mlp.up_proj"):
    # how to name keys on save. Naming only, so it does not take part in equality.
    module_paths: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    # Number of decoder layers of the base model, if known: lets save_adapter omit
    # `layers_to_transform` when every layer is covered. Metadata, not part of equality.
    model_layers: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise LoraError(f"LoraSpec.rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha):
            raise LoraError(f"LoraSpec.alpha must be a finite number, got {self.alpha!r}")
        if isinstance(self.target_modules, str):
            raise LoraError("LoraSpec.target_modules must be a tuple of names, not a string")
        targets = tuple(self.target_modules)
        if not targets:
            raise LoraError("LoraSpec.target_modules must not be empty")
        for m in targets:
            if not isinstance(m, str) or not m or "." in m:
                raise LoraError(f"LoraSpec.target_modules: {m!r} is not a short module name")
        if len(set(targets)) != len(targets):
            raise LoraError(f"LoraSpec.target_modules has duplicates: {targets}")
        layers = tuple(self.layers)
        if not layers or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers
        ):
            raise LoraError(f"LoraSpec.layers must be non-negative ints, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise LoraError(f"LoraSpec.layers has duplicates: {layers}")
        targets = tuple(sorted(targets, key=module_order))
        shapes = tuple((str(m), int(i), int(o)) for m, i, o in self.shapes)
        if shapes:
            names = [m for m, _, _ in shapes]
            if sorted(names, key=module_order) != list(targets):
                raise LoraError(
                    f"LoraSpec.shapes must list each target module once: got {names}, "
                    f"target_modules {list(targets)}"
                )
            shapes = tuple(sorted(shapes, key=lambda s: module_order(s[0])))
        paths = tuple(sorted(((str(m), str(p)) for m, p in self.module_paths)))
        for m, p in paths:
            if "{layer}" not in p:
                raise LoraError(f"LoraSpec.module_paths[{m!r}] = {p!r} lacks '{{layer}}'")
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "layers", tuple(sorted(layers)))
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "module_paths", paths)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "use_rslora", bool(self.use_rslora))
        object.__setattr__(self, "base_model", str(self.base_model or ""))
        if self.model_layers is not None and (
            not isinstance(self.model_layers, int) or self.model_layers <= max(layers)
        ):
            raise LoraError(
                f"LoraSpec.model_layers={self.model_layers!r} does not cover layers {layers}"
            )

    @property
    def scale(self) -> float:
        """The LoRA scaling PEFT uses: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def keys(self) -> list[LoraKey]:
        """Every (layer, module) pair: layer-major, then `target_modules` order."""
        return [(layer, m) for layer in self.layers for m in self.target_modules]

    def in_out(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a target module."""
        for m, i, o in self.shapes:
            if m == module:
                return i, o
        known = "no shapes recorded" if not self.shapes else f"known: {list(self.target_modules)}"
        raise LoraError(f"LoraSpec.in_out: no shape for module {module!r} ({known})")

    def num_params(self) -> int:
        """Number of LoRA parameters of one adapter (A and B of every key)."""
        return sum(self.rank * (i + o) for _, i, o in self.shapes) * len(self.layers)

    def path_template(self, module: str) -> str | None:
        """The PEFT path template of a module, or None if the spec does not record one."""
        return dict(self.module_paths).get(module)

    def compatible(self, other: LoraSpec) -> bool:
        """Same structure and scale (base_model and naming may differ): can share a LoraBatch."""
        return (
            self.target_modules == other.target_modules
            and self.layers == other.layers
            and self.rank == other.rank
            and self.scale == other.scale
            and self.shapes == other.shapes
        )

    def replace(self, **changes: object) -> LoraSpec:
        """A copy with some fields changed (validated again)."""
        fields = {
            "base_model": self.base_model,
            "target_modules": self.target_modules,
            "layers": self.layers,
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "shapes": self.shapes,
            "module_paths": self.module_paths,
            "model_layers": self.model_layers,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise LoraError(f"LoraSpec.replace: unknown fields {sorted(unknown)}")
        fields.update(changes)
        return LoraSpec(**fields)  # type: ignore[arg-type]

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        rank: int,
        alpha: float,
        target_modules: tuple[str, ...] | list[str],
        use_rslora: bool = False,
        layers: tuple[int, ...] | list[int] | None = None,
        base_model: str | None = None,
    ) -> LoraSpec:
        """The spec of an adapter on `model` (CausalLM or backbone), shapes and names discovered.

        `layers=None` covers every decoder layer. Raises LoraKeyMismatchError if a requested
        (layer, module) pair does not exist in the model.
        """
        from .mapping import discover

        target_modules = tuple(target_modules)
        found = discover(model, target_modules)
        absent = [m for m in target_modules if m not in found.templates]
        if absent:
            raise LoraKeyMismatchError(
                f"LoraSpec.for_model({type(model).__name__}): no nn.Linear '...layers.<i>...<name>'",
                missing=absent,
            )
        model_layers = sorted({layer for layer, _ in found.modules})
        layers = tuple(model_layers if layers is None else layers)
        missing = [(i, m) for i in layers for m in target_modules if (i, m) not in found.modules]
        if missing:
            raise LoraKeyMismatchError(
                f"LoraSpec.for_model({type(model).__name__})", missing=missing
            )
        shapes = []
        for m in target_modules:
            dims = {
                (found.modules[(i, m)].in_features, found.modules[(i, m)].out_features)
                for i in layers
            }
            if len(dims) != 1:
                raise LoraError(
                    f"LoraSpec.for_model: module {m!r} has different shapes per layer: {dims}"
                )
            (i_f, o_f) = dims.pop()
            shapes.append((m, i_f, o_f))
        if base_model is None:
            config = getattr(model, "config", None)
            base_model = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
        return cls(
            base_model=base_model or "",
            target_modules=tuple(target_modules),
            layers=layers,
            rank=rank,
            alpha=alpha,
            use_rslora=use_rslora,
            shapes=tuple(shapes),
            module_paths=tuple((m, found.templates[m]) for m in target_modules),
            model_layers=model_layers[-1] + 1,
        )


def _check_tensors(
    spec: LoraSpec, A: dict, B: dict, lead: tuple[int, ...] | None, where: str
) -> int | None:
    """Validate A/B keys and shapes against `spec`; returns the shared leading (batch) size."""
    want = set(spec.keys())
    missing = sorted((want - set(A)) | (want - set(B)))
    extra = sorted((set(A) - want) | (set(B) - want), key=str)
    if missing or extra:
        raise LoraKeyMismatchError(where, missing=missing, extra=extra)
    shapes = dict((m, (i, o)) for m, i, o in spec.shapes)
    errors: list[str] = []
    n_seen: set[int] = set()
    r = spec.rank
    keys = spec.keys()
    for key in keys:
        a, b = A[key], B[key]
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            raise LoraError(f"{where}: A/B of {key} must be tensors")
        extra_dims = a.dim() - 2
        if lead is None and (extra_dims != 1 or b.dim() != 3):
            errors.append(
                f"{key} A{tuple(a.shape)} B{tuple(b.shape)} need [n, r, in] / [n, out, r]"
            )
            continue
        if lead == () and (a.dim() != 2 or b.dim() != 2):
            errors.append(f"{key} A{tuple(a.shape)} B{tuple(b.shape)} need [r, in] / [out, r]")
            continue
        if lead is None:
            n_seen.update((a.shape[0], b.shape[0]))
        io = shapes.get(key[1])
        if a.shape[-2] != r or b.shape[-1] != r:
            errors.append(f"{key} A{tuple(a.shape)} B{tuple(b.shape)} rank != {r}")
        elif io is not None and (a.shape[-1] != io[0] or b.shape[-2] != io[1]):
            errors.append(f"{key} A{tuple(a.shape)} B{tuple(b.shape)} != in/out {io}")
    if len(n_seen) > 1:
        errors.append(f"adapter counts differ across tensors: {sorted(n_seen)}")
    if errors:
        raise LoraKeyMismatchError(where, shape_errors=errors)
    return n_seen.pop() if n_seen else None


@dataclass
class LoraAdapter:
    """One adapter: A `[r, in]` and B `[out, r]` per (layer, module) key of `spec`."""

    spec: LoraSpec
    A: dict[LoraKey, Tensor]  # [r, in]
    B: dict[LoraKey, Tensor]  # [out, r]

    def __post_init__(self) -> None:
        _check_tensors(self.spec, self.A, self.B, (), "LoraAdapter")

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LoraAdapter:
        """A copy on `device` / in `dtype` (differentiable, like Tensor.to)."""
        return LoraAdapter(
            self.spec,
            {k: v.to(device=device, dtype=dtype) for k, v in self.A.items()},
            {k: v.to(device=device, dtype=dtype) for k, v in self.B.items()},
        )

    def delta_weight(self, key: LoraKey) -> Tensor:
        """The dense update `scale * B @ A` `[out, in]` of one key (for merging/inspection)."""
        return self.spec.scale * (self.B[key] @ self.A[key])


@dataclass
class LoraBatch:
    """n adapters sharing one spec, stacked: A `[n, r, in]`, B `[n, out, r]` per key."""

    spec: LoraSpec
    A: dict[LoraKey, Tensor]  # [n, r, in]
    B: dict[LoraKey, Tensor]  # [n, out, r]

    def __post_init__(self) -> None:
        _check_tensors(self.spec, self.A, self.B, None, "LoraBatch")

    def __len__(self) -> int:
        return next(iter(self.A.values())).shape[0]

    def __getitem__(self, i: int | slice) -> LoraAdapter | LoraBatch:
        """`batch[i]` is a LoraAdapter (views, differentiable); `batch[a:b]` a LoraBatch."""
        if isinstance(i, slice):
            return LoraBatch(
                self.spec,
                {k: v[i] for k, v in self.A.items()},
                {k: v[i] for k, v in self.B.items()},
            )
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"LoraBatch index {i} out of range for {n} adapters")
        return LoraAdapter(
            self.spec, {k: v[i] for k, v in self.A.items()}, {k: v[i] for k, v in self.B.items()}
        )

    @classmethod
    def from_adapters(cls, adapters: list[LoraAdapter]) -> LoraBatch:
        """Stack adapters of compatible specs (same structure and scale) into a batch."""
        if not adapters:
            raise LoraError("LoraBatch.from_adapters: empty list")
        spec = adapters[0].spec
        for j, a in enumerate(adapters[1:], start=1):
            if not spec.compatible(a.spec):
                raise LoraError(
                    f"LoraBatch.from_adapters: adapter {j} has a different structure or scale "
                    f"({a.spec}) than adapter 0 ({spec})"
                )
        keys = spec.keys()
        return cls(
            spec,
            {k: torch.stack([a.A[k] for a in adapters]) for k in keys},
            {k: torch.stack([a.B[k] for a in adapters]) for k in keys},
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LoraBatch:
        """A copy on `device` / in `dtype` (differentiable, like Tensor.to)."""
        return LoraBatch(
            self.spec,
            {k: v.to(device=device, dtype=dtype) for k, v in self.A.items()},
            {k: v.to(device=device, dtype=dtype) for k, v in self.B.items()},
        )
