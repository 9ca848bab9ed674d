"""Re-score a run's saved adapters with plain transformers + PEFT (nothing of llgbm involved).

    uv run python scripts/rescore_peft.py runs/experiments/tiny/shared/delta_multi-s0

Reads the run's eval/report.json (which tasks, how many items, the reported accuracy), loads
each eval/adapters/<task> with `PeftModel.from_pretrained` on the world's base, greedy-decodes
the task's first n test items (left padding, whitespace-normalised exact match, the same token
budget rule as the scorer: 2 + the longest answer) and prints both accuracies per task and
overall. Exit 1 if any task differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(run: Path) -> int:
    torch.set_num_threads(1)
    report = json.loads((run / "eval" / "report.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    world = Path(cfg["world"]["dir"])
    base_dir = world / json.loads((world / "world.json").read_text())["base"]
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    diff = 0
    total = [0, 0, 0]
    for row in report["per_task"]:
        lines = (world / "tasks" / row["task"] / "test.jsonl").read_text().splitlines()
        items = [json.loads(x) for x in lines if x][: row["n_items"]]
        model = PeftModel.from_pretrained(base, run / "eval" / "adapters" / row["task"]).eval()
        limit = 2 + max(
            len(tok(" " + e["answer"], add_special_tokens=False)["input_ids"]) for e in items
        )
        enc = tok([e["prompt"] for e in items], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=limit,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        right = sum(
            " ".join(t.split()) == " ".join(e["answer"].split()) for t, e in zip(texts, items)
        )
        base = model.unload()  # the base back without the adapter
        reported = round(row["methods"]["generated"]["accuracy"] * len(items))
        diff += right != reported
        total[0] += right
        total[1] += reported
        total[2] += len(items)
        print(
            f"{row['task']:14s} {row['split']:8s} plain PEFT {right:3d}/{len(items)}  reported {reported:3d}"
        )
    print(
        f"all: plain PEFT {total[0]}/{total[2]}, reported {total[1]}/{total[2]}; tasks differing: {diff}"
    )
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
