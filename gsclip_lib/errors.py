"""The errors a user can cause and fix: a bad parameter, a missing file, unusable input data.

Everything in gsclip that rejects what a user gave it raises a :class:`GsclipError` whose message
names the key, file or argument and says what would be valid. The command line
(:mod:`gsclip_lib.stages.cli`) prints such an error as one line and exits with status 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import numbers


class GsclipError(Exception):
    """A problem with the user's input; the message alone tells what is wrong and how to fix it."""


class ConfigError(GsclipError, ValueError):
    """A parameter file, profile or override is invalid (unknown, missing or out-of-range key)."""


class InputError(GsclipError, ValueError):
    """Input data or arguments that cannot be used: a shard spec that names no file, images out of
    range, splats with non-finite geometry, mismatched shapes or dtypes."""


def positive_int(value: object, name: str) -> int:
    """``value`` as an ``int`` when it is a whole number of at least 1 (a numpy integer too, never a
    bool); otherwise an :class:`InputError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
