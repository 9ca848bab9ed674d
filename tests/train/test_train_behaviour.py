"""Behaviour targets in training: condition / probe pools, honesty checks on the data, the KL and
behaviour-delta terms, the gauge-blind weight loss, and the base-model condition encoder."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from llgbm_flora import LoraAdapter, LoraBatch
from llgbm_flora.testing import random_batch
from llgbm_train import data as D
from llgbm_train.config import ConfigError
from llgbm_train.losses import behaviour_delta_loss, kl_loss, weight_loss
from llgbm_train.trainer import prepare, train
from llgbm_worlds import World
from llgbm_worlds.families import Example

BEHAVIOUR = (
    "training.delta_target=behaviour",
    "training.lambda_kl=1.0",
    "behaviour.n_probes=4",
    "behaviour.max_answer_tokens=6",
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class FakeTask:
    name: str
    train: list
    test: list

    def items(self, split):
        return list(self.train if split == "train" else self.test)


def _items(prefix: str, n: int, header: str = "H") -> list[Example]:
    from llgbm_worlds.frame import INSTRUCTION_TAG

    return [
        Example(f"{header}{INSTRUCTION_TAG}Do it. Input:{prefix} {i}", str(i)) for i in range(n)
    ]


def test_pools_split_every_task_disjointly_and_deterministically(test_world_dir):
    world = World.load(test_world_dir)
    for task in world.tasks:
        pools = D.task_pools(task, 0.5)
        train = {e.prompt for e in task.items("train")}
        test = {e.prompt for e in task.items("test")}
        cond, probes = set(pools.condition), {e.prompt for e in pools.probes}
        assert cond and probes and not cond & probes
        assert cond | probes == train and not (cond | probes) & test
        # Reordering the items does not move any of them to the other pool.
        shuffled = FakeTask(task.name, task.items("train")[::-1], task.items("test"))
        again = D.task_pools(shuffled, 0.5)
        assert set(again.condition) == cond and {e.prompt for e in again.probes} == probes


def test_pools_refuse_a_test_question_among_train_items():
    train, test = _items("x", 40), _items("y", 5)
    # The same question under another header is the same item.
    leaked = Example(test[0].prompt.replace("H", "Other header", 1), test[0].answer)
    with pytest.raises(D.DataError, match="also test items"):
        D.task_pools(FakeTask("t", [*train, leaked], test), 0.5)
    with pytest.raises(D.DataError, match="both must be non-empty"):
        D.task_pools(FakeTask("t", _items("x", 1), test), 0.5)


def test_heldout_tasks_and_scored_items_never_reach_training(test_world_dir, tmp_path):
    from train_world import small_config

    cfg = small_config(test_world_dir, tmp_path / "runs", *BEHAVIOUR)
    s = prepare(cfg, progress=False)
    world = s.world
    heldout = {t.name for t in world.tasks if t.split != "train"}
    assert heldout and not heldout & set(s.data.tasks)
    assert not heldout & set(s.data.prompts) and not heldout & set(s.data.probes)
    questions = {D._question(e.prompt) for t in world.tasks for e in t.items("test")}
    questions |= {D._question(p) for t in world.tasks if t.name in heldout for p in t.prompts()}
    for task in s.data.tasks:
        cond = {D._question(p) for p in s.data.prompts[task]}
        probes = {D._question(p) for p in s.data.probes[task]}
        assert not cond & probes and not cond & questions and not probes & questions
    # The behaviour targets' token rows are exactly each sample's task probes (then its answer).
    bt = s.behaviour
    for i, task in enumerate(s.data.tasks):
        for p, text in enumerate(s.data.probes[task][: cfg.behaviour.n_probes]):
            ids = s.tokenizer(text)["input_ids"]
            assert bt["input_ids"][i, p, : len(ids)].tolist() == ids


def test_zero_adapter_scores_exactly_as_the_base(test_world_dir):
    from llgbm_worlds import score
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world = World.load(test_world_dir)
    model = AutoModelForCausalLM.from_pretrained(str(world.base_path)).eval()
    tok = AutoTokenizer.from_pretrained(str(world.base_path))
    teacher = __import__("llgbm_flora").load_adapter(world.teachers[0].path)
    zero = LoraAdapter(
        teacher.spec, teacher.A, {k: torch.zeros_like(v) for k, v in teacher.B.items()}
    )
    items = [e for t in world.tasks for e in t.items("test")][:24]
    assert score(model, tok, items, adapter=zero) == score(model, tok, items)
    # And in training's terms: the zero adapter's KL is the logged baseline, its delta is zero.
    from llgbm_delta.behaviour import BehaviourSpec, behaviour_forward, teacher_targets
    from llgbm_delta.probes import ProbeSet

    probes = ProbeSet("p", tuple(e.prompt for e in items[:6]))
    spec = BehaviourSpec(layers=(0, -1), max_answer_tokens=6)
    (t,) = teacher_targets(model, tok, [teacher], [probes], spec)
    with torch.no_grad():
        out = behaviour_forward(model, t.batch, spec.layers, LoraBatch.from_adapters([zero]))
    m = t.batch.select_mask
    kl = kl_loss(out.logits, t.logprobs, m, base_kl=t.base_kl)
    assert abs(float(kl.value) - kl.baseline) <= 1e-5
    torch.testing.assert_close(out.hidden, t.base_hidden, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "extra",
    [
        ("training.objective=delta_multi",),
        ("training.objective=delta_only", "training.lambda_d=0"),
        ("training.objective=baseline",),
    ],
    ids=["delta_multi", "kl_only", "baseline"],
)
def test_behaviour_terms_train_and_are_logged(make_config, tmp_path, extra):
    cfg = make_config(*BEHAVIOUR, *extra, "training.steps=4")
    result = train(cfg, tmp_path / "run", progress=False)
    rec = result.last
    for name in ("loss_w", "loss_d", "loss_kl"):
        assert rec[name] == rec[name] and rec[name + "_baseline"] == rec[name + "_baseline"]
    assert result.setup.metadata["behaviour"]["probes_per_sample"] == 4


def test_kl_alone_fits_a_teacher(test_world_dir, tmp_path):
    """KL through the base drives the generated adapters' outputs to their teachers'."""
    from train_world import small_config

    cfg = small_config(
        test_world_dir,
        tmp_path / "runs",
        *BEHAVIOUR,
        "training.objective=delta_only",
        "training.lambda_d=0",
        "training.lambda_w=0",
        "training.steps=40",
        "training.warmup_steps=4",
        "training.lr=3e-3",
        "training.log_every=1",
    )
    result = train(cfg, tmp_path / "run", progress=False)
    rec = result.last
    assert rec["loss_kl"] < 0.5 * rec["loss_kl_baseline"], rec


def test_world_and_generic_probes_are_shared_by_every_sample(test_world_dir, tmp_path):
    from train_world import small_config

    cfg = small_config(test_world_dir, tmp_path / "runs", *BEHAVIOUR)
    s = prepare(cfg, progress=False)
    for name, n in (("world", 4), ("generic", 5)):
        sets = D.behaviour_probe_sets(cfg.override([f"behaviour.probes={name}"]), s.data)
        assert len({ps.hash for ps in sets}) == 1 and len(sets[0]) == n
    (world,) = {
        ps for ps in D.behaviour_probe_sets(cfg.override(["behaviour.probes=world"]), s.data)
    }
    # Round robin: the first probe of each train task, in task order, before any second one.
    firsts = [s.data.probes[t][0] for t in sorted(s.data.probes)]
    assert list(world.texts[: len(firsts)]) == firsts[:4]
    own = D.behaviour_probe_sets(cfg, s.data)
    assert [ps.texts[0] for ps in own] == [s.data.probes[t][0] for t in s.data.tasks]


def test_probes_per_step_draws_subsets(make_config, tmp_path):
    cfg = make_config(*BEHAVIOUR, "behaviour.probes_per_step=2", "training.steps=2")
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == 2


def test_delta_w_losses_are_blind_to_the_lora_gauge():
    pred = random_batch(_spec(), n=3, seed=1, scale=0.5)
    target = random_batch(_spec(), n=3, seed=2, scale=0.5)
    m = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3)))[0] * 2.0
    minv = torch.linalg.inv(m)
    moved = LoraBatch(
        pred.spec,
        {k: minv @ v for k, v in pred.A.items()},
        {k: v @ m for k, v in pred.B.items()},
    )
    for space in ("delta_w", "delta_w_rel"):
        a = weight_loss(pred, target, space=space).value
        b = weight_loss(moved, target, space=space).value
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        assert float(weight_loss(target, target, space=space).value) <= 1e-5
    zero = LoraBatch(target.spec, target.A, {k: torch.zeros_like(v) for k, v in target.B.items()})
    rel = weight_loss(zero, target, space="delta_w_rel")
    assert abs(float(rel.value) - 1.0) < 1e-5 and rel.baseline == 1.0


def test_behaviour_delta_loss_reads_only_selected_positions():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, 2, 8, generator=gen)
    delta = torch.randn(3, 4, 2, 8, generator=gen)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    scale = torch.tensor([1.0, 2.0])
    hidden = base + delta
    exact = behaviour_delta_loss(hidden, base, delta, mask, scale, kind="combined")
    assert float(exact.value) <= 1e-6
    wrecked = hidden.clone()
    wrecked[~mask] = 1e6  # padding positions do not count
    same = behaviour_delta_loss(wrecked, base, delta, mask, scale, kind="combined")
    assert float(same.value) <= 1e-6
    off = behaviour_delta_loss(base, base, delta, mask, scale, kind="mse")
    expect = float(((delta / scale[None, None, :, None]) ** 2)[mask].mean())
    assert abs(float(off.value) - expect) < 1e-5 and abs(off.baseline - expect) < 1e-5


def test_behaviour_config_validation(make_config):
    assert not make_config().uses_behaviour
    assert make_config("training.lambda_kl=0.5").uses_behaviour
    assert make_config("training.delta_target=behaviour").uses_behaviour
    for bad, needle in (
        (("behaviour.probe_share=1.0",), "no condition prompts"),
        (("behaviour.positions=first",), "not allowed"),
        (("behaviour.probes_per_step=40",), "probes_per_step"),
        (("training.objective=delta_only", "training.lambda_d=0"), "needs a behaviour term"),
        (("behaviour.layers=[]",), "layers"),
    ):
        with pytest.raises(ConfigError, match=needle):
            make_config(*bad)


def test_base_encoder_reads_the_world_base(test_world_dir, tmp_path):
    from llgbm_train.encoders import build_encoder

    world = World.load(test_world_dir)
    prompts = [world.tasks[0].prompts()[:3], world.tasks[1].prompts()[:3]]
    enc = build_encoder("base", model_path=world.base_path, max_tokens=24, cache_dir=tmp_path)
    states, mask = enc.encode(prompts)
    assert states.shape == (2, 3, 24, enc.dim) and mask.shape == (2, 3, 24)
    assert bool(mask[..., 0].all()) and float(states[~mask].abs().max()) == 0.0
    again = build_encoder("base", model_path=world.base_path, max_tokens=24, cache_dir=tmp_path)
    s2, _ = again.encode(prompts)
    assert again.n_encoded == 0 and torch.equal(states, s2)  # served from the disk cache
    first = build_encoder("base", model_path=world.base_path, max_tokens=24, layer=0)
    assert first.encoder_id != enc.encoder_id
    assert not torch.allclose(first.encode(prompts)[0], states)


def _spec():
    from llgbm_flora import LoraSpec

    shapes = (("q_proj", 16, 16), ("v_proj", 16, 8))
    return LoraSpec(
        base_model="t",
        target_modules=("q_proj", "v_proj"),
        layers=(0, 1),
        rank=4,
        alpha=8.0,
        shapes=shapes,
    )


def test_paper_delta_and_kl_share_one_forward_with_the_same_losses(
    make_config, tmp_path, monkeypatch
):
    """With the paper's delta and the KL both on, each step runs the generic probes and the task
    sequences in one packed forward (tiny Llama: the fused path); the logged losses and gradient
    norms equal those of the two-forward path to float tolerance."""
    import llgbm_delta.behaviour as B

    cfg = make_config(
        "training.delta_target=paper",
        "training.lambda_kl=1.0",
        "training.objective=delta_multi",
        "behaviour.n_probes=4",
        "behaviour.max_answer_tokens=6",
        "training.steps=3",
    )
    packed_calls = []
    real_packed = B._packed
    monkeypatch.setattr(B, "_packed", lambda *a: packed_calls.append(1) or real_packed(*a))
    packed = train(cfg, tmp_path / "packed", progress=False).run.read_metrics()
    assert len(packed_calls) == 3
    monkeypatch.setattr(B, "packed_unsupported", lambda *a: "forced off by the test")
    two = train(cfg, tmp_path / "two", progress=False).run.read_metrics()
    assert len(packed_calls) == 3
    for a, b in zip(packed, two, strict=True):
        for name in ("loss", "loss_d", "loss_kl", "loss_w", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-7), (name, a, b)


def test_full_vocabulary_targets_beyond_the_limit_ask_for_top_k(make_config, tmp_path, monkeypatch):
    """SmolLM2's 49k vocabulary x 13 positions x 40 probes x 192 teachers is ~20 GB of targets."""
    monkeypatch.setattr(D, "FULL_VOCAB_LIMIT", 1000)  # bytes: the test world's targets exceed it
    with pytest.raises(D.DataError, match=r"behaviour.top_k: unset.*set behaviour.top_k=64") as e:
        prepare(make_config(*BEHAVIOUR, "training.objective=delta_multi"), progress=False)
    assert "\n" not in str(e.value)
    setup = prepare(
        make_config(*BEHAVIOUR, "training.objective=delta_multi", "behaviour.top_k=8"),
        progress=False,
    )
    assert setup.behaviour["logprobs"].shape[-1] == 8


@pytest.mark.parametrize(
    "extra",
    [
        ("training.objective=baseline",),
        # the paper's delta + KL: generic probes and task sequences in one fused forward
        ("training.objective=delta_multi", *BEHAVIOUR[1:]),
        ("training.objective=delta_multi", *BEHAVIOUR),  # the behaviour delta + KL
    ],
    ids=["baseline", "paper_delta_kl", "behaviour_delta_kl"],
)
def test_bf16_autocast_over_an_fp32_base_trains(make_config, tmp_path, monkeypatch, extra):
    """training.precision=bf16 on an fp32 base (the smollm2 spec): the fused LoRA path mixed
    a bf16 product into an fp32 output in place and raised. CUDA autocast is not available on
    CI, so the trainer's autocast is swapped for CPU bf16 autocast (the same casts)."""
    import llgbm_train.trainer as TR

    used = []

    def cpu_bf16(cfg, device):
        used.append(1)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    cfg = make_config(*extra, "training.steps=2")
    fp32 = train(cfg, tmp_path / "fp32", progress=False).last
    monkeypatch.setattr(TR, "autocast", cpu_bf16)
    bf16 = train(cfg, tmp_path / "bf16", progress=False).last
    assert used
    names = [k for k in ("loss", "loss_w", "loss_d", "loss_kl") if k in fp32]
    assert len(names) >= 3
    for name in names:
        assert math.isfinite(bf16[name]), name
        assert bf16[name] == pytest.approx(fp32[name], rel=0.1), name  # bf16 rounding only


def test_baseline_logs_its_unused_terms_every_monitor_steps(make_config, tmp_path):
    """training.monitor_every=3: loss_d / loss_kl at steps 1, 4, 7 (and the last), nothing else
    changes: the weights the baseline trains on follow the same path as with every step logged."""
    from llgbm_train.runs import Run
    from llgbm_train.visualize import plot_curves

    runs = {}
    for k in (1, 3):
        cfg = make_config(
            *BEHAVIOUR,
            "training.objective=baseline",
            "training.steps=8",
            f"training.monitor_every={k}",
        )
        result = train(cfg, tmp_path / f"m{k}", progress=False)
        runs[k] = (result, Run.open(tmp_path / f"m{k}").read_metrics())
    every, sparse = runs[1][1], runs[3][1]
    assert [r["step"] for r in sparse] == list(range(1, 9))
    assert [r["step"] for r in sparse if "loss_d" in r] == [1, 4, 7, 8]
    assert [r["step"] for r in sparse if "loss_kl" in r] == [1, 4, 7, 8]
    for a, b in zip(every, sparse, strict=True):
        assert a["loss_w"] == b["loss_w"] and a["grad_norm"] == b["grad_norm"]
        if "loss_d" in b:
            assert a["loss_d"] == b["loss_d"] and a["loss_kl"] == b["loss_kl"]
    state = [r[0].generator.state_dict() for r in runs.values()]
    assert all(torch.equal(state[0][k], state[1][k]) for k in state[0])
    assert plot_curves(sparse, tmp_path / "curves.png").is_file()
