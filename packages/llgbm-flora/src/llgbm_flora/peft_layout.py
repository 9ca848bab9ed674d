"""Where a PEFT adapter's tensors lie in its safetensors file, and reading it in one piece.

    layout = adapter_layout("teachers/add_3")        # spec + each tensor's byte range (header only)
    data = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=True)
    read_adapter_data(layout, data)                  # one read of the data section, no copies
    batch = batch_from_data([layout, ...], [data.to("cuda", non_blocking=True), ...])

This is the fast way from disk to a `LoraBatch`: the data section of each file is read with one
`readinto` (straight into pinned memory, if given), moved to the device as one transfer, and cut
into A / B (/ DoRA magnitude) tensors there by one stacking copy per key for the whole batch; no
per-tensor host copies and no host-side stacking. `load_adapter` stays the simple path; both
give the same tensors (tests).

`adapter_layout` is memoised on the raw bytes of `adapter_config.json` and of the safetensors
header, so a zoo whose files share a header shape (the usual case: one trainer, one structure)
parses the config and runs the key checks of `from_peft_state_dict` once, not per adapter.
A layout is checked as strictly as safetensors does: every tensor's byte range matches its
dtype and shape, the ranges tile the data section without gaps or overlaps, and the file is
exactly as long as the header says.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import LoraFormatError
from .spec import LoraAdapter, LoraBatch, LoraKey, LoraSpec

__all__ = [
    "AdapterLayout",
    "adapter_from_data",
    "adapter_layout",
    "batch_from_data",
    "read_adapter_data",
]

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_MEMO_SIZE = 256


@dataclass(frozen=True)
class AdapterLayout:
    """A PEFT safetensors adapter: its spec and where each of its tensors lies in the file.

    `tensors`: (part, key, dtype, shape, lo, hi) in canonical order (keys sorted, then A, B and
    DoRA's magnitude M), with [lo, hi) the tensor's bytes within the data section, which starts
    at byte `data_start` of `file` and is `nbytes` long.
    """

    spec: LoraSpec
    file: Path
    data_start: int
    nbytes: int
    tensors: tuple[tuple[str, LoraKey, torch.dtype, tuple[int, ...], int, int], ...]


_memo: OrderedDict[tuple[bytes, bytes], tuple] = OrderedDict()
_memo_lock = threading.Lock()


def adapter_layout(path: str | os.PathLike) -> AdapterLayout | None:
    """The layout of a PEFT directory's adapter_model.safetensors, from config and header only.

    None if the directory holds no safetensors file (an adapter_model.bin has no header). Raises
    LoraFormatError / LoraKeyMismatchError as `load_adapter` would for a bad config, header, key
    or shape (damaged tensor bytes past an intact header read as they are).
    """
    from .peft_io import CONFIG_NAME, SAFETENSORS_NAME

    path = Path(path)
    st = path / SAFETENSORS_NAME
    if not st.is_file():
        return None
    config_file = path / CONFIG_NAME
    try:
        config_raw = config_file.read_bytes()
    except OSError as exc:
        raise LoraFormatError(f"{config_file}: unreadable ({exc})") from None
    header_raw, size = _read_header(st)
    memo_key = (config_raw, header_raw)
    with _memo_lock:
        hit = _memo.get(memo_key)
        if hit is not None:
            _memo.move_to_end(memo_key)
    if hit is None:
        hit = _parse(config_file, config_raw, st, header_raw, size)
        with _memo_lock:
            _memo[memo_key] = hit
            while len(_memo) > _MEMO_SIZE:
                _memo.popitem(last=False)
    spec, tensors, nbytes = hit
    if size != 8 + len(header_raw) + nbytes:  # a memoised header says nothing of this file's end
        raise LoraFormatError(
            f"{st}: corrupt or unreadable safetensors file (data section is "
            f"{size - 8 - len(header_raw)} bytes, the header describes {nbytes})"
        )
    return AdapterLayout(spec, st, 8 + len(header_raw), nbytes, tensors)


def _read_header(st: Path) -> tuple[bytes, int]:
    try:
        with open(st, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
            raw = f.read(n)
            if len(raw) != n:
                raise ValueError("header truncated")
    except (OSError, ValueError) as exc:
        raise LoraFormatError(f"{st}: corrupt or unreadable safetensors file ({exc})") from None
    return raw, size


def _parse(config_file: Path, config_raw: bytes, st: Path, header_raw: bytes, size: int):
    from .peft_io import from_peft_state_dict

    try:
        config = json.loads(config_raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraFormatError(f"{config_file}: unreadable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LoraFormatError(f"{config_file}: expected a JSON object")
    try:
        entries = _header_entries(header_raw, size - 8 - len(header_raw))
    except ValueError as exc:
        raise LoraFormatError(f"{st}: corrupt or unreadable safetensors file ({exc})") from None
    # The state dict of meta tensors carries each tensor's identity through the key mapping.
    state = {
        name: torch.empty(shape, dtype=dtype, device="meta")
        for name, (dtype, shape, _, _) in entries.items()
    }
    where = {id(t): name for name, t in state.items()}
    adapter = from_peft_state_dict(state, config, where=str(st), config_where=str(config_file))
    parts = [("A", adapter.A), ("B", adapter.B)]
    if adapter.magnitude is not None:
        parts.append(("M", adapter.magnitude))
    tensors = []
    for key in sorted(adapter.spec.keys()):
        for part, d in parts:
            dtype, shape, lo, hi = entries[where[id(d[key])]]
            tensors.append((part, key, dtype, shape, lo, hi))
    nbytes = max((e[3] for e in entries.values()), default=0)
    return adapter.spec, tuple(tensors), nbytes


def _header_entries(raw: bytes, data_len: int) -> dict[str, tuple]:
    """name -> (dtype, shape, lo, hi), checked: ranges match dtype/shape and tile the data."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ValueError(f"tensor {name}: malformed entry")
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"tensor {name}: dtype {info.get('dtype')!r} is not supported")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (
            isinstance(shape, list)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise ValueError(f"tensor {name}: malformed shape or data_offsets")
        lo, hi = offsets
        if not 0 <= lo <= hi or hi - lo != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name}: data_offsets {offsets} do not fit {shape} {dtype}")
        out[name] = (dtype, tuple(shape), lo, hi)
    end = 0
    for lo, hi in sorted((e[2], e[3]) for e in out.values()):
        if lo != end:
            raise ValueError("tensor data has gaps or overlaps")
        end = hi
    if end != data_len:
        raise ValueError(f"data section is {data_len} bytes, the header describes {end}")
    return out


def read_adapter_data(layout: AdapterLayout, out: Tensor) -> Tensor:
    """Read the data section of `layout.file` into `out` (uint8, CPU, >= nbytes); returns it.

    One `readinto` loop into `out`'s memory (pinned memory works, and is what makes the
    transfer to the GPU fast). Raises LoraFormatError if the file is no longer the length its
    layout says (it changed on disk).
    """
    if out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError("read_adapter_data: out must be a contiguous uint8 CPU tensor")
    if out.numel() < layout.nbytes:
        raise ValueError(f"read_adapter_data: out holds {out.numel()} bytes < {layout.nbytes}")
    view = memoryview(out.numpy()).cast("B")[: layout.nbytes]
    try:
        with open(layout.file, "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != layout.data_start + layout.nbytes:
                raise LoraFormatError(f"{layout.file}: changed on disk since its header was read")
            f.seek(layout.data_start)
            got = 0
            while got < layout.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise LoraFormatError(f"{layout.file}: truncated while reading")
                got += n
    except OSError as exc:
        raise LoraFormatError(f"{layout.file}: cannot read ({exc})") from None
    finally:
        view.release()
    return out


def _piece(data: Tensor, dtype: torch.dtype, shape: tuple[int, ...], lo: int, hi: int) -> Tensor:
    raw = data[lo:hi]
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()  # misaligned for a view as `dtype`: copy to a fresh buffer
    return raw.view(dtype).view(shape)


def adapter_from_data(layout: AdapterLayout, data: Tensor) -> LoraAdapter:
    """The LoraAdapter of a read data section (views into `data`, on its device)."""
    parts: dict[str, dict[LoraKey, Tensor]] = {"A": {}, "B": {}, "M": {}}
    for part, key, dtype, shape, lo, hi in layout.tensors:
        parts[part][key] = _piece(data, dtype, shape, lo, hi)
    return LoraAdapter(layout.spec, parts["A"], parts["B"], parts["M"] or None)


def _cut(rows: Tensor, lo: int, hi: int, dtype, shape, view: bool) -> Tensor:
    """rows[:, lo:hi] as [n, *shape] of `dtype`: a strided view where the byte offsets allow it
    (`view`), else one contiguous copy."""
    part = rows[:, lo:hi]
    if view:
        size = torch.empty((), dtype=dtype).element_size()
        if lo % size == 0 and rows.stride(0) % size == 0:
            return part.view(dtype).view(rows.shape[0], *shape)
    return part.contiguous().view(dtype).view(rows.shape[0], *shape)


def batch_from_data(layouts: list[AdapterLayout], data: list[Tensor]) -> LoraBatch:
    """One LoraBatch from read data sections (all on one device), one stacking copy per key.

    The layouts must share a structure and scale (LoraBatch.from_adapters' rule) and store each
    tensor in the same dtype; their byte offsets may differ.
    """
    if not layouts or len(layouts) != len(data):
        raise ValueError("batch_from_data: needs one data tensor per layout, and at least one")
    first = layouts[0]
    for j, lay in enumerate(layouts[1:], start=1):
        same = len(lay.tensors) == len(first.tensors) and all(
            (p, k, d, s) == (p0, k0, d0, s0)
            for (p, k, d, s, _, _), (p0, k0, d0, s0, _, _) in zip(lay.tensors, first.tensors)
        )
        if not (same and first.spec.compatible(lay.spec)):
            raise ValueError(
                f"batch_from_data: adapter {j} ({lay.file}) differs in structure, scale or "
                f"stored dtypes from adapter 0 ({first.file})"
            )
    n = len(layouts)
    parts: dict[str, dict[LoraKey, Tensor]] = {"A": {}, "B": {}, "M": {}}
    if all(lay.tensors == first.tensors and lay.nbytes == first.nbytes for lay in layouts):
        # One file layout (the usual case): stack the whole sections once, then cut per key
        # (no per-adapter slicing in Python). A is left a strided view into the stack (every
        # consumer reads it through a copy anyway: the fused path concatenates each group's A),
        # saving one copy kernel per key; B and M get one copy kernel each.
        rows = torch.stack([d[: first.nbytes] for d in data])  # [n, nbytes]
        for part, key, dtype, shape, lo, hi in first.tensors:
            parts[part][key] = _cut(rows, lo, hi, dtype, shape, view=part == "A")
        return LoraBatch(first.spec, parts["A"], parts["B"], parts["M"] or None)
    for t, (part, key, dtype, shape, _, _) in enumerate(first.tensors):
        rows = [d[lay.tensors[t][4] : lay.tensors[t][5]] for lay, d in zip(layouts, data)]
        parts[part][key] = torch.stack(rows).view(dtype).view(n, *shape)
    return LoraBatch(first.spec, parts["A"], parts["B"], parts["M"] or None)
