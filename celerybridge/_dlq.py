"""Reading, replaying and purging dead letters (``celerybridge dlq``), blocking, with kombu.

A dead letter is the original message, headers and body untouched, plus two headers
(:data:`~celerybridge._constants.DEAD_REASON_HEADER`, ``DEAD_FROM_HEADER``). Listing
takes every message without acknowledging it and closes the channel, so the broker puts
them all back (RabbitMQ in their order; Redis may change the order).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import kombu

from ._constants import CONTENT_TYPE, DEAD_FROM_HEADER, DEAD_REASON_HEADER
from ._dead_letter import dead_letter_queue
from ._exceptions import CallError, DelegationError
from ._signing import Signer
from ._transports._errors import translate


@dataclass(frozen=True)
class DeadLetter:
    """One message on a dead-letter queue."""

    task_id: str
    task: str
    reason: str
    source: str
    """The queue it came from, where a replay sends it."""
    headers: dict[str, Any]
    """The original headers, without the two dead-letter ones."""
    body: bytes
    content_type: str
    content_encoding: str

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly view; a JSON body is shown as text, any other as base64."""
        if self.content_type == CONTENT_TYPE:
            body: Any = self.body.decode(self.content_encoding or "utf-8", "replace")
        else:
            body = {"base64": base64.b64encode(self.body).decode()}
        return {
            "id": self.task_id,
            "task": self.task,
            "reason": self.reason,
            "source": self.source,
            "content_type": self.content_type,
            "headers": self.headers,
            "body": body,
        }


def _dead_letter(message: Any, queue: str) -> DeadLetter:
    headers = dict(message.headers or {})
    reason = str(headers.pop(DEAD_REASON_HEADER, ""))
    source = str(headers.pop(DEAD_FROM_HEADER, queue))
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    return DeadLetter(
        task_id=str(headers.get("id", "")),
        task=str(headers.get("task", "")),
        reason=reason,
        source=source,
        headers=headers,
        body=body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
    )


@contextmanager
def _taken(broker_url: str, queue: str) -> Iterator[tuple[Any, list[tuple[DeadLetter, Any]]]]:
    """Every dead letter of ``queue``, unacknowledged; closing puts back what was not acked."""
    target = dead_letter_queue(queue)
    with (
        translate(DelegationError, f"reading {target!r}"),
        kombu.Connection(broker_url) as connection,
    ):
        channel: Any = connection.channel()
        dead = _declare(channel, target)
        taken: list[tuple[DeadLetter, Any]] = []
        try:
            while (message := dead.get(no_ack=False)) is not None:
                taken.append((_dead_letter(message, queue), message))
            yield connection, taken
        finally:
            channel.close()


def _declare(channel: Any, target: str) -> Any:
    """The dead-letter queue bound to ``channel``, declared as the worker declares it (a
    queue that does not exist yet simply has no letters)."""
    queue = kombu.Queue(target, durable=True)(channel)
    queue.declare()
    return queue


def list_dead_letters(broker_url: str, queue: str) -> list[DeadLetter]:
    """The dead letters of ``queue``, left where they are."""
    with _taken(broker_url, queue) as (_, taken):
        return [letter for letter, _ in taken]


def signed_headers(letter: DeadLetter, signer: Signer) -> dict[str, Any]:
    """``letter``'s headers with a fresh signature of its task, id, service and body,
    signed now.

    Whoever replays with the key vouches for the letter: a message refused as forged
    becomes genuine. Only JSON ``[args, kwargs, ...]`` bodies can be signed.
    """
    headers = (
        signer.resigned(letter.headers, letter.body)
        if letter.content_type == CONTENT_TYPE
        else None
    )
    if headers is None:
        raise CallError(
            f"cannot sign dead letter {letter.task_id}: its body is not a JSON "
            "[args, kwargs, ...] list"
        )
    return headers


def replay(
    broker_url: str, queue: str, task_ids: Iterable[str] | None, signer: Signer | None = None
) -> list[DeadLetter]:
    """Send dead letters back to their queue as they were (``None``: all of them).

    Each is acknowledged on the dead-letter queue only once it has been republished.
    With a ``signer`` each is signed afresh (:func:`signed_headers`), so a worker with
    the key runs a letter refused for an expired or missing signature.
    """
    wanted = None if task_ids is None else set(task_ids)
    replayed = []
    with _taken(broker_url, queue) as (connection, taken):
        producer = connection.Producer()
        for letter, message in taken:
            if wanted is not None and letter.task_id not in wanted:
                continue
            source = kombu.Queue(
                letter.source, kombu.Exchange(letter.source, "direct"), routing_key=letter.source
            )
            headers = letter.headers if signer is None else signed_headers(letter, signer)
            with translate(DelegationError, f"replaying task {letter.task_id}"):
                producer.publish(
                    letter.body,
                    exchange=source.exchange,
                    routing_key=letter.source,
                    declare=[source],
                    headers=headers,
                    content_type=letter.content_type,
                    content_encoding=letter.content_encoding,
                    retry=True,
                )
                message.ack()
            replayed.append(letter)
    return replayed


def purge(broker_url: str, queue: str) -> int:
    """Drop every dead letter of ``queue``; returns how many there were."""
    target = dead_letter_queue(queue)
    with (
        translate(DelegationError, f"purging {target!r}"),
        kombu.Connection(broker_url) as connection,
    ):
        channel: Any = connection.default_channel
        _declare(channel, target)
        return int(channel.queue_purge(target) or 0)
