"""Settings, read from ``CELERYBRIDGE_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    PositiveFloat,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ._constants import (
    AMQP_SHORTSTR_BYTES,
    DEFAULT_BROKER_URL,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_PUBLISH_TIMEOUT,
    DEFAULT_RESULT_TIMEOUT,
    DEFAULT_SIGNING_MAX_AGE,
    ENV_PREFIX,
    FILESYSTEM_POLLING_INTERVAL,
    MAX_PRIORITY,
    MAX_PRIORITY_ARGUMENT,
    QUEUE_TYPE_ARGUMENT,
    QUEUE_TYPE_QUORUM,
    QUEUE_TYPES,
    SIGNING_KEY_MIN_LENGTH,
)
from ._exceptions import ConfigurationError

# Schemes we can publish to (kombu transports) and await results from: every result
# backend Celery knows by URL (celery/app/backends.py BACKEND_ALIASES), see
# Bridge._result_source for which source awaits which.
BROKER_SCHEMES = frozenset(
    {"amqp", "amqps", "pyamqp", "redis", "rediss", "sentinel", "memory", "filesystem"}
)
RESULT_SCHEMES = frozenset(
    {
        "redis", "rediss", "sentinel", "file", "rpc", "mongodb", "elasticsearch",
        "cassandra", "couchbase", "couchdb", "cosmosdbsql", "consul", "dynamodb",
        "azureblockblob", "arangodb", "s3", "gs",
    }
)  # fmt: skip
# Result backends named "<backend>+<url>": db+postgresql://..., cache+memcached://...
RESULT_PREFIXES = frozenset({"db", "cache"})
# Schemes with a native asyncio client (the fast path): brokers (_transports/redis.py,
# _transports/amqp.py) and result backends (_transports/redis_results.py).
FAST_PATH_BROKER_SCHEMES = frozenset({"redis", "rediss", "amqp", "amqps", "pyamqp"})
FAST_PATH_RESULT_SCHEMES = frozenset({"redis", "rediss"})
# Result backends read as plain key/value pairs (_transports/kombu.py); the others are
# read through Celery's own backend classes (_transports/celery_results.py).
KEY_VALUE_RESULT_SCHEMES = frozenset({"redis", "rediss", "file"})
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
_AWAITABLE_INSTEAD = "use redis://, rpc:// (with RabbitMQ) or db+postgresql:// instead"
# Schemes whose URL names a folder (or nothing), not a server: no credentials to read.
_FOLDER_SCHEMES = frozenset({"filesystem", "file", "memory"})
# RFC 3986: a letter, then letters, digits, "+", "-" and ".".
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_URL_SHAPE = "scheme://[user:password@]host[:port][/path]"
_NOT_SHOWN = "(the value is not shown: it may hold a password)"
# Query parameters that may carry a secret (redis-py reads ``?password=``).
_SECRET_QUERY = re.compile(r"(?i)([?&][^=&#]*(?:pass|secret|token|key|auth|cred)[^=&#]*=)[^&#]*")
# What comes before the user info: a scheme, its colon and slashes.
_HEAD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/*")
# A ";" that starts another URL of a failover list.
_ALTERNATES = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)")


class BridgeSettings(BaseSettings):
    """How a :class:`~celerybridge.Bridge` reaches Celery.

    Every field can come from the environment: ``CELERYBRIDGE_BROKER_URL``,
    ``CELERYBRIDGE_RESULT_BACKEND``, ``CELERYBRIDGE_PUBLISH_TIMEOUT``,
    ``CELERYBRIDGE_RESULT_TIMEOUT``, ``CELERYBRIDGE_FAST_PATH``,
    ``CELERYBRIDGE_SIGNING_KEY``, ``CELERYBRIDGE_SIGNING_VERIFY_KEYS``,
    ``CELERYBRIDGE_SIGNING_MAX_AGE``, ``CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS``,
    ``CELERYBRIDGE_RESULT_BACKEND_TRANSPORT_OPTIONS``, ``CELERYBRIDGE_QUEUES``,
    ``CELERYBRIDGE_DEFAULT_QUEUE_TYPE``, ``CELERYBRIDGE_MAX_MESSAGE_BYTES``,
    ``CELERYBRIDGE_MAX_DELIVERIES``, ``CELERYBRIDGE_SERVICE``. Values are checked
    when the settings are built. Credentials in URLs are masked in ``repr`` and a URL
    is never quoted in an error message (a malformed one could show its password where
    a parser expects a host or a port); the signing key never appears in ``repr`` or
    in an error message.
    """

    # hide_input_in_errors: a rejected value (a short signing key, a URL with its
    # password) must not reach the ValidationError chained to our ConfigurationError.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", hide_input_in_errors=True
    )

    broker_url: str = Field(default=DEFAULT_BROKER_URL, repr=False)
    """The Celery broker, e.g. ``redis://127.0.0.1:6379/0`` or ``amqp://guest:guest@host//``."""

    result_backend: str | None = Field(default=None, repr=False)
    """Where workers store results, e.g. ``redis://127.0.0.1:6379/1``, ``rpc://`` or
    ``db+postgresql://user:password@host/db``; ``None`` disables results."""

    # After both URLs: their checks see the URLs (a sentinel:// one needs a master_name).
    broker_transport_options: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, repr=False, validate_default=True
    )
    """kombu transport options for the broker (Celery's ``broker_transport_options``), for
    the bridge and for workers built with :func:`~celerybridge.celery_app`. In the
    environment a JSON object, e.g.
    ``CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS='{"master_name": "mymaster"}'``; a
    ``sentinel://`` broker needs ``master_name``."""

    result_backend_transport_options: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict, repr=False, validate_default=True
    )
    """Options for the result backend's connection (Celery's
    ``result_backend_transport_options``), a JSON object like
    ``broker_transport_options``; a ``sentinel://`` result backend needs ``master_name``."""

    publish_timeout: PositiveFloat = DEFAULT_PUBLISH_TIMEOUT
    """Seconds ``delegate`` may take to have the broker accept a message."""

    result_timeout: PositiveFloat = DEFAULT_RESULT_TIMEOUT
    """Default seconds ``handle.result()`` waits when no timeout is given."""

    fast_path: bool = True
    """Use the native asyncio clients where there is one (Redis and RabbitMQ brokers,
    Redis result backend, under asyncio); ``False`` always uses Celery's own client
    (kombu) in threads."""

    signing_key: SecretStr | None = None
    """Sign every published message (HMAC-SHA256 over its exact body and every header that
    says what runs, when and as whom), and, on a worker built with
    :func:`~celerybridge.celery_app`, refuse messages not signed with it (or with one of
    ``signing_verify_keys``). At least 32 characters; ``None`` (the default) signs
    nothing and accepts everything. See docs/security.md."""

    signing_verify_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    """More keys a worker accepts signatures of, never signs with: the old key while keys
    are rotated. In the environment a JSON list of strings,
    ``CELERYBRIDGE_SIGNING_VERIFY_KEYS='["old-key..."]'`` (empty: none). Each has at least
    32 characters; they need a ``signing_key``."""

    signing_max_age: PositiveFloat = DEFAULT_SIGNING_MAX_AGE
    """Seconds after signing a worker with a key still accepts a message."""

    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024)
    """The largest message body a worker built with :func:`~celerybridge.celery_app`
    reads (bytes, checked before anything is parsed); larger ones are dead-lettered."""

    max_deliveries: int = Field(default=DEFAULT_MAX_DELIVERIES, ge=1)
    """On a Redis broker, how many times a worker built with
    :func:`~celerybridge.celery_app` may be handed one message (first delivery and
    redeliveries after a crash, a lost connection or a killed pool process): a message
    taken more often goes to ``<queue>.dead`` with that reason instead of running again,
    so one task that kills its worker cannot do so forever."""

    service: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """This service's name, sent with every message (``x-celerybridge-service``, covered
    by the signature when signing is on); task bodies read it with
    :func:`~celerybridge.caller_service`, e.g. to enforce per-service policies."""

    queues: Annotated[dict[str, dict[str, Any]], NoDecode] = Field(default_factory=dict)
    """How to declare queues on RabbitMQ that do not exist yet when a message is published
    to them: queue name -> AMQP queue arguments, e.g. ``{"pusher": {"x-queue-type":
    "quorum"}}``; in the environment the same as JSON. A queue that exists is published
    to as it is, whatever its arguments; workers built with
    :func:`~celerybridge.celery_app` declare these queues with the same arguments.
    Meaningless on Redis (accepted, ignored). See docs/delegation.md."""

    default_queue_type: Literal["classic", "quorum"] = "classic"
    """The type of a missing queue that ``queues`` does not name (Celery's
    ``task_create_missing_queue_type``); ``Bridge(celery=app)`` uses the app's instead."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from exc

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, url: str) -> str:
        problem = url_problem(url, BROKER_SCHEMES)
        if problem is not None:
            raise ValueError(problem)
        return url

    @field_validator("broker_url")
    @classmethod
    def _check_filesystem_folder(cls, url: str) -> str:
        if scheme_of(url) == "filesystem" and not url.split("://", 1)[1].startswith("/"):
            raise ValueError(
                "the filesystem transport needs an absolute folder, e.g. filesystem:///var/spool/cb"
            )
        return url

    @field_validator("result_backend")
    @classmethod
    def _check_backend(cls, url: str | None) -> str | None:
        problem = None if url is None else url_problem(url, RESULT_SCHEMES, RESULT_PREFIXES)
        if problem is not None:
            raise ValueError(problem)
        return url

    @field_validator("broker_transport_options", "result_backend_transport_options", mode="before")
    @classmethod
    def _parse_transport_options(cls, options: Any) -> Any:
        if isinstance(options, str):
            try:
                options = json.loads(options) if options.strip() else {}
            except (ValueError, RecursionError):  # RecursionError: nested too deeply
                options = None
        if not isinstance(options, dict):
            # Not even the part that parsed: it may hold a password (sentinel_kwargs).
            raise ValueError(
                """must be a JSON object, e.g. '{"master_name": "mymaster"}' """
                "(the value is not shown: it may hold a password)"
            )
        return options

    @field_validator("broker_transport_options", "result_backend_transport_options")
    @classmethod
    def _check_master_name(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        url_field = (
            "broker_url" if info.field_name == "broker_transport_options" else "result_backend"
        )
        url = info.data.get(url_field)
        if url is None or scheme_of(url) != "sentinel":
            return options
        master = options.get("master_name")
        if not isinstance(master, str) or not master:
            setting = f"{ENV_PREFIX}{str(info.field_name).upper()}"
            raise ValueError(
                f"a sentinel:// {'broker' if url_field == 'broker_url' else 'result backend'} "
                f"needs the name of the Redis master its Sentinels watch: set {setting}="
                """'{"master_name": "mymaster"}' (the name in the Sentinels' configuration)"""
            )
        return options

    @field_validator("signing_key")
    @classmethod
    def _check_signing_key(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and len(key.get_secret_value()) < SIGNING_KEY_MIN_LENGTH:
            raise ValueError(
                f"a signing key needs at least {SIGNING_KEY_MIN_LENGTH} characters; "
                'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        return key

    @field_validator("signing_verify_keys", mode="before")
    @classmethod
    def _parse_verify_keys(cls, keys: Any) -> Any:
        if not isinstance(keys, str):
            return keys
        if not keys.strip():
            return ()
        try:
            parsed = json.loads(keys)
        except ValueError:
            parsed = None
        if not isinstance(parsed, list) or not all(isinstance(k, str) for k in parsed):
            # Not even the part that parsed: it may be a key.
            raise ValueError(
                """must be a JSON list of keys, e.g. '["first-key...", "second-key..."]' """
                "(the value is not shown)"
            )
        return parsed

    @field_validator("signing_verify_keys")
    @classmethod
    def _check_verify_keys(
        cls, keys: tuple[SecretStr, ...], info: ValidationInfo
    ) -> tuple[SecretStr, ...]:
        short = [
            i for i, k in enumerate(keys) if len(k.get_secret_value()) < SIGNING_KEY_MIN_LENGTH
        ]
        if short:
            raise ValueError(
                f"each key needs at least {SIGNING_KEY_MIN_LENGTH} characters; key number "
                f"{short[0] + 1} of {len(keys)} has fewer"
            )
        # A signing_key that failed its own check is absent: that error is enough.
        if keys and "signing_key" in info.data and info.data["signing_key"] is None:
            raise ValueError(
                "keys to verify with need a signing key (CELERYBRIDGE_SIGNING_KEY): a worker "
                "signs its retries, and without one it would check nothing"
            )
        return keys

    @field_validator("queues", mode="before")
    @classmethod
    def _parse_queues(cls, queues: Any) -> Any:
        if isinstance(queues, str):
            if not queues.strip():
                return {}
            try:
                queues = json.loads(queues)
            except (ValueError, RecursionError):
                raise ValueError(f"is not JSON; {_QUEUES_SHAPE}") from None
        return checked_queues(queues)

    def __repr_args__(self) -> Any:
        yield "broker_url", mask_url(self.broker_url)
        yield "result_backend", (mask_url(self.result_backend) if self.result_backend else None)
        yield from super().__repr_args__()


_QUEUES_SHAPE = (
    "expected a JSON object mapping queue names to their AMQP arguments, "
    """e.g. '{"pusher": {"x-queue-type": "quorum"}}'"""
)
# RabbitMQ's queue arguments whose value is a number, and the smallest value it takes.
_INT_ARGUMENTS = {
    MAX_PRIORITY_ARGUMENT: 1,
    "x-message-ttl": 0,
    "x-expires": 1,
    "x-max-length": 0,
    "x-max-length-bytes": 0,
    "x-delivery-limit": 0,
    "x-quorum-initial-group-size": 1,
}
# ... whose value is one of a few words; None: any string.
_STR_ARGUMENTS: dict[str, tuple[str, ...] | None] = {
    QUEUE_TYPE_ARGUMENT: QUEUE_TYPES,
    "x-dead-letter-exchange": None,
    "x-dead-letter-routing-key": None,
    "x-overflow": ("drop-head", "reject-publish", "reject-publish-dlx"),
    "x-queue-mode": ("default", "lazy"),
    "x-dead-letter-strategy": ("at-most-once", "at-least-once"),
    "x-queue-leader-locator": ("client-local", "balanced", "random", "least-leaders"),
    # Any other value makes RabbitMQ 3.10 close the whole connection (541 INTERNAL_ERROR).
    "x-queue-master-locator": ("min-masters", "client-local", "random"),
}
_INT64 = 2**63  # an AMQP table holds signed 64-bit integers at most


def checked_queues(queues: Any) -> dict[str, dict[str, Any]]:
    """``queues`` (:attr:`BridgeSettings.queues`) as a new dict, or ``ValueError`` saying
    what is wrong with it, naming the queue and the argument."""
    if not isinstance(queues, Mapping):
        raise ValueError(_QUEUES_SHAPE)
    checked: dict[str, dict[str, Any]] = {}
    for name, arguments in queues.items():
        problem = _name_problem(name, "queue names")
        if problem is None and name.startswith("amq."):
            problem = f"queue names starting with 'amq.' are reserved by RabbitMQ (got {name!r})"
        if problem is not None:
            raise ValueError(problem)
        if not isinstance(arguments, Mapping):
            raise ValueError(
                f"queue {name!r}: its arguments must be a JSON object, "
                f'e.g. {{"x-queue-type": "quorum"}} (got {type(arguments).__name__})'
            )
        checked[name] = {}
        for key, value in arguments.items():
            problem = _name_problem(key, "argument names") or _argument_problem(key, value)
            if problem is not None:
                raise ValueError(f"queue {name!r}: {problem}")
            checked[name][key] = value
        if (
            checked[name].get(QUEUE_TYPE_ARGUMENT) == QUEUE_TYPE_QUORUM
            and MAX_PRIORITY_ARGUMENT in checked[name]
        ):
            raise ValueError(
                f"queue {name!r}: quorum queues do not support priorities; drop "
                f"{MAX_PRIORITY_ARGUMENT} or make it a classic queue"
            )
    return checked


def _shown(value: object) -> str:
    """``value`` quoted for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _name_problem(name: object, what: str) -> str | None:
    if not isinstance(name, str):
        return f"{what} must be strings (got {type(name).__name__})"
    if not 1 <= _utf8_size(name) <= AMQP_SHORTSTR_BYTES:
        return f"{what} must be 1 to {AMQP_SHORTSTR_BYTES} bytes of UTF-8 (got {_shown(name)})"
    return None


def _argument_problem(key: str, value: object) -> str | None:
    """Why RabbitMQ would refuse ``key: value`` as a queue argument, or ``None``."""
    if not key.startswith("x-"):
        return f"argument {_shown(key)} is not a queue argument (they start with 'x-')"
    if key in _INT_ARGUMENTS:
        low = _INT_ARGUMENTS[key]
        high = MAX_PRIORITY if key == MAX_PRIORITY_ARGUMENT else _INT64 - 1
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"{key} must be an integer from {low} to {high} (got {_shown(value)})"
        return None
    if key in _STR_ARGUMENTS:
        allowed = _STR_ARGUMENTS[key]
        if allowed is not None and (not isinstance(value, str) or value not in allowed):
            expected = " or ".join(repr(a) for a in allowed)
            return f"{key} must be {expected} (got {_shown(value)})"
        if allowed is None and not (
            isinstance(value, str) and 0 <= _utf8_size(value) <= AMQP_SHORTSTR_BYTES
        ):
            return (
                f"{key} must be a name of at most {AMQP_SHORTSTR_BYTES} bytes of UTF-8 "
                f"(got {_shown(value)})"
            )
        return None
    if isinstance(value, bool) or (isinstance(value, int) and -_INT64 <= value < _INT64):
        return None
    if isinstance(value, str) and _utf8_size(value) >= 0:
        return None
    return f"{key} must be a string, an integer or a boolean (got {_shown(value)})"


def _utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8; -1 if it cannot be encoded (a lone surrogate)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return -1


def broker_transport_options(url: str) -> dict[str, Any]:
    """The kombu transport options a broker URL implies, for clients and workers alike.

    ``filesystem:///some/dir`` is kombu's filesystem transport with every process
    exchanging messages through files in ``/some/dir`` (created if missing), polled
    every 0.1 s: an embedded broker for demos, no server needed. It is at most once
    (kombu deletes a message file when it reads it, before any acknowledgement).
    """
    if scheme_of(url) != "filesystem":
        return {}
    folder = Path(url.split("://", 1)[1])
    try:
        (folder / "control").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot use {folder} for the filesystem broker: {exc}") from exc
    return {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder / "control"),
        "polling_interval": FILESYSTEM_POLLING_INTERVAL,
    }


def result_backend_problem(settings: BridgeSettings) -> str | None:
    """Why the bridge could never await a result on the settings' backend, or ``None``.

    Checked when a :class:`~celerybridge.Bridge` is built (a worker may use such a
    backend, e.g. in eager tests); the scheme alone tells, nothing is imported.
    """
    url = settings.result_backend
    if url is None:
        return None
    scheme = scheme_of(url)
    if scheme == "cache+memory":
        return (
            "result backend cache+memory:// keeps results in the memory of each process, so "
            f"a worker's results never reach this bridge; {_AWAITABLE_INSTEAD}"
        )
    if scheme == "db+sqlite" and url.split("://", 1)[1] in ("", "/", "/:memory:"):
        return (
            "result backend db+sqlite:// without a file is a database in the memory of each "
            f"process, so a worker's results never reach this bridge; {_AWAITABLE_INSTEAD}"
        )
    if scheme == "rpc" and scheme_of(settings.broker_url) == "memory":
        return (
            "result backend rpc:// sends results through the broker, and a memory:// broker "
            "lives in one process: a worker's results never reach this bridge; "
            + _AWAITABLE_INSTEAD
        )
    return None


def client_transport_options(settings: BridgeSettings) -> dict[str, Any]:
    """The broker's kombu transport options: what its URL implies
    (:func:`broker_transport_options`), then ``CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS``."""
    return {**broker_transport_options(settings.broker_url), **settings.broker_transport_options}


def kombu_url(url: str) -> str:
    """The broker URL as handed to kombu and Celery.

    ``filesystem:///some/dir`` gets kombu's default host, ``filesystem://localhost/some/dir``:
    the host means nothing to the filesystem transport (its folders come from
    :func:`broker_transport_options`), but without one kombu logs "No hostname was
    supplied. Reverting to default 'localhost'" each time it connects. Other URLs are
    returned as they are.
    """
    if scheme_of(url) != "filesystem":
        return url
    return "filesystem://localhost" + url.split("://", 1)[1]


def scheme_of(url: str) -> str:
    """The scheme of a broker or backend URL (``redis``, ``amqp``...), or ``""``."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def url_problem(
    url: str, allowed: frozenset[str], prefixes: frozenset[str] = frozenset()
) -> str | None:
    """Why ``url`` is not a broker or backend URL with a scheme in ``allowed``, or ``None``.

    A scheme ``<prefix>+<anything>`` is allowed too for a prefix in ``prefixes`` (Celery's
    ``db+postgresql://``: SQLAlchemy's URL after the ``db+``).

    The answer never quotes ``url``, which may hold a password; it names a scheme only
    when it is one of ours. A URL that kombu or redis-py would read differently from
    what was meant (an unencoded ``#``, ``?``, ``/`` or ``@`` in a password turns part of
    it into the host, port or path, and their errors then quote it) is refused here.
    """
    scheme, sep, _ = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        named = url.partition(":")[0].lower()
        hint = (
            f" ({named + ':'!r} must be followed by '//')"
            if named in BROKER_SCHEMES | RESULT_SCHEMES
            else ""
        )
        return f"not a URL of the form {_URL_SHAPE}{hint} {_NOT_SHOWN}"
    prefix, plus, rest = scheme.lower().partition("+")
    if not (scheme.lower() in allowed or (plus and rest and prefix in prefixes)):
        supported = [*sorted(allowed), *(f"{p}+<url>" for p in sorted(prefixes))]
        return f"unsupported scheme {scheme.lower()!r}; supported: {', '.join(supported)}"
    if scheme.lower() in _FOLDER_SCHEMES:
        return None
    # kombu reads "a;b" as a failover list of URLs (Redis Sentinel, RabbitMQ).
    if not all(_reads_as_written(part) for part in url.split(";")):
        return (
            f"cannot be read as {_URL_SHAPE}: percent-encode '/', '?', '#', '@', '[', ']', "
            f"';' and '%' in the user name and password (e.g. '%40' for '@') {_NOT_SHOWN}"
        )
    return None


def _reads_as_written(url: str) -> bool:
    """Whether every ``@`` of ``url`` ends its user info and its port is a number.

    Never raises: parsers' errors quote the part they could not read, maybe a password.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # ValueError for a port that is not a number, or out of range
    except ValueError:
        return False
    return url.count("@") == parts.netloc.count("@")


def mask_url(url: str) -> str:
    """``url`` fit for a log line or a ``repr``: credentials become ``**``.

    Works on the text, so it never fails and masks malformed URLs too: everything
    between the scheme and the last ``@`` is a secret (``amqp://user:**@host//`` when
    a user name and a password read cleanly, ``redis:/**@host`` otherwise), and so are
    the values of query parameters named like a password, token or key. A failover
    list (``sentinel://...;sentinel://...``) is masked URL by URL.
    """
    return ";".join(_mask_one(part) for part in _ALTERNATES.split(url))


def _mask_one(url: str) -> str:
    head = _HEAD.match(url)
    start = head.end() if head else 0
    userinfo, at, rest = url[start:].rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        clean = head is not None and head.group().endswith("://") and bool(colon)
        masked = f"{user}:**" if clean and not any(c in user for c in "/?#[]") else "**"
        url = f"{url[:start]}{masked}@{rest}"
    return _SECRET_QUERY.sub(r"\1**", url)


def load_settings(settings: BridgeSettings | None = None, **overrides: Any) -> BridgeSettings:
    """Build settings from the environment plus ``overrides``, raising our own error."""
    if settings is not None and not overrides:
        return settings
    if settings is not None:
        return BridgeSettings(**{**settings.model_dump(), **overrides})
    return BridgeSettings(**overrides)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(p) for p in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{ENV_PREFIX}{field.upper()} ({field}): {message}")
    return "invalid celerybridge settings: " + "; ".join(parts)
