"""Behaviour targets: what an adapter does on probes, at chosen positions and layers, with logits.

The paper's delta (delta.py) is one pooled vector: the last probe token, the last layer, the mean
over probes. A behaviour target keeps the rows apart and can look further along the answer:

    seq(p)      = probe p, then (positions="answer") the adapter's own greedy answer to it
    positions   = "last": the probe's last token (the paper's rule);
                  "answer": that token and every answer token, i.e. every position whose next
                  token is part of the answer (teacher forcing along the adapter's answer)
    hidden      = hidden_states[layer](base + adapter; seq)[positions], per layer   [P, K, L, H]
    delta       = hidden(base + adapter) - hidden(base), on the same sequences        (float32)
    logprobs    = log_softmax(lm_head(last layer))[positions]                       [P, K, V]

With positions="last" and layers=(-1,), the mean over probes of `delta[:, 0, 0]` is exactly the
paper's delta (`delta_for_lora` with the default DeltaSpec; tested equal). The teacher's answer
fixes the sequences, so a generated adapter is scored on the very tokens its teacher was
(`behaviour_forward` on a target's `SequenceBatch`), and the base's hidden states on them are
stored with the target. `teacher_targets` computes targets once per adapter and probe set;
`BehaviourCache` (behaviour_cache.py) keeps them by content.

Training that needs both the paper's delta on the generic probes and behaviour terms on task
sequences calls `delta_and_behaviour`: on the fused (Llama-family) path both row sets go through
one forward per adapter chunk instead of two; elsewhere it runs the two forwards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from llgbm_flora import LoraAdapter, LoraBatch
from llgbm_flora.fused import fused_hidden_states, fused_unsupported
from torch import Tensor, nn

from llgbm_delta.delta import ProbeBatch, backbone_forward, delta_for_lora, pool_tokens
from llgbm_delta.delta import _as_batch as _probe_batch
from llgbm_delta.errors import DeltaSpecError, ProbeError
from llgbm_delta.probes import ProbeSet
from llgbm_delta.spec import DeltaSpec

# Bumped whenever what a BehaviourSpec computes changes, so old cache entries stop matching.
BEHAVIOUR_VERSION = 1
POSITIONS = ("last", "answer")


@dataclass(frozen=True)
class BehaviourSpec:
    """Which positions, layers and outputs make up a behaviour target."""

    # "last": the probe's last token only (the paper's position); "answer": also every token of
    # the adapter's own greedy answer (teacher-forced), so K = answer length + 1 positions.
    positions: str = "answer"
    # Indices into HF `hidden_states` (-1: last layer after the final norm; 0: embeddings).
    layers: tuple[int, ...] = (-1,)
    # Greedy answer tokens generated per probe at most (positions="answer"); EOS ends it early.
    max_answer_tokens: int = 16
    # Next-token distributions kept: None for the full vocabulary, k for the top k (plus the
    # remaining mass, see `kl_to_teacher`), 0 for none (no logits target).
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise DeltaSpecError(
                f"BehaviourSpec.positions must be one of {', '.join(POSITIONS)}, "
                f"got {self.positions!r}"
            )
        if not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers or any(
            isinstance(x, bool) or not isinstance(x, int) for x in self.layers
        ):
            raise DeltaSpecError(
                f"BehaviourSpec.layers must be a non-empty list of ints, got {self.layers!r}"
            )
        if len(set(self.layers)) != len(self.layers):
            raise DeltaSpecError(f"BehaviourSpec.layers has duplicates: {self.layers!r}")
        if self.max_answer_tokens < 1:
            raise DeltaSpecError(
                f"BehaviourSpec.max_answer_tokens must be >= 1, got {self.max_answer_tokens}"
            )
        if self.top_k is not None and self.top_k < 0:
            raise DeltaSpecError(f"BehaviourSpec.top_k must be >= 0 or None, got {self.top_k}")

    @property
    def logits(self) -> bool:
        return self.top_k != 0

    def to_dict(self) -> dict:
        return {
            "behaviour": BEHAVIOUR_VERSION,
            "positions": self.positions,
            "layers": list(self.layers),
            "max_answer_tokens": self.max_answer_tokens if self.positions == "answer" else 0,
            "top_k": self.top_k,
        }

    @property
    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class SequenceBatch:
    """Right-padded token rows and the positions read from each. Rows: adapter-major."""

    input_ids: Tensor  # [R, T] int64
    attention_mask: Tensor  # [R, T] int64, 1 on real tokens (a prefix of each row)
    select: Tensor  # [R, K] int64, positions read (0 where select_mask is False)
    select_mask: Tensor  # [R, K] bool

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device) -> SequenceBatch:
        return SequenceBatch(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (self.input_ids, self.attention_mask, self.select, self.select_mask)

    def model_inputs(self) -> dict[str, Tensor]:
        position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)  # [R, T]
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": position_ids,
        }


@dataclass
class BehaviourOut:
    """`behaviour_forward`'s result: hidden states and logits at the selected positions."""

    hidden: Tensor  # [R, K, L, H] float32 (layers in spec order)
    logits: Tensor | None  # [R, K, V] float32, or None when not asked for


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [R, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [R, T]
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def tokenize_probes(tokenizer, probes: ProbeSet) -> list[list[int]]:
    """Each probe tokenised on its own, special tokens as the tokenizer adds them."""
    ids = [list(tokenizer(text)["input_ids"]) for text in probes.texts]
    for i, row in enumerate(ids):
        if not row:
            raise ProbeError(f"probe set {probes.name!r}: probe {i} tokenises to no tokens")
    return ids


def token_hash(rows: Sequence[Sequence[int]]) -> str:
    """sha256 of token id rows: ties the tokenizer into cache keys."""
    return hashlib.sha256(
        json.dumps([list(r) for r in rows], separators=(",", ":")).encode()
    ).hexdigest()


def sequence_batch(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], positions: str, pad_id: int
) -> SequenceBatch:
    """Rows prompt + answer and the positions read: the last prompt token, then (answer) each
    answer token, whose next-token prediction is the answer's next token (or its end)."""
    seqs = [list(p) + list(a) for p, a in zip(prompts, answers, strict=True)]
    ids, mask = _right_pad(seqs, pad_id)
    n_sel = [1 + (len(a) if positions == "answer" else 0) for a in answers]
    k = max(n_sel)
    select = torch.zeros((len(seqs), k), dtype=torch.long)  # [R, K]
    select_mask = torch.zeros((len(seqs), k), dtype=torch.bool)  # [R, K]
    for i, (p, n) in enumerate(zip(prompts, n_sel)):
        select[i, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        select_mask[i, :n] = True
    return SequenceBatch(ids, mask, select, select_mask)


def _fp32_up(x: Tensor) -> Tensor:
    """float32, or float64 where the model runs in it (finite-difference checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise DeltaSpecError(
            "behaviour logits need a causal LM with an output head (got a model without one); "
            "set top_k=0 to use hidden states only"
        )
    return head


def behaviour_forward(
    model: nn.Module,
    batch: SequenceBatch,
    layers: Sequence[int],
    lora: LoraAdapter | LoraBatch | None = None,
    *,
    logits: bool = True,
    adapter_chunk_size: int | None = None,
    gradient_checkpointing: bool = False,
) -> BehaviourOut:
    """Hidden states at `batch.select` for each layer and the next-token logits there.

    Differentiable wrt the adapter tensors. With a LoraBatch of n adapters, rows are
    adapter-major (n divides R; adapter i covers rows [i R/n, (i+1) R/n)). Only the selected
    positions go through the LM head.
    """
    need_states = any(layer != -1 for layer in layers)
    out = backbone_forward(
        model,
        batch.model_inputs(),
        lora,
        hidden_states=need_states,
        adapter_chunk_size=adapter_chunk_size,
        gradient_checkpointing=gradient_checkpointing,
    )
    rows = torch.arange(batch.n_rows, device=batch.select.device)[:, None]  # [R, 1]
    n_states = len(out.hidden_states) if need_states else None
    picked = []
    last = None
    for layer in layers:
        if layer == -1:
            h = out.last_hidden_state
        else:
            if not -n_states <= layer < n_states:
                raise DeltaSpecError(
                    f"behaviour layer {layer} is out of range: the model has {n_states} hidden states"
                )
            h = out.hidden_states[layer]
        g = h[rows, batch.select]  # [R, K, H]
        if layer == -1:
            last = g
        picked.append(_fp32_up(g))
    hidden = torch.stack(picked, 2)  # [R, K, L, H]
    out_logits = None
    if logits:
        if last is None:
            last = out.last_hidden_state[rows, batch.select]  # [R, K, H]
        out_logits = _fp32_up(_lm_head(model)(last))  # [R, K, V]
    return BehaviourOut(hidden, out_logits)


def packed_unsupported(
    model: nn.Module,
    probes: ProbeBatch,
    spec: DeltaSpec,
    batch: SequenceBatch,
    layers: Sequence[int],
    lora: LoraAdapter | LoraBatch | None,
) -> str | None:
    """None if `delta_and_behaviour` can run the probes and `batch` in one forward, else why."""
    if lora is None:
        return "no adapters (the base runs each row set once anyway)"
    n = len(lora) if isinstance(lora, LoraBatch) else 1
    if batch.n_rows % n:
        return f"{batch.n_rows} sequence rows is not a multiple of {n} adapters"
    if tuple(layers) != (-1,) or spec.layer != -1:
        return "layers other than the last (the fused path computes the last layer only)"
    width = max(probes.input_ids.shape[1], batch.input_ids.shape[1])
    reason = fused_unsupported(model, int(width))
    if reason is not None:
        return reason
    mask = batch.attention_mask
    if not bool((mask[:, 0] == 1).all() & (mask[:, 1:] <= mask[:, :-1]).all()):
        return "sequence rows are not right-padded with at least one token"
    return None


def delta_and_behaviour(
    model: nn.Module,
    probes: ProbeBatch | ProbeSet,
    spec: DeltaSpec,
    batch: SequenceBatch,
    layers: Sequence[int],
    lora: LoraAdapter | LoraBatch,
    *,
    base: Tensor,
    logits: bool = True,
    adapter_chunk_size: int | None = None,
    gradient_checkpointing: bool = False,
    packed: bool | None = None,
    tokenizer=None,
) -> tuple[Tensor, BehaviourOut]:
    """`delta_for_lora(model, None, lora, probes, spec, base=base)` and
    `behaviour_forward(model, batch, layers, lora, logits=logits)`, differentiable. -> ([n, H],
    BehaviourOut).

    packed=None runs both row sets in one forward per adapter chunk when `packed_unsupported`
    says it can (each adapter's probe rows, then its sequence rows, through the fused path), and
    the two forwards otherwise; True requires packing, False never packs. Same values either way
    (up to float rounding; tested). A ProbeSet is encoded with `tokenizer`.
    """
    probes = _probe_batch(tokenizer, probes, model)
    reason = (
        None if packed is False else packed_unsupported(model, probes, spec, batch, layers, lora)
    )
    if packed and reason is not None:
        raise DeltaSpecError(
            f"packed=True, but the probes and sequences cannot share a forward: {reason}"
        )
    if packed is False or reason is not None:
        d = delta_for_lora(
            model,
            None,
            lora,
            probes,
            spec,
            base=base,
            adapter_chunk_size=adapter_chunk_size,
            gradient_checkpointing=gradient_checkpointing,
        )
        out = behaviour_forward(
            model,
            batch,
            layers,
            lora,
            logits=logits,
            adapter_chunk_size=adapter_chunk_size,
            gradient_checkpointing=gradient_checkpointing,
        )
        return d, out
    return _packed(
        model, probes, spec, batch, lora, base, logits, adapter_chunk_size, gradient_checkpointing
    )


def _packed(model, probes, spec, batch, lora, base, logits, chunk, checkpointing):
    """One fused forward per adapter chunk over [probe rows; sequence rows] per adapter."""
    n = len(lora) if isinstance(lora, LoraBatch) else 1
    P, Q = probes.n_probes, batch.n_rows // n
    p_ids, p_len = probes.right_padded()  # [P, Tp], [P]
    s_len = batch.attention_mask.sum(-1)  # [R]
    width = max(p_ids.shape[1], batch.input_ids.shape[1])
    p_ids = torch.nn.functional.pad(p_ids, (0, width - p_ids.shape[1]))  # [P, T]
    s_ids = torch.nn.functional.pad(batch.input_ids, (0, width - batch.input_ids.shape[1]))
    step = n if chunk is None else max(1, chunk)
    deltas, hidden, out_logits = [], [], []
    for a0 in range(0, n, step):
        k = min(step, n - a0)
        sub = lora if isinstance(lora, LoraAdapter) or k == n else lora[a0 : a0 + k]
        rows = slice(a0 * Q, (a0 + k) * Q)
        ids = torch.cat([p_ids.expand(k, P, width), s_ids[rows].view(k, Q, width)], 1).view(
            k * (P + Q), width
        )
        lengths = torch.cat([p_len.expand(k, P), s_len[rows].view(k, Q)], 1).view(-1)
        h = fused_hidden_states(
            model, sub, ids, lengths=lengths, gradient_checkpointing=checkpointing
        ).view(k, P + Q, width, -1)  # [k, P+Q, T, H] final-norm hidden states
        hp = h[:, :P].reshape(k * P, width, -1)
        mask = torch.arange(width, device=ids.device) < p_len.repeat(k).unsqueeze(1)  # [k*P, T]
        v = pool_tokens(hp, mask.long(), spec.token).view(k, P, -1).mean(1)  # [k, H]
        deltas.append(v - base.to(v.device, v.dtype))
        hs = h[:, P:].reshape(k * Q, width, -1)  # [k*Q, T, H]
        r = torch.arange(k * Q, device=ids.device)[:, None]
        g = hs[r, batch.select[rows]]  # [k*Q, K, H]
        hidden.append(_fp32_up(g)[:, :, None])  # [k*Q, K, 1, H]
        if logits:
            out_logits.append(_fp32_up(_lm_head(model)(g)))  # [k*Q, K, V]
    return torch.cat(deltas), BehaviourOut(
        torch.cat(hidden), torch.cat(out_logits) if logits else None
    )


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    lora: LoraAdapter | LoraBatch | None,
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Greedy continuation of each prompt row (adapter-major for a LoraBatch), EOS excluded.

    Re-runs the whole sequence per new token (no KV cache): these targets are computed once per
    adapter, and the plain forward is the same one `behaviour_forward` runs.
    """
    answers: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        seqs = [list(p) + a for p, a in zip(prompts, answers)]
        ids, mask = _right_pad(seqs, pad_id)
        dev = next(model.parameters()).device
        last = torch.tensor([len(s) - 1 for s in seqs])
        batch = SequenceBatch(ids, mask, last[:, None], torch.ones(len(seqs), 1, dtype=torch.bool))
        out = behaviour_forward(model, batch.to(dev), (-1,), lora, logits=True)
        nxt = out.logits[:, 0].argmax(-1).tolist()  # [R]
        for i, t in enumerate(nxt):
            if done[i]:
                continue
            if eos_id is not None and t == eos_id:
                done[i] = True
            else:
                answers[i].append(int(t))
        if all(done):
            break
    return answers


@dataclass
class BehaviourTarget:
    """One adapter's behaviour on its probes (all tensors on CPU)."""

    batch: SequenceBatch  # [P, T] rows and [P, K] positions
    hidden: Tensor  # [P, K, L, H] float32: the adapter's hidden states
    base_hidden: Tensor  # [P, K, L, H] float32: the base's, on the same sequences
    logprobs: Tensor | None  # [P, K, V] float32 (full), or [P, K, k] with top_k
    top_ids: Tensor | None  # [P, K, k] int64 token ids of `logprobs` with top_k, else None
    base_kl: Tensor | None  # [P, K] float32: KL(adapter || base) per position (the zero-LoRA loss)

    @property
    def delta(self) -> Tensor:
        """hidden - base_hidden: the per-position, per-layer delta. [P, K, L, H]."""
        return self.hidden - self.base_hidden

    def tensors(self) -> dict[str, Tensor]:
        b = self.batch
        out = {
            "input_ids": b.input_ids,
            "attention_mask": b.attention_mask,
            "select": b.select,
            "select_mask": b.select_mask.to(torch.uint8),
            "hidden": self.hidden,
            "base_hidden": self.base_hidden,
        }
        for name in ("logprobs", "top_ids", "base_kl"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor]) -> BehaviourTarget:
        batch = SequenceBatch(
            t["input_ids"].long(),
            t["attention_mask"].long(),
            t["select"].long(),
            t["select_mask"].bool(),
        )
        return cls(
            batch,
            t["hidden"],
            t["base_hidden"],
            t.get("logprobs"),
            t.get("top_ids"),
            t.get("base_kl"),
        )


def kl_to_teacher(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    top_ids: Tensor | None = None,
) -> Tensor:
    """Forward KL(teacher || student) per position. [N, V] logits, [N, V] or [N, k] -> [N].

    With `top_ids` [N, k] the teacher is known on its top k tokens only: both distributions are
    coarsened to those k tokens plus one bucket for the rest of the vocabulary, and the KL of
    the coarsened distributions is returned (exact when the top k carry all the mass, and never
    above the full KL).
    """
    log_q = torch.log_softmax(_fp32_up(student_logits), -1)  # [N, V]
    log_p = _fp32_up(teacher_logprobs)
    if top_ids is None:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    log_q_k = log_q.gather(-1, top_ids)  # [N, k]
    p_k = log_p.exp()
    p_rest = (1.0 - p_k.sum(-1)).clamp_min(0.0)  # [N]
    q_rest = (1.0 - log_q_k.exp().sum(-1)).clamp_min(1e-12)  # [N]
    kl = (p_k * (log_p - log_q_k)).sum(-1)
    return kl + torch.where(
        p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), 0.0
    )


def _as_batch(adapters: Sequence[LoraAdapter]) -> LoraBatch:
    return LoraBatch.from_adapters(list(adapters))


@torch.no_grad()
def teacher_targets(
    model: nn.Module,
    tokenizer,
    adapters: Sequence[LoraAdapter],
    probes: Sequence[ProbeSet],
    spec: BehaviourSpec,
    *,
    adapters_per_batch: int = 16,
) -> list[BehaviourTarget]:
    """Behaviour targets of `adapters`, adapter i on `probes[i]` (no cache; see behaviour_cache).

    Adapters run `adapters_per_batch` at a time; those in one batch must have the same number
    of probes (rows are adapter-major). The base runs on each adapter's own sequences.
    """
    if len(adapters) != len(probes):
        raise ProbeError(f"teacher_targets: {len(adapters)} adapters but {len(probes)} probe sets")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    dev = next(model.parameters()).device
    out: list[BehaviourTarget] = []
    i = 0
    while i < len(adapters):
        n_p = len(probes[i])
        j = i
        while j < len(adapters) and j - i < adapters_per_batch and len(probes[j]) == n_p:
            j += 1
        lora = _as_batch(adapters[i:j]).to(device=dev)
        prompts = [row for ps in probes[i:j] for row in tokenize_probes(tokenizer, ps)]
        if spec.positions == "answer":
            answers = greedy_answers(
                model,
                prompts,
                lora,
                max_new_tokens=spec.max_answer_tokens,
                eos_id=eos_id,
                pad_id=pad_id,
            )
        else:
            answers = [[] for _ in prompts]
        batch = sequence_batch(prompts, answers, spec.positions, pad_id)
        on_dev = batch.to(dev)
        t = behaviour_forward(model, on_dev, spec.layers, lora, logits=spec.logits)
        b = behaviour_forward(model, on_dev, spec.layers, None, logits=spec.logits)
        logp = top_ids = base_kl = None
        if spec.logits:
            logp = torch.log_softmax(t.logits, -1)  # [R, K, V]
            base_kl = kl_to_teacher(b.logits.flatten(0, 1), logp.flatten(0, 1)).view(
                logp.shape[:2]
            )  # [R, K]
            if spec.top_k is not None:
                logp, top_ids = logp.topk(min(spec.top_k, logp.shape[-1]), dim=-1)
                top_ids = top_ids.cpu()
            logp = logp.cpu()
            base_kl = (base_kl * on_dev.select_mask).cpu()
        for a in range(j - i):
            rows = slice(a * n_p, (a + 1) * n_p)
            sub = _trim(
                SequenceBatch(*(x[rows] for x in batch.tensors())),
            )
            k = sub.select.shape[1]
            out.append(
                BehaviourTarget(
                    sub,
                    t.hidden[rows, :k].cpu(),
                    b.hidden[rows, :k].cpu(),
                    None if logp is None else logp[rows, :k],
                    None if top_ids is None else top_ids[rows, :k],
                    None if base_kl is None else base_kl[rows, :k],
                )
            )
        i = j
    return out


def _trim(batch: SequenceBatch) -> SequenceBatch:
    """Drop padding columns that no row of this (sub)batch uses."""
    t = int(batch.attention_mask.sum(-1).max())
    k = int(batch.select_mask.sum(-1).max())
    return SequenceBatch(
        batch.input_ids[:, :t].contiguous(),
        batch.attention_mask[:, :t].contiguous(),
        batch.select[:, :k].contiguous(),
        batch.select_mask[:, :k].contiguous(),
    )


def stack_targets(targets: Sequence[BehaviourTarget], pad_id: int = 0) -> dict[str, Tensor]:
    """Targets of equal probe count, padded to common T and K and stacked. -> [n, P, ...] each.

    Padding rows and positions are masked (`attention_mask` 0, `select_mask` False).
    """
    n_p = {len(t.batch.input_ids) for t in targets}
    if len(n_p) != 1:
        raise ProbeError(f"stack_targets: targets have different probe counts {sorted(n_p)}")
    T = max(t.batch.input_ids.shape[1] for t in targets)
    K = max(t.batch.select.shape[1] for t in targets)

    def pad(x: Tensor, dim: int, size: int, value=0) -> Tensor:
        extra = size - x.shape[dim]
        if extra == 0:
            return x
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x, torch.full(shape, value, dtype=x.dtype)], dim)

    out: dict[str, list[Tensor]] = {}
    for t in targets:
        d = t.tensors()
        d["input_ids"] = pad(d["input_ids"], 1, T, pad_id)
        d["attention_mask"] = pad(d["attention_mask"], 1, T)
        for name in (
            "select",
            "select_mask",
            "hidden",
            "base_hidden",
            "logprobs",
            "top_ids",
            "base_kl",
        ):
            if name in d:
                d[name] = pad(d[name], 1, K)
        for name, v in d.items():
            out.setdefault(name, []).append(v)
    return {name: torch.stack(v) for name, v in out.items()}
