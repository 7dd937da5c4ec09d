"""Signed task messages: a worker with a key runs only what a holder of that key sent, lately.

Celery's ``auth`` serializer signs the body alone (not the task name) and a signed
message stays valid for ever, so a captured message can be replayed at will. With
``CELERYBRIDGE_SIGNING_KEY`` set, every message a bridge publishes carries two headers:

- ``x-celerybridge-timestamp``: when it was signed, in whole seconds since the epoch;
- ``x-celerybridge-signature``: HMAC-SHA256 (hex) under the key of the canonical form
  below.

The canonical form is compact JSON, keys sorted, ASCII only, of::

    ["celerybridge-hmac-sha256-v1", task name, task id, timestamp, service, args, kwargs]

where ``service`` is the ``x-celerybridge-service`` header (``CELERYBRIDGE_SERVICE`` of
the sender) or ``null``, so a signed message cannot be re-labelled as another service's;

``args`` and ``kwargs`` are what the message body carries, read back as plain JSON.
The caller encodes its arguments with kombu's JSON encoder (the one that writes the body,
on every path) and reads them back with :mod:`json`; the worker reads the body it received
with :mod:`json`. Both sides therefore sign the same JSON values, whatever whitespace,
key order or encoder (datetimes become ``{"__type__": ...}`` objects) the body used, and
the worker checks what it will actually run, not a re-serialisation of its own.

A worker built by :func:`~celerybridge.celery_app` with a key checks every message
before Celery looks at it (:meth:`Signer.refusal`); what fails goes to the dead-letter
queue (see ``_dead_letter.py``). The key is never part of a reason, a log line or a repr.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import weakref
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.app.amqp import AMQP, task_message
from kombu.utils.json import dumps as kombu_json_dumps

from ._constants import (
    SERVICE_HEADER,
    SIGNATURE_HEADER,
    SIGNATURE_SCHEME,
    SIGNING_CLOCK_SKEW,
    TIMESTAMP_HEADER,
)

if TYPE_CHECKING:
    from ._config import BridgeSettings

_SIGNATURE_HEADERS = frozenset({SIGNATURE_HEADER, TIMESTAMP_HEADER})

UNSIGNED = (
    "unsigned message: this worker runs only messages signed with its signing key "
    "(CELERYBRIDGE_SIGNING_KEY)"
)
MALFORMED = (
    f"malformed signature headers: {TIMESTAMP_HEADER} must be an integer and "
    f"{SIGNATURE_HEADER} a hex string"
)
BAD_SIGNATURE = (
    "bad signature: the message was not signed with this worker's signing key, "
    "or was altered after signing"
)
UNREADABLE_BODY = "cannot check the signature: the body is not a JSON [args, kwargs, ...] list"


def body_call(body: bytes | str) -> tuple[list[Any], dict[str, Any]] | None:
    """The ``args`` and ``kwargs`` of a JSON task body (``[args, kwargs, embed]``), or
    ``None`` when the body is not one."""
    try:
        document = json.loads(body)
    except (ValueError, TypeError):
        return None
    if (
        isinstance(document, list)
        and len(document) >= 2
        and isinstance(document[0], list)
        and isinstance(document[1], dict)
    ):
        return document[0], document[1]
    return None


class Signer:
    """Signs outgoing task messages and checks incoming ones with one key.

    ``max_age`` is how many seconds after signing a message is still accepted;
    signatures up to ``SIGNING_CLOCK_SKEW`` seconds in the future are accepted too,
    for clocks that disagree a little. The key does not appear in ``repr``.
    """

    __slots__ = ("_key", "max_age")

    def __init__(self, key: str | bytes, max_age: float) -> None:
        self._key = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        self.max_age = max_age

    @classmethod
    def from_settings(cls, settings: BridgeSettings) -> Signer | None:
        """The signer the settings ask for, or ``None`` when no key is set."""
        if settings.signing_key is None:
            return None
        return cls(settings.signing_key.get_secret_value(), settings.signing_max_age)

    def __repr__(self) -> str:
        return f"<Signer max_age={self.max_age:g}s>"

    def headers(
        self,
        task: str,
        task_id: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        now: float | None = None,
        service: str | None = None,
    ) -> dict[str, Any]:
        """The two headers that sign a call of ``task`` with these arguments, sent by
        ``service`` (the ``x-celerybridge-service`` header the message carries, if any).

        ``now`` (seconds since the epoch) is the signing time, the current time by
        default.
        """
        timestamp = int(time.time() if now is None else now)
        # Exactly the JSON values the body will carry: kombu's encoder, read back plainly.
        sent = json.loads(kombu_json_dumps([list(args), dict(kwargs)]))
        return {
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: self._sign(task, task_id, timestamp, service, sent[0], sent[1]),
        }

    def refusal(
        self, headers: Mapping[str, Any] | None, body: bytes | str, now: float | None = None
    ) -> str | None:
        """Why a received message must not run, or ``None`` if its signature is good.

        ``body`` is the message body as received (kombu has undone any transport
        encoding, such as base64 on Redis).
        """
        headers = headers or {}
        signature = headers.get(SIGNATURE_HEADER)
        timestamp = headers.get(TIMESTAMP_HEADER)
        if signature is None and timestamp is None:
            return UNSIGNED
        if (
            not isinstance(signature, str)
            or not isinstance(timestamp, int)
            or isinstance(timestamp, bool)
        ):
            return MALFORMED
        call = body_call(body)
        if call is None:
            return UNREADABLE_BODY
        service = headers.get(SERVICE_HEADER)
        expected = self._sign(
            str(headers.get("task")),
            str(headers.get("id")),
            timestamp,
            None if service is None else str(service),
            *call,
        )
        if not hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8")):
            return BAD_SIGNATURE
        # Only an authentic message learns about its age: a forged timestamp is a bad signature.
        age = (time.time() if now is None else now) - timestamp
        if age <= self.max_age and -age <= SIGNING_CLOCK_SKEW:
            return None
        signed_at = datetime.fromtimestamp(timestamp, UTC).isoformat()
        if age > self.max_age:
            return (
                f"expired signature: signed at {signed_at}, more than {self.max_age:g} s "
                "before this worker's clock (CELERYBRIDGE_SIGNING_MAX_AGE)"
            )
        return (
            f"signature from the future: signed at {signed_at}, more than "
            f"{SIGNING_CLOCK_SKEW} s ahead of this worker's clock"
        )

    def resigned(self, headers: Mapping[str, Any], body: bytes | str) -> dict[str, Any] | None:
        """``headers`` of a received message with a fresh signature over it, signed now
        (``None`` if its body is not a JSON task body). Whoever does this vouches for it."""
        call = body_call(body)
        if call is None:
            return None
        kept = {k: v for k, v in headers.items() if k not in _SIGNATURE_HEADERS}
        service = kept.get(SERVICE_HEADER)
        return {
            **kept,
            **self.headers(
                str(kept.get("task")),
                str(kept.get("id")),
                *call,
                service=None if service is None else str(service),
            ),
        }

    def _sign(
        self,
        task: str,
        task_id: str,
        timestamp: int,
        service: str | None,
        args: list[Any],
        kwargs: dict[str, Any],
    ) -> str:
        canonical = json.dumps(
            [SIGNATURE_SCHEME, task, task_id, timestamp, service, args, kwargs],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        return hmac.new(self._key, canonical.encode("ascii"), hashlib.sha256).hexdigest()


# The signer of each Celery app built by celerybridge with a key: kept off ``app.conf``,
# which Celery can print (``celery inspect conf``, ``celery report``).
_app_signers: weakref.WeakKeyDictionary[Celery, Signer] = weakref.WeakKeyDictionary()


def signing_app(main: str, settings: BridgeSettings, **options: Any) -> Celery:
    """A Celery app (``Celery(main, **options)``) that, when ``settings`` have a signing
    key, signs what it sends and, as a worker, checks what it receives."""
    signer = Signer.from_settings(settings)
    app = Celery(main, amqp=SigningAMQP if signer is not None else None, **options)
    if signer is not None:
        _app_signers[app] = signer
    return app


def signer_of(app: Celery) -> Signer | None:
    """The signer attached to ``app``, if any."""
    return _app_signers.get(app)


class SigningAMQP(AMQP):
    """Celery's message builder, signing each task message when the app has a signer.

    The kombu path (``Celery.send_task`` in the bridge's client app) and a keyed
    worker's own publishes (retries, ``autoretry_for``, tasks sent from tasks) build
    their messages here, so they are signed as the native publishers sign theirs.

    A retry carries its request's custom headers over (``headers=``), which Celery
    merges into the new message after building it: the old signature and timestamp
    among them would replace the fresh ones, so they are dropped from there.
    """

    def _create_task_sender(self) -> Any:
        send = super()._create_task_sender()  # type: ignore[misc]

        def send_task_message(
            *args: Any, headers: Mapping[str, Any] | None = None, **kw: Any
        ) -> Any:
            if headers:
                headers = {k: v for k, v in headers.items() if k not in _SIGNATURE_HEADERS}
            return send(*args, headers=headers, **kw)

        return send_task_message

    def as_task_v2(
        self,
        task_id: str,
        name: str,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        *more: Any,
        **options: Any,
    ) -> task_message:
        message = super().as_task_v2(task_id, name, args, kwargs, *more, **options)
        signer = signer_of(self.app)
        if signer is not None:
            service = (options.get("headers") or {}).get(SERVICE_HEADER)
            message.headers.update(
                signer.headers(name, task_id, args or (), kwargs or {}, service=service)
            )
        return message
