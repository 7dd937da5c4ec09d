"""Replay refusal: a signed message runs once while its signature is valid.

A signature stays valid for ``CELERYBRIDGE_SIGNING_MAX_AGE`` seconds, so a captured
message could be sent again within that window and run again. The intake records each
signed message it lets through under its signature (:data:`SEEN_KEY_PREFIX` + the
signature, ``SET NX`` with a time to live of the window) and refuses one whose record
exists, with one exception: a broker redelivery (the worker died or lost its connection
while the task ran, ``acks_late``) of a message that never finished. A message is
recorded as finished (``done``) when its task has run, whatever the outcome, so a
replay of a finished task is refused even when it claims to be a redelivery.

Where the record lives, shared by every worker of the fleet: the Redis result backend,
else a Redis broker. With neither (RabbitMQ and no Redis), each worker process keeps its
own record, and says so at start.

The redelivered flag is the broker's word, not proof: on Redis kombu writes it into the
message, and on RabbitMQ a client allowed to consume from the queue can take a copy and
reject it so that the broker marks it. Either can pass a replay off as a redelivery while
the first copy still runs (docs/security.md says so); once it has run, nothing passes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from celery import Celery, signals

from .._config import scheme_of
from .._constants import SEEN_KEY_PREFIX, SIGNATURE_HEADER, SIGNING_CLOCK_SKEW
from .._signing import signer_of

log = logging.getLogger("celerybridge.intake")

RUNNING = "running"
DONE = "done"

REPLAYED = (
    "replayed: a message with this signature was already taken by a worker "
    "(a signed message runs once while its signature is valid)"
)

_REDIS_SCHEMES = frozenset({"redis", "rediss"})


class SeenStore(Protocol):
    """Where the signatures of messages already taken are recorded."""

    def add(self, key: str, ttl: float) -> bool:
        """Record ``key`` as running for ``ttl`` seconds; ``False`` if it was there."""

    def state(self, key: str) -> str | None:
        """``running``, ``done``, or ``None`` once the record has expired."""

    def finish(self, key: str) -> None:
        """Mark ``key`` done, keeping its time to live."""


class RedisSeen:
    """The record in Redis: one key per signature, expiring with the window."""

    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)

    def add(self, key: str, ttl: float) -> bool:
        return bool(self._client.set(key, RUNNING, nx=True, px=max(1, int(ttl * 1000))))

    def state(self, key: str) -> str | None:
        value: bytes | None = self._client.get(key)  # type: ignore[assignment]
        return None if value is None else value.decode()

    def finish(self, key: str) -> None:
        self._client.set(key, DONE, xx=True, keepttl=True)


class MemorySeen:
    """The record in this process only (no Redis to share it through)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[str, float]] = {}

    def add(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen = {k: v for k, v in self._seen.items() if v[1] > now}
            current = self._seen.get(key)
            if current is not None and current[1] > now:
                return False
            self._seen[key] = (RUNNING, now + ttl)
            return True

    def state(self, key: str) -> str | None:
        with self._lock:
            current = self._seen.get(key)
        return current[0] if current is not None and current[1] > time.monotonic() else None

    def finish(self, key: str) -> None:
        with self._lock:
            if (current := self._seen.get(key)) is not None:
                self._seen[key] = (DONE, current[1])


def store_for(app: Celery) -> SeenStore:
    """The shared record for ``app``'s workers: its Redis result backend or broker."""
    for url in (app.conf.result_backend, app.conf.broker_url):
        if isinstance(url, str) and scheme_of(url) in _REDIS_SCHEMES:
            return RedisSeen(url)
    log.warning(
        "replay refusal is kept per worker process: no Redis result backend or broker "
        "to share it through"
    )
    return MemorySeen()


class ReplayGuard:
    """Lets a signed message through once within ``window`` seconds (plus clock skew)."""

    def __init__(self, store: SeenStore, window: float) -> None:
        self.store = store
        self.ttl = window + SIGNING_CLOCK_SKEW

    def refusal(self, signature: str, redelivered: bool) -> str | None:
        """``REPLAYED`` when this signature was already taken, else ``None`` (recorded)."""
        key = SEEN_KEY_PREFIX + signature
        if self.store.add(key, self.ttl):
            return None
        if redelivered and self.store.state(key) != DONE:
            return None
        return REPLAYED

    def finish(self, signature: str) -> None:
        self.store.finish(SEEN_KEY_PREFIX + signature)


_guards: dict[int, ReplayGuard] = {}
_guards_lock = threading.Lock()


def guard_for(app: Celery, window: float) -> ReplayGuard:
    """One guard per app and process (a pool child makes its own connection)."""
    key = id(app)
    with _guards_lock:
        guard = _guards.get(key)
        if guard is None:
            guard = _guards[key] = ReplayGuard(store_for(app), window)
        return guard


@signals.task_postrun.connect(weak=False)
def _finished(sender: Any = None, task: Any = None, **_: Any) -> None:
    """A signed task that ran (to any end) is done: a later copy is a replay."""
    task = task or sender
    # Read the request's own attributes: a header may shadow a method such as ``get``.
    signature = getattr(getattr(task, "request", None), "__dict__", {}).get(SIGNATURE_HEADER)
    app = getattr(task, "app", None)
    signer = signer_of(app) if isinstance(app, Celery) else None
    if signer is not None and isinstance(app, Celery) and isinstance(signature, str):
        try:
            guard_for(app, signer.max_age).finish(signature)
        except Exception:  # the record expires anyway; a failed mark must not fail the task
            log.exception("could not mark a signed message done")
