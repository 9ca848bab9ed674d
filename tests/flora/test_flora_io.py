"""PEFT directories in and out: exact round trips, PEFT interop, and loud failures on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llgbm_flora import (
    LoraFormatError,
    LoraKeyMismatchError,
    check_fits,
    from_peft_state_dict,
    functional_forward,
    load_adapter,
    module_map,
    save_adapter,
)
from llgbm_flora.testing import MODEL_BUILDERS, random_adapter, tiny_spec
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

ST = "adapter_model.safetensors"
CFG = "adapter_config.json"


def assert_same_adapter(a, b) -> None:
    assert a.spec == b.spec
    keys = a.spec.keys()
    for k in keys:
        assert a.A[k].dtype == b.A[k].dtype and torch.equal(a.A[k], b.A[k])
        assert a.B[k].dtype == b.B[k].dtype and torch.equal(a.B[k], b.B[k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_exact_and_peft_loads_it(model, inputs, tmp_path, dtype):
    adapter = random_adapter(tiny_spec(model, rank=4, alpha=6), seed=1, scale=0.2, dtype=dtype)
    out = save_adapter(adapter, tmp_path / "a")
    assert sorted(p.name for p in out.iterdir()) == [CFG, ST]
    assert_same_adapter(adapter, load_adapter(out, model=model))
    config = json.loads((out / CFG).read_text())
    assert config["peft_type"] == "LORA" and config["layers_to_transform"] is None
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 6, False)
    # save(load(x)) writes the same bytes
    save_adapter(load_adapter(out), tmp_path / "b")
    assert (tmp_path / "b" / ST).read_bytes() == (out / ST).read_bytes()
    assert (tmp_path / "b" / CFG).read_text() == (out / CFG).read_text()
    if dtype == torch.float32:
        pm = PeftModel.from_pretrained(model, out).eval()
        with torch.no_grad():
            ref = pm(**inputs).logits
        pm.unload()  # from_pretrained injected layers into `model`: take them out again
        with torch.no_grad():
            ours = functional_forward(model, adapter, **inputs).logits
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_layer_subset_and_rslora_round_trip_through_peft(inputs, tmp_path):
    model = MODEL_BUILDERS["qwen2"](seed=0, layers=3)
    spec = tiny_spec(
        model, layers=(0, 2), target_modules=("k_proj", "o_proj"), use_rslora=True, alpha=3
    )
    adapter = random_adapter(spec, seed=3, scale=0.3)
    path = save_adapter(adapter, tmp_path / "sub")
    config = json.loads((path / CFG).read_text())
    assert config["layers_to_transform"] == [0, 2] and config["use_rslora"] is True
    assert_same_adapter(adapter, load_adapter(path, model=model))
    pm = PeftModel.from_pretrained(MODEL_BUILDERS["qwen2"](seed=0, layers=3), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            functional_forward(model, adapter, **inputs).logits,
            pm(**inputs).logits,
            atol=1e-5,
            rtol=0,
        )


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_loads_what_peft_saves(family, inputs, tmp_path, safe):
    build = MODEL_BUILDERS[family]
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    )
    pm = get_peft_model(build(seed=0), config).eval()
    pm.save_pretrained(tmp_path, safe_serialization=safe)
    assert (tmp_path / (ST if safe else "adapter_model.bin")).is_file()
    model = build(seed=0)
    adapter = load_adapter(tmp_path, model=model)
    assert adapter.spec.scale == 4.0 and adapter.spec.layers == (0, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            functional_forward(model, adapter, **inputs).logits,
            pm(**inputs).logits,
            atol=1e-5,
            rtol=0,
        )
    # the in-memory names (with ".default") map to the same adapter
    in_memory = {k: v for k, v in pm.state_dict().items() if ".lora_" in k}
    assert all(".default." in k for k in in_memory)
    raw = json.loads((tmp_path / CFG).read_text())
    assert_same_adapter(from_peft_state_dict(in_memory, raw), adapter)


def test_names_do_not_depend_on_root(model, tmp_path):
    full = module_map(model, ["q_proj", "down_proj"])
    backbone = module_map(model.get_decoder(), ["q_proj", "down_proj"])
    assert (
        full.keys() == backbone.keys() == {(i, m) for i in (0, 1) for m in ("q_proj", "down_proj")}
    )
    assert all(full[k] == "model." + backbone[k] for k in full)
    spec_full = tiny_spec(model)
    spec_backbone = tiny_spec(model.get_decoder())
    assert spec_full == spec_backbone and spec_full.module_paths == spec_backbone.module_paths
    adapter = random_adapter(spec_backbone, seed=0)
    save_adapter(adapter, tmp_path / "x")
    names = set(load_file(tmp_path / "x" / ST))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in names


def test_overwrite_is_clean(tmp_path):
    model = MODEL_BUILDERS["llama"](seed=0)
    first = random_adapter(tiny_spec(model), seed=1)
    second = random_adapter(tiny_spec(model, target_modules=("q_proj",)), seed=2)
    save_adapter(first, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"stale")
    save_adapter(second, tmp_path / "a")
    assert_same_adapter(second, load_adapter(tmp_path / "a"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp dirs left
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CFG, ST]


def test_save_refuses_a_folder_that_is_not_an_adapter(tmp_path):
    from llgbm_flora.atomic import DirectoryNotOwnedError

    model = MODEL_BUILDERS["llama"](seed=0)
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "important.txt").write_text("keep me")
    with pytest.raises(DirectoryNotOwnedError, match=r"victim: exists and was not written"):
        save_adapter(random_adapter(tiny_spec(model), seed=1), tmp_path / "victim")
    assert sorted(p.name for p in (tmp_path / "victim").iterdir()) == ["important.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]


# ---- key mismatches: every kind raises and names what is wrong -------------------------------


def _saved(tmp_path: Path, layers: int = 2, **spec_kw) -> tuple[Path, dict]:
    model = MODEL_BUILDERS["llama"](seed=0, layers=layers)
    path = save_adapter(random_adapter(tiny_spec(model, **spec_kw), seed=0), tmp_path / "a")
    return path, load_file(path / ST)


def _rewrite(path: Path, state: dict) -> None:
    save_file(state, str(path / ST))


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def test_missing_module(tmp_path):
    path, state = _saved(tmp_path)
    del state["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    _rewrite(path, state)
    with pytest.raises(LoraKeyMismatchError, match=r"missing 1: \(1, 'v_proj'\)\.lora_A") as err:
        load_adapter(path)
    assert str(path / ST) in str(err.value)


def test_extra_key(tmp_path):
    path, state = _saved(tmp_path)
    state["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 32)
    _rewrite(path, state)
    with pytest.raises(LoraKeyMismatchError, match=r"extra 1: base_model\.model\.lm_head\.lora_A"):
        load_adapter(path)


def test_wrong_layer_index(tmp_path):
    path, state = _saved(tmp_path)
    moved = {k.replace(".layers.1.", ".layers.5."): v for k, v in state.items()}
    _rewrite(path, moved)
    with pytest.raises(LoraKeyMismatchError, match=r"missing 28: \(1, 'q_proj'\), \(1, 'k_proj'\)"):
        load_adapter(path)  # layers 1-4 absent below the highest layer seen
    config = json.loads((path / CFG).read_text())
    (path / CFG).write_text(json.dumps({**config, "layers_to_transform": [0, 1]}))
    with pytest.raises(
        LoraKeyMismatchError, match=r"missing 7: \(1, 'q_proj'\).*extra 14: .*layers\.5\."
    ):
        load_adapter(path)
    # a layer the model does not have
    (path / CFG).write_text(json.dumps({**config, "layers_to_transform": [0, 5]}))
    model = MODEL_BUILDERS["llama"](seed=0)
    with pytest.raises(LoraKeyMismatchError, match=r"extra 7: \(5, 'q_proj'\)"):
        load_adapter(path, model=model)


def test_wrong_shape(tmp_path):
    path, state = _saved(tmp_path)
    state[Q0 + ".lora_A.weight"] = torch.zeros(5, 32)  # rank 5 in an r=4 adapter
    _rewrite(path, state)
    with pytest.raises(
        LoraKeyMismatchError, match=r"shape errors 1: \(0, 'q_proj'\) lora_A \(5, 32\)"
    ):
        load_adapter(path)
    state[Q0 + ".lora_A.weight"] = torch.zeros(4, 48)  # in_features differ from other layers
    _rewrite(path, state)
    with pytest.raises(LoraKeyMismatchError, match=r"q_proj shapes differ across layers"):
        load_adapter(path)


def test_shapes_do_not_fit_model(tmp_path):
    path, _ = _saved(tmp_path)
    wide = MODEL_BUILDERS["llama"](seed=0, hidden=48)
    with pytest.raises(
        LoraKeyMismatchError,
        match=r"shape errors 14:.*\(0, 'q_proj'\) adapter in/out \(32, 32\) != model \(48, 48\)",
    ):
        load_adapter(path, model=wide)


def test_layers_do_not_fit_model(tmp_path):
    path, _ = _saved(tmp_path, layers=2)
    with pytest.raises(LoraKeyMismatchError, match=r"missing 7: \(2, 'q_proj'\)"):
        load_adapter(path, model=MODEL_BUILDERS["llama"](seed=0, layers=3))
    path4, _ = _saved(tmp_path / "x", layers=4)
    adapter4 = load_adapter(path4)
    with pytest.raises(LoraKeyMismatchError, match=r"extra 14: \(2, 'q_proj'\)"):
        check_fits(MODEL_BUILDERS["llama"](seed=0), adapter4.spec)


def test_wrong_target_module_name(tmp_path):
    path, state = _saved(tmp_path, target_modules=("q_proj", "v_proj"))
    renamed = {k.replace("q_proj", "qq_proj"): v for k, v in state.items()}
    _rewrite(path, renamed)
    with pytest.raises(
        LoraKeyMismatchError, match=r"missing 2: \(0, 'q_proj'\).*extra 4: .*qq_proj"
    ):
        load_adapter(path)
    config = json.loads((path / CFG).read_text())
    (path / CFG).write_text(json.dumps({**config, "target_modules": ["qq_proj", "v_proj"]}))
    assert load_adapter(path).spec.target_modules == ("v_proj", "qq_proj")
    with pytest.raises(
        LoraKeyMismatchError, match=r"no nn.Linear.*missing 1: qq_proj|extra 2: \(0, 'qq_proj'\)"
    ):
        load_adapter(path, model=MODEL_BUILDERS["llama"](seed=0))


def test_long_lists_are_truncated(tmp_path):
    path, state = _saved(tmp_path, layers=4)
    _rewrite(path, {k: v for k, v in state.items() if ".layers.0." in k or ".layers.3." in k})
    with pytest.raises(LoraKeyMismatchError) as err:
        load_adapter(path)
    message = str(err.value)
    assert "missing 14:" in message and "(+6 more)" in message and "\n" not in message
    assert len(err.value.missing) == 14


# ---- bad input: one line naming the file --------------------------------------------------


def _config_edit(**changes):
    def edit(path: Path) -> Path:
        config = json.loads((path / CFG).read_text())
        (path / CFG).write_text(json.dumps({**config, **changes}))
        return path / CFG

    return edit


def _write(name: str, data: bytes):
    def edit(path: Path) -> Path:
        (path / name).write_bytes(data)
        return path / name

    return edit


def _remove(name: str):
    def edit(path: Path) -> Path:
        (path / name).unlink()
        return path / name if name == CFG else path

    return edit


def _truncate(path: Path) -> Path:
    data = (path / ST).read_bytes()
    (path / ST).write_bytes(data[: len(data) // 2])
    return path / ST


def _bin_garbage(path: Path) -> Path:
    (path / ST).unlink()
    (path / "adapter_model.bin").write_bytes(b"not a pickle")
    return path / "adapter_model.bin"


BAD = {
    "no config": (_remove(CFG), "missing"),
    "bad json": (_write(CFG, b"{not json"), "unreadable JSON"),
    "no weights": (_remove(ST), "no adapter_model.safetensors or adapter_model.bin"),
    "garbage safetensors": (
        _write(ST, b"\x00\x01garbage" * 10),
        "corrupt or unreadable safetensors",
    ),
    "truncated safetensors": (_truncate, "corrupt or unreadable safetensors"),
    "garbage bin": (_bin_garbage, "corrupt or unreadable torch file"),
    "not lora": (_config_edit(peft_type="IA3"), "only LORA adapters are supported"),
    "bias": (_config_edit(bias="all"), "bias='all' is not supported"),
    "modules_to_save": (
        _config_edit(modules_to_save=["lm_head"]),
        "modules_to_save is not supported",
    ),
    "rank_pattern": (_config_edit(rank_pattern=[8]), "rank_pattern must be an object"),
    "alpha_pattern": (_config_edit(alpha_pattern={"q_proj": "x"}), "alpha_pattern['q_proj']"),
    "fan_in_fan_out": (_config_edit(fan_in_fan_out=True), "fan_in_fan_out is not supported"),
    "alora": (
        _config_edit(alora_invocation_tokens=[5, 6]),
        "activated LoRA (alora_invocation_tokens) is not supported",
    ),
    "trainable tokens": (
        _config_edit(trainable_token_indices=list(range(100))),
        "trainable_token_indices (trained embedding rows) is not supported "
        "(trainable_token_indices=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16...)",
    ),
    "kasa": (_config_edit(kasa_config={"beta": 1.0}), "KaSA (kasa_config) is not supported"),
    "bdlora": (_config_edit(use_bdlora={"nblocks": 2}), "block-diagonal LoRA"),
    "arrow": (_config_edit(arrow_config={"top_k": 2}), "Arrow routing"),
    "monteclora": (_config_edit(monteclora_config={"n": 2}), "MonteCLoRA"),
    "qalora": (_config_edit(use_qalora=True), "QA-LoRA"),
    "pissa": (
        _config_edit(init_lora_weights="pissa_niter_4"),
        "init_lora_weights='pissa_niter_4' is not supported: PEFT changes the base weights",
    ),
    "olora": (_config_edit(init_lora_weights="olora"), "init_lora_weights='olora'"),
    "bad r": (_config_edit(r=0), "r must be a positive integer"),
    "bad targets": (_config_edit(target_modules=7), "target_modules"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_naming_the_file(tmp_path, case):
    edit, expected = BAD[case]
    path, _ = _saved(tmp_path)
    culprit = edit(path)
    with pytest.raises(LoraFormatError) as err:
        load_adapter(path)
    message = str(err.value)
    assert expected in message
    assert str(culprit) in message and "\n" not in message


def test_not_a_directory(tmp_path):
    with pytest.raises(LoraFormatError, match="not a PEFT adapter directory"):
        load_adapter(tmp_path / "nope")
