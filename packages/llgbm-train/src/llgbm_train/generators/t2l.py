"""T2L-style hypernetwork: one task embedding, one shared trunk, one output head per module type.

    task  = MLP(masked mean of the condition over prompts and tokens)          # [B, hidden]
    h_key = trunk(task, layer_embedding[layer], module_embedding[module])      # [B, hidden]
    A, B  = head[module](h_key)                                                # per (layer, module)

Heads emit either raw A [r, in] and B [out, r] or, given a WeightTokenizer, the key's normalised
weight tokens, which the tokenizer decodes (values of unit scale whatever the LoRA's magnitude).
`head_rank` factors each head through a bottleneck when r * (in + out) is large.

`standardize` (default "features"; True is the same): the pooled condition is shifted and scaled
per feature by the mean and std of the training tasks' pooled conditions (``fit_condition``,
called by ``prepare``; kept in the state dict). A frozen encoder's pooled states of different
tasks are nearly parallel (on the tiny world's base encoder their mean dominates), so without it
the task MLP starts from conditions that barely differ and learns a near-constant adapter.
"within" whitens instead by the *within-task* scatter of the pooled conditions (the
within-class covariance of linear discriminant analysis, shrunk towards a multiple of the
identity): directions that vary with a prompt's input words shrink, directions that change
only with the task (its instruction) grow. On the tiny world's base encoder a nearest-centroid
read of fresh 8-prompt conditions of the 36 train tasks is 93-94% right after the per-feature
scaling and 98-99% after within-task whitening, the remaining misses all mixture tasks
(whose prompts come from two tasks); add_k / subtract_k and the code_* words were the
per-feature scaling's confusions. "none" (or False) feeds the pooled condition as it is.

Initialisation: the output is a usable LoRA from step 0. Raw A starts like PEFT's A (uniform
+-1/sqrt(in), through the head's bias) and raw B near zero but with non-zero weights, so the
gradient reaches B from the first step; token heads start around the teachers' slab statistics.
"""

from __future__ import annotations

import math

import torch
from llgbm_flora import LoraBatch, LoraSpec
from torch import Tensor, nn

from llgbm_train.generators.base import Generator, GeneratorError
from llgbm_train.weight_tokens import WeightTokenizer

# Std of the raw B head's weights: B starts at ~1e-3 of A's scale, small but trainable.
_B_INIT_STD = 1e-3
STANDARDIZE_MODES = ("none", "features", "within")
# Shrinkage of the within-task scatter towards (its mean variance) x identity, as a share: with
# 36 tasks x 16 conditions of the tiny world, 1e-3 / 1e-2 / 1e-1 read 98-99% of fresh conditions
# right; it keeps the whitening finite where a direction never varies within a task.
WITHIN_SHRINKAGE = 1e-2


def masked_mean(cond: Tensor, cond_mask: Tensor) -> Tensor:
    """Masked mean over prompts and tokens: [B, N, L, D], [B, N, L] -> [B, D]."""
    m = cond_mask[..., None].to(cond.dtype)  # [B, N, L, 1]
    return (cond * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2)).clamp_min(1.0)


@torch.no_grad()
def standardisation(pooled: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature (mean, std) of pooled training conditions [C >= 2, D], float32.

    Features constant over the zoo carry nothing: scale 1 keeps them from blowing up.
    """
    pooled = pooled.float()
    std = pooled.std(dim=0)
    floor = 1e-6 * float(std.max().clamp_min(1e-12))
    return pooled.mean(dim=0), torch.where(std > floor, std, torch.ones_like(std))


@torch.no_grad()
def within_whitening(
    pooled: Tensor, groups: Tensor, shrinkage: float = WITHIN_SHRINKAGE
) -> tuple[Tensor, Tensor]:
    """(mean [D], W [D, D]) with ``(x - mean) @ W`` white in the within-task scatter.

    ``pooled`` [C, D] are pooled training conditions, ``groups`` [C] their task ids; at least
    one task must have two conditions. The scatter S_w (pooled within-task covariance) is shrunk
    to S_w + shrinkage * mean(diag S_w) * I and W = S^-1/2 (symmetric), float32 (mean(diag S_w)
    is floored at 1e-3 of the total variance).
    """
    pooled = pooled.float()
    groups = torch.as_tensor(groups, device=pooled.device).long()
    if groups.shape != pooled.shape[:1]:
        raise GeneratorError(
            f"within_whitening: {groups.shape[0]} group ids for {pooled.shape[0]} conditions"
        )
    ids, inverse = torch.unique(groups, return_inverse=True)
    dof = pooled.shape[0] - len(ids)
    if dof < 1:
        raise GeneratorError(
            "within_whitening: every task has one condition; the within-task scatter needs two "
            "conditions of some task"
        )
    means = torch.zeros(len(ids), pooled.shape[1], device=pooled.device)
    means.index_add_(0, inverse, pooled)
    means /= torch.bincount(inverse, minlength=len(ids))[:, None].float()
    within = pooled - means[inverse]  # [C, D]
    scatter = within.T.double() @ within.double() / dof  # [D, D]
    # Where conditions hardly vary within a task (a pool no larger than one condition: every
    # draw is the same prompts), the ridge comes from the total scatter instead: no direction is
    # blown up from rounding noise. (On the tiny world the within-task share of the variance is
    # 0.035, far above the floor.)
    total = float(pooled.double().var(dim=0).mean()) if pooled.shape[0] > 1 else 0.0
    ridge = max(float(scatter.diagonal().mean()), 1e-3 * total) or 1.0
    scatter += (
        shrinkage * ridge * torch.eye(scatter.shape[0], dtype=scatter.dtype, device=scatter.device)
    )
    ev, vec = torch.linalg.eigh(scatter)
    w = (vec * ev.clamp_min(1e-12 * float(ev.max())).rsqrt()) @ vec.T
    return pooled.mean(dim=0), w.float()


class _Head(nn.Module):
    def __init__(self, hidden: int, n_out: int, head_rank: int | None) -> None:
        super().__init__()
        if head_rank is None:
            self.down = nn.Identity()
            self.up = nn.Linear(hidden, n_out)
        else:
            self.down = nn.Linear(hidden, head_rank, bias=False)
            self.up = nn.Linear(head_rank, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


class T2LGenerator(Generator):
    """Pooled condition + layer/module embeddings -> shared MLP -> per-module-type heads."""

    def __init__(
        self,
        *,
        spec: LoraSpec,
        cond_dim: int,
        weight_tokenizer: WeightTokenizer | None = None,
        hidden: int = 256,
        emb_dim: int = 32,
        head_rank: int | None = None,
        standardize: bool | str = "features",
    ) -> None:
        super().__init__(spec, cond_dim)
        mode = {True: "features", False: "none"}.get(standardize, standardize)  # type: ignore[arg-type]
        if mode not in STANDARDIZE_MODES:
            raise GeneratorError(
                f"generator standardize: {standardize!r} is not one of "
                f"{', '.join(STANDARDIZE_MODES)} (or true / false)"
            )
        self.standardize_mode = mode
        self.standardize = mode != "none"
        # Identity until fit_condition: a generator built without a zoo behaves as before.
        self.register_buffer("cond_shift", torch.zeros(cond_dim))
        self.register_buffer("cond_scale", torch.ones(cond_dim))
        self.register_buffer("cond_whiten", torch.eye(cond_dim))  # "within" mode's matrix
        if hidden < 1 or emb_dim < 1:
            raise GeneratorError(f"generator hidden/emb_dim: {hidden}/{emb_dim} must be >= 1")
        if head_rank is not None and head_rank < 1:
            raise GeneratorError(f"generator head_rank: {head_rank} must be >= 1 or None")
        self.tokenizer = weight_tokenizer
        self.keys = spec.keys()
        self.task = nn.Sequential(
            nn.LayerNorm(cond_dim),
            nn.Linear(cond_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
        )
        self.layer_emb = nn.Embedding(len(spec.layers), emb_dim)
        self.module_emb = nn.Embedding(len(spec.target_modules), emb_dim)
        self.trunk = nn.Sequential(
            nn.Linear(hidden + 2 * emb_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
        )
        layer_index = {layer: i for i, layer in enumerate(spec.layers)}
        module_index = {m: i for i, m in enumerate(spec.target_modules)}
        self.register_buffer(
            "key_layer", torch.tensor([layer_index[k[0]] for k in self.keys]), persistent=False
        )
        self.register_buffer(
            "key_module", torch.tensor([module_index[k[1]] for k in self.keys]), persistent=False
        )
        r = spec.rank
        self.heads = nn.ModuleDict()
        self._token_counts: dict[str, int] = {}
        for m in spec.target_modules:
            d_in, d_out = spec.in_out(m)
            if weight_tokenizer is None:
                head = _Head(hidden, r * d_in + d_out * r, head_rank)
                with torch.no_grad():
                    bound = 1.0 / math.sqrt(d_in)
                    head.up.bias[: r * d_in].uniform_(-bound, bound)
                    head.up.bias[r * d_in :].zero_()
                    head.up.weight[r * d_in :].normal_(0.0, _B_INIT_STD)
            else:
                seg = [s for s in weight_tokenizer.segments if s.key[1] == m][:2]
                n_tok = sum(s.n_slabs for s in seg)
                self._token_counts[m] = n_tok
                head = _Head(hidden, n_tok * r * weight_tokenizer.slab_width, head_rank)
            self.heads[m] = head
        # key positions of each module type, in `self.keys` order (one per layer)
        self._by_module = {
            m: [i for i, k in enumerate(self.keys) if k[1] == m] for m in spec.target_modules
        }

    pool = staticmethod(masked_mean)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before the "within" mode have no cond_whiten: theirs is the identity.
        state_dict.setdefault(prefix + "cond_whiten", torch.eye(self.cond_dim))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit_condition(self, pooled: Tensor, groups: Tensor | None = None) -> None:
        """Set the standardisation from training conditions' pooled states ([C, D], C >= 2);
        ``groups`` [C] (each condition's task id) is needed by the "within" mode."""
        if not self.standardize:
            return
        if pooled.dim() != 2 or pooled.shape[1] != self.cond_dim or pooled.shape[0] < 2:
            raise GeneratorError(
                f"fit_condition: pooled conditions of shape {list(pooled.shape)}, expected "
                f"[C >= 2, {self.cond_dim}]"
            )
        if self.standardize_mode == "within":
            if groups is None:
                raise GeneratorError(
                    "fit_condition: standardize 'within' needs each condition's task"
                )
            shift, whiten = within_whitening(pooled, groups)
            self.cond_shift.copy_(shift)
            self.cond_scale.fill_(1.0)
            self.cond_whiten.copy_(whiten)
            return
        shift, scale = standardisation(pooled)
        self.cond_shift.copy_(shift)
        self.cond_scale.copy_(scale)

    def forward(self, cond: Tensor, cond_mask: Tensor) -> LoraBatch:
        self._check_cond(cond, cond_mask, None, None)
        pooled = self.pool(cond, cond_mask)  # [B, D]
        if self.standardize:
            pooled = (pooled - self.cond_shift) / self.cond_scale
            if self.standardize_mode == "within":
                pooled = pooled @ self.cond_whiten
        task = self.task(pooled)  # [B, hidden]
        n, n_keys = cond.shape[0], len(self.keys)
        emb = torch.cat([self.layer_emb(self.key_layer), self.module_emb(self.key_module)], -1)
        x = torch.cat(
            [task[:, None].expand(n, n_keys, -1), emb[None].expand(n, -1, -1)], -1
        )  # [B, K, hidden + 2 emb]
        h = self.trunk(x)  # [B, K, hidden]
        if self.tokenizer is not None:
            return self._decode_tokens(h, n)
        outs: list[Tensor | None] = [None] * n_keys
        for mod, idx in self._by_module.items():
            y = self.heads[mod](h[:, idx])  # [B, n_layers, out_dim]
            # unbind, not y[:, j]: its backward is one stack, where each select's backward
            # would zero-fill and add a y-sized gradient (210 of them on SmolLM2).
            for i, y_i in zip(idx, y.unbind(1), strict=True):
                outs[i] = y_i
        r = self.spec.rank
        A: dict = {}
        B: dict = {}
        for key, y in zip(self.keys, outs):
            d_in, d_out = self.spec.in_out(key[1])
            A[key] = y[:, : r * d_in].reshape(n, r, d_in)  # [B, r, in]
            B[key] = y[:, r * d_in :].reshape(n, d_out, r)  # [B, out, r]
        return LoraBatch(spec=self.spec, A=A, B=B)

    def _decode_tokens(self, h: Tensor, n: int) -> LoraBatch:
        """Each module's head over its layers, decoded as tokens one module at a time."""
        tok = self.tokenizer
        assert tok is not None
        A: dict = {}
        B: dict = {}
        for mod, idx in self._by_module.items():
            y = self.heads[mod](h[:, idx])  # [B, L, n_tok * r * w]
            t = y.reshape(n, len(idx), self._token_counts[mod], tok.rank, tok.slab_width)
            a, b = tok.decode_module(mod, t)  # [B, L, r, in], [B, L, out, r]
            # unbind: per-key views whose backward is one stack
            for key, a_i, b_i in zip(tok.module_keys(mod), a.unbind(1), b.unbind(1), strict=True):
                A[key], B[key] = a_i, b_i
        return LoraBatch(
            spec=self.spec, A={k: A[k] for k in self.keys}, B={k: B[k] for k in self.keys}
        )
