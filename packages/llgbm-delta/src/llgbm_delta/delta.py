"""The one delta definition, differentiable: probes -> base activation -> deltas of adapters.

    v(model; probes) = mean over probes p of pool(hidden_states[layer](model; p))   # [hidden]
    delta(adapter)   = v(base + adapter) - v(base)                                 # float32

`pool` takes the last real token ("last", the paper's rule) or the mean over real tokens
("mean"). Positions and the last token come from the attention mask, so left and right padding
give the same result. Only the backbone runs (no LM head). Teachers (`compute_deltas`) and
generated adapters (training) both go through `delta_for_lora`; there is no second copy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from llgbm_flora import LoraAdapter, LoraBatch, functional_forward
from llgbm_flora.fused import fused_hidden_states, fused_unsupported
from torch import Tensor, nn

from llgbm_delta.errors import DeltaSpecError, ProbeError
from llgbm_delta.probes import ProbeSet, generic_probes
from llgbm_delta.spec import DEFAULT_SPEC, DeltaSpec


@dataclass(frozen=True)
class ProbeBatch:
    """Probes tokenised once: the exact model inputs every delta uses."""

    input_ids: Tensor  # [P, T] int64
    attention_mask: Tensor  # [P, T] int64, 1 on real tokens
    position_ids: Tensor  # [P, T] int64, counted over real tokens only (0 on padding)
    token_hash: str  # sha256 of the unpadded token ids; ties the tokenizer into cache keys
    probe_hash: str  # ProbeSet.hash of the texts
    # length_groups() computed once (it syncs with the device); not part of equality.
    _groups: list | None = field(default=None, compare=False, repr=False)

    @property
    def n_probes(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str | None) -> ProbeBatch:
        if device is None or self.input_ids.device == torch.device(device):
            return self
        return ProbeBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.token_hash,
            self.probe_hash,
        )

    def model_inputs(self, n_adapters: int = 1) -> dict[str, Tensor]:
        """Inputs for n adapters x P probes, adapter-major: rows [i*P, (i+1)*P) are adapter i."""
        return {
            "input_ids": self.input_ids.repeat(n_adapters, 1),  # [n*P, T]
            "attention_mask": self.attention_mask.repeat(n_adapters, 1),  # [n*P, T]
            "position_ids": self.position_ids.repeat(n_adapters, 1),  # [n*P, T]
        }

    def right_padded(self) -> tuple[Tensor, Tensor]:
        """The probes right-padded (real tokens first, any pad id) and their lengths. [P, T], [P]."""
        mask = self.attention_mask.bool()
        lengths = mask.sum(-1)  # [P]
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)  # real tokens first
        return torch.gather(self.input_ids, 1, order), lengths

    def length_groups(self) -> list[tuple[list[int], ProbeBatch]]:
        """Probes of equal real length, unpadded: [(probe indices, ProbeBatch [P_g, L])].

        The real tokens are taken where the mask is 1, so left and right padding give the same
        groups. Running each group without padding wastes no compute on pad tokens and lets
        attention take its plain causal path.
        """
        if self._groups is not None:
            return self._groups
        mask = self.attention_mask.bool()
        rows = [self.input_ids[i][mask[i]] for i in range(self.n_probes)]  # [L_i] each
        by_len: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_len.setdefault(int(row.shape[0]), []).append(i)
        groups = []
        for length, idx in sorted(by_len.items()):
            ids = torch.stack([rows[i] for i in idx])  # [P_g, L]
            ones = torch.ones_like(ids)
            pos = torch.arange(length, device=ids.device).expand_as(ids)  # [P_g, L]
            groups.append((idx, ProbeBatch(ids, ones, pos, self.token_hash, self.probe_hash)))
        object.__setattr__(self, "_groups", groups)
        return groups


def encode_probes(
    tokenizer, probes: ProbeSet, *, padding_side: str = "right", device=None
) -> ProbeBatch:
    """Tokenise each probe on its own (special tokens as the tokenizer adds them), then pad.

    Padding is done here, not by the tokenizer, so a tokenizer without a pad token works and
    `padding_side` is explicit. The pad id is irrelevant: padded positions are masked out.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    ids = [list(tokenizer(text)["input_ids"]) for text in probes.texts]
    for i, row in enumerate(ids):
        if not row:
            raise ProbeError(f"probe set {probes.name!r}: probe {i} tokenises to no tokens")
    width = max(len(row) for row in ids)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # [P, T]
    mask = torch.zeros((len(ids), width), dtype=torch.long)  # [P, T]
    for i, row in enumerate(ids):
        sl = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        input_ids[i, sl] = torch.tensor(row, dtype=torch.long)
        mask[i, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, T]
    token_hash = hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest()
    return ProbeBatch(input_ids, mask, position_ids, token_hash, probes.hash).to(device)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token, for any padding side. [B, T] -> [B]."""
    T = attention_mask.shape[-1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # [B, T]
    return torch.where(attention_mask.bool(), pos, -1).max(-1).values


def pool_tokens(hidden: Tensor, attention_mask: Tensor, token: str) -> Tensor:
    """Pool hidden states over tokens in float32 (float64 stays). [B, T, H], [B, T] -> [B, H]."""
    h = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    if token == "last":
        idx = last_token_index(attention_mask)  # [B]
        return h[torch.arange(h.shape[0], device=h.device), idx]
    if token == "mean":
        m = attention_mask.bool().unsqueeze(-1)  # [B, T, 1]
        # where(), not multiply: padded rows may hold NaN/inf under some attention kernels.
        return torch.where(m, h, 0.0).sum(1) / m.sum(1).clamp(min=1)
    raise DeltaSpecError(f"DeltaSpec.token must be 'last' or 'mean', got {token!r}")


def backbone_of(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (`model.model` for a CausalLM), or model itself."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def backbone_forward(
    model: nn.Module,
    inputs: dict[str, Tensor],
    lora: LoraAdapter | LoraBatch | None,
    *,
    hidden_states: bool,
    adapter_chunk_size: int | None = None,
    gradient_checkpointing: bool = False,
):
    """The backbone's output on `inputs`, with `lora` applied functionally (None: the base)."""
    backbone = backbone_of(model)
    kwargs = dict(inputs, use_cache=False)
    if hidden_states:
        kwargs["output_hidden_states"] = True
    if lora is None:
        return backbone(**kwargs)
    return functional_forward(
        backbone,
        lora,
        adapter_chunk_size=adapter_chunk_size,
        gradient_checkpointing=gradient_checkpointing,
        **kwargs,
    )


def _hidden(
    model: nn.Module,
    inputs: dict[str, Tensor],
    spec: DeltaSpec,
    lora: LoraAdapter | LoraBatch | None,
    adapter_chunk_size: int | None,
    gradient_checkpointing: bool,
) -> Tensor:
    """The hidden state the spec selects. -> [B, T, H] (model dtype)."""
    out = backbone_forward(
        model,
        inputs,
        lora,
        hidden_states=spec.layer != -1,
        adapter_chunk_size=adapter_chunk_size,
        gradient_checkpointing=gradient_checkpointing,
    )
    if spec.layer == -1:
        return out.last_hidden_state
    n = len(out.hidden_states)
    if not -n <= spec.layer < n:
        raise DeltaSpecError(
            f"DeltaSpec.layer={spec.layer} is out of range: the model has {n} hidden states"
        )
    return out.hidden_states[spec.layer]


def activations(
    model: nn.Module,
    batch: ProbeBatch,
    spec: DeltaSpec = DEFAULT_SPEC,
    lora: LoraAdapter | LoraBatch | None = None,
    *,
    adapter_chunk_size: int | None = None,
    gradient_checkpointing: bool = False,
    unpad: bool | None = None,
    fused: bool | None = None,
    compile: bool = False,
) -> Tensor:
    """v for the base (lora=None) or each adapter of `lora`. -> [n_adapters, H] float32.

    Path: `fused=True` runs llgbm-flora's fused Llama-family forward (`fused_hidden_states`),
    `False` the HF model with LoRA hooks (`functional_forward`: any architecture, any layer).
    The default (None) takes the fused path when the model supports it and `spec.layer` is the
    last layer. The fused path packs the probes (no compute on padding) into one forward;
    `compile=True` compiles its layer with `torch.compile`.

    Layout of the hooks path: with `unpad=True` probes run in groups of equal length without
    padding (one forward per distinct length); `unpad=False` runs them padded in one forward.
    The default (None) unpads on CPU and pads on accelerators (docs/benchmarks.md).
    Every combination computes the same definition (tested equal).
    """
    n = len(lora) if isinstance(lora, LoraBatch) else 1
    if _use_fused(model, batch, spec, fused):
        rows = _fused_rows(
            model, batch, spec, lora, n, adapter_chunk_size, gradient_checkpointing, compile
        )  # [n*P, H]
        return rows.view(n, batch.n_probes, -1).mean(1)
    if unpad is None:
        unpad = _device_of(model).type == "cpu"
    groups = batch.length_groups() if unpad else [(list(range(batch.n_probes)), batch)]
    pooled: list[Tensor | None] = [None] * batch.n_probes
    for idx, group in groups:
        inputs = group.model_inputs(n)  # [n*P_g, T_g] each, adapter-major
        hidden = _hidden(model, inputs, spec, lora, adapter_chunk_size, gradient_checkpointing)
        rows = pool_tokens(hidden, inputs["attention_mask"], spec.token)  # [n*P_g, H] fp32
        rows = rows.view(n, len(idx), -1)  # [n, P_g, H]
        for j, i in enumerate(idx):
            pooled[i] = rows[:, j]  # [n, H]
    return torch.stack(pooled, 1).mean(1)  # [n, P, H] -> [n, H]


def _use_fused(model: nn.Module, batch: ProbeBatch, spec: DeltaSpec, fused: bool | None) -> bool:
    if fused is False:
        return False
    reason = fused_unsupported(model, int(batch.attention_mask.sum(-1).max()))
    if reason is None and spec.layer != -1:
        reason = f"DeltaSpec.layer={spec.layer} (the fused path computes the last layer only)"
    if reason is not None and fused:
        raise DeltaSpecError(f"fused=True, but the fused path cannot run this: {reason}")
    return reason is None


def _fused_rows(
    model: nn.Module,
    batch: ProbeBatch,
    spec: DeltaSpec,
    lora: LoraAdapter | LoraBatch | None,
    n: int,
    adapter_chunk_size: int | None,
    gradient_checkpointing: bool,
    compile: bool,
) -> Tensor:
    """Pooled rows of the fused path, adapter-major. -> [n*P, H] float32 (float64 stays)."""
    ids, lengths = batch.right_padded()  # [P, T], [P]
    step = n if adapter_chunk_size is None else max(1, adapter_chunk_size)
    out = []
    for a0 in range(0, n, step):
        sub = lora if (lora is None or isinstance(lora, LoraAdapter)) else lora[a0 : a0 + step]
        k = min(step, n - a0)
        rep_ids = ids.repeat(k, 1)  # [k*P, T]
        rep_len = lengths.repeat(k)  # [k*P]
        select = rep_len - 1 if spec.token == "last" else None
        h = fused_hidden_states(
            model,
            sub,
            rep_ids,
            lengths=rep_len,
            select=select,
            compile=compile,
            gradient_checkpointing=gradient_checkpointing,
        )
        if spec.token == "last":
            out.append(h.to(torch.promote_types(h.dtype, torch.float32)))  # [k*P, H]
        else:
            mask = torch.arange(ids.shape[1], device=ids.device) < rep_len.unsqueeze(1)
            out.append(pool_tokens(h, mask.long(), spec.token))
    return torch.cat(out, 0) if len(out) > 1 else out[0]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_batch(tokenizer, probes: ProbeSet | ProbeBatch | None, model: nn.Module) -> ProbeBatch:
    if isinstance(probes, ProbeBatch):
        return probes.to(_device_of(model))
    return encode_probes(tokenizer, probes or generic_probes(), device=_device_of(model))


@torch.no_grad()
def base_activation(
    model: nn.Module,
    tokenizer,
    probes: ProbeSet | ProbeBatch | None = None,
    spec: DeltaSpec = DEFAULT_SPEC,
) -> Tensor:
    """v(base): the mean pooled hidden state of the base model over the probes. -> [H] float32."""
    return activations(model, _as_batch(tokenizer, probes, model), spec)[0]


def delta_for_lora(
    model: nn.Module,
    tokenizer,
    lora: LoraBatch | LoraAdapter,
    probes: ProbeSet | ProbeBatch | None = None,
    spec: DeltaSpec = DEFAULT_SPEC,
    *,
    base: Tensor | None = None,
    adapter_chunk_size: int | None = None,
    gradient_checkpointing: bool = False,
    unpad: bool | None = None,
    fused: bool | None = None,
    compile: bool = False,
) -> Tensor:
    """Deltas of a batch of adapters, differentiable wrt the adapter tensors. -> [n, H] float32.

    (float64 if the model runs in float64, e.g. for finite-difference checks.)

    `base` is `base_activation(...)` for the same model, probes and spec; pass it to skip
    recomputing it every call (training does). A single LoraAdapter gives [1, H]. `unpad`, `fused`,
    `compile`: see `activations`.
    """
    batch = _as_batch(tokenizer, probes, model)
    if base is None:
        base = base_activation(model, tokenizer, batch, spec)
    if isinstance(lora, LoraAdapter):
        lora = LoraBatch.from_adapters([lora])
    v = activations(
        model,
        batch,
        spec,
        lora,
        adapter_chunk_size=adapter_chunk_size,
        gradient_checkpointing=gradient_checkpointing,
        unpad=unpad,
        fused=fused,
        compile=compile,
    )  # [n, H]
    return v - base.to(v.device, v.dtype)
