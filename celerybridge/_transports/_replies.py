"""What both ``rpc://`` result sources share: the reply queue, and the replies kept.

Celery's rpc backend stores nothing: a worker publishes each state of a task (STARTED,
RETRY, custom states, then the final one) as a message to the queue the task message
named in ``reply_to``, with the task id as ``correlation_id`` and the result meta as a
JSON body (``RPCBackend.store_result``). The queue belongs to the caller: Celery's client
declares it (``RPCBackend.binding``) before it sends a task, and so does a bridge, with
the same arguments, so that a worker's reply is never published to a queue that does
not exist (the default exchange drops it).

A reply is a message: consumed once, by the one bridge whose queue it reached. What
arrives is therefore kept here, decoded as data, until asked for (a result that came
before anyone waited) and after (``handle.result()`` twice), the latest
``RPC_REPLIES_KEPT`` final outcomes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from kombu.serialization import loads

from .._constants import (
    CONTENT_TYPE,
    RPC_EXPECTED_KEPT,
    RPC_REPLIES_KEPT,
    RPC_REPLY_MAX_BYTES,
    RPC_REPLY_QUEUE_EXPIRES,
)
from .._exceptions import ResultBackendError
from ._errors import translate
from .base import TaskOutcome, outcome_from_meta

REPLY_QUEUE_ARGUMENTS: dict[str, Any] = {"x-expires": int(RPC_REPLY_QUEUE_EXPIRES * 1000)}
"""``Queue(oid, Exchange(None), oid, durable=True, auto_delete=True, expires=...)`` as
kombu declares it: the queue arguments besides ``durable`` and ``auto_delete``."""


def decode_reply(
    body: bytes,
    content_type: str | None,
    content_encoding: str | None,
    headers: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The result meta a worker published, JSON only, as data; ``None`` if it is not one.

    A compressed reply (Celery's workers never compress results sent as replies) or one
    over ``RPC_REPLY_MAX_BYTES`` is refused unread: a small message must not inflate.
    """
    if headers and "compression" in headers:
        raise ResultBackendError("a compressed message on the rpc:// reply queue")
    if len(body) > RPC_REPLY_MAX_BYTES:
        raise ResultBackendError(
            f"a message of {len(body):,} bytes on the rpc:// reply queue (at most "
            f"{RPC_REPLY_MAX_BYTES:,} are read)"
        )
    with translate(ResultBackendError, "decoding a reply on the rpc:// reply queue"):
        meta = loads(
            body,
            content_type or CONTENT_TYPE,
            content_encoding or "utf-8",
            accept={CONTENT_TYPE},
        )
    return meta if isinstance(meta, dict) else None


class Replies:
    """Final outcomes received on a reply queue, by task id, the latest ``limit`` of them.

    Only replies for expected tasks are kept (:meth:`expect`: those the bridge sent, and
    those someone awaits): anyone who may publish to the broker can put a message on
    the queue, and replies for other ids would push real ones out.

    Thread-safe, with a lock held only while the maps change: the kombu drain adds from a
    worker thread while the bridge expects from the event loop, which must never wait
    for a drain's broker I/O.
    """

    def __init__(self, limit: int = RPC_REPLIES_KEPT, expected: int = RPC_EXPECTED_KEPT) -> None:
        self._limit = limit
        self._outcomes: OrderedDict[str, TaskOutcome] = OrderedDict()
        self._expected_limit = expected
        self._expected: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def expect(self, task_id: str) -> None:
        """Keep the reply for ``task_id`` when it comes (the oldest expectation goes first)."""
        with self._lock:
            if task_id in self._outcomes:
                return
            self._expected[task_id] = None
            while len(self._expected) > self._expected_limit:
                self._expected.popitem(last=False)

    def __len__(self) -> int:
        return len(self._outcomes)

    def get(self, task_id: str) -> TaskOutcome | None:
        """The task's final outcome if it arrived (and is still kept)."""
        return self._outcomes.get(task_id)

    def add(
        self, correlation_id: str | None, meta: dict[str, Any]
    ) -> tuple[str, TaskOutcome] | None:
        """Keep the reply if it is a final state; the task id and outcome, else ``None``.

        Intermediate states (STARTED, RETRY, PROGRESS...) are pushed too, and dropped.
        """
        outcome = outcome_from_meta(meta)
        task_id = correlation_id or meta.get("task_id")
        if outcome is None or not isinstance(task_id, str):
            return None
        with self._lock:
            if self._expected.pop(task_id, False) is False:  # not expected (None if it was)
                return None
            self._outcomes[task_id] = outcome
            self._outcomes.move_to_end(task_id)
            while len(self._outcomes) > self._limit:
                self._outcomes.popitem(last=False)
        return task_id, outcome
