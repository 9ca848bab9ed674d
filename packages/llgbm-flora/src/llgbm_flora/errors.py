"""Errors raised by llgbm-flora: one-line messages that name the file or field at fault."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["LoraError", "LoraFormatError", "LoraKeyMismatchError", "short_list"]


class LoraError(ValueError):
    """Base class of every error this package raises about adapters or their use."""


class LoraFormatError(LoraError):
    """An adapter directory or file is unreadable, malformed or uses an unsupported PEFT feature."""


class LoraKeyMismatchError(LoraError):
    """Adapter keys do not cover the expected (layer, module) pairs exactly, or shapes do not fit.

    `missing`, `extra` and `shape_errors` keep the full lists; the message shows a truncated view.
    """

    def __init__(
        self,
        where: str,
        *,
        missing: Iterable[object] = (),
        extra: Iterable[object] = (),
        shape_errors: Iterable[str] = (),
    ) -> None:
        self.where = where
        self.missing = list(missing)
        self.extra = list(extra)
        self.shape_errors = list(shape_errors)
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {short_list(self.missing)}")
        if self.extra:
            parts.append(f"extra {len(self.extra)}: {short_list(self.extra)}")
        if self.shape_errors:
            parts.append(f"shape errors {len(self.shape_errors)}: {short_list(self.shape_errors)}")
        super().__init__(f"{where}: keys do not match ({'; '.join(parts)})")


def short_list(items: Iterable[object], limit: int = 8) -> str:
    """`a, b, c, ... (+N more)`: long key lists stay readable on one line."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... (+{len(items) - limit} more)"
