"""Errors raised by llgbm-worlds: every one is a ValueError with a one-line message."""

from __future__ import annotations


class WorldError(ValueError):
    """Base class: bad input to a world (a name, a file, a field). The message is one line."""


class UnknownNameError(WorldError):
    """An unknown world kind, family, preset or task name; the message lists the valid ones."""


class WorldIncompleteError(WorldError):
    """A world directory is missing or half-built; the message names what and how to build it."""


class ManifestError(WorldError):
    """A world.json or hf manifest is malformed or points at something missing."""


class ChecksumError(WorldError):
    """A world file no longer matches the sha256 its world.json records; the message names it."""


class BuildError(WorldError):
    """A build step failed for an external reason (disk full, unwritable directory)."""
