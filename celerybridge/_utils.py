"""Small helpers with no better home."""

from __future__ import annotations

import math
from datetime import timedelta

from ._exceptions import ConfigurationError

Timeout = float | int | timedelta
"""A duration as users may pass it: seconds, or a ``timedelta``."""


def to_seconds(value: Timeout | None, *, what: str = "timeout") -> float | None:
    """Normalise a user's timeout to seconds, refusing nonsense early.

    ``None`` means "no limit" and is passed through.
    """
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{what} must be seconds or a timedelta, got {value!r}")
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError(f"{what} must be a positive, finite duration, got {value!r}")
    return seconds
