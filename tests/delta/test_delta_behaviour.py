"""Behaviour targets against independent paths: a hand-merged model with HF generate, the paper's
delta, autograd against finite differences; the content-keyed BehaviourCache."""

from __future__ import annotations

import pytest
import torch
from llgbm_delta import DeltaSpecError, ProbeSet, delta_for_lora, domain_probes, generic_probes
from llgbm_delta.behaviour import (
    BehaviourSpec,
    behaviour_forward,
    kl_to_teacher,
    stack_targets,
    teacher_targets,
)
from llgbm_delta.behaviour_cache import BehaviourCache, compute_behaviour
from llgbm_flora import LoraBatch, load_adapter

from .conftest import merged_reference_model

MATH = domain_probes("math")


def _reference(base_dir, adapter_dir, tok, texts, layers, max_new):
    """Greedy answers by HF generate on a hand-merged model, then hidden states and
    log-probabilities at every answer position from one plain forward per probe."""
    teacher = merged_reference_model(base_dir, adapter_dir)
    base = merged_reference_model(base_dir, None)
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            n = enc["input_ids"].shape[1]
            gen = teacher.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )[0, n:].tolist()
            if tok.eos_token_id in gen:
                gen = gen[: gen.index(tok.eos_token_id)]
            ids = torch.tensor([enc["input_ids"][0].tolist() + gen])
            pos = list(range(n - 1, n + len(gen)))
            t = teacher(input_ids=ids, output_hidden_states=True)
            b = base(input_ids=ids, output_hidden_states=True)
            out.append(
                {
                    "answer": gen,
                    "hidden": torch.stack([t.hidden_states[x][0, pos] for x in layers], 1),
                    "base": torch.stack([b.hidden_states[x][0, pos] for x in layers], 1),
                    "logprobs": torch.log_softmax(t.logits[0, pos].double(), -1),
                }
            )
    return out


def test_last_position_mean_is_the_papers_delta(model, tok, adapter_dirs):
    adapters = [load_adapter(d) for d in adapter_dirs[:3]]
    spec = BehaviourSpec(positions="last", layers=(-1,))
    got = teacher_targets(model, tok, adapters, [generic_probes()] * 3, spec)
    paper = delta_for_lora(model, tok, LoraBatch.from_adapters(adapters), generic_probes())
    for i, t in enumerate(got):
        assert t.delta.shape == (5, 1, 1, 64)
        torch.testing.assert_close(t.delta[:, 0, 0].mean(0), paper[i].detach(), atol=1e-5, rtol=0)


def test_answer_positions_equal_generate_on_a_merged_model(model, tok, base_dir, adapter_dirs):
    layers = (0, 1, -1)
    spec = BehaviourSpec(positions="answer", layers=layers, max_answer_tokens=5)
    adapters = [load_adapter(d) for d in adapter_dirs[:2]]
    got = teacher_targets(model, tok, adapters, [MATH, MATH], spec, adapters_per_batch=2)
    for a, target in enumerate(got):
        ref = _reference(base_dir, adapter_dirs[a], tok, MATH.texts, layers, 5)
        for p, r in enumerate(ref):
            k = len(r["answer"]) + 1
            mask = target.batch.select_mask[p]
            assert int(mask.sum()) == k
            n = int(target.batch.attention_mask[p].sum())
            assert target.batch.input_ids[p, n - len(r["answer"]) : n].tolist() == r["answer"]
            torch.testing.assert_close(target.hidden[p, :k], r["hidden"], atol=2e-5, rtol=0)
            torch.testing.assert_close(target.base_hidden[p, :k], r["base"], atol=2e-5, rtol=0)
            torch.testing.assert_close(
                target.logprobs[p, :k].double(), r["logprobs"], atol=1e-4, rtol=0
            )
    # The adapters change what the model says, so the answer positions carry information.
    assert all(float(t.base_kl.max()) > 1e-3 for t in got)


def test_zero_adapter_has_zero_delta_and_zero_kl(model, tok, zero_adapter_dir):
    spec = BehaviourSpec(positions="answer", layers=(0, -1), max_answer_tokens=4)
    (t,) = teacher_targets(model, tok, [load_adapter(zero_adapter_dir)], [MATH], spec)
    assert float(t.delta.abs().max()) == 0.0
    assert float(t.base_kl.abs().max()) <= 1e-6


def test_generated_path_is_differentiable_and_descends_to_the_teacher(model, tok, adapter_dirs):
    """Gradient steps on a student's tensors through `behaviour_forward` cut its KL to the
    teacher and its delta error. (HF norms run in float32 whatever the model dtype, so finite
    differences through a real HF model are too noisy; flora's gradcheck covers the hooks.)"""
    spec = BehaviourSpec(positions="answer", layers=(-1,), max_answer_tokens=3)
    (t,) = teacher_targets(model, tok, [load_adapter(adapter_dirs[0])], [MATH], spec)
    student = load_adapter(adapter_dirs[1])
    params = [v.clone().requires_grad_(True) for v in (*student.A.values(), *student.B.values())]
    keys = list(student.A)
    opt = torch.optim.Adam(params, lr=3e-3)
    m = t.batch.select_mask

    def losses():
        n = len(keys)
        lora = LoraBatch.from_adapters(
            [type(student)(student.spec, dict(zip(keys, params[:n])), dict(zip(keys, params[n:])))]
        )
        out = behaviour_forward(model, t.batch, spec.layers, lora)
        kl = kl_to_teacher(out.logits[m], t.logprobs[m]).mean()
        err = (out.hidden - t.hidden)[m].pow(2).mean()
        return kl, err

    kl0, err0 = (float(x.detach()) for x in losses())
    for _ in range(40):
        kl, _ = losses()
        opt.zero_grad()
        kl.backward()
        assert all(p.grad is not None for p in params)
        opt.step()
    kl1, err1 = (float(x.detach()) for x in losses())
    assert kl1 < 0.5 * kl0 and err1 < err0


def test_top_k_kl_is_exact_at_full_k_and_a_lower_bound_below():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 20, generator=gen)
    teacher = torch.log_softmax(3 * torch.randn(6, 20, generator=gen), -1)
    full = kl_to_teacher(student, teacher)
    vals, ids = teacher.topk(20, -1)
    torch.testing.assert_close(kl_to_teacher(student, vals, ids), full)
    vals, ids = teacher.topk(4, -1)
    part = kl_to_teacher(student, vals, ids)
    assert bool((part <= full + 1e-6).all()) and bool((part >= -1e-6).all())
    assert float(kl_to_teacher(teacher, teacher).abs().max()) <= 1e-6


def test_cache_hits_keys_and_corruption(model, tok, adapter_dirs, tmp_path, monkeypatch):
    import llgbm_delta.behaviour_cache as bc

    adapters = [load_adapter(d) for d in adapter_dirs[:2]]
    spec = BehaviourSpec(positions="answer", layers=(-1,), max_answer_tokens=3)
    cache = BehaviourCache(tmp_path / "c")
    first = compute_behaviour(model, tok, adapters, [MATH, MATH], spec, cache)
    assert len(cache) == 2
    calls = []
    real = bc.teacher_targets
    monkeypatch.setattr(bc, "teacher_targets", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = compute_behaviour(model, tok, adapters, [MATH, MATH], spec, cache)
    assert not calls
    for a, b in zip(first, again):
        assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    # Another spec, probe set or adapter is another entry.
    compute_behaviour(model, tok, adapters[:1], [MATH], BehaviourSpec(positions="last"), cache)
    compute_behaviour(model, tok, adapters[:1], [generic_probes()], spec, cache)
    assert len(cache) == 4
    # A damaged entry is moved aside and recomputed, never returned.
    path = next((tmp_path / "c" / "entries").glob("*.safetensors"))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    calls.clear()
    compute_behaviour(model, tok, adapters, [MATH, MATH], spec, cache)
    compute_behaviour(model, tok, adapters[:1], [MATH], BehaviourSpec(positions="last"), cache)
    compute_behaviour(model, tok, adapters[:1], [generic_probes()], spec, cache)
    assert len(calls) == 1 and len(cache.problems) == 1
    assert len(list((tmp_path / "c" / "corrupt").iterdir())) == 1


def test_stack_pads_with_masked_positions(model, tok, adapter_dirs):
    spec = BehaviourSpec(positions="answer", layers=(-1,), max_answer_tokens=3)
    short = ProbeSet("short", ("Hi.", "Yes."))
    long = ProbeSet("long", MATH.texts[:2])
    adapters = [load_adapter(d) for d in adapter_dirs[:2]]
    got = stack_targets(teacher_targets(model, tok, adapters, [short, long], spec))
    assert got["input_ids"].shape[:2] == (2, 2)
    assert got["select_mask"].shape == got["base_kl"].shape
    for name in ("hidden", "base_hidden", "logprobs"):
        assert got[name].shape[:3] == got["select_mask"].shape
    assert int(got["attention_mask"][0].sum()) < int(got["attention_mask"][1].sum())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"positions": "first"},
        {"layers": ()},
        {"layers": (1, 1)},
        {"max_answer_tokens": 0},
        {"top_k": -1},
    ],
)
def test_spec_rejects_bad_values(kwargs):
    with pytest.raises(DeltaSpecError):
        BehaviourSpec(**kwargs)


def _packed_case(model, tok, seed: int):
    """3 adapters (grads on), the generic probes, 2 task rows per adapter of varied lengths."""
    from llgbm_delta import base_activation, encode_probes
    from llgbm_delta.behaviour import sequence_batch
    from llgbm_flora.testing import random_batch, tiny_spec

    g = torch.Generator().manual_seed(seed)
    spec = tiny_spec(model, rank=4, alpha=8)
    lora = random_batch(spec, 3, seed=seed, scale=0.3)
    for t in (*lora.A.values(), *lora.B.values()):
        t.requires_grad_(True)
    probes = encode_probes(tok, generic_probes())
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in (7, 12) * 3]
    answers = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in (1, 5, 3) * 2]
    seqs = sequence_batch(prompts, answers, "answer", pad_id=0)
    return lora, probes, seqs, base_activation(model, None, probes)


def _losses(d, out, seqs, target_d, target_h, target_lp):
    from llgbm_delta.behaviour import kl_to_teacher

    m = seqs.select_mask
    ld = ((d - target_d) ** 2).mean()
    lh = ((out.hidden - target_h) ** 2)[m].mean()
    kl = kl_to_teacher(out.logits[m], target_lp[m]).mean()
    return ld, lh, kl


@pytest.mark.parametrize("chunk", [None, 2])
def test_packed_forward_gives_the_two_forwards_losses_and_gradients(model, tok, chunk):
    """One fused forward over [probe rows; task rows] per adapter == delta_for_lora plus
    behaviour_forward (the hooked HF path): deltas, hidden states, logits, each loss and the
    gradients of their sum wrt every LoRA tensor, in float32; also with adapter chunks."""
    from llgbm_delta import DeltaSpec
    from llgbm_delta.behaviour import delta_and_behaviour, packed_unsupported

    lora, probes, seqs, base = _packed_case(model, tok, seed=3)
    spec = DeltaSpec()
    assert packed_unsupported(model, probes, spec, seqs, (-1,), lora) is None
    g = torch.Generator().manual_seed(4)
    target_d = torch.randn(3, model.config.hidden_size, generator=g) * 0.1
    target_h = torch.randn(6, seqs.select.shape[1], 1, model.config.hidden_size, generator=g)
    target_lp = torch.log_softmax(
        torch.randn(6, seqs.select.shape[1], model.config.vocab_size, generator=g), -1
    )
    results = {}
    for packed in (False, True):
        d, out = delta_and_behaviour(
            model, probes, spec, seqs, (-1,), lora, base=base, adapter_chunk_size=chunk,
            packed=packed,
        )  # fmt: skip
        losses = _losses(d, out, seqs, target_d, target_h, target_lp)
        tensors = [*lora.A.values(), *lora.B.values()]
        grads = torch.autograd.grad(sum(losses), tensors)
        results[packed] = (d.detach(), out, [float(x.detach()) for x in losses], grads)
    (d0, o0, l0, g0), (d1, o1, l1, g1) = results[False], results[True]
    m = seqs.select_mask
    torch.testing.assert_close(d1, d0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(o1.hidden[m], o0.hidden[m], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(o1.logits[m], o0.logits[m], atol=1e-5, rtol=1e-4)
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert all(float(x.abs().max()) > 0 for x in g0)  # every tensor gets a gradient
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_packing_falls_back_or_refuses_where_it_cannot_run(model, tok):
    from llgbm_delta import DeltaSpec
    from llgbm_delta.behaviour import delta_and_behaviour, packed_unsupported

    lora, probes, seqs, base = _packed_case(model, tok, seed=5)
    spec = DeltaSpec()
    reason = packed_unsupported(model, probes, spec, seqs, (0, -1), lora)
    assert reason is not None and "last" in reason
    with pytest.raises(DeltaSpecError, match="cannot share a forward"):
        delta_and_behaviour(model, probes, spec, seqs, (0, -1), lora, base=base, packed=True)
    with torch.no_grad():
        d, out = delta_and_behaviour(model, probes, spec, seqs, (0, -1), lora, base=base)
        want = behaviour_forward(model, seqs, (0, -1), lora)
    torch.testing.assert_close(out.hidden, want.hidden)
    torch.testing.assert_close(d, delta_for_lora(model, None, lora, probes, spec, base=base))
