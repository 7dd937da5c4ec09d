"""What a well-formed task message looks like: Celery protocol 2, JSON, typed headers.

Every check here is a pure function of what arrived, returns the reason a message is
refused (``None`` when it is well-formed) and never raises, whatever the input: these
run before Celery's strategy, request or tracer code sees anything, and each case they
let through is one that code handles (``tests/worker/intake/test_shape.py`` generates inputs).

The rules follow what Celery itself writes (``celery/app/amqp.py`` ``as_task_v2``) and
what its worker reads (``celery/worker/request.py``, ``celery/app/trace.py``):

- content type ``application/json``, encoding ``utf-8`` (or ``binary``), no
  ``compression`` header;
- a body of at most the configured bytes, UTF-8, JSON (as kombu's decoder reads it)
  nested at most :data:`MAX_DEPTH` deep, exactly ``[args, kwargs, embed]``: a list, an
  object, and an object with only ``callbacks``, ``errbacks``, ``chain`` and ``chord``,
  each null or well-formed signatures (``chord`` one, the others lists; each with its
  ``task``, ``args``, ``kwargs`` and ``options``, which Celery needs to apply it);
- headers nested at most :data:`MAX_DEPTH` deep, the protocol 2 ones with their types
  (:data:`_HEADER_TYPES`), identifiers printable; no header named after an attribute of
  Celery's request context (:data:`RESERVED_HEADERS`: a ``callbacks`` header would reach
  the request where the body has none, a ``get`` header would hide a method);
- protocol 1 (the task in the body, no ``task`` header) is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from datetime import UTC
from typing import Any, Final

from celery.app.task import Context
from dateutil.parser import isoparse
from kombu.utils.json import loads as kombu_loads

from ..._constants import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    MAX_BODY_DEPTH,
    UNREADABLE,
    UNREADABLE_HEADER,
)

MAX_DEPTH: Final = MAX_BODY_DEPTH
"""How deep JSON may nest in a body (arrays and objects); Celery's own messages use 4."""

MAX_NAME: Final = 255
"""Characters in a task name, a task id and the other identifiers of a message."""

MAX_RETRIES: Final = 1_000_000

EMBED_KEYS: Final = frozenset({"callbacks", "errbacks", "chain", "chord"})

# The keys of a signature as Celery serialises one (``celery.canvas.Signature``).
_SIGNATURE_KEYS: Final = frozenset(
    {"task", "args", "kwargs", "options", "subtask_type", "immutable", "chord_size"}
)


def identifier(value: Any) -> bool:
    """A task name, id or the like: 1 to :data:`MAX_NAME` printable characters (no
    control characters, line separators, bidirectional overrides or lone surrogates,
    which would forge or garble the worker's log lines and fail in result keys)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME and value.isprintable()


def _optional_identifier(value: Any) -> bool:
    return value is None or identifier(value)


def _optional_text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _count(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _optional_count(value: Any) -> bool:
    return value is None or _count(value, MAX_RETRIES)


def _iso8601(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        moment = isoparse(value)  # what Celery's worker parses eta and expires with
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        # What the worker then does with it: local time and a timestamp.
        moment.astimezone(UTC).astimezone().timestamp()
    except (ValueError, OverflowError, OSError):
        return False
    return True


def _seconds(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _time_limits(value: Any) -> bool:
    return (
        isinstance(value, list) and len(value) == 2 and all(v is None or _seconds(v) for v in value)
    )


def _optional_bool(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def _stamped_headers(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _optional_object(value: Any) -> bool:
    return value is None or isinstance(value, dict)


_HEADER_TYPES: Final[Mapping[str, tuple[Callable[[Any], bool], str]]] = {
    "task": (identifier, "a non-empty string of printable characters"),
    "id": (identifier, "a non-empty string of printable characters"),
    "lang": (_optional_text, "a string"),
    "shadow": (_optional_identifier, "a string of printable characters"),
    "root_id": (_optional_identifier, "a string of printable characters"),
    "parent_id": (_optional_identifier, "a string of printable characters"),
    "group": (_optional_identifier, "a string of printable characters"),
    "group_index": (_optional_count, "a non-negative integer"),
    "retries": (_optional_count, "a non-negative integer"),
    "eta": (_iso8601, "an ISO 8601 date and time the worker can convert"),
    "expires": (_iso8601, "an ISO 8601 date and time the worker can convert"),
    "timelimit": (_time_limits, "a pair of seconds (numbers >= 0) or nulls"),
    "argsrepr": (_optional_text, "a string"),
    "kwargsrepr": (_optional_text, "a string"),
    "origin": (_optional_text, "a string"),
    "ignore_result": (_optional_bool, "a boolean"),
    "replaced_task_nesting": (_optional_count, "a non-negative integer"),
    "stamped_headers": (_stamped_headers, "a list of strings"),
    "stamps": (_optional_object, "an object"),
}


# Names a header may not have: every attribute of Celery's request context that is not a
# protocol 2 header. Celery copies each header onto the task's request, so a header named
# ``callbacks`` would win where the body has none, and one named ``get`` or ``_children``
# would hide a method Celery itself calls (``headers`` stays allowed: Sentry sends it).
RESERVED_HEADERS: Final = frozenset(
    name
    for name in dir(Context)
    if not name.startswith("__") and name not in {"headers", *_HEADER_TYPES}
)


def readable_refusal(headers: Any) -> str | None:
    """Why these headers cannot even be looked at (not a table, nested too deep)."""
    if not isinstance(headers, dict):
        return f"headers must be a table, not {kind_of(headers)}"
    if UNREADABLE_HEADER in headers:
        return f"unreadable message: {UNREADABLE}"
    if depth_exceeds(headers, MAX_DEPTH):
        return f"the headers nest deeper than {MAX_DEPTH} levels"
    return None


def header_refusal(headers: Any) -> str | None:
    """Why these headers are not those of a protocol 2 task message, or ``None``."""
    if (reason := readable_refusal(headers)) is not None:
        return reason
    if "task" not in headers:
        return "not a Celery protocol 2 task message (no 'task' header; protocol 1 is refused)"
    if "id" not in headers:
        return "no 'id' header"
    for name, (valid, expected) in _HEADER_TYPES.items():
        if name in headers and not valid(headers[name]):
            return f"header {name!r} must be {expected}, not {kind_of(headers[name])}"
    for name in headers:
        if not isinstance(name, str):
            return "header names must be strings"
        if name in RESERVED_HEADERS:
            return f"header {name!r} is reserved: the worker sets it from the body or the broker"
    return None


def property_refusal(properties: Any) -> str | None:
    """Why these message properties cannot come with a task message, or ``None``."""
    if not isinstance(properties, Mapping):
        return f"properties must be a table, not {kind_of(properties)}"
    for name in ("correlation_id", "reply_to"):
        value = properties.get(name)
        if value is not None and not isinstance(value, str):
            return f"property {name!r} must be a string, not {kind_of(value)}"
    priority = properties.get("priority")
    if priority is not None and not _count(priority, 255):
        return f"property 'priority' must be an integer from 0 to 255, not {kind_of(priority)}"
    return None


def content_refusal(
    content_type: Any, content_encoding: Any, headers: Mapping[str, Any]
) -> str | None:
    """Why a body of this type and encoding is not one the worker reads, or ``None``."""
    if content_type != CONTENT_TYPE:
        return f"content type {_shown(content_type)} refused: only {CONTENT_TYPE} is accepted"
    # kombu writes utf-8; a sender handing kombu bytes gets binary: both are read as UTF-8.
    if not isinstance(content_encoding, str) or content_encoding.lower() not in {
        CONTENT_ENCODING,
        "utf8",
        "binary",
    }:
        return (
            f"content encoding {_shown(content_encoding)} refused: "
            f"only {CONTENT_ENCODING} (or binary) is accepted"
        )
    if headers.get("compression") is not None:
        return "compressed bodies are refused"
    return None


def parse_body(body: Any, max_bytes: int) -> tuple[Any, str | None]:
    """The JSON document a body holds, or the reason it cannot be read within the bounds.

    The size is checked before anything is parsed; the depth is checked on the parsed
    document (CPython's decoder stops at its recursion limit, which is caught too).
    """
    if isinstance(body, str):
        body = body.encode(CONTENT_ENCODING, "surrogatepass")
    if not isinstance(body, bytes | bytearray | memoryview):
        return None, f"the body must be bytes, not {kind_of(body)}"
    if len(body) > max_bytes:
        return None, (
            f"the body has {len(body)} bytes, more than the {max_bytes} this worker accepts "
            "(CELERYBRIDGE_MAX_MESSAGE_BYTES)"
        )
    try:
        text = bytes(body).decode(CONTENT_ENCODING)
    except UnicodeDecodeError as exc:
        return None, f"the body is not UTF-8: {exc.reason} at byte {exc.start}"
    try:
        # kombu's decoder, as the worker's: it turns {"__type__": ...} objects into
        # bytes, datetimes, decimals..., and what it cannot turn is refused here.
        document = kombu_loads(text)
    except RecursionError:
        return None, f"the body nests deeper than {MAX_DEPTH} levels"
    except json.JSONDecodeError as exc:
        return None, f"the body is not JSON: {exc}"
    except Exception as exc:
        return None, f"the body is JSON the worker cannot decode ({type(exc).__name__})"
    if depth_exceeds(document, MAX_DEPTH):
        return None, f"the body nests deeper than {MAX_DEPTH} levels"
    return document, None


def depth_exceeds(document: Any, limit: int) -> bool:
    """Whether ``document`` nests arrays and objects more than ``limit`` deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def body_refusal(document: Any) -> str | None:
    """Why a parsed body is not ``[args, kwargs, embed]``, or ``None``."""
    if not isinstance(document, list) or len(document) != 3:
        return "the body must be a JSON array [args, kwargs, embed]"
    args, kwargs, embed = document
    if not isinstance(args, list):
        return f"args must be a JSON array, not {kind_of(args)}"
    if not isinstance(kwargs, dict):
        return f"kwargs must be a JSON object, not {kind_of(kwargs)}"
    if not isinstance(embed, dict):
        return f"the body's third part must be a JSON object, not {kind_of(embed)}"
    unknown = set(embed) - EMBED_KEYS
    if unknown:
        return f"unknown keys in the body's third part: {', '.join(sorted(map(repr, unknown)))}"
    for key in ("callbacks", "errbacks", "chain"):
        steps = embed.get(key)
        if steps is None:
            continue
        if not isinstance(steps, list):
            return f"{key} must be null or a list of signatures, not {kind_of(steps)}"
        for step in steps:
            if (problem := signature_refusal(step)) is not None:
                return f"{key}: {problem}"
    chord = embed.get("chord")
    if chord is not None and (problem := signature_refusal(chord)) is not None:
        return f"chord: {problem}"
    return None


def signature_refusal(step: Any) -> str | None:
    """Why ``step`` is not a serialised Celery signature, or ``None``.

    Nested signatures (a chain's or a group's ``tasks``) sit inside ``kwargs`` and are
    only bounded in depth here: Celery rebuilds them with ``signature()``, which checks
    their keys again when they are applied.
    """
    if not isinstance(step, dict):
        return f"a signature must be an object, not {kind_of(step)}"
    unknown = set(step) - _SIGNATURE_KEYS
    if unknown:
        return f"unknown signature keys {', '.join(sorted(map(repr, unknown)))}"
    if not identifier(step.get("task")):
        return "a signature needs a 'task' name"
    for key, kind, expected in (
        ("args", list, "an array"),
        ("kwargs", dict, "an object"),
        ("options", dict, "an object"),
    ):
        # Celery serialises all three, and cannot apply a signature without them: its
        # tracer fails (``Signature._merge``), then its failure handling (``_fail_chain``).
        if not isinstance(step.get(key), kind):
            return f"signature {key!r} must be {expected}"
    if not _optional_identifier(step.get("subtask_type")):
        return "signature 'subtask_type' must be a string"
    if not _optional_bool(step.get("immutable")):
        return "signature 'immutable' must be a boolean"
    if not _optional_count(step.get("chord_size")):
        return "signature 'chord_size' must be a non-negative integer"
    return None


def kind_of(value: Any) -> str:
    """A short, safe description of a value's type for a reason (never the value)."""
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
        bytes: "bytes",
    }.get(type(value), f"a {type(value).__name__}")


def _shown(value: Any) -> str:
    """A value for a reason: short, printable, quoted."""
    text = value if isinstance(value, str) else kind_of(value)
    return ascii(text[:64])
