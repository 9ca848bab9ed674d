"""A fused forward for Llama-family decoders: the HF model's weights, our own layer function.

    fused_unsupported(model)                                      # None, or why not
    h = fused_hidden_states(model, batch, input_ids, select=last)  # [N, H], final norm applied

`functional_forward` runs the HF model with forward hooks: any architecture, any output. This
module covers the common case that needs speed (delta activations of many adapters at once) for
Llama, Qwen2 and Mistral: the decoder layer is written out as one function of plain tensors
(norm, rotary, causal attention, SwiGLU MLP, per-row LoRA via bmm), so that

- one function serves every layer, and `torch.compile` can fuse the elementwise work around the
  matmuls (compiled once per shape, not once per layer);
- inputs are right-padded and attention is purely causal: a real token never sees a pad token,
  so no mask is built and attention takes its fused causal kernel; pad positions compute values
  nobody reads;
- the final norm runs only on the selected tokens.

It reads the model's weights and never changes them (no hooks either). The math is the HF
implementation's (RMSNorm in float32, rotary from the model's own `rotary_emb`, scaling
head_dim**-0.5): tested equal to the hooked HF forward within 1e-5 in float32 for all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import LoraError
from .functional import dora_factor
from .mapping import check_fits
from .spec import LoraAdapter, LoraBatch, uniform_rank

__all__ = ["fused_hidden_states", "fused_unsupported"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# Linear modules of one decoder layer, grouped by the input they read (one A-product per group).
_GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
)
_MODULES = tuple(m for _, group in _GROUPS for m in group)
_compiled: dict[str, Callable] = {}
# llgbm_flora.kernels (Triton), imported by the first call on a CUDA tensor, so that CPU users
# never import Triton or register its custom op.
_kernels = None


def _load_kernels():
    global _kernels
    if _kernels is None:
        from . import kernels

        _kernels = kernels
    return _kernels


def _backbone(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def fused_unsupported(model: nn.Module, seq_len: int | None = None) -> str | None:
    """None if `fused_hidden_states` can run `model` (inputs of `seq_len` tokens), else why not."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {config.hidden_act!r} is not 'silu'"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if model.training and getattr(config, "attention_dropout", 0.0):
        return "attention dropout in training mode"
    window = getattr(config, "sliding_window", None)
    uses_window = model_type == "mistral" or getattr(config, "use_sliding_window", False)
    if window and uses_window and (seq_len is None or seq_len > window):
        return f"sequences longer than the sliding window ({window})"
    backbone = _backbone(model)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not isinstance(getattr(backbone, name, None), nn.Module):
            return f"backbone {type(backbone).__name__} has no {name}"
    for layer in backbone.layers:
        for part, group in _GROUPS:
            for m in group:
                lin = getattr(getattr(layer, part, None), m, None)
                if type(lin) is not nn.Linear:  # a subclass (quantised, PEFT-wrapped) may differ
                    return f"{part}.{m} is {type(lin).__name__}, not a plain nn.Linear"
        if any(hasattr(layer.self_attn, a) for a in ("q_norm", "k_norm")):
            return "attention has q/k norms"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if not hasattr(getattr(layer, norm, None), "variance_epsilon"):
                return f"layer has no RMSNorm {norm}"
    return None


def fused_hidden_states(
    model: nn.Module,
    adapters: LoraAdapter | LoraBatch | None,
    input_ids: Tensor,
    *,
    lengths: Tensor | None = None,
    select: Tensor | None = None,
    compile: bool = False,
    gradient_checkpointing: bool = False,
) -> Tensor:
    """Final-norm hidden states of `model` with `adapters` applied per row group.

    input_ids: [N, T], right-padded (row i's real tokens first); N = n_adapters * rows_per_adapter,
        adapter-major as in `functional_forward`. Pad positions produce values to be ignored.
    lengths: [N] real tokens per row. When every adapter's rows have the same lengths (probes
        repeated per adapter), the rows are packed: all per-token work runs on real tokens only,
        and only attention sees the padded layout. Without it every position is computed.
    select: [N] token index per row (< its length) -> returns [N, H]; None -> [N, T, H].
    compile: run each layer through `torch.compile` (one compiled graph for all layers).
    Returns the model dtype; gradients flow to the adapter tensors.
    """
    N, T = input_ids.shape
    reason = fused_unsupported(model, int(T))
    if reason is not None:
        raise LoraError(f"fused_hidden_states: {type(model).__name__}: {reason}")
    backbone = _backbone(model)
    config = model.config
    n, lora = _prepare(model, adapters)
    if N % n:
        raise LoraError(f"fused_hidden_states: {N} input rows is not a multiple of {n} adapters")
    P = N // n  # rows (sequences) per adapter
    device = input_ids.device
    layout = _Layout.build(lengths, n, P, T, device)
    h = backbone.embed_tokens(input_ids.view(n, P * T))  # [n, P*T, H]
    if layout.real_idx is not None:
        h = h[:, layout.real_idx]  # [n, S, H], real tokens only
    H = h.shape[-1]
    cos, sin = backbone.rotary_emb(h, layout.positions.unsqueeze(0))  # [1, S, head_dim] each
    layer_fn = _compiled_layer() if compile else _layer
    n_heads = config.num_attention_heads
    n_kv = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or H // n_heads
    sel = None if select is None else layout.select(select.to(device), N, T)  # [N] flat, position
    mlp_kernel = _mlp_kernel(h, backbone, adapters)
    layers = list(backbone.layers)
    for i, layer in enumerate(layers):
        last = sel is not None and i == len(layers) - 1
        args = (
            h,
            cos[0],
            sin[0],
            _weights(layer),
            lora.get(i),
            layout.pad_idx,
            layout.real_idx,
            sel if last else None,
        )
        static = dict(
            P=P,
            T=T,
            n_heads=n_heads,
            n_kv=n_kv,
            head_dim=head_dim,
            eps=float(layer.input_layernorm.variance_epsilon),
            eps2=float(layer.post_attention_layernorm.variance_epsilon),
            scaling=head_dim**-0.5,
            inplace=not compile,
            mlp_kernel=mlp_kernel,
        )
        if gradient_checkpointing and torch.is_grad_enabled():
            h = checkpoint(layer_fn, *args, use_reentrant=False, **static)
        else:
            h = layer_fn(*args, **static)
    # h: [n, P, H] (the selected tokens, from the last layer) or [n, S, H]
    h = _rms_norm(h, backbone.norm.weight, float(backbone.norm.variance_epsilon))
    if sel is not None:
        return h.reshape(N, H)
    if layout.real_idx is None:
        return h.view(N, T, H)
    out = h.new_zeros(n, P * T, H)
    out[:, layout.real_idx] = h  # pads stay zero
    return out.view(N, T, H)


@dataclass(frozen=True)
class _Layout:
    """Where each row's real tokens sit: padded ([P, T] per adapter) or packed ([S] per adapter).

    positions: [S] rotary position of each token; starts: [P] index of each row's first token.
    Packed only (else None): real_idx [S] (padded slot of each packed token), pad_idx [P*T]
    (packed token feeding each padded slot; a pad repeats a real token of its row, and causal
    attention never lets a real token read a pad).
    """

    positions: Tensor
    real_idx: Tensor | None
    pad_idx: Tensor | None
    starts: Tensor
    lengths: Tensor | None  # [P] real tokens per row, packed only

    @classmethod
    def build(cls, lengths: Tensor | None, n: int, P: int, T: int, device) -> _Layout:
        if lengths is not None:
            lengths = lengths.to(device).view(n, P)
            if not bool((lengths == lengths[:1]).all()) or int(lengths.min()) < 1:
                lengths = None  # rows differ between adapters (or are empty): stay padded
        if lengths is None:
            positions = torch.arange(T, device=device).repeat(P)  # [P*T]
            return cls(positions, None, None, torch.arange(P, device=device) * T, None)
        lens = lengths[0]  # [P]
        t = torch.arange(T, device=device)
        real = t.unsqueeze(0) < lens.unsqueeze(1)  # [P, T]
        slots = torch.arange(P * T, device=device).view(P, T)
        real_idx = slots[real]  # [S] padded slot of each real token
        starts = torch.cumsum(lens, 0) - lens  # [P] packed index of each row's first token
        packed_of = starts.unsqueeze(1) + torch.minimum(t.unsqueeze(0), lens.unsqueeze(1) - 1)
        positions = t.unsqueeze(0).expand(P, T)[real]  # [S]
        return cls(positions, real_idx, packed_of.reshape(P * T), starts, lens)

    def select(self, select: Tensor, N: int, T: int) -> tuple[Tensor, Tensor]:
        """Row-wise token index [N] -> (flat index into [n*S] tokens, rotary position) [N] each."""
        if select.shape != (N,):
            raise LoraError(
                f"fused_hidden_states: select must hold one index per row ({N}), got "
                f"shape {tuple(select.shape)}"
            )
        P = self.starts.shape[0]
        S = self.positions.shape[0]
        row = torch.arange(N, device=select.device)
        limit = T if self.lengths is None else self.lengths[row % P]
        if not bool(((select >= 0) & (select < limit)).all()):
            raise LoraError("fused_hidden_states: select must point inside the row's real tokens")
        flat = (row // P) * S + self.starts[row % P] + select
        return flat, select


def _mlp_kernel(h: Tensor, backbone: nn.Module, adapters) -> str | None:
    """Which Triton MLP kernel (forward only) applies: "gemm", "swiglu" or None (torch ops)."""
    if adapters is None or not h.is_cuda or adapters.spec.use_dora:
        return None
    k = _load_kernels()
    r = adapters.spec.max_rank  # the rank every key is padded to (uniform_rank)
    if not k.swiglu_lora_supported(h, r):
        return None
    mlps = [layer.mlp for layer in backbone.layers]
    if all(k.gemm_swiglu_lora_supported(h, m.gate_proj.weight, m.up_proj.weight, r) for m in mlps):
        return "gemm"
    return "swiglu"


def _compiled_layer() -> Callable:
    if "layer" not in _compiled:
        # dynamic=None: the first call compiles for its exact shapes; a call with another
        # adapter count or probe set recompiles once with those sizes symbolic, not per shape.
        _compiled["layer"] = torch.compile(_layer, dynamic=None)
    return _compiled["layer"]


def _weights(layer: nn.Module) -> tuple:
    """(ln1, ln2, (weight, bias) per module in _MODULES order) of one decoder layer."""
    mods = [getattr(getattr(layer, part), m) for part, group in _GROUPS for m in group]
    return (
        layer.input_layernorm.weight,
        layer.post_attention_layernorm.weight,
        tuple((lin.weight, lin.bias) for lin in mods),
    )


def _prepare(
    model: nn.Module, adapters: LoraAdapter | LoraBatch | None
) -> tuple[int, dict[int, tuple]]:
    """Per layer: for each group, (A^T of its present modules concatenated, B^T per module or
    None, DoRA factor per module or None).

    A^T: [n, in, g*r]; B^T: [n, r, out]; DoRA factor: [n, 1, out]; cast once to the weight
    dtype (differentiably). Per-key ranks and scales are padded to one rank (`uniform_rank`).
    """
    if adapters is None:
        return 1, {}
    if isinstance(adapters, LoraAdapter):
        adapters = LoraBatch.from_adapters([adapters])
    spec = adapters.spec
    unknown = sorted(set(spec.target_modules) - set(_MODULES))
    if unknown:
        raise LoraError(f"fused_hidden_states: cannot apply LoRA to {', '.join(unknown)}")
    found = check_fits(model, spec)
    n = len(adapters)
    r, scale, A, B = uniform_rank(spec, adapters.A, adapters.B)
    M = adapters.magnitude
    if M is None:
        return n, _prepare_stacked(spec, found, r, scale, A, B)
    lora: dict[int, tuple] = {}
    for i in spec.layers:
        groups = []
        for _, group in _GROUPS:
            present = [m for m in group if (i, m) in found.modules]
            if not present:
                groups.append(None)
                continue
            w = found.modules[(i, present[0])].weight
            At = torch.cat([A[(i, m)] for m in present], dim=1)  # [n, g*r, in]
            At = At.to(device=w.device, dtype=w.dtype).transpose(1, 2)  # [n, in, g*r]
            Bt = tuple(
                B[(i, m)].to(device=w.device, dtype=w.dtype).transpose(1, 2)
                if m in present
                else None
                for m in group
            )  # [n, r, out] each
            D = None
            if M is not None:
                D = tuple(
                    dora_factor(
                        found.modules[(i, m)].weight, A[(i, m)], B[(i, m)], M[(i, m)], scale
                    )
                    .to(w.dtype)
                    .unsqueeze(1)
                    if m in present
                    else None
                    for m in group
                )  # [n, 1, out] each
            groups.append((At, Bt, D))
        lora[i] = (float(scale), r, tuple(groups))
    return n, lora


def _prepare_stacked(spec, found, r: int, scale: float, A: dict, B: dict) -> dict[int, tuple]:
    """`_prepare`'s per-layer tuples without DoRA; each group's A^T for all its layers at once.

    Layers whose group has the same present modules (and weight device and dtype) share one
    stack (A is copied once, as the per-layer concatenation did), cast and transpose, then
    `unbind` into per-layer views (backward: one stack): a few ops per group instead of a few per
    layer. B^T stays a per-key view (no copy: a batch's B can be most of its memory).
    """
    per_layer: dict[int, list] = {i: [None] * len(_GROUPS) for i in spec.layers}
    for g, (_, group) in enumerate(_GROUPS):
        runs: dict[tuple, list[int]] = {}  # (present modules, device, dtype) -> layers
        for i in spec.layers:
            present = tuple(m for m in group if (i, m) in found.modules)
            if present:
                w = found.modules[(i, present[0])].weight
                runs.setdefault((present, w.device, w.dtype), []).append(i)
        for (present, device, dtype), layers in runs.items():
            a = torch.stack([A[(i, m)] for i in layers for m in present], dim=1)  # [n, L*g, r, in]
            n, _, rank, d_in = a.shape
            a = a.reshape(n, len(layers), len(present) * rank, d_in)  # [n, L, g*r, in]
            a = a.to(device=device, dtype=dtype).transpose(2, 3).unbind(1)  # L x [n, in, g*r]
            for j, i in enumerate(layers):
                bt = tuple(
                    B[(i, m)].to(device=device, dtype=dtype).transpose(1, 2)  # [n, r, out]
                    if m in present
                    else None
                    for m in group
                )
                per_layer[i][g] = (a[j], bt, None)
    return {i: (float(scale), r, tuple(groups)) for i, groups in per_layer.items()}


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's Llama/Qwen2/Mistral RMSNorm: float32 statistics, cast back, then the weight."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _linears(
    x: Tensor,
    weights: tuple,
    group: tuple | None,
    scale: float,
    r: int,
    inplace: bool,
    xa: Tensor | None = None,
) -> list[Tensor]:
    """Base linears of one input group plus their LoRA. x [n, M, in] -> [n, M, out] each.

    `xa` (x @ A^T of the group, [n, M, g*r]) is computed here unless given. `inplace` adds the
    LoRA into the base output with `baddbmm_` (eager: out-of-place baddbmm would first copy the
    output); compiled code adds `scale * (xa @ B^T)` out of place, which the compiler fuses into
    the next elementwise kernel.
    """
    outs = [F.linear(x, w, b) for w, b in weights]
    if group is None:
        return outs
    At, Bts, Ds = group
    if xa is None:
        xa = torch.bmm(x, At)  # [n, M, g*r]
    j = 0
    for k, Bt in enumerate(Bts):
        if Bt is not None:
            xa_k = xa[..., j * r : (j + 1) * r]  # [n, M, r]
            if Ds is not None:  # DoRA: factor * (W x + scale B A x) + bias
                bias = weights[k][1]
                base = outs[k] if bias is None else outs[k] - bias
                outs[k] = (base + scale * torch.bmm(xa_k, Bt)) * Ds[k]
                if bias is not None:
                    outs[k] = outs[k] + bias
            elif inplace and outs[k].dtype == xa_k.dtype == Bt.dtype:
                outs[k] = outs[k].baddbmm_(xa_k, Bt, alpha=scale)
            else:  # also under autocast, where the three dtypes can differ
                outs[k] = outs[k] + (scale * torch.bmm(xa_k, Bt)).to(outs[k].dtype)
            j += 1
    return outs


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _layer(
    h: Tensor,
    cos: Tensor,
    sin: Tensor,
    weights: tuple,
    lora: tuple | None,
    pad_idx: Tensor | None,
    real_idx: Tensor | None,
    select: tuple[Tensor, Tensor] | None,
    *,
    P: int,
    T: int,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    eps: float,
    eps2: float,
    scaling: float,
    inplace: bool,
    mlp_kernel: str | None = None,
) -> Tensor:
    """One decoder layer. h: [n, S, H] -> [n, S, H] (S = P*T padded, or the packed tokens).

    cos/sin: [S, head_dim], each token's rotary. Attention runs on the padded layout [n*P, T]
    (gathered with pad_idx when packed, scattered back with real_idx). With `select` (flat token
    index into n*S and its position, [n*P] each) only those tokens leave the layer: -> [n, P, H].
    Keys and values still cover every token; queries, the output projection and the MLP run on
    the selected tokens alone (the last layer needs nothing else).
    """
    ln1, ln2, lin = weights
    scale, r, groups = lora if lora is not None else (0.0, 0, (None,) * 4)
    n, S, H = h.shape
    B = n * P  # sequences
    kw = dict(scale=scale, r=r, inplace=inplace)
    rope = (cos.view(1, S, 1, head_dim), sin.view(1, S, 1, head_dim))

    x = _rms_norm(h, ln1, eps)
    if select is None:
        q, k, v = _linears(x, lin[0:3], groups[0], **kw)
        q = _to_padded(_rope(q.view(n, S, n_heads, head_dim), *rope), pad_idx, B, T)
        mask = None
    else:
        flat, pos = select
        xa = None if groups[0] is None else torch.bmm(x, groups[0][0])  # [n, S, 3r]
        has_q = groups[0] is not None and groups[0][1][0] is not None
        k, v = _linears(x, lin[1:3], _drop_first(groups[0]), xa=_cols(xa, r, int(has_q)), **kw)
        x_sel = x.reshape(n * S, H)[flat].view(n, P, H)
        xa_sel = None if xa is None else xa.reshape(n * S, -1)[flat].view(n, P, -1)
        (q,) = _linears(x_sel, lin[0:1], _first(groups[0]), xa=xa_sel, **kw)
        local = flat % S  # the selected token's index among its adapter's tokens
        q_rope = (cos[local].view(n, P, 1, head_dim), sin[local].view(n, P, 1, head_dim))
        q = _rope(q.view(n, P, n_heads, head_dim), *q_rope)
        q = q.view(B, 1, n_heads, head_dim).transpose(1, 2)  # [B, heads, 1, d]
        mask = (torch.arange(T, device=h.device) <= pos.unsqueeze(1)).view(B, 1, 1, T)
        h = h.reshape(n * S, H)[flat].view(n, P, H)  # the residual of the selected tokens
    k = _to_padded(_rope(k.view(n, S, n_kv, head_dim), *rope), pad_idx, B, T)  # [B, kv, T, d]
    v = _to_padded(v.view(n, S, n_kv, head_dim), pad_idx, B, T)
    a = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=n_kv != n_heads
    )  # [B, heads, Tq, d]
    a = a.transpose(1, 2).reshape(n, -1, n_heads * head_dim)  # [n, P*Tq, heads*d]
    if select is None and real_idx is not None:
        a = a[:, real_idx]  # [n, S, heads*d]
    (o,) = _linears(a, lin[3:4], groups[1], **kw)
    h = h + o

    x = _rms_norm(h, ln2, eps2)
    gu = groups[2]
    if mlp_kernel and gu is not None and all(b is not None for b in gu[1]) and gu[2] is None:
        (wg, bg), (wu, bu) = lin[4:6]
        xa = torch.bmm(x, gu[0])  # [n, S, 2r]
        if mlp_kernel == "gemm" and bg is None and bu is None:
            m = _kernels.gemm_swiglu_lora(x, wg, wu, xa, gu[1][0], gu[1][1], scale)
        else:
            g, u = _linears(x, lin[4:6], None, **kw)
            m = _kernels.swiglu_lora(g, u, xa, gu[1][0], gu[1][1], scale)
    else:
        g, u = _linears(x, lin[4:6], gu, **kw)
        m = F.silu(g) * u
    (d,) = _linears(m, lin[6:7], groups[3], **kw)
    return h + d


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding as HF applies it. x: [n, S, heads, d]; cos/sin broadcast to it."""
    return x * cos + _rotate_half(x) * sin


def _to_padded(x: Tensor, pad_idx: Tensor | None, B: int, T: int) -> Tensor:
    """[n, S, heads, d] -> [B, heads, T, d] (gathered into the padded layout when packed)."""
    if pad_idx is not None:
        x = x[:, pad_idx]  # [n, P*T, heads, d]
    return x.reshape(B, T, x.shape[-2], x.shape[-1]).transpose(1, 2)


def _first(group: tuple | None) -> tuple | None:
    """The group restricted to its first module (q of q/k/v)."""
    if group is None or group[1][0] is None:
        return None
    return (group[0], group[1][:1], None if group[2] is None else group[2][:1])


def _drop_first(group: tuple | None) -> tuple | None:
    """The group without its first module (k/v of q/k/v); A^T columns are sliced by `_cols`."""
    if group is None or all(b is None for b in group[1][1:]):
        return None
    return (group[0], group[1][1:], None if group[2] is None else group[2][1:])


def _cols(xa: Tensor | None, r: int, skip: int) -> Tensor | None:
    return None if xa is None else xa[..., skip * r :]
