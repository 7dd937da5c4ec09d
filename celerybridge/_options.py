"""Send options: Celery's ``apply_async`` options, validated when they are given.

:class:`SendOptions` is what a stub sends with (``with_options``, ``apply_async``,
``signature``). Every value is checked when the options are built, so a bad one fails
where it is written, not when a message is published, and never reaches a worker.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, cast

from ._constants import AMQP_SHORTSTR_BYTES, MAX_MESSAGE_TTL
from ._exceptions import CallError, CeleryBridgeError, ConfigurationError, ContractError
from ._utils import to_seconds

if TYPE_CHECKING:
    from celery.canvas import Signature

SUPPORTED_OPTIONS: Final = (
    "countdown",
    "eta",
    "expires",
    "headers",
    "link",
    "link_error",
    "priority",
    "queue",
    "retry",
    "retry_policy",
    "soft_time_limit",
    "task_id",
    "time_limit",
)
"""What ``with_options``, ``apply_async``, ``signature`` and ``send_options=`` accept."""

MAX_EXPIRES: Final = MAX_MESSAGE_TTL
"""Seconds: the longest ``expires``, RabbitMQ's longest message TTL (49.7 days)."""
MIN_EXPIRES: Final = 0.001
"""Seconds: RabbitMQ counts a message TTL in whole milliseconds; less would be a TTL of
0, a message dropped unless a consumer takes it at once."""
MAX_COUNTDOWN: Final = 10 * 365 * 86400
"""Seconds (10 years): a countdown becomes an ETA, ``now + countdown``, which must stay
a date a worker can read; a task due later than this is a mistake, not a plan."""
TASK_ID_BYTES: Final = AMQP_SHORTSTR_BYTES
"""A task id travels as AMQP's ``correlation_id``, a short string of at most 255 bytes."""
MAX_HEADER_BYTES: Final = 65536
"""The custom headers of one message, as compact JSON."""
MAX_HEADER_DEPTH: Final = 8
RETRY_POLICY_KEYS: Final = frozenset(
    {"max_retries", "interval_start", "interval_step", "interval_max"}
)


def _protocol_headers() -> frozenset[str]:
    # What the protocol, the worker's request and celerybridge itself put in headers:
    # a custom header of that name would replace the task name, its id, its ETA...
    from ._worker.intake.shape import _HEADER_TYPES, RESERVED_HEADERS

    return frozenset({*_HEADER_TYPES, *RESERVED_HEADERS, "compression", "headers"})


@dataclass(frozen=True, slots=True)
class SendOptions:
    """Per-call delivery options, checked when built (:func:`merge_options`).

    ``celery_options`` gives them as ``Celery.send_task`` keywords, which is also how
    the native publishers read them.
    """

    queue: str
    countdown: float | None = None
    eta: datetime | None = None
    expires: float | datetime | None = None
    priority: int | None = None
    headers: Mapping[str, Any] | None = None
    task_id: str | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    retry: bool | None = None
    retry_policy: Mapping[str, Any] | None = None
    link: tuple[Signature[Any], ...] = field(default=())
    link_error: tuple[Signature[Any], ...] = field(default=())

    def celery_options(self) -> dict[str, Any]:
        """The options as ``Celery.send_task`` keywords, ``None`` values left out.

        ``queue`` and ``task_id`` are not among them: the message carries both.
        """
        options: dict[str, Any] = {
            "countdown": self.countdown,
            "eta": self.eta,
            "expires": self.expires,
            "priority": self.priority,
            "headers": dict(self.headers) if self.headers else None,
            "time_limit": self.time_limit,
            "soft_time_limit": self.soft_time_limit,
            "retry": self.retry,
            "retry_policy": dict(self.retry_policy) if self.retry_policy else None,
            "link": [sig.clone() for sig in self.link] or None,
            "link_error": [sig.clone() for sig in self.link_error] or None,
        }
        return {k: v for k, v in options.items() if v is not None}


def merge_options(task: str, base: SendOptions, given: Mapping[str, Any]) -> SendOptions:
    """``base`` with the options in ``given`` (``None`` values ignored), each checked.

    An unknown option is a :class:`CallError` naming the supported ones; a bad value a
    :class:`ConfigurationError` naming the option.
    """
    unknown = set(given) - set(SUPPORTED_OPTIONS)
    if unknown:
        raise CallError(
            f"task {task!r}: unsupported option(s) {', '.join(sorted(unknown))}; "
            f"supported: {', '.join(SUPPORTED_OPTIONS)}"
        )
    options = {k: v for k, v in given.items() if v is not None}
    if "countdown" in options and "eta" in options:
        raise ConfigurationError("give countdown or eta, not both")
    changes: dict[str, Any] = {}
    if "queue" in options:
        check_identifier("queue", options["queue"], ConfigurationError)
        changes["queue"] = options["queue"]
    if "countdown" in options:
        changes["countdown"] = _countdown(options["countdown"])
        changes["eta"] = None  # the later of the two wins
    if "eta" in options:
        changes["eta"] = check_moment("eta", options["eta"])
        changes["countdown"] = None
    if "expires" in options:
        changes["expires"] = _expires(options["expires"])
    if "priority" in options:
        changes["priority"] = _priority(options["priority"])
    if "headers" in options:
        changes["headers"] = check_headers(options["headers"])
    if "task_id" in options:
        changes["task_id"] = _task_id(options["task_id"])
    for name in ("time_limit", "soft_time_limit"):
        if name in options:
            changes[name] = to_seconds(options[name], what=name)
    if "retry" in options:
        if not isinstance(options["retry"], bool):
            raise ConfigurationError(f"retry must be True or False, got {options['retry']!r}")
        changes["retry"] = options["retry"]
    if "retry_policy" in options:
        changes["retry_policy"] = _retry_policy(options["retry_policy"])
    for name in ("link", "link_error"):
        if name in options:
            changes[name] = _signatures(name, options[name])
    merged = replace(base, **changes)
    hard, soft = merged.time_limit, merged.soft_time_limit
    if hard is not None and soft is not None and soft > hard:
        raise ConfigurationError(
            f"soft_time_limit ({soft:g} s) must not exceed time_limit ({hard:g} s)"
        )
    return merged


def check_identifier(
    what: str, value: object, error: type[CeleryBridgeError] = ContractError
) -> None:
    """A name a broker stores: non-empty, no spaces, valid UTF-8, a short AMQP string.

    ``error``: a :class:`ContractError` in a contract's definition (``@remote_task``), a
    :class:`ConfigurationError` in a send option (``with_options(queue=...)``, a
    signature's or a workflow step's options, ``celerybridge call --queue``).
    """
    if not isinstance(value, str) or not value or value != value.strip() or " " in value:
        raise error(f"{what} must be a non-empty string without spaces, got {value!r}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: brokers would store it as it is
        raise error(f"{what} must be valid UTF-8, got {value!r}") from None
    if size > AMQP_SHORTSTR_BYTES:
        raise error(
            f"{what} must be at most {AMQP_SHORTSTR_BYTES} bytes of UTF-8, got {size:,} bytes"
        )


def check_moment(what: str, value: object) -> datetime:
    """A timezone-aware datetime a worker can convert to its local time."""
    if not isinstance(value, datetime):
        raise ConfigurationError(f"{what} must be a timezone-aware datetime, got {value!r}")
    if value.utcoffset() is None:
        raise ConfigurationError(
            f"{what} must be a timezone-aware datetime (e.g. datetime.now(UTC) + "
            f"timedelta(seconds=5)), got the naive {value.isoformat()}"
        )
    try:
        # In UTC: an offset of seconds (local mean time of old dates) is ISO 8601 the
        # worker's parser cannot read. Then what the worker does: local time, a timestamp.
        moment = value.astimezone(UTC)
        moment.astimezone().timestamp()
    except (OverflowError, OSError, ValueError):
        raise ConfigurationError(f"{what} is out of range: {value.isoformat()}") from None
    return moment


def _countdown(value: object) -> float:
    seconds = to_seconds(value, what="countdown")  # type: ignore[arg-type]
    assert seconds is not None
    if seconds > MAX_COUNTDOWN:
        raise ConfigurationError(
            f"countdown must be at most {MAX_COUNTDOWN} s (10 years), got {value!r}"
        )
    return seconds


def check_expires_ahead(moment: datetime) -> None:
    """An absolute ``expires`` must still be ahead when a message is built, not only when
    it was given (``with_options``): past, its TTL would be 0, and RabbitMQ would drop the
    message unseen while the caller waited for a result until its timeout."""
    left = (moment - datetime.now(UTC)).total_seconds()
    if left <= 0:
        raise ConfigurationError(f"expires is in the past: {moment.isoformat()}")
    if left < MIN_EXPIRES:
        raise ConfigurationError(f"expires must be at least 1 ms ahead: {moment.isoformat()}")


def _expires(value: object) -> float | datetime:
    if isinstance(value, datetime):
        moment = check_moment("expires", value)
        check_expires_ahead(moment)
        left = (moment - datetime.now(UTC)).total_seconds()
        if left > MAX_EXPIRES:
            raise ConfigurationError(
                f"expires must be at most {MAX_EXPIRES:g} s (49.7 days) ahead, RabbitMQ's "
                f"longest message TTL; got {moment.isoformat()}"
            )
        return moment
    seconds = to_seconds(value, what="expires")  # type: ignore[arg-type]
    assert seconds is not None
    if seconds > MAX_EXPIRES:
        raise ConfigurationError(
            f"expires must be at most {MAX_EXPIRES:g} s (49.7 days), RabbitMQ's longest "
            f"message TTL; got {value!r}"
        )
    if seconds < MIN_EXPIRES:
        raise ConfigurationError(
            f"expires must be at least 1 ms (RabbitMQ counts a TTL in whole milliseconds), "
            f"got {value!r}"
        )
    return seconds


def _priority(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
        raise ConfigurationError(f"priority must be an integer from 0 to 9, got {value!r}")
    return value


def _task_id(value: object) -> str:
    # Bytes, not characters: 200 'é' are 400 bytes, over AMQP's correlation_id.
    fits = isinstance(value, str) and value.isprintable()
    if fits:
        try:
            fits = 0 < len(cast(str, value).encode("utf-8")) <= TASK_ID_BYTES
        except UnicodeEncodeError:  # a lone surrogate (not printable, but be sure)
            fits = False
    if not fits:
        raise ConfigurationError(
            f"task_id must be 1 to {TASK_ID_BYTES} bytes of printable UTF-8, got {value!r:.80}"
        )
    return cast(str, value)


def check_headers(value: object) -> dict[str, Any]:
    """Custom headers: names a worker accepts and values JSON carries, bounded in size."""
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"headers must be a mapping, got {type(value).__name__}")
    taken = _protocol_headers()
    for name in value:
        if not isinstance(name, str) or not name or not name.isprintable():
            raise ConfigurationError(
                f"header names must be non-empty printable strings, got {name!r:.80}"
            )
        if len(name.encode("utf-8", "surrogatepass")) > AMQP_SHORTSTR_BYTES:
            raise ConfigurationError(f"header name {name[:40]!r}... is over 255 bytes")
        if name in taken or name.lower().startswith("x-celerybridge-"):
            raise ConfigurationError(
                f"header {name!r} is reserved: Celery's protocol, the worker's request or "
                "celerybridge set it"
            )
    try:
        encoded = json.dumps(dict(value), allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConfigurationError(f"headers must hold JSON values only: {exc}") from None
    if len(encoded.encode("utf-8", "surrogatepass")) > MAX_HEADER_BYTES:
        raise ConfigurationError(f"headers must be at most {MAX_HEADER_BYTES} bytes as JSON")
    if _depth(json.loads(encoded)) > MAX_HEADER_DEPTH:
        raise ConfigurationError(f"headers must nest at most {MAX_HEADER_DEPTH} levels")
    return json.loads(encoded)  # type: ignore[no-any-return]


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _retry_policy(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"retry_policy must be a mapping, got {type(value).__name__}")
    unknown = set(value) - RETRY_POLICY_KEYS
    if unknown:
        raise ConfigurationError(
            f"retry_policy: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
            f"known: {', '.join(sorted(RETRY_POLICY_KEYS))}"
        )
    for key, number in value.items():
        if key == "max_retries" and number is None:
            continue
        if (
            isinstance(number, bool)
            or not isinstance(number, int | float)
            or not math.isfinite(number)
            or number < 0
        ):
            raise ConfigurationError(
                f"retry_policy[{key!r}] must be a finite number >= 0, got {number!r}"
            )
    return dict(value)


def _signatures(what: str, value: object) -> tuple[Signature[Any], ...]:
    from celery.canvas import Signature

    items = list(value) if isinstance(value, list | tuple) else [value]
    for item in items:
        if not isinstance(item, Signature):
            raise ConfigurationError(
                f"{what} must be a signature or a list of them (stub.s(...), stub.si(...)), "
                f"got {type(item).__name__}"
            )
    from ._canvas import check_callback

    return tuple(check_callback(what, cast("Signature[Any]", item)) for item in items)
