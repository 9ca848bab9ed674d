"""Run a frozen HF model as if LoRA adapters were loaded, one adapter per group of batch rows.

    out = functional_forward(model, batch, input_ids=ids, attention_mask=mask)

With a LoraBatch of n adapters and N input rows (N a multiple of n), adapter i covers rows
[i*N/n, (i+1)*N/n). Forward hooks on the target nn.Linear modules add `scale * B_i (A_i x)` to
their outputs with two bmm calls over `[n, rows_per_adapter * T, features]`: no dense delta-W is
built and no parameter or buffer of the model changes. Per-key ranks and scales (PEFT's
rank_pattern / alpha_pattern) run through the same bmm's, zero-padded to the largest rank
(`spec.uniform_rank`); DoRA rescales each output row by `m / ||W + scale B A||_row` as PEFT does. Modules fed the same tensor (q/k/v,
gate/up) share one bmm against their concatenated A's. Hooks exist only during the call
(try/finally), so the model is clean afterwards, also after an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import LoraError
from .mapping import Discovery, check_fits
from .spec import LoraAdapter, LoraBatch, LoraKey, LoraSpec, uniform_rank

__all__ = ["applied", "functional_forward"]

# Modules that usually read the same input tensor. Sharing is only an optimisation: a hook checks
# that the input really is the same tensor object and otherwise computes its own product.
_SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# Inputs whose first dimension is the batch row; these are split when adapters are chunked.
_ROW_INPUTS = ("input_ids", "attention_mask", "inputs_embeds", "position_ids", "token_type_ids")


def functional_forward(
    model: nn.Module,
    adapters: LoraAdapter | LoraBatch,
    *,
    adapter_chunk_size: int | None = None,
    gradient_checkpointing: bool = False,
    **model_inputs: Any,
) -> Any:
    """`model(**model_inputs)` with `adapters` applied functionally; returns the model's output.

    model: a CausalLM or its backbone (`model.model`); the base is never modified.
    adapters: a LoraAdapter (applied to every row) or a LoraBatch (adapter-major rows).
    adapter_chunk_size: run at most this many adapters (with their rows) per forward and
        concatenate the outputs along the batch dimension (every tensor field, tuples too).
    gradient_checkpointing: checkpoint each decoder layer; the recompute in backward re-applies
        that layer's LoRA. (HF's own `gradient_checkpointing_enable()` would drop it; that
        combination raises.)
    `use_cache` defaults to False. Gradients flow to the adapter tensors.
    """
    spec, A, B, M = _unpack(adapters, "functional_forward")
    n = next(iter(A.values())).shape[0]
    rows = _rows(model_inputs)
    if n == 0 or rows % n:
        raise LoraError(f"functional_forward: {rows} input rows is not a multiple of {n} adapters")
    found = check_fits(model, spec)
    _refuse_hf_checkpointing(model, found)
    model_inputs.setdefault("use_cache", False)

    use_ckpt = gradient_checkpointing and torch.is_grad_enabled()
    if adapter_chunk_size is None or adapter_chunk_size >= n:
        return _forward(model, found, spec, A, B, M, use_ckpt, model_inputs)
    if adapter_chunk_size < 1:
        raise LoraError(
            f"functional_forward: adapter_chunk_size must be >= 1, got {adapter_chunk_size}"
        )
    per = rows // n
    outs = []
    for a0 in range(0, n, adapter_chunk_size):
        a1 = min(n, a0 + adapter_chunk_size)
        sub_inputs = _slice_rows(model_inputs, rows, a0 * per, a1 * per)
        sub_A = {k: v[a0:a1] for k, v in A.items()}
        sub_B = {k: v[a0:a1] for k, v in B.items()}
        sub_M = _map(M, lambda v, a0=a0, a1=a1: v[a0:a1])
        outs.append(_forward(model, found, spec, sub_A, sub_B, sub_M, use_ckpt, sub_inputs))
    return _concat(outs)


@contextmanager
def applied(model: nn.Module, adapters: LoraAdapter | LoraBatch):
    """Every forward of ``model`` inside the block runs with ``adapters`` applied functionally.

        with applied(model, batch):   # n adapters; rows adapter-major, as in functional_forward
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8)

    For calls that run the model several times, such as ``generate`` (greedy or sampling: its
    rows keep their order, so row group i stays with adapter i through the KV cache). Every
    forward's row count must be a multiple of the adapters (checked in each hook; beam search,
    which reorders and multiplies rows, is not supported). The hooks are removed on exit, also
    after an exception; no parameter or buffer of the model changes.
    """
    spec, A, B, M = _unpack(adapters, "applied")
    found = check_fits(model, spec)
    _refuse_hf_checkpointing(model, found)
    prep = _Prepared(found, spec, A, B, M)
    with _hooks_installed(found, prep.hooks(spec.keys())):
        yield


def _unpack(adapters: LoraAdapter | LoraBatch, where: str):
    """(spec, A, B, magnitude) with a leading adapter dimension (1 for a single adapter)."""
    if isinstance(adapters, LoraAdapter):
        A = {k: v.unsqueeze(0) for k, v in adapters.A.items()}  # [1, r, in]
        B = {k: v.unsqueeze(0) for k, v in adapters.B.items()}  # [1, out, r]
        M = _map(adapters.magnitude, lambda v: v.unsqueeze(0))  # [1, out]
        return adapters.spec, A, B, M
    if isinstance(adapters, LoraBatch):
        return adapters.spec, adapters.A, adapters.B, adapters.magnitude
    raise LoraError(
        f"{where}: adapters must be LoraAdapter or LoraBatch, got {type(adapters).__name__}"
    )


def _rows(inputs: dict[str, Any]) -> int:
    for name in ("input_ids", "inputs_embeds"):
        t = inputs.get(name)
        if isinstance(t, Tensor):
            return t.shape[0]
    raise LoraError(
        "functional_forward: pass input_ids or inputs_embeds (batch rows come from them)"
    )


def _refuse_hf_checkpointing(model: nn.Module, found: Discovery) -> None:
    """HF's checkpointing replays layers in backward, after our hooks are gone: refuse it."""
    if not (model.training and torch.is_grad_enabled()):
        return
    layers = [model.get_submodule(name) for name in found.layers.values()]
    if any(getattr(m, "gradient_checkpointing", False) is True for m in [model, *layers]):
        raise LoraError(
            "functional_forward: the model has HF gradient checkpointing enabled, whose backward "
            "recompute would drop the LoRA; call model.gradient_checkpointing_disable() and pass "
            "gradient_checkpointing=True instead"
        )


def _slice_rows(inputs: dict[str, Any], rows: int, r0: int, r1: int) -> dict[str, Any]:
    out = {}
    for name, value in inputs.items():
        if not isinstance(value, Tensor):
            out[name] = value
        elif name == "labels":
            raise LoraError(
                "functional_forward: labels with adapter_chunk_size would average the loss per "
                "chunk; compute the loss from the returned logits instead"
            )
        elif name not in _ROW_INPUTS:
            raise LoraError(
                f"functional_forward: cannot split input {name!r} across adapter chunks"
            )
        elif value.shape[0] == rows:
            out[name] = value[r0:r1]
        elif value.shape[0] == 1:  # broadcast over rows, e.g. position_ids [1, T]
            out[name] = value
        else:
            raise LoraError(
                f"functional_forward: input {name!r} has {value.shape[0]} rows, expected {rows}"
            )
    return out


def _concat(outs: list[Any]) -> Any:
    """Concatenate chunk outputs along the batch dimension, field by field."""
    first = outs[0]
    if isinstance(first, Tensor):
        if first.dim() == 0:
            raise LoraError(
                "functional_forward: cannot concatenate scalar outputs across adapter chunks"
            )
        return torch.cat(outs, dim=0)
    if first is None:
        return None
    if isinstance(first, tuple | list) and not hasattr(first, "keys"):
        return type(first)(_concat([o[i] for o in outs]) for i in range(len(first)))
    if hasattr(first, "keys"):  # transformers ModelOutput (or a dict)
        return type(first)(**{k: _concat([o[k] for o in outs]) for k in first.keys()})  # noqa: SIM118
    raise LoraError(
        f"functional_forward: cannot concatenate output of type {type(first).__name__} across "
        "adapter chunks (pass use_cache=False)"
    )


class _Prepared:
    """The adapter tensors of one forward, cast once to the activation dtype/device.

    At[key]: [n, in, r]; Bt[key]: [n, r, out]; group_At[group]: [n, in, g*r] (concatenated A's);
    dora[key]: [n, 1, out] DoRA's per-row factor m / ||W + scale B A|| (DoRA only).
    Built before the forward so gradient-checkpoint recompute reuses them unchanged.
    """

    def __init__(
        self, found: Discovery, spec: LoraSpec, A: dict, B: dict, M: dict | None = None
    ) -> None:
        self.n = next(iter(A.values())).shape[0]
        self.r, self.scale, A, B = uniform_rank(spec, A, B)
        self.At: dict[LoraKey, Tensor] = {}
        self.Bt: dict[LoraKey, Tensor] = {}
        self.dora: dict[LoraKey, Tensor] = {}
        self.group_of: dict[LoraKey, tuple[tuple[LoraKey, ...], int]] = {}
        self.group_At: dict[tuple[LoraKey, ...], Tensor] = {}
        targets = set(spec.target_modules)
        for layer in spec.layers:
            for names in _SHARED_INPUT_GROUPS:
                if all(m in targets for m in names):
                    group = tuple((layer, m) for m in names)
                    w = found.modules[group[0]].weight
                    cat = torch.cat([A[k] for k in group], dim=1)  # [n, g*r, in]
                    self.group_At[group] = cat.to(device=w.device, dtype=w.dtype).transpose(1, 2)
                    for j, k in enumerate(group):
                        self.group_of[k] = (group, j)
        keys = spec.keys()
        for key in keys:
            w = found.modules[key].weight
            if key in self.group_of:
                group, j = self.group_of[key]
                self.At[key] = self.group_At[group][..., j * self.r : (j + 1) * self.r]
            else:
                self.At[key] = A[key].to(device=w.device, dtype=w.dtype).transpose(1, 2)
            self.Bt[key] = B[key].to(device=w.device, dtype=w.dtype).transpose(1, 2)
            if M is not None:
                factor = dora_factor(w, A[key], B[key], M[key], self.scale)  # [n, out]
                self.dora[key] = factor.to(w.dtype).unsqueeze(1)  # [n, 1, out]

    def hooks(self, keys: list[LoraKey]) -> dict[LoraKey, Callable]:
        """One forward hook per key; keys of a shared-input group share a small state."""
        states: dict[tuple[LoraKey, ...], dict] = {}
        out = {}
        for key in keys:
            group, j = self.group_of.get(key, (None, 0))
            state = (
                states.setdefault(group, {"x": None, "xa": None, "shared": True}) if group else None
            )
            out[key] = self._hook(key, group, j, state)
        return out

    def _hook(self, key: LoraKey, group: tuple | None, j: int, state: dict | None) -> Callable:
        n, r, scale = self.n, self.r, self.scale
        At, Bt = self.At[key], self.Bt[key]
        group_At = self.group_At[group] if group else None
        dora = self.dora.get(key)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
            x = args[0] if args else kwargs["input"]
            if x.dim() == 3 and x.shape[0] % n:  # a reshape would silently mix adapters' rows
                raise LoraError(
                    f"{key[1]} of layer {key[0]}: {x.shape[0]} input rows is not a multiple of "
                    f"{n} adapters (rows are adapter-major: n adapters x rows per adapter)"
                )
            x3 = x.reshape(n, -1, x.shape[-1])  # [n, rows_per_adapter * T, in] (a view)
            if state is None:
                xa = torch.bmm(x3, _as(At, x3))  # [n, rows*T, r]
            elif state["x"] is x and state["shared"]:
                xa = state["xa"][..., j * r : (j + 1) * r]  # [n, rows*T, r]
            elif j == 0 and state["shared"]:
                state["x"], state["xa"] = x, torch.bmm(x3, _as(group_At, x3))  # [n, rows*T, g*r]
                xa = state["xa"][..., :r]
            else:  # this module's input is not its group's: stop sharing for this layer
                state["shared"] = False
                state["x"] = state["xa"] = None
                xa = torch.bmm(x3, _as(At, x3))
            out3 = output.reshape(n, -1, output.shape[-1])  # [n, rows*T, out]
            if dora is not None:
                return _dora_output(module, out3, xa, _as(Bt, xa), scale, dora).view_as(output)
            if xa.dtype == out3.dtype:
                return torch.baddbmm(out3, xa, _as(Bt, xa), alpha=scale).view_as(output)
            return (out3 + scale * torch.bmm(xa, _as(Bt, xa)).to(out3.dtype)).view_as(output)

        return hook


def dora_factor(weight: Tensor, A: Tensor, B: Tensor, magnitude: Tensor, scale: float) -> Tensor:
    """DoRA's per-row factor m / ||W + scale B_i A_i||, for n adapters at once. -> [n, out] fp32.

    weight: [out, in]; A: [n, r, in]; B: [n, out, r]; magnitude: [n, out]. The squared row norm
    is expanded as ||W||^2 + 2 s <W, B A> + s^2 ||B A||^2, so no [n, out, in] tensor is built.
    Computed in float32 (float64 stays) and detached from the graph, as PEFT detaches the norm
    (DoRA paper, section 4.3); gradients still reach the magnitude.
    """
    dt = torch.promote_types(weight.dtype, torch.float32)
    with torch.no_grad():
        w = weight.to(dt)
        a = A.detach().to(device=w.device, dtype=dt)
        b = B.detach().to(device=w.device, dtype=dt)
        wa = torch.matmul(w, a.transpose(1, 2))  # [n, out, r]
        bg = torch.bmm(b, torch.bmm(a, a.transpose(1, 2)))  # [n, out, r]: B (A A^T)
        sq = w.square().sum(1) + 2 * scale * (b * wa).sum(-1) + scale**2 * (bg * b).sum(-1)
        norm = sq.clamp(min=0).sqrt()  # [n, out]
    return magnitude.to(device=w.device, dtype=dt) / norm


def _dora_output(
    module: nn.Module, out3: Tensor, xa: Tensor, Bt: Tensor, scale: float, factor: Tensor
) -> Tensor:
    """factor * (W x + scale B A x) + bias from the base output W x + bias. [n, M, out]."""
    bias = getattr(module, "bias", None)
    lora = scale * torch.bmm(xa, Bt).to(out3.dtype)  # [n, M, out]
    base = out3 if bias is None else out3 - bias
    out = (base + lora) * _as(factor, out3)
    return out if bias is None else out + bias


def _map(tensors: dict | None, fn: Callable) -> dict | None:
    return None if tensors is None else {k: fn(v) for k, v in tensors.items()}


def _as(w: Tensor, like: Tensor) -> Tensor:
    """Adapter tensor in the dtype of the activation (differs only under autocast)."""
    return w if w.dtype == like.dtype else w.to(like.dtype)


@contextmanager
def _hooks_installed(found: Discovery, hooks: dict[LoraKey, Callable]):
    handles = []
    try:
        for key, hook in hooks.items():
            handles.append(found.modules[key].register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _forward(
    model: nn.Module,
    found: Discovery,
    spec: LoraSpec,
    A: dict,
    B: dict,
    M: dict | None,
    use_ckpt: bool,
    inputs: dict[str, Any],
) -> Any:
    prep = _Prepared(found, spec, A, B, M)
    if not use_ckpt:
        with _hooks_installed(found, prep.hooks(spec.keys())):
            return model(**inputs)
    with _layers_checkpointed(model, found, spec, prep):
        return model(**inputs)


@contextmanager
def _layers_checkpointed(model: nn.Module, found: Discovery, spec: LoraSpec, prep: _Prepared):
    """Checkpoint every decoder layer; each (re)run of a layer installs that layer's LoRA hooks.

    Layers the adapter does not touch are checkpointed too, so memory does not depend on
    which layers an adapter covers.
    """
    keys = spec.keys()
    keys_by_layer = {i: [k for k in keys if k[0] == i] for i in found.layers}
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for i, name in found.layers.items():
            layer = model.get_submodule(name)
            patched.append((layer, layer.__dict__.get("forward")))
            layer.forward = _checkpointed_forward(layer.forward, found, prep, keys_by_layer[i])
        yield
    finally:
        for layer, previous in patched:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


def _checkpointed_forward(
    forward: Callable, found: Discovery, prep: _Prepared, keys: list[LoraKey]
) -> Callable:
    def run(*args: Any, **kwargs: Any) -> Any:
        with _hooks_installed(found, prep.hooks(keys)):  # fresh shared-input state per run
            return forward(*args, **kwargs)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return wrapped
