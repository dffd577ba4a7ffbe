"""Errors the library raises: each says what was found, what was expected and what to do.

The CLI turns every `BnaError` into one line on stderr and exit code 2; anything else is a bug.
"""

from __future__ import annotations


class BnaError(Exception):
    """Base class of every error caused by the user's input (files, options, models)."""


class BadInputError(BnaError):
    """A data set, option or file is missing, malformed or inconsistent."""


class ModelError(BnaError):
    """A model cannot be loaded, run or adapted (no BatchNorm layer, static batch, ...)."""


class FitFileError(BnaError):
    """A `.bna` fit file is malformed, truncated or from an unsupported format version."""
