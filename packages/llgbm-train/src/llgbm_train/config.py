"""Typed experiment configuration: dataclasses, YAML round trip, dotted overrides, a stable hash.

    cfg = load_config("configs/delta_multi.yaml", overrides=["training.steps=20"])
    save_config(cfg, "runs/x/config.yaml");  cfg.hash  # 16 hex chars, stable across processes

Every section validates itself in ``__post_init__`` (types are coerced and checked by
``from_dict``); a bad value raises ``ConfigError`` with one line naming the field and, for
choices, the allowed values. Every float field must be finite (NaN passes every ``<`` range
check, so it is refused first). Constructing a config never touches the disk or a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from llgbm_flora.atomic import write_text as atomic_write_text


class ConfigError(ValueError):
    """A config file, field or override is wrong; the message is one line."""


def _check_choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{section}.{name}: {value!r} is not allowed (allowed: {', '.join(map(str, allowed))})"
        )


def _check_range(section: str, name: str, value: float, *, lo=None, hi=None, lo_open=False):
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and value > hi
    )
    if bad:
        cond = []
        if lo is not None:
            cond.append(f"{'>' if lo_open else '>='} {lo}")
        if hi is not None:
            cond.append(f"<= {hi}")
        raise ConfigError(f"{section}.{name}: {value!r} must be {' and '.join(cond)}")


class _Section:
    """Mixin: enum fields (Literal) are checked against their allowed values after init."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            allowed = _literal_values(hints[f.name])
            if allowed is not None and value is not None:
                _check_choice(self.section, f.name, value, allowed)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{self.section}.{f.name}: {value!r} must be a finite number")
        self.validate()

    def validate(self) -> None:
        """Range checks of a section; enum checks are done above."""


@dataclass(frozen=True)
class WorldConfig(_Section):
    section: ClassVar[str] = "world"
    kind: Literal["tiny", "smollm2", "hf"] = "tiny"  # world kind; tiny and smollm2 can be built
    dir: str = "worlds/tiny"  # directory holding world.json (relative to the working directory)
    preset: str | None = None  # llgbm_worlds build preset when built here ("test" is tiny and fast)
    build_if_missing: bool = True  # build a tiny/smollm2 world when dir has no world.json
    build_seed: int = 0  # seed of that build


@dataclass(frozen=True)
class ModelConfig(_Section):
    section: ClassVar[str] = "model"
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype the frozen base model is held in
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available (overridden by DDP)
    gradient_checkpointing: bool = False  # recompute base activations in backward (flora's option)
    adapter_chunk_size: int | None = None  # adapters per forward in the delta path (None: all)

    def validate(self) -> None:
        if self.adapter_chunk_size is not None:
            _check_range(self.section, "adapter_chunk_size", self.adapter_chunk_size, lo=1)


@dataclass(frozen=True)
class LoraConfig(_Section):
    """The adapter structure. None means "as the world's teachers have it"; a value is checked."""

    section: ClassVar[str] = "lora"
    rank: int | None = None  # LoRA rank r of generated adapters (must equal the teachers')
    alpha: float | None = None  # LoRA alpha
    target_modules: tuple[str, ...] | None = None  # short module names, e.g. [q_proj, v_proj]
    use_rslora: bool | None = None  # scale alpha/sqrt(r) instead of alpha/r

    def validate(self) -> None:
        if self.rank is not None:
            _check_range(self.section, "rank", self.rank, lo=1)
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("lora.target_modules: must not be empty")


@dataclass(frozen=True)
class ProbeConfig(_Section):
    section: ClassVar[str] = "probe"
    set: str = "generic"  # generic | math | code | commonsense | path to a probe file


@dataclass(frozen=True)
class DeltaConfig(_Section):
    section: ClassVar[str] = "delta"
    layer: int = -1  # hidden-state layer of the delta (-1: last, after the final norm)
    token: Literal["last", "mean"] = "last"  # token rule: last real token or mean over tokens
    cache_dir: str | None = None  # DeltaCache directory (None: <world dir>/delta_cache)
    adapters_per_batch: int = 16  # teacher adapters per forward when filling the cache

    def validate(self) -> None:
        _check_range(self.section, "adapters_per_batch", self.adapters_per_batch, lo=1)


@dataclass(frozen=True)
class BehaviourConfig(_Section):
    """Behaviour targets (llgbm_delta.behaviour): used when training.delta_target is behaviour
    or training.lambda_kl > 0. Each train task's train items are split once into a condition
    pool (what the generator reads) and a probe pool (its task probes), whatever the objective,
    so every objective sees the same conditions."""

    section: ClassVar[str] = "behaviour"
    # task (the sample's own task's probe pool) | world (probes of every train task, shared) |
    # generic | math | code | commonsense | FILE (one llgbm-delta probe set for every sample)
    probes: str = "task"
    positions: Literal["last", "answer"] = "answer"  # last prompt token, or every answer position
    layers: tuple[int, ...] = (-1,)  # hidden-state layers of the behaviour delta (-1: last)
    n_probes: int = 16  # task probes per task (the first n of its probe pool)
    probes_per_step: int | None = None  # probes per sample and step, drawn anew (None: all)
    max_answer_tokens: int = 12  # greedy teacher answer length cap (positions=answer)
    top_k: int | None = None  # teacher distribution kept: None full vocabulary, k the top k
    probe_share: float = 0.5  # share of each task's train items that form its probe pool
    cache_dir: str | None = None  # BehaviourCache directory (None: <world dir>/behaviour_cache)
    adapters_per_batch: int = 16  # teacher adapters per forward when filling the cache

    def validate(self) -> None:
        s = self.section
        for name in ("n_probes", "max_answer_tokens", "adapters_per_batch"):
            _check_range(s, name, getattr(self, name), lo=1)
        if self.probes_per_step is not None:
            _check_range(s, "probes_per_step", self.probes_per_step, lo=1, hi=self.n_probes)
        if self.top_k is not None:
            _check_range(s, "top_k", self.top_k, lo=1)
        _check_range(s, "probe_share", self.probe_share, lo=0.0, hi=1.0, lo_open=True)
        if self.probe_share >= 1.0:
            raise ConfigError(f"{s}.probe_share: {self.probe_share} leaves no condition prompts")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"{s}.layers: must be a non-empty list without repeats")


@dataclass(frozen=True)
class GeneratorConfig(_Section):
    section: ClassVar[str] = "generator"
    kind: Literal["dnd", "t2l"] = "t2l"  # DnD hyper-convolutional decoder or T2L-style heads
    encoder: Literal["sbert", "light", "base"] = "light"  # condition encoder (base: the frozen LLM)
    n_prompts: int = 8  # N prompts per condition
    max_tokens: int = 64  # tokens per prompt seen by the encoder
    slab_width: int = 128  # width of the normalised weight tokens (DnD: 128/256/512)
    options: dict[str, Any] = field(default_factory=dict)  # extra generator kwargs (by kind)
    encoder_options: dict[str, Any] = field(default_factory=dict)  # extra encoder kwargs

    def validate(self) -> None:
        for name in ("n_prompts", "max_tokens", "slab_width"):
            _check_range(self.section, name, getattr(self, name), lo=1)


@dataclass(frozen=True)
class TrainingConfig(_Section):
    section: ClassVar[str] = "training"
    objective: Literal["baseline", "delta_multi", "delta_only"] = "delta_multi"  # what is optimised
    # delta_only variant. b1: a generator trained on the delta through the base + regularisers;
    # b2: a delta predictor (prompts -> delta), whose adapter is the merge of the training
    # teachers it retrieves by predicted delta (the retrieval section; llgbm-compose).
    variant: Literal["b1", "b2"] = "b1"
    steps: int = 200  # optimiser steps
    batch_size: int = 4  # samples (teacher checkpoints) per step, over all processes
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.01
    warmup_steps: int = 10  # linear LR warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm (0: no clipping)
    seed: int = 0  # seeds sampling, init and noise
    lambda_w: float = 1.0  # weight-loss weight (delta_multi; the anchor weight in delta_only)
    lambda_d: float = 1.0  # delta-loss weight reached after its schedule's warm-up
    lambda_d_schedule: Literal["constant", "linear", "cosine"] = "linear"
    lambda_d_warmup: int = 0  # steps to ramp lambda_d from lambda_d_start
    lambda_d_start: float = 0.0
    weight_space: Literal["token", "delta_w", "delta_w_rel"] = "token"  # weight-loss space
    # What L_delta matches: the paper's pooled delta (probe, delta sections) or the behaviour
    # targets' per-position, per-layer deltas (behaviour section).
    delta_target: Literal["paper", "behaviour"] = "paper"
    # Output-level behaviour: forward KL(teacher || generated) of next-token distributions at
    # the behaviour positions, weighted by lambda_kl(step) (0: off).
    lambda_kl: float = 0.0
    lambda_kl_schedule: Literal["constant", "linear", "cosine"] = "constant"
    lambda_kl_warmup: int = 0  # steps to ramp lambda_kl from lambda_kl_start
    lambda_kl_start: float = 0.0
    delta_loss: Literal["mse", "cosine", "combined"] = "combined"
    cos_weight: float = 0.5  # cosine share of the combined delta loss
    delta_scale: float | None = None  # divide deltas by this (None: RMS of the teacher deltas)
    norm_penalty: float = 1.0  # delta_only: weight of the delta-W norm penalty vs teacher norms
    cond_noise: float = 1e-4  # Gaussian noise on condition states (DnD)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast (CUDA only; fp32 on CPU)
    log_every: int = 1  # steps between metrics.jsonl records
    # baseline: steps between evaluations of the delta / KL it does not train on (logged only;
    # a full base forward each). Records in between carry no loss_d / loss_kl.
    monitor_every: int = 1
    checkpoint_every: int = 50  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept

    def validate(self) -> None:
        s = self.section
        for name in (
            "steps",
            "batch_size",
            "log_every",
            "monitor_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            _check_range(s, name, getattr(self, name), lo=1)
        _check_range(s, "lr", self.lr, lo=0.0, lo_open=True)
        for name in ("weight_decay", "warmup_steps", "grad_clip", "lambda_w", "lambda_d"):
            _check_range(s, name, getattr(self, name), lo=0)
        for name in ("lambda_d_warmup", "lambda_d_start", "norm_penalty", "cond_noise"):
            _check_range(s, name, getattr(self, name), lo=0)
        for name in ("lambda_kl", "lambda_kl_warmup", "lambda_kl_start"):
            _check_range(s, name, getattr(self, name), lo=0)
        b2 = self.objective == "delta_only" and self.variant == "b2"
        if b2 and (self.delta_target != "paper" or self.lambda_kl > 0):
            raise ConfigError(
                f"{s}.variant: b2 predicts the paper's pooled delta and has no adapter to "
                "score by KL: set training.delta_target=paper and training.lambda_kl=0"
            )
        if not b2 and self.objective == "delta_only" and self.lambda_d == 0 and self.lambda_kl == 0:
            raise ConfigError(
                f"{s}.objective: delta_only needs a behaviour term (lambda_d > 0 or lambda_kl > 0)"
            )
        _check_range(s, "min_lr_ratio", self.min_lr_ratio, lo=0, hi=1)
        _check_range(s, "cos_weight", self.cos_weight, lo=0, hi=1)
        if self.delta_scale is not None:
            _check_range(s, "delta_scale", self.delta_scale, lo=0.0, lo_open=True)


@dataclass(frozen=True)
class RetrievalConfig(_Section):
    """delta_only b2: the delta predictor, and how its adapter is made from the training
    teachers (a faiss index over their cached deltas; llgbm_compose.retrieve_merge)."""

    section: ClassVar[str] = "retrieval"
    k: int = 4  # teachers retrieved per task (nearest by cosine to the predicted delta)
    merge: Literal["average", "ties", "dare"] = "average"  # their merge, in delta-W space
    weights: Literal["uniform", "score"] = "uniform"  # score: weighted by cosine (sum 1)
    rank: int | None = None  # rank of the merged adapter (None: exact, no SVD cut)
    hidden: int = 256  # width of the predictor's MLP

    def validate(self) -> None:
        for name in ("k", "hidden"):
            _check_range(self.section, name, getattr(self, name), lo=1)
        if self.rank is not None:
            _check_range(self.section, "rank", self.rank, lo=1)
        if self.weights == "score" and self.merge != "average":
            raise ConfigError(
                "retrieval.weights: score weighs an average by cosine; with merge "
                f"{self.merge} use weights=uniform"
            )


@dataclass(frozen=True)
class EvalConfig(_Section):
    section: ClassVar[str] = "eval"
    tasks: Literal["heldout", "train", "all"] = "heldout"  # which tasks are evaluated
    max_items: int = 64  # test items per task (None-free: a cap keeps CPU runs short)
    max_new_tokens: int | None = None  # greedy decoding budget (None: the scorer's default)
    bootstrap: int = 1000  # bootstrap resamples for the 95% CI over items
    seed: int = 0  # seeds condition prompts and the bootstrap
    # batched: adapters of one structure share generate passes (llgbm_worlds.score_groups);
    # peft: each adapter loaded into PEFT and scored alone (the definition; same booleans, slower)
    scorer: Literal["batched", "peft"] = "batched"
    batch_rows: int = 512  # item rows per batched pass (memory)

    def validate(self) -> None:
        _check_range(self.section, "max_items", self.max_items, lo=1)
        _check_range(self.section, "batch_rows", self.batch_rows, lo=1)
        _check_range(self.section, "bootstrap", self.bootstrap, lo=10)


SECTIONS: dict[str, type] = {
    "world": WorldConfig,
    "model": ModelConfig,
    "lora": LoraConfig,
    "probe": ProbeConfig,
    "delta": DeltaConfig,
    "behaviour": BehaviourConfig,
    "generator": GeneratorConfig,
    "training": TrainingConfig,
    "retrieval": RetrievalConfig,
    "eval": EvalConfig,
}
# Outside the hash: fields that name or place a run, and the eval section, which changes how a
# trained generator is scored but not what training computes (so a run can be re-evaluated on
# other tasks, and resumed after eval settings change).
_UNHASHED = ("name", "runs_dir", "eval")


@dataclass(frozen=True)
class Config:
    name: str | None = None  # run name (default: the config file's stem)
    runs_dir: str = "runs"  # parent of run directories
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    delta: DeltaConfig = field(default_factory=DeltaConfig)
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def retrieves(self) -> bool:
        """delta_only b2: a delta predictor whose adapters are retrieved teachers, merged."""
        return self.training.objective == "delta_only" and self.training.variant == "b2"

    @property
    def uses_behaviour(self) -> bool:
        """Whether training needs behaviour targets (the behaviour section)."""
        t = self.training
        return not self.retrieves and (t.delta_target == "behaviour" or t.lambda_kl > 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-able dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @property
    def hash(self) -> str:
        """sha256 (16 hex) of everything that changes what training computes."""
        d = {k: v for k, v in self.to_dict().items() if k not in _UNHASHED}
        if not self.retrieves:
            d.pop("retrieval")  # only b2 reads it: other runs keep the hashes they had
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Config:
        return _build(cls, data, prefix="", source=source)

    def override(self, overrides: list[str] | tuple[str, ...]) -> Config:
        """New config with dotted ``key=value`` overrides applied (values parsed as YAML)."""
        data = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. training.lr=1e-4")
            _set_dotted(data, key, _parse_scalar(raw))
        return Config.from_dict(data, source="override")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if part not in node:
            _unknown(".".join(parts[: i + 1]), node.keys(), "override")
        if not isinstance(node[part], dict):
            raise ConfigError(f"override: {'.'.join(parts[: i + 1])} is not a section")
        node = node[part]
    if parts[-1] not in node and len(parts) <= 2:
        _unknown(key, node.keys(), "override")
    node[parts[-1]] = value


def _unknown(key: str, allowed, source: str):
    leaf = key.rsplit(".", 1)[-1]
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    close = difflib.get_close_matches(leaf, list(allowed), n=1)
    hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
    raise ConfigError(
        f"{source}: unknown key '{key}' ({hint}allowed: {', '.join(sorted(allowed))})"
    )


def _literal_values(tp: Any) -> tuple | None:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            vals = _literal_values(arg)
            if vals is not None:
                return vals
    return None


def _coerce(tp: Any, value: Any, where: str, source: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{source}: {where}: {value!r} is not allowed (allowed: {', '.join(map(str, args))})"
            )
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, where, source) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a section (mapping), got {value!r}")
        return _build(tp, value, prefix=where + ".", source=source)
    raise ConfigError(f"{source}: {where}: unsupported field type {tp!r}")


def _build(cls: type, data: Any, *, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            _unknown(prefix + str(key), names, source)
    kwargs = {k: _coerce(hints[k], v, prefix + k, source) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply overrides; the run name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if data is None:
        # An empty file would silently mean "every default" (a long default-world build).
        raise ConfigError(
            f"{path}: config is empty; start from a file in configs/ (e.g. delta_multi.yaml)"
        )
    cfg = Config.from_dict(data, source=str(path))
    if overrides:
        cfg = cfg.override(overrides)
    if cfg.name is None:
        cfg = dataclasses.replace(cfg, name=path.stem)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write YAML atomically (tmp file in the same dir + os.replace)."""
    return atomic_write_text(Path(path), dump_config(cfg))
