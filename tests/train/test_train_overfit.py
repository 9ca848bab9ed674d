"""Each generator can reproduce one teacher adapter, in weights and in behaviour (delta).

The failure this guards against (REFERENCE.md s.4 item 4): a generator that cannot express a
real LoRA. One random teacher (non-zero A and B on every projection of a tiny Llama) is fitted
from one fixed condition, (a) with the weight loss alone and (b) with the delta loss alone; the
generated adapter's Delta Activation, through llgbm-delta's one definition, must then match the
teacher's: cosine >= 0.95 and relative error < 0.2.
"""

import pytest
import torch
from llgbm_delta import base_activation, delta_for_lora, encode_probes, generic_probes
from llgbm_delta.testing import tiny_tokenizer
from llgbm_flora import LoraBatch
from llgbm_flora.testing import random_adapter, tiny_llama, tiny_spec
from llgbm_train.encoders import build_encoder
from llgbm_train.generators import build_generator
from llgbm_train.losses import delta_loss, weight_loss
from llgbm_train.weight_tokens import WeightTokenizer

PROMPTS = [[f"Add 3 to the number. Input: {x}" for x in (4, 17, 0)]]
CASES = {
    "dnd": ("dnd", True, {"n_blocks": 2, "kernel": 3}),
    "t2l": ("t2l", False, {"hidden": 64, "emb_dim": 16}),
    "t2l-tokens": ("t2l", True, {"hidden": 64, "emb_dim": 16}),
}


@pytest.fixture(scope="module")
def world():
    # Tiny models run fastest on one thread; two spinning threads on a loaded 2-core box were
    # measured ~50x slower per op.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_llama(seed=0, vocab=len(tok))
    model.requires_grad_(False)
    spec = tiny_spec(model, rank=4)
    teacher = LoraBatch.from_adapters([random_adapter(spec, seed=1, scale=0.1)])
    probes = encode_probes(tok, generic_probes())
    base = base_activation(model, tok, probes)
    target = delta_for_lora(model, tok, teacher, probes, base=base)  # [1, hidden]
    enc = build_encoder("light", max_tokens=16, dim=32, n_heads=4)
    cond, mask = enc.encode(PROMPTS)  # [1, 3, 16, 32], [1, 3, 16]
    yield {
        "tok": tok,
        "model": model,
        "spec": spec,
        "teacher": teacher,
        "probes": probes,
        "base": base,
        "target": target,
        "cond": cond,
        "mask": mask,
        "weight_tok": WeightTokenizer(spec, slab_width=16).fit(teacher),
    }
    torch.set_num_threads(threads)


def make_generator(w, case):
    kind, tokens, kw = CASES[case]
    torch.manual_seed(0)
    return build_generator(
        kind,
        spec=w["spec"],
        cond_dim=w["cond"].shape[-1],
        n_prompts=3,
        max_tokens=16,
        weight_tokenizer=w["weight_tok"] if tokens else None,
        **kw,
    )


def delta_match(w, lora):
    with torch.no_grad():
        d = delta_for_lora(w["model"], w["tok"], lora, w["probes"], base=w["base"])
    t = w["target"]
    cos = float(torch.nn.functional.cosine_similarity(d, t).squeeze())
    rel = float((d - t).norm() / t.norm())
    return cos, rel


@pytest.mark.parametrize("case", list(CASES))
def test_overfit_one_teacher_in_weights(world, case):
    w = world
    gen = make_generator(w, case)
    _, rel0 = delta_match(w, gen(w["cond"], w["mask"]))
    assert rel0 > 0.5, "the untrained generator must be far from the teacher for this to mean much"
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    for _ in range(600):
        out = weight_loss(gen(w["cond"], w["mask"]), w["teacher"], tokenizer=w["weight_tok"])
        opt.zero_grad()
        out.value.backward()
        opt.step()
        if float(out.value.detach()) < 1e-3 * out.baseline:
            break
    lora = gen(w["cond"], w["mask"])
    final = weight_loss(lora, w["teacher"], tokenizer=w["weight_tok"])
    assert float(final.value.detach()) < 0.01 * final.baseline
    dw = weight_loss(lora, w["teacher"], space="delta_w")
    assert float(dw.value.detach()) < 0.01 * dw.baseline
    cos, rel = delta_match(w, lora)
    assert cos >= 0.95 and rel < 0.2, f"delta cosine {cos:.3f}, relative error {rel:.3f}"


@pytest.mark.parametrize("case", list(CASES))
def test_overfit_one_teacher_with_delta_loss_alone(world, case):
    w = world
    gen = make_generator(w, case)
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    for step in range(300):
        lora = gen(w["cond"], w["mask"])
        d = delta_for_lora(w["model"], w["tok"], lora, w["probes"], base=w["base"])
        out = delta_loss(d, w["target"], kind="mse")
        if step == 0:
            assert float(out.value.detach()) > 0.3 * out.baseline
        opt.zero_grad()
        out.value.backward()
        opt.step()
        if float(out.value.detach()) < 5e-3 * out.baseline:
            break
    cos, rel = delta_match(w, gen(w["cond"], w["mask"]))
    assert cos >= 0.95 and rel < 0.2, f"delta cosine {cos:.3f}, relative error {rel:.3f}"


@pytest.mark.parametrize("case", list(CASES))
def test_two_conditions_give_their_own_teachers(world, case):
    """The condition is used: two tasks' prompts -> two different teachers, both reproduced."""
    w = world
    teachers = LoraBatch.from_adapters(
        [random_adapter(w["spec"], seed=s, scale=0.1) for s in (1, 2)]
    )
    enc = build_encoder("light", max_tokens=16, dim=32, n_heads=4)
    cond, mask = enc.encode(
        [PROMPTS[0], [f"Reverse the word. Input: {x}" for x in ("stone", "abc", "river")]]
    )
    w = {
        **w,
        "cond": cond,
        "mask": mask,
        "weight_tok": WeightTokenizer(w["spec"], 16).fit(teachers),
    }
    gen = make_generator(w, case)
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    for _ in range(800):
        out = weight_loss(gen(cond, mask), teachers, tokenizer=w["weight_tok"])
        opt.zero_grad()
        out.value.backward()
        opt.step()
        if float(out.value.detach()) < 1e-3 * out.baseline:
            break
    lora = gen(cond, mask)
    assert float(weight_loss(lora, teachers, tokenizer=w["weight_tok"]).value.detach()) < (
        0.01 * out.baseline
    )
    with torch.no_grad():
        d = delta_for_lora(w["model"], w["tok"], lora, w["probes"], base=w["base"])
        t = delta_for_lora(w["model"], w["tok"], teachers, w["probes"], base=w["base"])
    cos = torch.nn.functional.cosine_similarity(d, t)  # [2]
    assert float(cos.min()) >= 0.95
    assert float(torch.nn.functional.cosine_similarity(t[0], t[1], dim=0)) < 0.9
