"""Is a held-out interpolated task reachable by averaging its neighbours' teachers (delta-W)?

    uv run python scripts/interpolate_teachers.py worlds/tiny

For add_4, subtract_3, shift_4 and repeat_4: the exact delta-W mean of the last checkpoints of
the two neighbouring train variants' teachers (add_3 and add_5, ...), scored on the held-out
task's first 48 test items, beside one neighbour alone and the task's own teacher.
"""

import sys

import torch
from llgbm_flora import LoraBatch, algebra, load_adapter
from llgbm_worlds import World, score
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
w = World.load(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(w.base_path).eval()
tok = AutoTokenizer.from_pretrained(w.base_path)
last = {}
for t in w.teachers:
    if t.kind == "single" and (t.task not in last or t.step > last[t.task][0].step):
        last[t.task] = [t]
    elif t.kind == "single" and t.step == last[t.task][0].step:
        last[t.task].append(t)
pairs = {
    "add_4": ("add_3", "add_5"),
    "subtract_3": ("subtract_2", "subtract_4"),
    "shift_4": ("shift_3", "shift_5"),
    "repeat_4": ("repeat_3", "repeat_5"),
}
for task, (lo, hi) in pairs.items():
    items = w.task(task).items("test")[:48]
    ads = [load_adapter(t.path) for t in last[lo] + last[hi]]
    mean = algebra.refactor(algebra.mean(LoraBatch.from_adapters(ads))).adapter
    own = load_adapter(last[task][0].path)
    r = {
        name: sum(score(model, tok, items, adapter=a)) / len(items)
        for name, a in [
            ("mean of neighbours", mean),
            ("lower neighbour", ads[0]),
            ("own teacher", own),
        ]
    }
    print(task, {k: round(v * 100, 1) for k, v in r.items()})
