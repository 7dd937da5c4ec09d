"""The pusher worker's settings, from ``PUSHER_*`` variables (AWS settings: the AWS chain)."""

from __future__ import annotations

from pydantic import Field, PositiveFloat, PositiveInt, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .bindings import key_problem

MiB = 1024 * 1024


class PusherSettings(BaseSettings):
    """Settings of ``celery -A pusher worker``.

    Credentials, region and endpoint are not here: they come from the standard AWS
    chain (``AWS_ACCESS_KEY_ID``, ``AWS_REGION``, ``AWS_ENDPOINT_URL_S3``, profiles...).
    """

    model_config = SettingsConfigDict(env_prefix="PUSHER_", frozen=True)

    bucket: str = Field(min_length=3)
    """The bucket objects land in (``PUSHER_BUCKET``); must exist."""
    concurrency: PositiveInt = 128
    """Uploads in flight per worker process: coroutines on its one event loop, sharing one
    S3 client whose connection pool is as large. Each holds its content in memory."""
    content_type: str = "application/json"
    multipart_threshold: PositiveInt = 8 * MiB
    """Content of at least this many bytes is sent as a multipart upload."""
    part_size: int = Field(default=8 * MiB, ge=5 * MiB)
    """Multipart part size; S3 requires at least 5 MiB."""
    s3_max_attempts: PositiveInt = 5
    """Attempts per S3 call by botocore's ``standard`` retry mode (backoff with jitter)."""
    s3_connect_timeout: PositiveFloat = 10
    """Seconds to open a connection to S3 before botocore retries."""
    s3_read_timeout: PositiveFloat = 60
    """Seconds S3 may stay silent on an open request before botocore retries."""
    max_retries: int = Field(default=5, ge=0)
    """Task-level retries after botocore gives up on a transient error."""
    task_time_limit: PositiveFloat = 300
    """Hard limit for one upload task, in seconds."""
    visibility_timeout: PositiveFloat = 360
    """Redis only: seconds before the task of a worker that died is delivered again
    (within about 1.25 x this). celerybridge's transport refreshes the records of running
    tasks, so a task longer than this is not delivered twice; with kombu's own transport
    (``broker_transport="redis"``) it must exceed :attr:`task_time_limit`."""
    allowed_prefixes: str = ""
    """Comma-separated key prefixes the pusher accepts (empty: any key).

    A prefix is a folder: whole ``/``-separated segments, with or without a final
    ``/`` (``items`` and ``items/`` both admit ``items/1.json``, and neither admits
    ``items2/1.json`` nor the key ``items`` itself). A prefix follows the rules of keys
    (:func:`pusher.bindings.key_problem`) or the pusher does not start."""

    service_prefixes: dict[str, tuple[str, ...]] = {}
    """Per calling service, the key prefixes it may write under, as JSON:
    ``PUSHER_SERVICE_PREFIXES='{"svc-a": ["items/a/"], "svc-b": ["items/b/"]}'``. When
    set, calls from services not listed (or that do not say who they are,
    ``CELERYBRIDGE_SERVICE``) are refused. Sign messages to make the names trustworthy.
    Prefixes are folders, as in :attr:`allowed_prefixes`."""

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.allowed_prefixes.split(",") if p.strip())

    @field_validator("allowed_prefixes")
    @classmethod
    def _check_allowed(cls, value: str) -> str:
        for prefix in (p.strip() for p in value.split(",")):
            if prefix:
                _check_prefix(prefix)
        return value

    @field_validator("service_prefixes")
    @classmethod
    def _check_services(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for prefixes in value.values():
            for prefix in prefixes:
                _check_prefix(prefix)
        return value

    def visibility_problem(self) -> str | None:
        """Why kombu's own Redis transport would hand a running task to a second worker
        (with acks_late it redelivers a task unacknowledged for the visibility timeout),
        or ``None``. celerybridge's transport refreshes running tasks' records: there it
        is only worth a warning."""
        if self.visibility_timeout > self.task_time_limit:
            return None
        return (
            f"PUSHER_VISIBILITY_TIMEOUT ({self.visibility_timeout:g} s) does not exceed "
            f"PUSHER_TASK_TIME_LIMIT ({self.task_time_limit:g} s)"
        )


def _check_prefix(prefix: str) -> None:
    problem = key_problem(prefix.removesuffix("/"))
    if problem is not None:
        problem = problem.replace("an S3 key", "a prefix", 1)
        raise ValueError(f"prefix {prefix!r}: {problem}")
