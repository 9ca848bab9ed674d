"""delta_only b2, "delta -> retrieve -> merge": a delta predictor read from prompts, and the
adapter it stands for: the training teachers nearest to its predicted delta, merged.

    predictor = DeltaPredictor(cond_dim=64, delta_dim=hidden)    # built by trainer.prepare
    delta = predict_delta(setup, predictor, prompts)              # [hidden], the delta's units
    adapter, info = retrieve_adapter(setup, predictor, prompts)   # LoraAdapter, the hits

The predictor reads the condition the generators read (the condition encoder's states of N
prompts of a task, no answers): masked mean over prompts and tokens, standardised per feature
over the training tasks' conditions (``fit_condition``, as the T2L generator does, since the
pooled states of different tasks are nearly parallel), then an MLP to a hidden-size vector. It
is trained on the training samples' cached teacher deltas (``training.delta_loss`` on deltas
divided by the run's delta scale); no base-model forward is needed in training.

Its adapter for a task: a faiss index (``llgbm_compose.DeltaIndex``, cosine) over the deltas of
the training samples only (train-split teachers, never a held-out task's), the
``retrieval.k`` nearest to the predicted delta merged in delta-W space
(``llgbm_compose.retrieve_merge``: average, TIES or DARE; or an average weighted by cosine).
The compose package does the index and the merge; this module never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from llgbm_train.generators.t2l import masked_mean, standardisation


class DeltaPredictor(nn.Module):
    """Condition states [B, N, L, D] (+ mask [B, N, L]) -> predicted deltas [B, delta_dim], in
    units of the run's delta scale (what the trainer's delta loss compares)."""

    standardize = True  # trainer.fit_condition fits cond_shift / cond_scale before training

    def __init__(self, *, cond_dim: int, delta_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.cond_dim, self.delta_dim = int(cond_dim), int(delta_dim)
        self.register_buffer("cond_shift", torch.zeros(cond_dim))
        self.register_buffer("cond_scale", torch.ones(cond_dim))
        self.mlp = nn.Sequential(
            nn.Linear(cond_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, delta_dim),
        )

    pool = staticmethod(masked_mean)

    @torch.no_grad()
    def fit_condition(self, pooled: Tensor) -> None:
        """Per-feature mean and std of the training conditions' pooled states [C >= 2, D]."""
        shift, scale = standardisation(pooled)
        self.cond_shift.copy_(shift)
        self.cond_scale.copy_(scale)

    def forward(self, states: Tensor, mask: Tensor) -> Tensor:
        if states.dim() != 4 or states.shape[-1] != self.cond_dim:
            raise ValueError(
                f"delta predictor: condition of shape {list(states.shape)}, expected "
                f"[B, N, L, {self.cond_dim}]"
            )
        x = (self.pool(states, mask) - self.cond_shift) / self.cond_scale  # [B, D]
        return self.mlp(x)  # [B, delta_dim]


def is_predictor(model) -> bool:
    return isinstance(model, DeltaPredictor)


@torch.no_grad()
def predict_delta(setup, predictor: DeltaPredictor, prompts: list[str]) -> np.ndarray:
    """The predicted delta of one task's condition prompts: [hidden] float32, delta units."""
    states, mask = setup.encoder.encode([prompts])  # [1, N, L, D], [1, N, L]
    was = predictor.training
    predictor.eval()
    try:
        out = predictor(states.to(setup.device), mask.to(setup.device))[0]  # [hidden]
    finally:
        predictor.train(was)
    return (out.float().cpu() * setup.delta_scale).numpy()


def training_index(setup):
    """A flat DeltaIndex over the training samples' teacher deltas (built once per setup)."""
    from llgbm_compose import DeltaIndex

    if setup.index is not None:
        return setup.index
    root = Path(setup.world_root).resolve()
    by_name = {t.name: t for t in setup.world.tasks}
    rows = []
    for task, path in zip(setup.data.tasks, setup.data.paths):
        p = Path(path).resolve()
        rows.append(
            {
                "task": task,
                "family": getattr(by_name.get(task), "family", ""),
                "path": p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p),
            }
        )
    source = {
        "world": str(root),
        "probe_hash": setup.probes.hash,
        "spec_hash": setup.delta_spec.hash,
        "teachers": "training samples",
    }
    setup.index = DeltaIndex.build(setup.data.deltas.numpy(), rows, kind="flat", source=source)
    return setup.index


def retrieve_adapter(setup, predictor: DeltaPredictor, prompts: list[str]):
    """The b2 adapter for one condition: (LoraAdapter cpu float32, {"retrieved": [...], ...})."""
    from llgbm_compose import retrieve_merge

    rc = setup.cfg.retrieval
    index = training_index(setup)
    k = min(rc.k, len(index))
    params: dict[str, Any] = {"rank": "exact" if rc.rank is None else rc.rank}
    if rc.weights == "uniform" and rc.merge == "dare":
        params["seed"] = setup.cfg.training.seed
    delta = predict_delta(setup, predictor, prompts)
    hits, merged = retrieve_merge(index, delta, k, method=rc.merge, weights=rc.weights, **params)
    info = {
        "retrieved": [{"task": h.row["task"], "cos": h.score, "path": h.row["path"]} for h in hits],
        "merge": {k: v for k, v in merged.summary().items() if k != "sources"},
    }
    return merged.adapter.to(dtype=torch.float32), info


def prompt_predictor(run_dir: str | Path, *, progress: bool = False) -> Callable:
    """prompts -> delta [hidden] from a trained run: a b2 run's predicted delta, or the delta of
    a generator run's adapter (through the run's base, probes and delta spec). The callable's
    ``source`` names the probe and spec hashes its deltas are measured with."""
    from llgbm_train.evaluate import delta_of
    from llgbm_train.generate import condition_prompts, load_generator

    loaded = load_generator(run_dir, progress=progress)
    setup, model = loaded.setup, loaded.generator

    def predict(prompts: list[str]) -> np.ndarray:
        chosen = condition_prompts(list(prompts), loaded.n_prompts, seed=0)
        if is_predictor(model):
            return predict_delta(setup, model, chosen)
        return delta_of(setup, loaded.adapter(chosen)).numpy()

    predict.source = {"probe_hash": setup.probes.hash, "spec_hash": setup.delta_spec.hash}
    return predict
