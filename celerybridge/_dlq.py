"""Reading, replaying and purging dead letters (``celerybridge dlq``), blocking, with kombu.

A dead letter is the original message, headers and body untouched, plus the dead-letter
headers (:data:`~celerybridge._constants.DEAD_REASON_HEADER`, ``DEAD_FROM_HEADER``,
``DEAD_KIND_HEADER``). Anyone who can write to the broker can write to ``<queue>.dead``
too, so nothing read there is trusted: an entry that is not a message is listed as
:class:`Garbage` and left alone, a letter is replayed only to the queue the operator
names, and what is printed is passed through :func:`printable` by the command line.

Nothing is removed while reading. On Redis the lists are read with ``LRANGE`` and a
replayed letter is removed (``LREM``) only once it has been republished (under the
``global_keyprefix`` of ``CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS``, which kombu does not
apply to those two commands); entries the take script set apart on ``<queue>.dead.held``
and no worker has wrapped yet are listed as raw garbage (and purged); elsewhere
(RabbitMQ) every message is taken without acknowledging it and the channel is closed, so
the broker puts back all that was not replayed. A replay interrupted half-way may send a
letter twice, never lose one.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any

import kombu

from ._config import AMQP_SCHEMES, broker_transport_options, kombu_url, scheme_of
from ._constants import (
    CONTENT_TYPE,
    DEAD_FROM_HEADER,
    DEAD_KIND_DELIVERIES,
    DEAD_KIND_HEADER,
    DEAD_KIND_SIGNATURE,
    DEAD_KINDS_NEVER_RESIGNED,
    DEAD_REASON_HEADER,
    HOLD_SUFFIX,
    KOMBU_PRIORITY_STEPS,
)
from ._exceptions import CallError, DelegationError
from ._signing import Signer
from ._transports._errors import translate
from ._transports._protocol import redis_queue_key
from ._transports.kombu import ExistingFirstQueue
from ._utils import printable
from ._worker.dead_letter import dead_letter_queue
from ._worker.redis_transport.records import key_for

# How signature refusals begin (_signing.py), as workers wrote them before the kind header
# and since: unsigned, malformed headers, unreadable body or header, bad, outdated scheme,
# unknown key, expired, from the future. Kept as written, whatever _signing.py says today.
_SIGNATURE_REASONS = (
    "unsigned message",
    "malformed signature headers",
    "cannot check the signature",
    "bad signature",
    "outdated signature",
    "signed with a key this worker does not know",
    "expired signature",
    "signature from the future",
)
_PREVIEW = 48  # bytes of a garbage entry shown by ``list``
_HELD = "raw: set apart by the take script, not yet wrapped by a worker (on {key})"

Options = Mapping[str, Any] | None
"""kombu transport options; ``None``: only what the broker URL implies (the command line
passes ``client_transport_options``, as the bridge and workers use)."""


@dataclass(frozen=True)
class DeadLetter:
    """One message on a dead-letter queue."""

    task_id: str
    task: str
    reason: str
    kind: str
    """Why, in one word (``DEAD_KIND_*``); ``signature`` for a letter written before the
    kind header whose reason is a signature refusal; ``""`` when unknown."""
    source: str
    """The queue its dead-from header names: only reported, never where a replay goes."""
    headers: dict[str, Any]
    """The original headers, without the dead-letter ones."""
    body: bytes
    content_type: str
    content_encoding: str

    def named_by(self, names: Collection[str]) -> bool:
        """Whether ``names`` hold this letter's id, as it is or as ``list`` prints it."""
        return self.task_id in names or printable(self.task_id) in names

    @property
    def never_resigned(self) -> bool:
        """Refused for its signature or as a replay (by its kind or its reason): what
        ``replay --all --sign`` must not turn into a genuine message."""
        return self.kind in DEAD_KINDS_NEVER_RESIGNED or self.reason.startswith(_SIGNATURE_REASONS)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly view; a JSON body is shown as text, any other as base64."""
        body: Any = {"base64": base64.b64encode(self.body).decode()}
        if self.content_type == CONTENT_TYPE:
            # An encoding Python does not know, not a text one, or one that cannot replace.
            with suppress(LookupError, ValueError):
                body = self.body.decode(self.content_encoding or "utf-8", "replace")
        return {
            "id": self.task_id,
            "task": self.task,
            "reason": self.reason,
            "kind": self.kind,
            "source": self.source,
            "content_type": self.content_type,
            "headers": self.headers,
            "body": body,
        }


@dataclass(frozen=True)
class Garbage:
    """An entry of a dead-letter queue that is not a message: kept where it is."""

    raw: bytes
    problem: str
    """What is wrong with it, in printable words (names of types, ``repr`` of values)."""

    def describe(self) -> str:
        """What it is, its size and its first bytes, printable."""
        more = "..." if len(self.raw) > _PREVIEW else ""
        return f"{self.problem}; {len(self.raw)} bytes: {self.raw[:_PREVIEW]!r}{more}"


Entry = DeadLetter | Garbage


def _letter(
    headers: object, body: object, content_type: object, encoding: object, queue: str
) -> Entry:
    """The dead letter these parts of a message make, or garbage if they make none."""
    raw = body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")
    if headers is not None and not isinstance(headers, Mapping):
        return Garbage(raw, f"its headers are a {type(headers).__name__}, not a mapping")
    if not isinstance(body, bytes | str):
        return Garbage(raw, f"its body is a {type(body).__name__}")
    for name, value in (("content type", content_type), ("content encoding", encoding)):
        if value is not None and not isinstance(value, str):
            return Garbage(raw, f"its {name} is a {type(value).__name__}")
    kept = dict(headers or {})
    reason = kept.pop(DEAD_REASON_HEADER, "")
    reason = reason if isinstance(reason, str) else str(reason)
    kind = kept.pop(DEAD_KIND_HEADER, None)
    if not isinstance(kind, str) or not kind:
        kind = DEAD_KIND_SIGNATURE if reason.startswith(_SIGNATURE_REASONS) else ""
    task_id, task = kept.get("id"), kept.get("task")
    return DeadLetter(
        task_id="" if task_id is None else str(task_id),
        task="" if task is None else str(task),
        reason=reason,
        kind=kind,
        source=str(kept.pop(DEAD_FROM_HEADER, queue)),
        headers=kept,
        body=raw,
        content_type=str(content_type or ""),
        content_encoding=str(encoding or ""),
    )


def _from_redis(raw: bytes, queue: str) -> Entry:
    """The dead letter a Redis list entry holds (kombu's JSON envelope, base64 body)."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return Garbage(raw, "not JSON")
    if not isinstance(document, dict):
        return Garbage(raw, f"JSON {type(document).__name__}, not a kombu message")
    properties, body = document.get("properties"), document.get("body")
    if not isinstance(properties, dict):
        return Garbage(raw, "a JSON object without kombu's properties")
    if not isinstance(body, str):
        return Garbage(raw, "a JSON object without a body string")
    encoding = properties.get("body_encoding")
    if encoding == "base64":
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return Garbage(raw, "its body is not base64")
    elif encoding is None:
        data = body.encode("utf-8", "surrogatepass")
    else:
        return Garbage(raw, f"unknown body encoding {encoding!r}")
    letter = _letter(
        document.get("headers"),
        data,
        document.get("content-type"),
        document.get("content-encoding"),
        queue,
    )
    return letter if isinstance(letter, DeadLetter) else replace(letter, raw=raw)


@dataclass
class _Taken:
    """Every entry of a dead-letter queue, each with what removes it once replayed."""

    connection: Any
    remove: Callable[[Any], None]
    entries: list[tuple[Entry, Any]] = field(default_factory=list)


def _options(broker_url: str, options: Options) -> dict[str, Any]:
    return dict(broker_transport_options(broker_url) if options is None else options)


@contextmanager
def _taken(broker_url: str, queue: str, options: Options = None) -> Iterator[_Taken]:
    """Every entry of ``queue``'s dead-letter queue, read without removing any."""
    target = dead_letter_queue(queue)
    options = _options(broker_url, options)
    with (
        translate(DelegationError, f"reading {target!r}"),
        kombu.Connection(kombu_url(broker_url), transport_options=options) as connection,
    ):
        if connection.transport.driver_type == "redis":
            redis_channel: Any = connection.default_channel
            with redis_channel.conn_or_acquire() as client:
                yield _redis_taken(connection, client, queue)
            return
        channel: Any = connection.channel()
        # py-amqp hands over a body decoded with its content encoding when it can; a
        # replay must send the bytes that came, whatever that encoding does both ways.
        if hasattr(channel, "auto_decode"):
            channel.auto_decode = False
        try:
            # As the worker declares it, if it does not exist yet (then it has no letters);
            # as it is (quorum...) if it does.
            ExistingFirstQueue(target, durable=True)(channel).declare()
            taken = _Taken(connection, lambda tag: channel.basic_ack(tag))
            while (message := channel.basic_get(target, no_ack=False)) is not None:
                letter = _letter(
                    message.headers,
                    message.body,
                    getattr(message, "content_type", None),
                    getattr(message, "content_encoding", None),
                    queue,
                )
                taken.entries.append((letter, message.delivery_tag))
            yield taken
        finally:
            channel.close()  # the broker puts back every message not acknowledged


def _redis_taken(connection: Any, client: Any, queue: str) -> _Taken:
    """The entries of the dead-letter lists (one per priority step), oldest first, as
    the Redis transport would deliver them, each removed by value once replayed; then
    the holding list's entries, as raw garbage."""
    taken = _Taken(
        connection, lambda where: client.lrem(key_for(client, "LREM", where[0]), 1, where[1])
    )
    for step in KOMBU_PRIORITY_STEPS:
        key = redis_queue_key(dead_letter_queue(queue), step)
        for raw in reversed(client.lrange(key_for(client, "LRANGE", key), 0, -1)):
            taken.entries.append((_from_redis(raw, queue), (key, raw)))
    held = queue + HOLD_SUFFIX
    for raw in reversed(client.lrange(key_for(client, "LRANGE", held), 0, -1)):
        taken.entries.append((Garbage(raw, _HELD.format(key=held)), None))
    return taken


def list_dead_letters(broker_url: str, queue: str, options: Options = None) -> list[Entry]:
    """The dead letters of ``queue``, and any garbage there, left where they are."""
    with _taken(broker_url, queue, options) as taken:
        return [entry for entry, _ in taken.entries]


def signed_headers(letter: DeadLetter, signer: Signer) -> dict[str, Any]:
    """``letter``'s headers with a fresh signature of its task, id, service and body,
    signed now.

    Whoever replays with the key vouches for the letter: a message refused as forged
    becomes genuine. Only JSON bodies, with headers JSON can carry, can be signed.
    """
    headers = (
        signer.resigned(
            letter.headers,
            letter.body,
            content_type=letter.content_type,
            content_encoding=letter.content_encoding,
        )
        if letter.content_type == CONTENT_TYPE
        else None
    )
    if headers is None:
        raise CallError(
            f"cannot sign dead letter {letter.task_id}: only {CONTENT_TYPE} bodies, with "
            "headers JSON can carry, can be signed"
        )
    return headers


@dataclass(frozen=True)
class ReplayReport:
    """What :func:`replay` did: letters sent, letters left (and why), garbage left,
    named ids matching no letter."""

    replayed: list[DeadLetter]
    skipped: list[tuple[DeadLetter, str]]
    garbage: list[Garbage]
    missing: list[str]


def _ambiguous(letters: list[DeadLetter], names: Iterable[str]) -> set[int]:
    """Positions of the letters a name shares with a different letter (another body or
    other headers): naming one of them vouches for none."""
    shared: set[int] = set()
    for name in names:
        named = [i for i, letter in enumerate(letters) if letter.named_by({name})]
        contents = {
            (letters[i].body, json.dumps(letters[i].headers, sort_keys=True, default=repr))
            for i in named
        }
        if len(contents) > 1:
            shared.update(named)
    return shared


def _why_not_all(letter: DeadLetter, kinds: Collection[str]) -> str | None:
    """Why ``replay --all`` leaves ``letter``, if it does: a message delivered more than
    CELERYBRIDGE_MAX_DELIVERIES times may kill its worker again."""
    if letter.kind == DEAD_KIND_DELIVERIES and DEAD_KIND_DELIVERIES not in kinds:
        return (
            f"refused as {letter.kind!r}: --all replays those only with --kind "
            f"{DEAD_KIND_DELIVERIES}; or name its id"
        )
    return None


def _why_not(letter: DeadLetter, everything: bool, ambiguous: bool) -> str | None:
    """Why ``letter`` must not be re-signed, if it must not."""
    if everything and letter.never_resigned:
        why = (
            f"refused as {letter.kind!r}"
            if letter.kind in DEAD_KINDS_NEVER_RESIGNED
            else "its reason is a signature refusal"
        )
        return f"{why}: --all --sign never re-signs those; name its id with --sign to vouch for it"
    if ambiguous:
        return "different dead letters have this id: none of them is re-signed"
    return None


def _replay_headers(letter: DeadLetter, signer: Signer | None) -> dict[str, Any]:
    """Its headers with a fresh count of retries and, with a ``signer``, a new signature."""
    headers = dict(letter.headers)
    if "retries" in headers:
        headers["retries"] = 0
    if signer is None:
        return headers
    return signed_headers(replace(letter, headers=headers), signer)


def replay(
    broker_url: str,
    queue: str,
    task_ids: Iterable[str] | None,
    signer: Signer | None = None,
    to: str | None = None,
    options: Options = None,
    kinds: Collection[str] = (),
) -> ReplayReport:
    """Send dead letters (``None``: all of them) back to ``queue``, where they were
    refused, or to ``to``: never where their dead-from header says.

    Each starts again with no retries and is removed from the dead-letter queue only once
    republished. With a ``signer`` each is signed afresh (:func:`signed_headers`), so a
    worker with the key runs a letter refused for an expired or missing signature; with
    ``task_ids=None`` letters refused for their signature or as replays are skipped, and
    so is, for named ids, every letter of an id that differing letters share. With
    ``task_ids=None``, ``deliveries`` letters (delivered too often: they may kill a worker
    again) are skipped unless ``kinds`` names that kind; ``kinds`` otherwise limits
    ``--all`` to the letters of those kinds. Garbage stays where it is.
    """
    wanted = None if task_ids is None else set(task_ids)
    target = to or queue
    exchange = kombu.Exchange(target, "direct")
    # Published to as the queue exists (quorum, priorities...), declared only if missing.
    queue_class = ExistingFirstQueue if _on_rabbitmq(broker_url) else kombu.Queue
    declared = queue_class(target, exchange, routing_key=target)
    report = ReplayReport([], [], [], [])
    with _taken(broker_url, queue, options) as taken:
        chosen = [
            (entry, handle)
            for entry, handle in taken.entries
            if isinstance(entry, DeadLetter)
            and (wanted is None or entry.named_by(wanted))
            and (wanted is not None or not kinds or entry.kind in kinds)
        ]
        letters = [letter for letter, _ in chosen]
        if wanted is None:
            report.garbage.extend(e for e, _ in taken.entries if isinstance(e, Garbage))
        else:
            report.missing.extend(
                sorted(name for name in wanted if not any(x.named_by({name}) for x in letters))
            )
        shared = _ambiguous(letters, wanted or ()) if signer is not None else set()
        producer = taken.connection.Producer()
        for position, (letter, handle) in enumerate(chosen):
            why = _why_not(letter, wanted is None, position in shared) if signer else None
            if why is None and wanted is None:
                why = _why_not_all(letter, kinds)
            if why is None:
                try:
                    headers = _replay_headers(letter, signer)
                except CallError as exc:  # cannot be signed
                    why = str(exc)
            if why is not None:
                report.skipped.append((letter, why))
                continue
            with translate(DelegationError, f"replaying task {letter.task_id}"):
                producer.publish(
                    letter.body,
                    exchange="",  # as Celery sends: the default exchange, routing key = queue
                    routing_key=target,
                    declare=[declared],
                    headers=headers,
                    content_type=letter.content_type or "application/data",
                    content_encoding=letter.content_encoding or "binary",
                    retry=True,
                )
                taken.remove(handle)  # only once it is on its way
            report.replayed.append(letter)
    return report


def purge(broker_url: str, queue: str, options: Options = None) -> int:
    """Drop every entry of ``queue``'s dead-letter queue (on Redis its holding list's
    too); returns how many there were."""
    target = dead_letter_queue(queue)
    options = _options(broker_url, options)
    with (
        translate(DelegationError, f"purging {target!r}"),
        kombu.Connection(kombu_url(broker_url), transport_options=options) as connection,
    ):
        channel: Any = connection.default_channel
        queue_class = ExistingFirstQueue if _on_rabbitmq(broker_url) else kombu.Queue
        queue_class(target, durable=True)(channel).declare()
        dropped = int(channel.queue_purge(target) or 0)
        if connection.transport.driver_type == "redis":
            with channel.conn_or_acquire() as client, client.pipeline() as pipe:
                held = queue + HOLD_SUFFIX  # LLEN and DEL are prefixed by kombu's client
                dropped += int(pipe.llen(held).delete(held).execute()[0] or 0)
        return dropped


def _on_rabbitmq(broker_url: str) -> bool:
    return scheme_of(broker_url) in AMQP_SCHEMES
