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

On :class:`celerybridge.AsyncioPool`, Celery's tracer stores a coroutine task's
result from the task's greenlet on the event loop's thread, where a Redis round trip
(and, while the backend is down, every retry and its sleep) would hold up every task
of the worker. The Redis backends store from a small thread pool instead
(``RESULT_STORE_THREADS`` per process) while the greenlet waits, and the loop runs
the other tasks meanwhile.

Final states keep Celery's rule (a stored SUCCESS is never replaced). Celery reads the
key, then writes and publishes: two round trips to Redis, made by the tracer after each
task (on :class:`celerybridge.AsyncioPool`, on the event loop's thread). With the
results in uncompressed JSON (the worker's default), the Redis backends do both in one
script instead (``STORE_FINAL``): one round trip, and no write between the read and the
write. Unfinished states are not ordered among
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

import asyncio
import fcntl
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from celery import states
from celery.backends.base import BaseKeyValueStoreBackend
from celery.backends.filesystem import FilesystemBackend
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from celery.loaders.app import AppLoader
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import WatchError

from .._constants import RESULT_STORE_THREADS
from .loop import worker_loop
from .pool.greenlets import running_job

T = TypeVar("T")

log = logging.getLogger("celerybridge.final_state")

# KEYS[1]: a task's result key. ARGV[1]: its final meta (JSON); ARGV[2]: milliseconds to
# keep it, 0 for ever. Stores and publishes the meta unless the stored one is a SUCCESS,
# as Celery's _store_result does in two steps; returns 1 when stored. Celery writes
# "status" first ('{"status": "SUCCESS", ...'): read from there, else decoded whole.
STORE_FINAL = """
local stored = redis.call('GET', KEYS[1])
if stored then
  local status = string.match(stored, '^{"status": "([A-Z_]+)"')
  if status == nil then
    local ok, meta = pcall(cjson.decode, stored)
    if ok and type(meta) == 'table' then status = meta['status'] end
  end
  if status == 'SUCCESS' then return 0 end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""

LOCK_FILE = b".celerybridge-results.lock"


def is_final(backend: BaseKeyValueStoreBackend, raw: bytes | None) -> bool:
    """Whether ``raw``, a task meta as ``backend`` stores it (or nothing), is final."""
    if not raw:  # as Celery reads it: no meta is PENDING
        return False
    return backend.decode_result(raw)["status"] in states.READY_STATES


_stores: tuple[int, ThreadPoolExecutor] | None = None
_stores_lock = threading.Lock()


def _store_threads() -> ThreadPoolExecutor:
    """This process's threads for result stores (made afresh in a forked child)."""
    global _stores
    with _stores_lock:
        if _stores is None or _stores[0] != os.getpid():
            executor = ThreadPoolExecutor(
                RESULT_STORE_THREADS, thread_name_prefix="celerybridge-results"
            )
            _stores = (os.getpid(), executor)
        return _stores[1]


async def _in_thread(call: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(_store_threads(), call)


def off_the_loop(call: Callable[[], T]) -> T:
    """``call()``; from a coroutine job of the asyncio pool (its greenlet on the event
    loop's thread), in a result-store thread while the greenlet waits."""
    if running_job() is None:
        return call()
    return worker_loop.run(_in_thread(call))


def _refused(key: bytes | str, state: str) -> None:
    log.debug("not storing %s over the final state of %r", state, key)


class FinalStateRedisBackend(RedisBackend):
    """Celery's Redis result backend, never storing or publishing an unfinished state over
    a final one (see the module docstring)."""

    # Set by Celery's __init__; declared for the type checker (celery-types omits them).
    expires: float | None
    failure_expires: float | None
    compression: str | None
    serializer: str
    _MAX_STR_VALUE_SIZE: int
    _store_final_script: Any = None  # per backend: Celery makes one per thread

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        store = super().store_result
        return off_the_loop(
            functools.partial(store, task_id, result, state, traceback, request, **kwargs)
        )

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if state not in states.READY_STATES or self.serializer != "json" or self.compression:
            return super()._store_result(  # type: ignore[misc]
                task_id, result, state, traceback, request, **kwargs
            )
        meta = self._get_result_meta(  # type: ignore[attr-defined]
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        expires = self.failure_expires if state == states.FAILURE else self.expires
        keep = max(1, round(float(expires) * 1000)) if expires else 0
        key = self.get_key_for_task(task_id)
        if not self.ensure(self._store_final, (key, value, keep)):
            log.debug("not storing %s over the SUCCESS of %r", state, key)
        return result

    def _store_final(self, key: bytes | str, value: Any, keep: int) -> bool:
        if self._store_final_script is None:
            self._store_final_script = self.client.register_script(STORE_FINAL)
        return bool(self._store_final_script(keys=[key], args=[value, keep]))

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
