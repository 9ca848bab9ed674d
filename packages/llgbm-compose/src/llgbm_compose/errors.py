"""Errors raised by llgbm-compose: every one is a ValueError with a one-line message."""

from __future__ import annotations


class ComposeError(ValueError):
    """Bad input to a merge, an experiment or a query: what is wrong and what to do, one line."""


class RetrievalError(ComposeError):
    """A retrieval index is empty, unreadable, or asked for more neighbours than it holds."""
