"""Adapters as data: `LoraSpec` (structure), `LoraAdapter` (one adapter), `LoraBatch` (n stacked).

A LoRA adds `scale * B (A x)` to a linear layer's output, with A `[r, in]`, B `[out, r]` and
`scale = alpha / r` (`alpha / sqrt(r)` with rsLoRA). Tensors are keyed by `(layer, module)`,
e.g. `(3, "q_proj")`, which does not depend on whether a CausalLM or its backbone is used.

Two PEFT extensions are part of the structure, both off by default (a plain adapter has neither):
- per-key ranks and alphas (PEFT's `rank_pattern` / `alpha_pattern`, resolved to keys): key k
  has rank `spec.rank_of(k)` and scale `spec.scale_of(k)`;
- DoRA (`use_dora`): each key also has a magnitude vector m `[out]`, and the layer computes
  `m / ||W + scale B A||_row * (W x + scale B A x) + bias` (the norm over each output row).

    spec = LoraSpec.for_model(model, rank=8, alpha=16, target_modules=("q_proj", "v_proj"))
    batch = LoraBatch(spec, A={k: ... [n, r, in]}, B={k: ... [n, out, r]})
    batch[0]  # -> LoraAdapter
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
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
    # Keys whose rank / alpha differ from `rank` / `alpha` (PEFT's rank_pattern / alpha_pattern,
    # resolved per key): ((layer, module), value) pairs, sorted; empty for a uniform adapter.
    rank_pattern: tuple[tuple[LoraKey, int], ...] = ()
    alpha_pattern: tuple[tuple[LoraKey, float], ...] = ()
    # DoRA: every key carries a magnitude vector [out] (weight-decomposed LoRA).
    use_dora: bool = False

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
        object.__setattr__(self, "use_dora", bool(self.use_dora))
        object.__setattr__(self, "rank_pattern", self._pattern("rank_pattern", self.rank))
        object.__setattr__(self, "alpha_pattern", self._pattern("alpha_pattern", self.alpha))

    def _pattern(self, name: str, default: int | float) -> tuple:
        """Validate and normalise a per-key pattern: known keys, sorted, defaults dropped."""
        raw = getattr(self, name)
        items = raw.items() if isinstance(raw, dict) else raw
        known = set(self.keys())
        out = {}
        for key, value in items:
            key = (int(key[0]), str(key[1]))
            if key not in known:
                raise LoraError(f"LoraSpec.{name}: key {key} is not one of the adapter's keys")
            if name == "rank_pattern":
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise LoraError(f"LoraSpec.{name}[{key}] must be a positive int, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise LoraError(f"LoraSpec.{name}[{key}] must be a number, got {value!r}")
            elif not math.isfinite(value):
                raise LoraError(f"LoraSpec.{name}[{key}] must be finite, got {value!r}")
            else:
                value = float(value)
            if key in out:
                raise LoraError(f"LoraSpec.{name} lists key {key} twice")
            out[key] = value
        return tuple(sorted((k, v) for k, v in out.items() if v != default))

    def __repr__(self) -> str:
        # The dataclass repr, with the PEFT extensions shown only when used.
        names = [f.name for f in fields(self) if f.repr]
        extensions = ("rank_pattern", "alpha_pattern", "use_dora")
        shown = [n for n in names if n not in extensions or getattr(self, n)]
        return f"LoraSpec({', '.join(f'{n}={getattr(self, n)!r}' for n in shown)})"

    @property
    def scale(self) -> float:
        """The LoRA scaling PEFT uses: alpha / r, or alpha / sqrt(r) with rsLoRA.

        Of every key when the spec is uniform; with patterns, of the keys not in them
        (`scale_of(key)` for any key)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def uniform(self) -> bool:
        """True when every key has rank `rank` and scale `scale` (no rank/alpha pattern)."""
        return not self.rank_pattern and not self.alpha_pattern

    def rank_of(self, key: LoraKey) -> int:
        """The rank of one key (`rank` unless rank_pattern says otherwise)."""
        return dict(self.rank_pattern).get(key, self.rank) if self.rank_pattern else self.rank

    def alpha_of(self, key: LoraKey) -> float:
        """The alpha of one key (`alpha` unless alpha_pattern says otherwise)."""
        return dict(self.alpha_pattern).get(key, self.alpha) if self.alpha_pattern else self.alpha

    def scale_of(self, key: LoraKey) -> float:
        """The scaling of one key: alpha_of / rank_of (square root of the rank with rsLoRA)."""
        if self.uniform:
            return self.scale
        r = self.rank_of(key)
        return self.alpha_of(key) / (math.sqrt(r) if self.use_rslora else r)

    @property
    def max_rank(self) -> int:
        """The largest rank of any key (`rank` for a uniform spec)."""
        return (
            max([self.rank, *(r for _, r in self.rank_pattern)]) if self.rank_pattern else self.rank
        )

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
        """Number of parameters of one adapter (A and B of every key, DoRA magnitudes too)."""
        if self.uniform and not self.use_dora:
            return sum(self.rank * (i + o) for _, i, o in self.shapes) * len(self.layers)
        shapes = {m: (i, o) for m, i, o in self.shapes}
        total = 0
        for key in self.keys():
            i, o = shapes[key[1]]
            total += self.rank_of(key) * (i + o) + (o if self.use_dora else 0)
        return total

    def path_template(self, module: str) -> str | None:
        """The PEFT path template of a module, or None if the spec does not record one."""
        return dict(self.module_paths).get(module)

    def compatible(self, other: LoraSpec) -> bool:
        """Same structure and scale (base_model and naming may differ): can share a LoraBatch."""
        return self.structure == other.structure

    @property
    def structure(self) -> tuple:
        """What adapters must share to be stacked into one LoraBatch, as a hashable value:
        modules, layers, rank, scale and shapes, plus per-key ranks and scales and DoRA when used."""
        plain = (self.target_modules, self.layers, self.rank, self.scale, self.shapes)
        if self.uniform and not self.use_dora:
            return plain
        scales = tuple((k, self.scale_of(k)) for k in self.keys())
        return (*plain, self.rank_pattern, scales, self.use_dora)

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
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "use_dora": self.use_dora,
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
    spec: LoraSpec,
    A: dict,
    B: dict,
    lead: tuple[int, ...] | None,
    where: str,
    magnitude: dict | None = None,
) -> int | None:
    """Validate A/B (and DoRA magnitude) keys and shapes against `spec`; returns the batch size."""
    want = set(spec.keys())
    missing = sorted((want - set(A)) | (want - set(B)))
    extra = sorted((set(A) - want) | (set(B) - want), key=str)
    if spec.use_dora:
        if magnitude is None:
            raise LoraError(f"{where}: a DoRA spec (use_dora) needs magnitude vectors")
        missing = sorted(set(missing) | (want - set(magnitude)))
        extra = sorted(set(extra) | (set(magnitude) - want), key=str)
    elif magnitude is not None:
        raise LoraError(f"{where}: magnitude vectors given, but the spec is not DoRA (use_dora)")
    if missing or extra:
        raise LoraKeyMismatchError(where, missing=missing, extra=extra)
    shapes = dict((m, (i, o)) for m, i, o in spec.shapes)
    errors: list[str] = []
    n_seen: set[int] = set()
    keys = spec.keys()
    for key in keys:
        a, b = A[key], B[key]
        r = spec.rank_of(key)
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
        if magnitude is not None:
            m = magnitude[key]
            if not isinstance(m, Tensor):
                raise LoraError(f"{where}: magnitude of {key} must be a tensor")
            want_shape = (b.shape[-2],) if lead == () else (b.shape[0], b.shape[-2])
            if tuple(m.shape) != want_shape:
                errors.append(f"{key} magnitude {tuple(m.shape)} != {want_shape}")
    if len(n_seen) > 1:
        errors.append(f"adapter counts differ across tensors: {sorted(n_seen)}")
    if errors:
        raise LoraKeyMismatchError(where, shape_errors=errors)
    return n_seen.pop() if n_seen else None


@dataclass
class LoraAdapter:
    """One adapter: A `[r, in]` and B `[out, r]` per (layer, module) key of `spec`.

    `magnitude`: DoRA's magnitude vector `[out]` per key, present exactly when `spec.use_dora`.
    """

    spec: LoraSpec
    A: dict[LoraKey, Tensor]  # [r, in]
    B: dict[LoraKey, Tensor]  # [out, r]
    magnitude: dict[LoraKey, Tensor] | None = None  # [out], DoRA only

    def __post_init__(self) -> None:
        _check_tensors(self.spec, self.A, self.B, (), "LoraAdapter", self.magnitude)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LoraAdapter:
        """A copy on `device` / in `dtype` (differentiable, like Tensor.to)."""
        return LoraAdapter(
            self.spec,
            {k: v.to(device=device, dtype=dtype) for k, v in self.A.items()},
            {k: v.to(device=device, dtype=dtype) for k, v in self.B.items()},
            _map(self.magnitude, lambda v: v.to(device=device, dtype=dtype)),
        )

    def delta_weight(self, key: LoraKey) -> Tensor:
        """The dense update `scale * B @ A` `[out, in]` of one key (for merging/inspection)."""
        if self.spec.use_dora:
            raise LoraError(
                "delta_weight: a DoRA adapter's update depends on the base weight "
                "(m / ||W + sBA|| (W + sBA) - W); it has no base-independent delta-W"
            )
        return self.spec.scale_of(key) * (self.B[key] @ self.A[key])


@dataclass
class LoraBatch:
    """n adapters sharing one spec, stacked: A `[n, r, in]`, B `[n, out, r]` per key.

    `magnitude`: DoRA's magnitude vectors `[n, out]` per key, present exactly when `spec.use_dora`.
    """

    spec: LoraSpec
    A: dict[LoraKey, Tensor]  # [n, r, in]
    B: dict[LoraKey, Tensor]  # [n, out, r]
    magnitude: dict[LoraKey, Tensor] | None = None  # [n, out], DoRA only

    def __post_init__(self) -> None:
        _check_tensors(self.spec, self.A, self.B, None, "LoraBatch", self.magnitude)

    def __len__(self) -> int:
        return next(iter(self.A.values())).shape[0]

    def __getitem__(self, i: int | slice) -> LoraAdapter | LoraBatch:
        """`batch[i]` is a LoraAdapter (views, differentiable); `batch[a:b]` a LoraBatch."""
        if isinstance(i, slice):
            return LoraBatch(
                self.spec,
                {k: v[i] for k, v in self.A.items()},
                {k: v[i] for k, v in self.B.items()},
                _map(self.magnitude, lambda v: v[i]),
            )
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"LoraBatch index {i} out of range for {n} adapters")
        return LoraAdapter(
            self.spec,
            {k: v[i] for k, v in self.A.items()},
            {k: v[i] for k, v in self.B.items()},
            _map(self.magnitude, lambda v: v[i]),
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
        magnitude = None
        if spec.use_dora:
            magnitude = {k: torch.stack([a.magnitude[k] for a in adapters]) for k in keys}
        return cls(
            spec,
            {k: torch.stack([a.A[k] for a in adapters]) for k in keys},
            {k: torch.stack([a.B[k] for a in adapters]) for k in keys},
            magnitude,
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LoraBatch:
        """A copy on `device` / in `dtype` (differentiable, like Tensor.to)."""
        return LoraBatch(
            self.spec,
            {k: v.to(device=device, dtype=dtype) for k, v in self.A.items()},
            {k: v.to(device=device, dtype=dtype) for k, v in self.B.items()},
            _map(self.magnitude, lambda v: v.to(device=device, dtype=dtype)),
        )


def _map(tensors: dict[LoraKey, Tensor] | None, fn) -> dict[LoraKey, Tensor] | None:
    return None if tensors is None else {k: fn(v) for k, v in tensors.items()}


def uniform_rank(
    spec: LoraSpec, A: dict[LoraKey, Tensor], B: dict[LoraKey, Tensor]
) -> tuple[int, float, dict[LoraKey, Tensor], dict[LoraKey, Tensor]]:
    """(r, scale, A, B) with every key at one rank r and one scale, for the batched kernels.

    A uniform spec comes back as it is. Otherwise each key is zero-padded to `spec.max_rank`
    (A `[n, r_k, in]` -> `[n, r, in]`, B `[n, out, r_k]` -> `[n, out, r]`: the extra rank
    components are 0 * 0, so B A is unchanged) and its own scale is folded into B, with scale 1.
    Differentiable wrt the given tensors.
    """
    if spec.uniform:
        return spec.rank, spec.scale, A, B
    r = spec.max_rank
    A2, B2 = {}, {}
    keys = spec.keys()
    for key in keys:
        pad = r - spec.rank_of(key)
        A2[key] = torch.nn.functional.pad(A[key], (0, 0, 0, pad))  # [n, r, in]
        B2[key] = torch.nn.functional.pad(B[key] * spec.scale_of(key), (0, pad))  # [n, out, r]
    return r, 1.0, A2, B2
