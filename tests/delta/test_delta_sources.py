"""Any fine-tuned model: PEFT variants, full checkpoints and hub ids, each against PEFT/HF itself.

References are independent of llgbm-flora: a fresh base per adapter, `PeftModel.from_pretrained`
(PEFT's own forward, DoRA and patterns included) or the full checkpoint loaded with transformers,
each probe run alone, `hidden_states[-1]` at its last token (conftest.reference_vector).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from llgbm_delta import AdapterError, DeltaCache, compute_deltas, generic_probes, run_deltas
from llgbm_delta.testing import make_peft_adapter
from peft import IA3Config, LoraConfig, PeftModel, VeloraConfig
from transformers import AutoModelForCausalLM

from .conftest import reference_vector

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = {
    "dora": dict(use_dora=True, target_modules=("q_proj", "v_proj", "up_proj", "down_proj")),
    "rank_alpha_pattern": dict(
        target_modules=ALL,
        rank_pattern={"q_proj": 2, r"model\.layers\.1\.mlp\.down_proj": 8},
        alpha_pattern={"v_proj": 3, "gate_proj": 20},
    ),
    "rslora_pattern": dict(target_modules=ALL, use_rslora=True, rank_pattern={"k_proj": 8}),
    "layers_to_transform": dict(target_modules=ALL, layers_to_transform=[1]),
    "dora_pattern": dict(use_dora=True, target_modules=ALL, alpha_pattern={"o_proj": 2}),
    # A PEFT LoRA variant whose eval forward is plain LoRA (it differs in its initialisation).
    "mica": dict(target_modules=ALL, init_lora_weights="mica"),
}


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory, base_dir) -> dict[str, list]:
    """Two adapters per variant (one batch of each structure), written by PEFT."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("variants")
    return {
        name: [make_peft_adapter(model, root / f"{name}_{s}", seed=s, **kw) for s in (11, 12)]
        for name, kw in VARIANTS.items()
    }


def _peft_reference(base_dir, tok, adapter_dir) -> np.ndarray:
    texts = generic_probes().texts
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    v0 = reference_vector(base, tok, texts)
    pm = PeftModel.from_pretrained(base, adapter_dir).eval()
    return (reference_vector(pm, tok, texts) - v0).numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_equal_peft(variant, variant_dirs, base_dir, tok, tmp_path):
    dirs = variant_dirs[variant]
    ref = np.stack([_peft_reference(base_dir, tok, d) for d in dirs])
    assert np.abs(ref).max() > 1e-3  # the adapters do change the base
    cache = DeltaCache(tmp_path / "cache")
    flora = compute_deltas(base_dir, dirs, cache=cache, progress=False)
    np.testing.assert_allclose(flora, ref, rtol=0, atol=2e-5)
    peft = compute_deltas(base_dir, dirs, method="peft", progress=False)
    np.testing.assert_allclose(peft, ref, rtol=0, atol=2e-5)
    again = run_deltas(base_dir, dirs, cache=cache, progress=False)
    assert again.cached == [True, True]


def test_variant_keys_differ_from_plain_lora(variant_dirs, adapter_dirs, model, tok, tmp_path):
    """DoRA and patterns are part of the content hash: no variant collides with a plain LoRA."""
    dirs = [adapter_dirs[0], *(d[0] for d in variant_dirs.values())]
    r = run_deltas((model, tok), dirs, cache=tmp_path / "c", progress=False)
    assert len(set(r.keys)) == len(dirs)


def _peft_made(base_dir, out, config) -> str:
    """An adapter of any PEFT type, made and saved by PEFT itself (weights as initialised)."""
    from peft import get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    get_peft_model(model, config).save_pretrained(out)
    return out


# What PEFT loads but llgbm-delta cannot embed, each made by PEFT: (config, expected words).
UNSUPPORTED = {
    "modules_to_save": (
        lambda: LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "modules_to_save is not supported",
    ),
    "alora": (
        lambda: LoraConfig(
            r=4, target_modules=["q_proj"], alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM"
        ),
        "activated LoRA (alora_invocation_tokens) is not supported",
    ),
    "trainable_tokens": (
        lambda: LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[3, 4]),
        "trainable_token_indices (trained embedding rows) is not supported",
    ),
    "pissa": (
        lambda: LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
        "init_lora_weights='pissa' is not supported: PEFT changes the base weights",
    ),
    "velora": (
        lambda: LoraConfig(r=4, target_modules=["q_proj"], velora_config=VeloraConfig()),
        "VeLoRA (velora_config) is not supported",
    ),
    "ia3": (
        lambda: IA3Config(
            target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
        ),
        "peft_type is 'IA3', only LORA adapters are supported",
    ),
}


@pytest.mark.parametrize("feature", list(UNSUPPORTED))
def test_unsupported_feature_is_one_line_before_the_model_loads(
    feature, base_dir, adapter_dirs, tmp_path, monkeypatch
):
    config, expected = UNSUPPORTED[feature]
    bad = _peft_made(base_dir, tmp_path / feature, config())
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), bad)  # PEFT loads it
    import llgbm_delta.base as base_mod

    def no_load(*a, **k):
        raise AssertionError("the base model was loaded before the adapters were validated")

    monkeypatch.setattr(base_mod, "load_base", no_load)
    with pytest.raises(AdapterError) as err:
        compute_deltas(base_dir, [*adapter_dirs[:4], bad], cache=tmp_path / "c", progress=False)
    msg = str(err.value)
    assert str(bad) in msg and expected in msg and "\n" not in msg


# -- full fine-tuned checkpoints -------------------------------------------------------------


def _fine_tune(base_dir, out, seed: int, shard: str | None = None):
    """A 'fine-tuned' full model: every weight of the base nudged; saved as safetensors."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kw)
    return out, model.eval()


def test_full_checkpoint_delta_cache_and_content_key(base_dir, tok, model, tmp_path):
    ckpt, ft = _fine_tune(base_dir, tmp_path / "ft", seed=1)
    texts = generic_probes().texts
    ref = (reference_vector(ft, tok, texts) - reference_vector(model, tok, texts)).numpy()
    cache = DeltaCache(tmp_path / "cache")
    first = run_deltas(base_dir, [ckpt], cache=cache, progress=False)
    np.testing.assert_allclose(first.deltas[0], ref, rtol=0, atol=2e-5)
    assert first.cached == [False] and first.n_computed == 1

    # The same weights resharded elsewhere: the same content, the same entry.
    sharded, _ = _fine_tune(base_dir, tmp_path / "ft_sharded", seed=1, shard="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    again = run_deltas(base_dir, [sharded], cache=cache, progress=False)
    assert again.cached == [True] and again.keys == first.keys
    # Other weights: another entry.
    other, _ = _fine_tune(base_dir, tmp_path / "ft2", seed=2)
    third = run_deltas(base_dir, [other], cache=cache, progress=False)
    assert third.cached == [False] and third.keys != first.keys


def test_checkpoint_mixed_with_adapters_and_bad_checkpoints(base_dir, adapter_dirs, tmp_path, tok):
    ckpt, _ = _fine_tune(base_dir, tmp_path / "ft", seed=3)
    mixed = compute_deltas(base_dir, [adapter_dirs[0], ckpt, adapter_dirs[1]], progress=False)
    alone = compute_deltas(base_dir, [adapter_dirs[0], adapter_dirs[1]], progress=False)
    np.testing.assert_allclose(mixed[[0, 2]], alone, rtol=0, atol=1e-6)
    assert np.abs(mixed[1]).max() > 1e-3

    pickled = shutil.copytree(ckpt, tmp_path / "pickled")
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    from llgbm_delta.testing import tiny_llama

    wider = tmp_path / "wider"
    tiny_llama(len(tok), hidden_size=32).save_pretrained(wider)
    for bad, expected in [
        (pickled, "pickle files (pytorch_model.bin)"),
        (wider, "hidden_size is 32, the base's 64"),
    ]:
        with pytest.raises(AdapterError) as err:
            compute_deltas(base_dir, [bad], progress=False)
        assert expected in str(err.value) and str(bad) in str(err.value)
        assert "\n" not in str(err.value)


# -- hub ids -----------------------------------------------------------------------------------


def _hub_cache(root, repo_id: str, adapter_dir) -> None:
    """huggingface_hub's cache layout, built by hand: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "refs" / "v1").write_text(commit)  # a tag: `repo_id@v1`
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in adapter_dir.iterdir():
        blob = repo / "blobs" / f.name
        blob.parent.mkdir(exist_ok=True)
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(blob)


def test_hub_id_resolves_offline_from_the_cache(
    base_dir, tok, variant_dirs, adapter_dirs, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    _hub_cache(hub, "someone/tiny-dora", variant_dirs["dora"][0])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    ids = ["someone/tiny-dora", adapter_dirs[0], "someone/tiny-dora@v1"]
    r = run_deltas(base_dir, ids, cache=tmp_path / "c", progress=False)
    ref = _peft_reference(base_dir, tok, variant_dirs["dora"][0])  # PEFT's forward, local copy
    np.testing.assert_allclose(r.deltas[0], ref, rtol=0, atol=2e-5)
    local = compute_deltas(base_dir, [variant_dirs["dora"][0], adapter_dirs[0]], progress=False)
    np.testing.assert_allclose(r.deltas[:2], local, rtol=0, atol=1e-6)
    assert r.names[0] == "someone/tiny-dora" and r.keys[2] == r.keys[0]  # @v1: same content
    np.testing.assert_array_equal(r.deltas[2], r.deltas[0])
    named = {e.key: e.adapter_name for e in DeltaCache(tmp_path / "c").entries()}
    assert named[r.keys[0]] in ("someone/tiny-dora", "someone/tiny-dora@v1")  # the id, not a path

    with pytest.raises(AdapterError) as err:
        compute_deltas(base_dir, ["someone/not-there"], progress=False)
    msg = str(err.value)
    assert msg.startswith("someone/not-there: not a local path, and not found in the local")
    assert "(offline)" in msg and "\n" not in msg
