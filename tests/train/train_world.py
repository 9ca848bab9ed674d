"""A minimal world for the training tests: tiny random Llama, 3 families x 3 tasks, PEFT teachers.

Built in seconds, written in the ``llgbm-world/1`` manifest format that ``llgbm_worlds.World``
reads (base dir, tasks with train/test jsonl, teachers). Teachers of one family share a LoRA
direction and differ by a parameter-dependent scale plus noise, so a generator can learn
"family and parameter -> adapter" from the prompt words and generalise to the held-out parameter
of each family. ``python tests/train/train_world.py --ddp-check ...`` is the distributed test's
entry point; ``python tests/train/train_world.py ARGS`` runs ``llgbm ARGS``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

FAMILIES = {
    "add": "Add {k} to the number.",
    "shift": "Shift each letter by {k}.",
    "code": "Encode the word with code {k}.",
}
PARAMS = (1, 2, 3)  # 3 is held out in every family
HELDOUT = 3


def small_config(world: Path, runs: Path, *overrides: str):
    """A config that trains in seconds on the minimal world at ``world``."""
    from llgbm_train.config import Config

    base = [
        f"world.dir={world}",
        f"runs_dir={runs}",
        "world.build_if_missing=false",
        f"delta.cache_dir={runs / 'delta_cache'}",
        "model.device=cpu",
        "generator.kind=t2l",
        "generator.encoder=light",
        "generator.n_prompts=4",
        "generator.max_tokens=32",
        "generator.options={hidden: 32, emb_dim: 8}",
        "generator.encoder_options={dim: 32}",
        "training.steps=6",
        "training.batch_size=4",
        "training.lr=3e-3",
        "training.warmup_steps=2",
        "training.checkpoint_every=2",
        "training.lambda_d_warmup=2",
        "eval.max_items=4",
        "eval.bootstrap=50",
    ]
    return Config(name="t").override([*base, *overrides])


def _prompt(instruction: str, x: str) -> str:
    from llgbm_worlds.frame import format_prompt

    return format_prompt(instruction, x)


def build(root: Path, *, seed: int = 0) -> Path:
    from llgbm_delta.testing import save_base, tiny_llama, tiny_tokenizer
    from llgbm_flora import LoraAdapter, LoraSpec, save_adapter

    root = Path(root)
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden_size=32, intermediate_size=64, seed=seed)
    save_base(model, tok, root / "base")
    spec = LoraSpec.for_model(
        model, rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"), base_model="base"
    )
    gen = torch.Generator().manual_seed(seed)
    keys = spec.keys()
    tasks, teachers = [], []
    for fi, (fam, instr) in enumerate(FAMILIES.items()):
        fam_a = {
            k: torch.randn(spec.rank, i, generator=gen) / i**0.5
            for k, (i, _) in ((k, spec.in_out(k[1])) for k in keys)
        }
        fam_b = {k: torch.randn(spec.in_out(k[1])[1], spec.rank, generator=gen) * 0.5 for k in keys}
        for k in PARAMS:
            name = f"{fam}_{k}"
            split = "heldout" if k == HELDOUT else "train"
            texts = {
                s: [
                    (_prompt(instr.format(k=k), f"{s} {fam} item {j}"), f"{fam}{k}x{j}")
                    for j in range(12)
                ]
                for s in ("train", "test")
            }
            for sp, rows in texts.items():
                path = root / "tasks" / name / f"{sp}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(
                    "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows)
                )
            tasks.append(
                {
                    "name": name,
                    "family": fam,
                    "split": split,
                    "param": str(k),
                    "heldout_kind": "variant" if split == "heldout" else None,
                    "base_accuracy": 0.0,
                    "train": f"tasks/{name}/train.jsonl",
                    "test": f"tasks/{name}/test.jsonl",
                }
            )
            for ckpt in range(2):
                noise = 0.05 * (ckpt + 1)
                A = {
                    key: fam_a[key] + noise * torch.randn(fam_a[key].shape, generator=gen)
                    for key in keys
                }
                B = {
                    key: fam_b[key] * (0.5 + 0.5 * k)
                    + noise * torch.randn(fam_b[key].shape, generator=gen)
                    for key in keys
                }
                rel = f"teachers/{name}/ckpt{ckpt}"
                save_adapter(LoraAdapter(spec, A, B), root / rel)
                teachers.append(
                    {
                        "task": name,
                        "path": rel,
                        "accuracy": 0.5 + 0.1 * ckpt + 0.01 * fi,
                        "step": 10 * (ckpt + 1),
                        "data_split": 0,
                        "kind": "single",
                        "sha256": hashlib.sha256(
                            (root / rel / "adapter_model.safetensors").read_bytes()
                        ).hexdigest(),
                    }
                )
    manifest = {
        "format": "llgbm-world/1",
        "kind": "tiny",
        "preset": "train-tests",
        "seed": seed,
        "base": "base",
        "tasks": tasks,
        "teachers": teachers,
    }
    (root / "world.json").write_text(json.dumps(manifest))
    return root


def ddp_check(config: str, run_dir: str, out_dir: str) -> None:
    """Train ``config`` into ``run_dir`` via the API; every rank saves its final parameters."""
    from llgbm_train.config import load_config
    from llgbm_train.trainer import train

    result = train(load_config(config), Path(run_dir), progress=False)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    state = {k: v.detach().cpu() for k, v in result.generator.state_dict().items()}
    torch.save({"world_size": world, "state": state}, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    if sys.argv[1] == "--ddp-check":
        ddp_check(*sys.argv[2:5])
        sys.exit(0)
    from llgbm_train.cli import main

    sys.exit(main(sys.argv[1:]))
