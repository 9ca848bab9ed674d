"""Checkpoint files that cannot run code: tensors in safetensors, everything else as JSON.

    save_state(path, {"step": 5, "generator": gen.state_dict(), "rng": {...}})  # atomic
    state = load_state(path)     # the same nested structure; CheckpointError when damaged

A checkpoint is one ``.safetensors`` file. Its tensors are the tensors of the nested state, each
named by its place in it (``optimizer.state.3.exp_avg``); the safetensors header's metadata holds
the rest as JSON, with every tensor replaced by a reference to its name, tuples and dicts with
non-string keys tagged (an optimizer's state is keyed by int, Python's RNG state is a tuple), and
a sha256 over the JSON and every tensor's bytes, so a torn or bit-flipped file is refused instead
of resumed from. Reading parses a JSON header and raw tensor bytes: nothing is unpickled, so a
checkpoint from someone else's run directory cannot execute anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llgbm_flora import atomic

if TYPE_CHECKING:  # torch loads on first use: reading a run's files does not need it
    import torch

FORMAT = "llgbm-checkpoint/1"
SUFFIX = ".safetensors"
# Tags of the JSON encoding; a dict whose only key is one of them is a tagged value.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_TAGS = (_TENSOR, _TUPLE, _ITEMS)


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, damaged or not in this format; one-line message."""


def _encode(obj: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        name = where or "tensor"
        while name in tensors:  # two places that print the same (a key "a.b" and a -> b)
            name += "'"
        # A copy on the CPU: safetensors refuses tensors that share storage (tied weights).
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{where}.{i}".lstrip("."), tensors) for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) for k in obj) and not (
            len(obj) == 1 and set(obj) & set(_TAGS)
        )
        if plain:
            return {k: _encode(v, f"{where}.{k}".lstrip("."), tensors) for k, v in obj.items()}
        return {
            _ITEMS: [
                [_encode(k, "", {}), _encode(v, f"{where}.{k}".lstrip("."), tensors)]
                for k, v in obj.items()
            ]
        }
    raise TypeError(f"{where or 'state'}: cannot store a {type(obj).__name__} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        [(tag, value)] = obj.items()
        if tag == _TENSOR:
            return tensors[value]
        if tag == _TUPLE:
            return tuple(_decode(v, tensors) for v in value)
        if tag == _ITEMS:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _digest(structure: str, tensors: dict[str, torch.Tensor]) -> str:
    import torch

    h = hashlib.sha256(structure.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # raw bytes, any dtype
    return h.hexdigest()


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (nested dicts, lists, tuples, scalars, tensors) to ``path`` atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(state, "", tensors))
    meta = {"format": FORMAT, "state": structure, "sha256": _digest(structure, tensors)}
    with atomic.atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """The state :func:`save_state` wrote; :class:`CheckpointError` when damaged or foreign."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except OSError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an llgbm checkpoint (format {meta.get('format')!r})")
    structure = meta.get("state", "")
    if _digest(structure, tensors) != meta.get("sha256"):
        raise CheckpointError(f"{path}: damaged checkpoint (sha256 of its contents differs)")
    try:
        return _decode(json.loads(structure), tensors)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged checkpoint structure ({e})") from None
