"""A task's last stored state is its final one: nothing unfinished overwrites a result.

Celery's ``Task.retry`` publishes the retry message (same task id) before the tracer
stores RETRY for the attempt that sent it. With a countdown of 0 (``retry_jitter`` can
draw one) another pool thread or worker may take that message at once, exhaust the
retries and store FAILURE; the first attempt's RETRY then lands on top, and a caller
waiting for the task waits until its timeout. Celery's own check (``_store_result``
keeps a SUCCESS) reads and writes in two steps and ignores FAILURE and REVOKED.

On a worker built by :func:`~celerybridge.celery_app`, a state that is not final
(RETRY, STARTED, PENDING, a custom progress state) is stored only while the task has no
final one (SUCCESS, FAILURE, REVOKED), checked and written in one step:

- Redis (``redis``, ``rediss``, ``sentinel``): ``WATCH`` the result key, read it, and
  ``SET`` + ``PUBLISH`` in ``MULTI``/``EXEC`` only if it holds no final state; a write
  in between fails the transaction, which starts again. A refused state is neither
  stored nor published, so pub/sub waiters never hear of it. The stored meta is decoded
  by the backend itself, whatever the serializer or compression.
- ``file://``: every result write (final ones too) holds an exclusive ``flock`` on
  ``.celerybridge-results.lock`` in the results folder while it compares and writes.

Final states are written as Celery writes them (its read-then-write SUCCESS check
included). Unfinished states are not ordered among
themselves (a RETRY from attempt N may replace attempt N+1's): the meta carries no
attempt number without ``result_extended``, and whichever unfinished state is shown, the
final state replaces it and stays.

How it is hooked: Celery picks the backend class for a result URL's scheme through the
app's loader (``loader.override_backends``, the hook its own ``override_backends``
setting uses). :class:`FinalStateLoader` maps the schemes above to the classes here,
so the URL is parsed as usual and every backend the app creates (one per thread unless
``result_backend_thread_safe``) is guarded, in the worker and in its pool's children; the
loader class travels with a pickled app. A backend class named in ``result_backend``
would lose the URL, and wrapping ``app.backend`` once would miss the per-thread
instances Celery creates later. A configuration module passed to ``config_from_object``
with an ``override_backends`` of its own replaces this mapping.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import states
from celery.backends.base import BaseKeyValueStoreBackend
from celery.backends.filesystem import FilesystemBackend
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from celery.loaders.app import AppLoader
from redis.exceptions import WatchError

log = logging.getLogger("celerybridge.final_state")

LOCK_FILE = b".celerybridge-results.lock"


def is_final(backend: BaseKeyValueStoreBackend, raw: bytes | None) -> bool:
    """Whether ``raw``, a task meta as ``backend`` stores it (or nothing), is final."""
    if not raw:  # as Celery reads it: no meta is PENDING
        return False
    return backend.decode_result(raw)["status"] in states.READY_STATES


def _refused(key: bytes | str, state: str) -> None:
    log.debug("not storing %s over the final state of %r", state, key)


class FinalStateRedisBackend(RedisBackend):
    """Celery's Redis result backend, never storing or publishing an unfinished state over
    a final one (see the module docstring)."""

    # Set by Celery's __init__; declared for the type checker (celery-types omits them).
    expires: int | None
    _MAX_STR_VALUE_SIZE: int

    def _set_with_state(self, key: bytes | str, value: Any, state: str) -> None:
        if state in states.READY_STATES:
            super()._set_with_state(key, value, state)  # type: ignore[misc]
            return
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend")  # Celery's check
        if not self.ensure(self._set_unless_final, (key, value)):
            _refused(key, state)

    def _set_unless_final(self, key: bytes | str, value: Any) -> bool:
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    if is_final(self, pipe.get(key)):
                        return False
                    pipe.multi()
                    pipe.set(key, value, ex=self.expires or None)
                    pipe.publish(key, value)
                    pipe.execute()
                    return True
                except WatchError:  # written meanwhile: look again
                    continue


class FinalStateSentinelBackend(FinalStateRedisBackend, SentinelBackend):
    """Celery's Redis Sentinel result backend, guarded as :class:`FinalStateRedisBackend`."""


class FinalStateFilesystemBackend(FilesystemBackend):
    """Celery's ``file://`` result backend, comparing and writing under a folder-wide lock
    (see the module docstring)."""

    path: bytes  # set by Celery's __init__

    def _set_with_state(self, key: bytes | str, value: Any, state: str) -> None:
        with self._locked():
            if state not in states.READY_STATES and is_final(self, self.get(key)):  # type: ignore[arg-type]
                _refused(key, state)
                return
            super()._set_with_state(key, value, state)  # type: ignore[misc]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # flock, not fcntl's record locks: held per open file, so threads of one process
        # exclude each other too; released when the descriptor closes.
        fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


class FinalStateLoader(AppLoader):
    """Celery's default app loader, resolving the result backends celerybridge supports
    to the guarded classes of this module."""

    override_backends = {  # noqa: RUF012 (Celery reads it as a plain dict, never writes it)
        "redis": f"{__name__}:FinalStateRedisBackend",
        "rediss": f"{__name__}:FinalStateRedisBackend",
        "sentinel": f"{__name__}:FinalStateSentinelBackend",
        "file": f"{__name__}:FinalStateFilesystemBackend",
    }
