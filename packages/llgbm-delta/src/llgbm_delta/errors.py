"""Errors raised by llgbm-delta: every one is a ValueError with a one-line message."""

from __future__ import annotations


class DeltaError(ValueError):
    """Base class: bad input or a broken invariant, described in one line."""


class ProbeError(DeltaError):
    """A probe set is empty, unreadable or malformed."""


class DeltaSpecError(DeltaError):
    """A DeltaSpec field has a value outside its allowed set."""


class AdapterError(DeltaError):
    """An adapter cannot be loaded or does not fit the base model."""


class BaseModelError(DeltaError):
    """The base model cannot be loaded, or it changed while deltas were computed."""


class CacheError(DeltaError):
    """A cache directory is unusable (wrong format, or written for another base model)."""


class DeltaWarning(UserWarning):
    """Something the deltas will be computed despite, but that the user should know (for
    example probes longer than the model's context)."""
