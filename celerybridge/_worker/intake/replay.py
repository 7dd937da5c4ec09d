"""Replay refusal: a signed message runs once while its signature is valid.

A signature stays valid for ``CELERYBRIDGE_SIGNING_MAX_AGE`` seconds, so a captured
message could be sent again within that window and run again. The intake records each
signed message it lets through under its signature (:data:`SEEN_KEY_PREFIX` + the
signature, ``SET NX`` with a time to live of the window) and refuses one whose record
exists, with one exception: a broker redelivery (the worker died or lost its connection
while the task ran, ``acks_late``) of a task that has not finished. Whether it finished is
what the result backend already holds (a final state, see ``_final_state.py``): no second
write per task. A task that stores no result (``ignore_result``, no backend) cannot be
told finished, so a redelivered copy of it passes.

Where the record lives, shared by every worker of the fleet: the Redis result backend,
else a Redis broker. With neither (RabbitMQ and no Redis), each worker process keeps its
own record, and says so at start.

The redelivered flag is the broker's word, not proof: on Redis kombu writes it into the
message, and on RabbitMQ a client allowed to consume from the queue can take a copy and
reject it so that the broker marks it. Either can pass a replay off as a redelivery while
the first copy still runs (docs/security.md says so); once it has stored its result,
nothing passes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from celery import Celery
from celery.backends.base import BaseKeyValueStoreBackend

from ..._config import scheme_of
from ..._constants import SEEN_KEY_PREFIX, SIGNING_CLOCK_SKEW
from ..final_state import is_final

log = logging.getLogger("celerybridge.intake")

REPLAYED = (
    "replayed: a message with this signature was already taken by a worker "
    "(a signed message runs once while its signature is valid)"
)

_REDIS_SCHEMES = frozenset({"redis", "rediss"})


class SeenStore(Protocol):
    """Where the signatures of messages already taken are recorded."""

    def add(self, key: str, ttl: float) -> bool:
        """Record ``key`` for ``ttl`` seconds; ``False`` if it was there already."""


class RedisSeen:
    """The record in Redis: one key per signature, expiring with the window."""

    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)

    def add(self, key: str, ttl: float) -> bool:
        return bool(self._client.set(key, 1, nx=True, px=max(1, int(ttl * 1000))))


class MemorySeen:
    """The record in this process only (no Redis to share it through)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}

    def add(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen = {k: until for k, until in self._seen.items() if until > now}
            if self._seen.get(key, 0.0) > now:
                return False
            self._seen[key] = now + ttl
            return True


def store_for(app: Celery) -> SeenStore:
    """The shared record for ``app``'s workers: its Redis result backend or broker."""
    for url in (app.conf.result_backend, app.conf.broker_url):
        if isinstance(url, str) and scheme_of(url) in _REDIS_SCHEMES:
            return RedisSeen(url)
    log.warning(
        "replay refusal is kept per worker process: neither the result backend nor the "
        "broker is a redis:// or rediss:// server to share it through"
    )
    return MemorySeen()


def finished_in(app: Celery) -> Callable[[str], bool]:
    """Whether a task has a final state in ``app``'s result backend: one read, no retry
    loop (the intake must not wait out a backend that is down: it raises instead)."""

    def finished(task_id: str) -> bool:
        backend = app.backend
        if not isinstance(backend, BaseKeyValueStoreBackend):  # none, or not key/value: unknown
            return False
        return is_final(backend, backend.get(backend.get_key_for_task(task_id)))

    return finished


class ReplayGuard:
    """Lets a signed message through once within ``window`` seconds (plus clock skew);
    a redelivered copy passes while ``finished`` says its task has not finished."""

    def __init__(self, store: SeenStore, window: float, finished: Callable[[str], bool]) -> None:
        self.store = store
        self.ttl = window + SIGNING_CLOCK_SKEW
        self.finished = finished

    @classmethod
    def for_app(cls, app: Celery, window: float) -> ReplayGuard:
        """The guard of a worker of ``app``: the record in its Redis, finished tasks read
        from its result backend."""
        return cls(store_for(app), window, finished_in(app))

    def refusal(self, signature: str, redelivered: bool, task_id: str) -> str | None:
        """``REPLAYED`` when this signature was already taken, else ``None`` (recorded)."""
        if self.store.add(SEEN_KEY_PREFIX + signature, self.ttl):
            return None
        if redelivered and not self.finished(task_id):
            return None
        return REPLAYED
