"""The ``argsrepr`` and ``kwargsrepr`` headers, as Celery's ``send_task`` writes them.

Celery writes ``saferepr(args, 1024, maxlevels=3)`` (``celery/utils/saferepr.py``), a
streaming repr that truncates. On the fast path it would cost more than encoding the
rest of the message, so for the usual arguments, a tuple of strings, numbers and
``None``, :func:`args_repr` follows the same steps directly and gets the same text:
``tests/test_repr.py`` compares the two on generated tuples (long, quoted, spaced,
many). Anything else goes through Celery's own ``saferepr``.
"""

from __future__ import annotations

from typing import Any

from celery.utils.saferepr import saferepr

from .._constants import CELERY_REPR_MAXLEVELS, CELERY_REPR_MAXSIZE

_FLAT = frozenset({str, int, float, bool, type(None)})
"""Values saferepr writes as one token: strings quoted, the others as ``str()``."""


def args_repr(args: tuple[Any, ...]) -> str:
    """``saferepr(args, 1024, maxlevels=3)``: Celery's ``argsrepr`` header."""
    if not _FLAT.issuperset(map(type, args)):
        return saferepr(args, CELERY_REPR_MAXSIZE, maxlevels=CELERY_REPR_MAXLEVELS)
    end = ",)" if len(args) == 1 else ")"
    parts = ["("]
    left = CELERY_REPR_MAXSIZE - 1
    for index, arg in enumerate(args):
        if index:
            if left <= 0:  # saferepr: out of room before a separator
                break
            parts.append(", ")
            left -= 2
        if left <= 0:  # saferepr: out of room before a value
            break
        text = arg if type(arg) is str else str(arg)
        if len(text) >= left:  # Celery's truncate(), left > 0
            text = text[:left].rsplit(" ", 1)[0] + "..."
        if type(arg) is str:
            text = "'" + text.replace("'", "\\'") + "'"
        parts.append(text)
        left -= len(text)
    else:
        parts.append(end)  # the closing paren is written even with no room left
        return "".join(parts)
    parts.append(", ...")  # values were left out: marked, then the paren closed
    parts.append(end)
    return "".join(parts)


def kwargs_repr(kwargs: dict[str, Any]) -> str:
    """``saferepr(kwargs, 1024, maxlevels=3)``: Celery's ``kwargsrepr`` header."""
    if not kwargs:
        return "{}"
    return saferepr(kwargs, CELERY_REPR_MAXSIZE, maxlevels=CELERY_REPR_MAXLEVELS)
