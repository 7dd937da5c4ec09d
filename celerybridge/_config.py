"""Settings, read from ``CELERYBRIDGE_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kombu.utils.url import maybe_sanitize_url
from pydantic import Field, PositiveFloat, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._constants import (
    DEFAULT_BROKER_URL,
    DEFAULT_PUBLISH_TIMEOUT,
    DEFAULT_RESULT_TIMEOUT,
    DEFAULT_SIGNING_MAX_AGE,
    ENV_PREFIX,
    FILESYSTEM_POLLING_INTERVAL,
    SIGNING_KEY_MIN_LENGTH,
)
from ._exceptions import ConfigurationError

# Schemes we can publish to (kombu transports) and await results from (Celery backends
# whose values we can read as plain key/value pairs, see _transports/kombu.py).
BROKER_SCHEMES = frozenset(
    {"amqp", "amqps", "pyamqp", "redis", "rediss", "sentinel", "memory", "filesystem"}
)
RESULT_SCHEMES = frozenset({"redis", "rediss", "sentinel", "file"})
# Schemes with a native asyncio client (the fast path): brokers (_transports/redis.py,
# _transports/amqp.py) and result backends (_transports/redis_results.py).
FAST_PATH_BROKER_SCHEMES = frozenset({"redis", "rediss", "amqp", "amqps", "pyamqp"})
FAST_PATH_RESULT_SCHEMES = frozenset({"redis", "rediss"})


class BridgeSettings(BaseSettings):
    """How a :class:`~celerybridge.Bridge` reaches Celery.

    Every field can come from the environment: ``CELERYBRIDGE_BROKER_URL``,
    ``CELERYBRIDGE_RESULT_BACKEND``, ``CELERYBRIDGE_PUBLISH_TIMEOUT``,
    ``CELERYBRIDGE_RESULT_TIMEOUT``, ``CELERYBRIDGE_FAST_PATH``,
    ``CELERYBRIDGE_SIGNING_KEY``, ``CELERYBRIDGE_SIGNING_MAX_AGE``. Values are checked
    when the settings are built. URLs are masked in ``repr``; the signing key never
    appears in ``repr`` or in an error message.
    """

    # hide_input_in_errors: a rejected value (a short signing key, a URL with its
    # password) must not reach the ValidationError chained to our ConfigurationError.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", hide_input_in_errors=True
    )

    broker_url: str = Field(default=DEFAULT_BROKER_URL, repr=False)
    """The Celery broker, e.g. ``redis://127.0.0.1:6379/0`` or ``amqp://guest:guest@host//``."""

    result_backend: str | None = Field(default=None, repr=False)
    """Where workers store results, e.g. ``redis://127.0.0.1:6379/1``; ``None`` disables results."""

    publish_timeout: PositiveFloat = DEFAULT_PUBLISH_TIMEOUT
    """Seconds ``delegate`` may take to have the broker accept a message."""

    result_timeout: PositiveFloat = DEFAULT_RESULT_TIMEOUT
    """Default seconds ``handle.result()`` waits when no timeout is given."""

    fast_path: bool = True
    """Use the native asyncio clients where there is one (Redis and RabbitMQ brokers,
    Redis result backend, under asyncio); ``False`` always uses Celery's own client
    (kombu) in threads."""

    signing_key: SecretStr | None = None
    """Sign every published message (HMAC-SHA256 over task name, id, arguments and time),
    and, on a worker built with :func:`~celerybridge.celery_app`, refuse messages not
    signed with it. At least 32 characters; ``None`` (the default) signs nothing and
    accepts everything. See docs/security.md."""

    signing_max_age: PositiveFloat = DEFAULT_SIGNING_MAX_AGE
    """Seconds after signing a worker with a key still accepts a message."""

    service: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """This service's name, sent with every message (``x-celerybridge-service``, covered
    by the signature when signing is on); task bodies read it with
    :func:`~celerybridge.caller_service`, e.g. to enforce per-service policies."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from exc

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, url: str) -> str:
        _check_scheme(url, BROKER_SCHEMES, "broker_url")
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
        if url is not None:
            _check_scheme(url, RESULT_SCHEMES, "result_backend")
        return url

    @field_validator("signing_key")
    @classmethod
    def _check_signing_key(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and len(key.get_secret_value()) < SIGNING_KEY_MIN_LENGTH:
            raise ValueError(
                f"a signing key needs at least {SIGNING_KEY_MIN_LENGTH} characters; "
                'make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        return key

    def __repr_args__(self) -> Any:
        yield "broker_url", maybe_sanitize_url(self.broker_url)
        yield (
            "result_backend",
            (maybe_sanitize_url(self.result_backend) if self.result_backend else None),
        )
        yield from super().__repr_args__()


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


def scheme_of(url: str) -> str:
    """The scheme of a broker or backend URL (``redis``, ``amqp``...), or ``""``."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _check_scheme(url: str, allowed: frozenset[str], field: str) -> None:
    scheme = scheme_of(url)
    if scheme not in allowed:
        known = ", ".join(sorted(allowed))
        raise ValueError(f"unsupported scheme {scheme or url!r}; supported: {known}")


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
