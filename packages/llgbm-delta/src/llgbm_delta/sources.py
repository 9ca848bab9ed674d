"""What can be embedded: PEFT LoRA directories, hub ids, full fine-tuned checkpoints, adapters in
memory; each one found, classified and validated before any model is loaded.

    src = resolve_source("org/my-lora", "org/my-lora")   # a hub id, resolved in the HF cache
    src = validate_source(src, base)                      # AdapterError naming it, or its spec

- A directory holding `adapter_config.json` is a PEFT LoRA adapter (plain LoRA, DoRA,
  rank_pattern / alpha_pattern, layers_to_transform, rsLoRA: whatever llgbm-flora reads).
  Validation reads its config and the safetensors header only (`inspect_adapter`) and checks
  every key against a weightless copy of the base, so a zoo of thousands validates in seconds.
- A directory holding `config.json` and safetensors weights is a full fine-tuned checkpoint of
  the base's architecture: its delta is that of the whole model against the base. Pickle weights
  (`pytorch_model.bin`) are refused: they can run code when loaded.
- Anything else that is not a local path but reads `org/name` (optionally `org/name@revision`)
  is a Hugging Face Hub id: it is resolved through huggingface_hub's cache (downloading only
  `*.json` and `*.safetensors` files, never pickles; nothing is fetched with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from llgbm_delta.errors import AdapterError

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# Config fields a full checkpoint must share with the base to be a fine-tune of it.
_SAME_AS_BASE = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")


@dataclass(frozen=True)
class Source:
    """One thing to embed, located and (after `validate_source`) checked."""

    label: str  # what the caller passed: a path, a hub id, or "adapter[i]" for one in memory
    kind: str  # "lora" (a PEFT directory), "checkpoint" (a full model), "memory" (a LoraAdapter)
    path: Path | None = None  # the local directory (a hub id's snapshot in the HF cache)
    adapter: object | None = None  # the LoraAdapter, for kind "memory"
    spec: object | None = None  # the LoraSpec, once validated (LoRA kinds)
    weights: tuple[Path, ...] = ()  # a checkpoint's safetensors files, once validated
    config: dict | None = None  # a checkpoint's config.json, once validated

    def identity_files(self) -> list[Path]:
        """The files its content hash is computed from (for the cache's memo)."""
        if self.kind == "lora":
            return [p for p in self.path.iterdir() if p.is_file()]
        if self.kind == "checkpoint":
            return [self.path / MODEL_CONFIG, *self.weights]
        return []


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.startswith(".")


def resolve_source(item, label: str) -> Source:
    """Locate `item` (a path, a hub id or a LoraAdapter) and say what kind it is."""
    from llgbm_flora import LoraAdapter

    if isinstance(item, LoraAdapter):
        return Source(label, "memory", adapter=item)
    if not isinstance(item, str | os.PathLike):
        raise AdapterError(
            f"{label}: expected an adapter path, hub id or LoraAdapter, got {type(item).__name__}"
        )
    path = Path(item)
    if not path.exists():
        if looks_like_hub_id(str(item)):
            path = hub_snapshot(str(item), label)
        else:
            raise AdapterError(f"{label}: no such file or directory")
    if not path.is_dir():
        raise AdapterError(f"{label}: not a directory (expected a PEFT adapter or a checkpoint)")
    return Source(label, _kind_of(path, label), path=path)


def _kind_of(path: Path, label: str) -> str:
    if (path / ADAPTER_CONFIG).is_file():
        return "lora"
    if (path / MODEL_CONFIG).is_file():
        return "checkpoint"
    raise AdapterError(
        f"{label}: neither a PEFT adapter ({ADAPTER_CONFIG}) nor a model checkpoint ({MODEL_CONFIG})"
    )


def hub_snapshot(repo: str, label: str | None = None) -> Path:
    """The local snapshot directory of a hub repo `org/name[@revision]` (downloaded if allowed)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    label = label or repo
    repo_id, _, revision = repo.partition("@")
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in (
        "1",
        "true",
        "yes",
        "on",
    )
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision or None,
                allow_patterns=["*.json", "*.safetensors"],
                local_files_only=offline,
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            )
        )
    except (OSError, ValueError, HFValidationError) as e:
        where = (
            "in the local Hugging Face cache (offline)" if offline else "on the Hugging Face Hub"
        )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(
            f"{label}: not a local path, and not found {where} ({first[:200]})"
        ) from None


def validate_source(src: Source, base) -> Source:
    """Check a source fits the base without reading tensor data; AdapterError otherwise.

    `base` has `fits(spec)` (raises LoraError unless every key of the spec is a linear of the
    right shape in the base; `all_layers` for adapters saved without layers_to_transform) and
    `config` (the base's HF config, read only for full checkpoints). Returns the source with
    its spec (LoRA) or weights and config (checkpoint).
    """
    from llgbm_flora import LoraError, inspect_adapter

    try:
        if src.kind == "memory":
            base.fits(src.adapter.spec)
            return replace(src, spec=src.adapter.spec)
        if src.kind == "lora":
            spec = inspect_adapter(src.path)
            base.fits(spec)
            return replace(src, spec=spec)
    except LoraError as e:
        msg = str(e)
        raise AdapterError(
            msg if src.label in msg or str(src.path) in msg else f"{src.label}: {msg}"
        ) from e
    except OSError as e:
        raise AdapterError(f"{src.label}: cannot read adapter ({e})") from e
    return _validate_checkpoint(src, base.config)


def _validate_checkpoint(src: Source, base_config) -> Source:
    from safetensors import safe_open

    config_file = src.path / MODEL_CONFIG
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{src.label}: unreadable {MODEL_CONFIG} ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{src.label}: {MODEL_CONFIG} is not a JSON object")
    base = base_config.to_dict()
    for field in _SAME_AS_BASE:
        if config.get(field) != base.get(field):
            raise AdapterError(
                f"{src.label}: a full checkpoint must have the base's architecture, but its "
                f"{field} is {config.get(field)!r}, the base's {base.get(field)!r}"
            )
    weights = _weight_files(src.path)
    if not weights:
        pickles = [n for n in PICKLE_WEIGHTS if (src.path / n).exists()]
        pickles += sorted(p.name for p in src.path.glob("pytorch_model-*.bin"))
        if pickles:
            raise AdapterError(
                f"{src.label}: weights are pickle files ({pickles[0]}), which can run code when "
                "loaded; only safetensors are read (convert them, e.g. with "
                "save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterError(f"{src.label}: no safetensors weights (model*.safetensors)")
    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises several types for damaged files
            raise AdapterError(f"{w}: corrupt or unreadable safetensors file ({e})") from None
    return replace(src, weights=tuple(weights), config=config)


def _weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: those of model.safetensors.index.json, or all."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise AdapterError(f"{index}: unreadable safetensors index ({e})") from None
        for n in names:
            if Path(n).name != n or not (path / n).is_file():
                raise AdapterError(f"{index}: shard {n!r} is missing or outside the checkpoint")
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def load_checkpoint(src: Source, *, dtype, device):
    """The full fine-tuned model of a validated checkpoint source (safetensors only), eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{src.label}: cannot load checkpoint ({first})") from e
    return model.to(device).eval()
