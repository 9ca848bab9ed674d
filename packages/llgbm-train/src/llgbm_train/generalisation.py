"""Which kind of generalisation a held-out task asks for, derived from the world's own split.

    kinds = generalisation_kinds(world.tasks)     # {"add_4": "interpolated", "add_3": "seen", ...}

A held-out task of family F with parameter p is compared with the parameters of F's *train tasks
in this world* (not with a family's full parameter list: a preset may keep fewer of them):
- ``new_family``: F has no train task (the world's held-out family, e.g. ``suffix``);
- ``interpolated``: p and every train parameter of F are numbers and p lies strictly between the
  smallest and the largest of them (``add_4`` between ``add_3`` and ``add_5``);
- ``extrapolated``: numeric, outside that range (``add_8``, ``mod_6``, ``shift_7``);
- ``new_symbol``: p is a word or code name none of F's train tasks has (``code_omega``,
  ``prefix_old``): the symbol itself was never a parameter during training;
- ``unclassified``: a held-out task without family and parameter (an imported hf world).
Train tasks are ``seen``; mixture tasks (``family == "mixture"``) get no kind.
"""

from __future__ import annotations

from collections.abc import Iterable

KINDS = ("interpolated", "extrapolated", "new_symbol", "new_family", "unclassified")
LABELS = {
    "seen": "seen",
    "heldout": "held-out",
    "interpolated": "interpolated",
    "extrapolated": "extrapolated",
    "new_symbol": "new symbol",
    "new_family": "new family",
    "unclassified": "unclassified",
}


def _number(x: str) -> float | None:
    try:
        return float(x)
    except ValueError:
        return None


def classify(family: str, param: str, train_params: Iterable[str]) -> str:
    """The kind of a held-out task of ``family`` with ``param`` (see the module docstring)."""
    train = [str(p) for p in train_params]
    if not family or not param:
        return "unclassified"
    if not train:
        return "new_family"
    if param in train:
        raise ValueError(
            f"held-out task {family}_{param}: parameter {param!r} is also a train parameter"
        )
    p, nums = _number(param), [_number(t) for t in train]
    if p is not None and all(n is not None for n in nums):
        lo, hi = min(nums), max(nums)  # type: ignore[type-var]
        return "interpolated" if lo < p < hi else "extrapolated"
    return "new_symbol"


def generalisation_kinds(tasks) -> dict[str, str]:
    """Task name -> ``seen`` or a held-out kind, for every non-mixture task of a world."""
    singles = [t for t in tasks if getattr(t, "family", "") != "mixture"]
    train_params: dict[str, list[str]] = {}
    for t in singles:
        if t.split == "train" and t.family:
            train_params.setdefault(t.family, []).append(str(t.param))
    out = {}
    for t in singles:
        if t.split == "train":
            out[t.name] = "seen"
        else:
            out[t.name] = classify(t.family, str(t.param), train_params.get(t.family, []))
    return out
