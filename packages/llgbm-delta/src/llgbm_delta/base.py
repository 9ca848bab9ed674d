"""The base model of a run: loading it, and what cache keys need from it without loading it.

    model, tokenizer, name = load_base("Qwen/Qwen2.5-1.5B", dtype="bfloat16")
    base = RunBase("path/to/base", device=None, dtype=None, cache=cache)
    base.fits(spec)                        # does an adapter of this structure apply?
    ident, memo = identity(base, probes, cache, trust_memo=True)

For a base read from local files (a path, or a hub id in the local HF cache), the cache's memo
(`DeltaCache.memo_get`) supplies its fingerprint, the probes' token hash, its context length and
which adapter structures fit, keyed by the files' identity: a fully cached run imports no
transformers model code and reads no weights. Otherwise the config and a weightless copy on the
meta device are built when first needed, and the weights are loaded at the first cache miss.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from llgbm_delta.cache import BaseInfo, DeltaCache
from llgbm_delta.delta import ProbeBatch, encode_probes
from llgbm_delta.errors import BaseModelError, DeltaError
from llgbm_delta.fingerprint import files_identity, model_fingerprint
from llgbm_delta.probes import ProbeSet

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DeltaError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_base(
    base: str | Path | tuple, *, device: str | torch.device | None = None, dtype=None
) -> tuple[nn.Module, object, str]:
    """(model, tokenizer, name) from an HF id/path or a (model, tokenizer) pair.

    A path or id loads in float32 unless `dtype` says otherwise, on `device` (default: CUDA if
    available). A given model is moved only if `device`/`dtype` are passed (in place, as
    `Module.to` does).
    """
    dtype = parse_dtype(dtype)
    if isinstance(base, tuple):
        if len(base) != 2:
            raise BaseModelError("base must be an HF id/path or a (model, tokenizer) pair")
        model, tokenizer = base
        name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model.eval(), tokenizer, name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(base)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise BaseModelError(f"{name}: cannot load base model ({_first_line(e)})") from e
    return model.to(device).eval(), tokenizer, name


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def base_argument(base, model, tokenizer):
    """The base as `run_deltas` takes it (a path/id or a pair) from `base=` or `model=`/`tokenizer=`."""
    if model is None and tokenizer is None:
        if base is None:
            raise DeltaError(
                "no base model: pass model= and tokenizer= (objects), model= (an HF id or path), "
                "or base= (an id/path or a (model, tokenizer) pair)"
            )
        return base
    if base is not None:
        raise DeltaError("pass the base model once: base=... or model=/tokenizer=, not both")
    if isinstance(model, str | os.PathLike):
        if tokenizer is not None:
            raise DeltaError(
                "model= is an HF id or path, which brings its own tokenizer; pass tokenizer= "
                "only with a model object"
            )
        return model
    if model is None or tokenizer is None:
        raise DeltaError("model= (a model object) and tokenizer= go together: pass both")
    return (model, tokenizer)


class RunBase:
    """The base model: what validation and cache keys need first, the weights at first need.

    For a base read from local files (a path, or a hub id in the local HF cache), the cache's
    memo supplies the fingerprint, token hash, context length and which adapter structures fit,
    so a fully cached run imports no transformers model code and reads no weights. Otherwise
    the config and a weightless copy on the meta device are built when first asked for.
    """

    def __init__(self, base, device, dtype, cache: DeltaCache | None) -> None:
        self.device = device
        self.dtype = parse_dtype(dtype)
        self.cache = cache
        self._fits_ok: set = set()  # structures already checked against the base in this run
        self.memo_new: dict[str, dict] = {}  # memo entries learned by this run
        self.model = self.tokenizer = None
        self._config = self._shadow = None
        self.dir: Path | None = None  # local directory of a base given by path or hub id
        self._identity: str | None = None
        if isinstance(base, tuple):
            self.model, self.tokenizer, self.name = load_base(base, device=device, dtype=dtype)
            self._config = self.model.config
            self._shadow = self.model
            return
        self.name = str(base)
        self.dir = _local_dir(self.name)
        if self.dir is None:
            self.config  # noqa: B018 (fail early, in one line, on a base that cannot load)

    @property
    def config(self):
        if self._config is None:
            from transformers import AutoConfig

            try:
                self._config = AutoConfig.from_pretrained(self.name)
            except (OSError, ValueError, KeyError) as e:
                raise BaseModelError(
                    f"{self.name}: cannot load base model ({_first_line(e)})"
                ) from e
        return self._config

    @property
    def shadow(self) -> nn.Module:
        """The base, or a copy without weights (meta device) until the base is loaded."""
        if self.model is not None:
            return self.model
        if self._shadow is None:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                self._shadow = AutoModelForCausalLM.from_config(self.config)
        return self._shadow

    def fits(self, spec) -> None:
        """Raise LoraError unless an adapter of this structure applies to the base (memoised)."""
        from llgbm_flora import check_fits

        all_layers = spec.model_layers is not None  # saved without layers_to_transform
        seen = (spec.structure, all_layers)
        if seen in self._fits_ok:
            return
        key = None
        if self.cache is not None and self.identity() is not None:
            digest = hashlib.sha256(repr((spec.structure, all_layers)).encode()).hexdigest()
            key = f"fits:{self.identity()}:{digest}"
            if self.cache.memo_get(key) is not None:
                self._fits_ok.add(seen)
                return
        check_fits(self.shadow, spec, all_layers=all_layers)
        self._fits_ok.add(seen)
        if key is not None:
            self.memo_new[key] = {"fits": True}

    def identity(self) -> str | None:
        """files_identity of the base directory's files, or None for a base not read from files."""
        if self.dir is not None and self._identity is None:
            self._identity = files_identity(p for p in self.dir.iterdir() if p.is_file())
        return self._identity

    def target_device(self) -> torch.device:
        """Where the model is, or will be loaded (as `load_base` chooses)."""
        if self.model is not None:
            return device_of(self.model)
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def load(self) -> tuple[nn.Module, object]:
        if self.model is None:
            self.model, self.tokenizer, _ = load_base(
                self.name, device=self.device, dtype=self.dtype
            )
            self._config = self.model.config
        return self.model, self.tokenizer

    def memo_keys(self, probe_hash: str) -> tuple[str, str] | None:
        """Memo keys of (fingerprint, probe tokens) for a base read from local files, else None."""
        identity = self.identity()
        if identity is None:
            return None
        dtype = str(self.dtype or torch.float32).removeprefix("torch.")
        return f"base:{identity}:{dtype}", f"tokens:{identity}:{probe_hash}"


def _local_dir(name: str) -> Path | None:
    """The directory a base id/path loads from, if it is on disk (a hub id: its cached snapshot)."""
    path = Path(name)
    if path.is_dir():
        return path
    from llgbm_delta.sources import looks_like_hub_id

    if not looks_like_hub_id(name):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached (or not a repo): the fingerprint is computed from the model
        return None


@dataclass
class Identity:
    """What cache keys need from the base: its fingerprint and the probes' token ids."""

    info: BaseInfo
    token_hash: str
    max_len: int  # tokens of the longest probe
    context: int | None  # the base's max_position_embeddings
    batch: ProbeBatch | None = None  # set when the tokenizer ran in this process
    from_memo: bool = False


def identity(base: RunBase, probes: ProbeSet, cache, trust_memo: bool) -> tuple[Identity, dict]:
    """The base identity, from the cache's memo if it knows the base files; and memo updates."""
    keys = base.memo_keys(probes.hash) if cache is not None else None
    if keys is not None and trust_memo:
        known, tokens = cache.memo_get(keys[0]), cache.memo_get(keys[1])
        if known is not None and tokens is not None:
            try:
                info = BaseInfo(**known["info"])
                return Identity(
                    info, tokens["token_hash"], int(tokens["max_len"]), known["context"]
                ), {}
            except (TypeError, KeyError, ValueError):
                pass  # a memo from another version: recompute
    model, tokenizer = base.load()
    param = next(model.parameters())
    batch = encode_probes(tokenizer, probes, device=param.device)
    info = BaseInfo(
        fingerprint=model_fingerprint(model),
        name=base.name,
        hidden_size=int(model.config.hidden_size),
        dtype=str(param.dtype).removeprefix("torch."),
    )
    max_len = int(batch.attention_mask.sum(-1).max())
    context = getattr(model.config, "max_position_embeddings", None)
    context = context if isinstance(context, int) else None
    memo = {}
    if keys is not None:
        memo = {
            keys[0]: {"info": asdict(info), "context": context},
            keys[1]: {"token_hash": batch.token_hash, "max_len": max_len},
        }
    return Identity(info, batch.token_hash, max_len, context, batch), memo


class StaleMemo(Exception):
    """The memo's fingerprint or token hash disagrees with the loaded base: recompute them."""


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
