"""Content hashes: base model fingerprints and adapter content hashes for cache keys.

`model_fingerprint(model)` = sha256 over
- the model config (`config.to_dict()` without runtime switches and paths, keys sorted), and
- every parameter (sorted by name): name, dtype, shape, and
  - all its bytes, when the model's parameters total at most `FULL_HASH_MAX_BYTES` (1 GiB:
    every tiny or 135M model), or
  - for larger models, a strided sample of `SAMPLE_PER_TENSOR` elements plus two exact integer
    checksums of the whole tensor: its bytes read as 16-bit integers, summed, and summed
    squared (int64, computed where the tensor lives, in chunks; integer sums do not depend on
    the order of summation, so CPU and GPU agree). Any realistic weight change (fine-tuning, a
    merged adapter, another checkpoint) moves them; a crafted edit that keeps both sums and
    misses the sample would not be seen, which is the price of not hashing 3 GB on every run.

`adapter_content_hash(adapter)` = sha256 over the fields of the LoRA structure that change the
computation (rank, alpha, rsLoRA, target modules, layers, shapes; per-key ranks and alphas and
DoRA when used) and every A and B tensor's (and DoRA magnitude's) dtype, shape and bytes in
canonical (layer, module) order. The path and the `base_model_name_or_path` string do not
count, so a moved adapter keeps its hash. A plain LoRA hashes as it always did.

`checkpoint_content_hash(path)` = sha256 over a full fine-tuned checkpoint's config (without
runtime switches) and every tensor of its safetensors files: name, dtype, shape and bytes,
sorted by name, so resharding or re-saving the same weights keeps the hash.

`files_identity(paths)`: names, sizes, mtimes, ctimes and inodes of files, the memo key under
which the cache remembers hashes computed from them (any write changes a file's ctime).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path

import torch

FULL_HASH_MAX_BYTES = 1 << 30
SAMPLE_PER_TENSOR = 4096
# Config fields that are runtime switches or provenance, not part of what the model computes.
_CONFIG_IGNORE = {
    "transformers_version",
    "name_or_path",
    "torch_dtype",
    "dtype",
    "use_cache",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "attn_implementation",
}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (any dtype, bf16 included) in row-major order."""
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).cpu().numpy().tobytes()


def config_digest(config) -> str:
    """sha256 of a model config, ignoring runtime switches and private fields."""
    d = {
        k: v
        for k, v in config.to_dict().items()
        if not k.startswith("_") and k not in _CONFIG_IGNORE
    }
    blob = json.dumps(d, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


_CHUNK = 1 << 24  # elements per step of the integer checksums (bounds the int64 temporary)


def _update_tensor_sampled(h, t: torch.Tensor) -> None:
    flat = t.detach().contiguous().reshape(-1)
    step = max(1, flat.numel() // SAMPLE_PER_TENSOR)
    h.update(tensor_bytes(flat[::step][:SAMPLE_PER_TENSOR]))
    raw = flat.view(torch.uint8)
    words = raw.view(torch.int16) if raw.numel() % 2 == 0 else raw  # [n_words]
    s1 = s2 = 0
    for i in range(0, words.numel(), _CHUNK):
        w = words[i : i + _CHUNK].to(torch.int64)
        # |w| < 2^15, so w*w < 2^30 and a chunk's sum stays far inside int64; Python ints add up.
        s1 += int(w.sum())
        s2 += int((w * w).sum())
    h.update(f"{s1},{s2}".encode())


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """A sha256 hex string that changes when the config or any weight changes (see module doc)."""
    h = hashlib.sha256(b"llgbm-model-fingerprint/1\0")
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config_digest(config).encode())
    params = sorted(model.named_parameters(), key=lambda kv: kv[0])
    total = sum(p.numel() * p.element_size() for _, p in params)
    full = total <= FULL_HASH_MAX_BYTES
    h.update(b"full" if full else b"sampled")
    for name, p in params:
        h.update(f"\0{name}\0{p.dtype}\0{tuple(p.shape)}\0".encode())
        if full:
            h.update(tensor_bytes(p))
        else:
            _update_tensor_sampled(h, p)
    return h.hexdigest()


def adapter_content_hash(adapter) -> str:
    """sha256 of a LoRA adapter's structure and tensors (see module doc); path-independent."""
    parts = [("A", adapter.A), ("B", adapter.B)]
    if adapter.magnitude is not None:
        parts.append(("M", adapter.magnitude))

    def items():
        for key in sorted(set(adapter.A) | set(adapter.B)):
            for part, tensors in parts:
                t = tensors.get(key)
                if t is None:
                    yield part, key, None, None, None
                else:
                    yield part, key, t.dtype, tuple(t.shape), _tensor_buffer(t)

    return _adapter_hash(adapter.spec, items())


def adapter_data_hash(layout, data: torch.Tensor) -> str:
    """`adapter_content_hash` of an adapter read with llgbm_flora.read_adapter_data: the same
    hash, computed straight from the read bytes (uint8 CPU tensor) without building tensors.

    The layout lists its tensors in the canonical order this hash walks (keys sorted; A, B, M).
    """
    view = memoryview(data.numpy()).cast("B")
    try:
        items = (
            (part, key, dtype, shape, view[lo:hi])
            for part, key, dtype, shape, lo, hi in layout.tensors
        )
        return _adapter_hash(layout.spec, items)
    finally:
        view.release()


def _tensor_buffer(t: torch.Tensor):
    """A tensor's bytes in row-major order, without a copy for a contiguous CPU tensor."""
    t = t.detach()
    if t.device.type == "cpu" and t.is_contiguous():
        return memoryview(t.reshape(-1).view(torch.uint8).numpy())
    return tensor_bytes(t)


def _adapter_hash(spec, items) -> str:
    h = hashlib.sha256(b"llgbm-adapter-content/1\0")
    structure = {
        "rank": int(spec.rank),
        "alpha": float(spec.alpha),
        "use_rslora": bool(spec.use_rslora),
        "target_modules": sorted(spec.target_modules),
        "layers": sorted(int(i) for i in spec.layers),
        "shapes": sorted([list(s) for s in spec.shapes]),
    }
    if not spec.uniform or spec.use_dora:  # absent for a plain LoRA: its hash stays the same
        structure["rank_pattern"] = [[list(k), r] for k, r in spec.rank_pattern]
        structure["alpha_pattern"] = [[list(k), a] for k, a in spec.alpha_pattern]
        structure["use_dora"] = spec.use_dora
    h.update(json.dumps(structure, sort_keys=True, separators=(",", ":")).encode())
    for part, key, dtype, shape, buf in items:
        if buf is None:
            h.update(f"\0{part}{key}\0missing".encode())
            continue
        h.update(f"\0{part}{key}\0{dtype}\0{shape}\0".encode())
        h.update(buf)  # hashlib releases the GIL on large buffers: threads hash in parallel
    return h.hexdigest()


def files_identity(paths) -> str:
    """sha256 of each file's name, size, mtime, ctime and inode (symlinks followed).

    Cheap (one stat per file) and changed by any write to a file; equal identities mean the
    same bytes unless a file was edited and its ctime forged, which needs root.
    """
    h = hashlib.sha256(b"llgbm-files-identity/1\0")
    for p in sorted(Path(p) for p in paths):
        st = os.stat(p)
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0".encode())
        h.update(f"{st.st_ino}\0{st.st_dev}\0".encode())
    return h.hexdigest()


def checkpoint_content_hash(config: dict, weight_files) -> str:
    """sha256 of a full checkpoint: its config and every safetensors tensor (see module doc)."""
    h = hashlib.sha256(b"llgbm-checkpoint-content/1\0")
    d = {k: v for k, v in config.items() if not k.startswith("_") and k not in _CONFIG_IGNORE}
    h.update(json.dumps(d, sort_keys=True, default=str, separators=(",", ":")).encode())
    tensors = []
    for path in weight_files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                tensors.append((name, info, Path(path), 8 + n))
    tensors.sort(key=lambda t: t[0])
    maps: dict[Path, mmap.mmap] = {}
    try:
        for name, info, path, start in tensors:
            if path not in maps:
                with open(path, "rb") as f:
                    maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            lo, hi = info["data_offsets"]
            h.update(f"\0{name}\0{info['dtype']}\0{tuple(info['shape'])}\0".encode())
            view = memoryview(maps[path])
            try:
                h.update(view[start + lo : start + hi])
            finally:
                view.release()
    finally:
        for m in maps.values():
            m.close()
    return h.hexdigest()
