"""GPU benchmark: one generator training step at the paper size, weight-only vs with behaviour terms.

    PYTHONPATH=packages/llgbm-flora/src:packages/llgbm-delta/src:packages/llgbm-train/src \\
        python benchmarks/train_step_gpu.py --out step.json
    python benchmarks/train_step_gpu.py --tiny     # small shapes on CPU: checks it runs

Setting (issue 16): Qwen2Config with Qwen2.5-1.5B's shapes (benchmarks/delta_gpu.py), random
init, bf16, frozen; LoRA r=16 on all 7 projections; a T2L generator (raw A/B heads through a
`--head-rank` bottleneck) reading random condition states [8, 8 prompts, 64 tokens, 384];
`--adapters` (8) generated adapters per step. Teachers are random adapters whose targets are
computed once before timing (as the cache would hold them).

Terms, each added to the one before:
- weight:    L_w in delta-W space (llgbm_train.losses.weight_loss, gauge-blind) only;
- delta:     + L_delta on the 5 generic probes (llgbm_delta.delta_for_lora, differentiable);
- behaviour: + task-probe terms along the teacher's answer (llgbm_delta.behaviour): `--task-probes`
             prompts of `--prompt-len` tokens per adapter with `--answer-len` teacher answer
             tokens; hidden-state delta at the last layer on every answer position and the
             forward KL to the teacher's top-`--top-k` next-token distribution there. The
             generic probes and the task sequences run through `delta_and_behaviour`, packed
             into one forward (as training does) and, with `--packed on off`, also as two
             forwards (the path before packing) for comparison.
Each setting runs with the memory options: gradient checkpointing on/off and microbatching over
adapters (`adapter_chunk_size`). Time per step: median of `--steps` steps after `--warmup`
(CUDA-synchronised wall clock around forward + backward + AdamW step); peak memory from
torch.cuda.max_memory_allocated. The behaviour share is (t_behaviour - t_weight) / t_behaviour.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from delta_gpu import BPE_LENGTHS, QWEN25_15B, TARGETS, TINY, SyntheticTokenizer


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype).eval().requires_grad_(False)


def random_rows(lengths: list[int], vocab: int, gen: torch.Generator) -> list[list[int]]:
    return [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in lengths]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small shapes on CPU (a smoke run)")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--head-rank", type=int, default=64)
    ap.add_argument("--task-probes", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--answer-len", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 2], help="0: all adapters at once")
    ap.add_argument(
        "--packed",
        nargs="+",
        choices=("on", "off"),
        default=["on", "off"],
        help="behaviour steps with the probes and task sequences in one forward (on) or two",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from llgbm_delta import (
        DeltaSpec,
        base_activation,
        delta_for_lora,
        encode_probes,
        generic_probes,
    )
    from llgbm_delta.behaviour import behaviour_forward, delta_and_behaviour, sequence_batch
    from llgbm_flora import LoraSpec
    from llgbm_flora.testing import random_batch
    from llgbm_train.generators import build_generator
    from llgbm_train.losses import kl_loss, weight_loss

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = TINY if args.tiny else QWEN25_15B
    model = build_model(shape, device, dtype)
    spec = LoraSpec.for_model(
        model, rank=args.rank, alpha=2.0 * args.rank, target_modules=TARGETS, base_model="qwen"
    )
    n = args.adapters
    gen = torch.Generator().manual_seed(0)
    vocab = shape["vocab_size"]

    # Generic probes as random token rows of the real probes' lengths (as delta_gpu.py does).
    texts = generic_probes()
    probes = encode_probes(
        SyntheticTokenizer(texts.texts, BPE_LENGTHS, vocab), texts, device=device
    )
    dspec = DeltaSpec()
    base_act = base_activation(model, None, probes, dspec)

    # Task probes: prompt + the teacher's answer, adapter-major rows.
    prompts = random_rows([args.prompt_len] * (n * args.task_probes), vocab, gen)
    answers = random_rows([args.answer_len] * (n * args.task_probes), vocab, gen)
    seqs = sequence_batch(prompts, answers, "answer", pad_id=0).to(device)

    teachers = random_batch(spec, n, seed=1, scale=0.02)
    teachers = teachers.to(device=device)
    with torch.no_grad():
        t_delta = delta_for_lora(model, None, teachers, probes, dspec, base=base_act)  # [n, H]
        t_out = behaviour_forward(model, seqs, (-1,), teachers, logits=True)
        base_out = behaviour_forward(model, seqs, (-1,), None, logits=False)
        t_logp = torch.log_softmax(t_out.logits, -1)  # [R, K, V]
        top_lp, top_ids = t_logp.topk(args.top_k, dim=-1)  # [R, K, k]
        t_hidden_delta = t_out.hidden - base_out.hidden  # [R, K, 1, H]
        del t_out, t_logp

    cond = torch.randn((n, 8, 64, 384), generator=gen).to(device)
    cmask = torch.ones((n, 8, 64), dtype=torch.bool, device=device)

    def make_generator():
        torch.manual_seed(0)
        g = build_generator(
            "t2l",
            spec=spec,
            cond_dim=384,
            n_prompts=8,
            max_tokens=64,
            weight_tokenizer=None,
            head_rank=args.head_rank,
        ).to(device)
        return g, torch.optim.AdamW(g.parameters(), lr=1e-5)

    def step(g, opt, terms: str, ckpt: bool, chunk: int | None, packed: bool) -> dict:
        pred = g(cond, cmask).to(dtype=torch.float32)
        loss = weight_loss(pred, teachers, space="delta_w").value
        if terms == "delta":
            pd = delta_for_lora(
                model,
                None,
                pred,
                probes,
                dspec,
                base=base_act,
                adapter_chunk_size=chunk,
                gradient_checkpointing=ckpt,
            )
            loss = loss + ((pd - t_delta) ** 2).mean()
        if terms == "behaviour":
            pd, out = delta_and_behaviour(
                model,
                probes,
                dspec,
                seqs,
                (-1,),
                pred,
                base=base_act,
                adapter_chunk_size=chunk,
                gradient_checkpointing=ckpt,
                packed=packed,
            )
            m = seqs.select_mask
            hd = ((out.hidden - base_out.hidden - t_hidden_delta) ** 2)[m].mean()
            kl = kl_loss(out.logits, top_lp, m, top_ids=top_ids).value
            loss = loss + ((pd - t_delta) ** 2).mean() + hd + kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    rows = []
    settings = [("weight", False, 0, False)]
    settings += [("delta", ckpt, chunk, False) for ckpt in (False, True) for chunk in args.chunks]
    settings += [
        ("behaviour", ckpt, chunk, packed == "on")
        for packed in args.packed
        for ckpt in (False, True)
        for chunk in args.chunks
    ]
    for terms, ckpt, chunk, packed in settings:
        g, opt = make_generator()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        key = {"terms": terms, "checkpointing": ckpt, "adapter_chunk": chunk or n}
        if terms == "behaviour":
            key["packed"] = packed
        try:
            for i in range(args.warmup + args.steps):
                sync()
                t0 = time.perf_counter()
                step(g, opt, terms, ckpt, chunk or None, packed)
                sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
            row = {
                **key,
                "ms_median": 1000 * statistics.median(times),
                "ms_min": 1000 * min(times),
                "ms_max": 1000 * max(times),
                "ms_all": [1000 * t for t in times],
                "peak_gib": peak,
            }
        except torch.cuda.OutOfMemoryError:
            row = {**key, "oom": True}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "ms_all"}), flush=True)
        del g, opt

    gen_params = sum(p.numel() for p in make_generator()[0].parameters())
    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": shape,
        "rank": args.rank,
        "adapters": n,
        "generator_parameters": gen_params,
        "task_probes_per_adapter": args.task_probes,
        "prompt_len": args.prompt_len,
        "answer_len": args.answer_len,
        "top_k": args.top_k,
        "date": time.strftime("%Y-%m-%d"),
    }
    ok = [r for r in rows if not r.get("oom")]
    w = min(r["ms_median"] for r in ok if r["terms"] == "weight")
    print(f"\ngenerator {gen_params / 1e6:.1f}M params; weight-only step {w:.1f} ms")
    print(
        "| terms | packed | checkpointing | adapters per forward | ms/step (median, min-max) | x weight-only | behaviour share | peak GiB |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        packed = {True: "yes", False: "no"}.get(r.get("packed"), "-")
        if r.get("oom"):
            print(
                f"| {r['terms']} | {packed} | {r['checkpointing']} | {r['adapter_chunk']} | OOM | | | |"
            )
            continue
        share = (r["ms_median"] - w) / r["ms_median"]
        print(
            f"| {r['terms']} | {packed} | {r['checkpointing']} | {r['adapter_chunk']} | "
            f"{r['ms_median']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | "
            f"{r['ms_median'] / w:.2f} | {100 * share:.0f}% | {r['peak_gib']:.1f} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
