"""Signed task messages: a worker with a key runs only what a holder of that key sent, lately.

Celery's ``auth`` serializer signs the body alone (not the task name) and a signed
message stays valid for ever, so a captured message can be replayed at will. With
``CELERYBRIDGE_SIGNING_KEY`` set, every message a bridge publishes carries three headers:

- ``x-celerybridge-timestamp``: when it was signed, in whole seconds since the epoch;
- ``x-celerybridge-key-id``: which key signed it (:func:`key_id`, which never reveals
  the key);
- ``x-celerybridge-signature``: HMAC-SHA256 (hex) under that key of the canonical form.

The canonical form (scheme v2) is compact JSON, keys sorted, ASCII only, of::

    ["celerybridge-hmac-sha256-v2", key id, timestamp, {header: value, ...},
     SHA-256 of the body (hex), content type, content encoding]

where the object holds every header of ``SIGNED_HEADERS`` (``_constants.py``: those
that change what runs, when, where or as whom, and ``x-celerybridge-service``), a
missing one as ``null``. The body is hashed as the exact bytes it travels as, once the
transport has undone its own framing (base64 on Redis): the arguments and the embed
(callbacks, errbacks, chain, chord) alike. The worker never parses the body to check
it, and a body re-encoded after signing (other whitespace, key order, escapes) is
refused even though it decodes to the same values: only the signer's bytes are
vouched for. Headers outside the list (``traceparent``, ``sentry-trace``, ``baggage``,
Celery's ``origin``...) are not signed, so instrumentation may add them; ``stamps`` and
``headers`` are, since Celery hands both to the task's retries.

Both publishing paths sign the final message: the native publishers in
``_transports/_protocol.task_message``, the kombu path and keyed workers' own publishes
(retries) in :class:`SigningAMQP`.

Several keys may verify (``CELERYBRIDGE_SIGNING_VERIFY_KEYS``, for rotation); one
signs. A worker built by :func:`~celerybridge.celery_app` with a key checks every
message before Celery looks at it (:meth:`Signer.refusal`), and what fails goes to the
dead-letter queue (``_worker/dead_letter.py``). The key is never part of a reason, a log line
or a repr.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import weakref
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.app.amqp import AMQP
from kombu.serialization import dumps as kombu_dumps

from ._constants import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    KEY_ID_DOMAIN,
    KEY_ID_HEADER,
    KEY_ID_LENGTH,
    SIGNATURE_HEADER,
    SIGNATURE_SCHEME,
    SIGNATURE_SCHEME_V1,
    SIGNED_HEADERS,
    SIGNING_CLOCK_SKEW,
    TIMESTAMP_HEADER,
)

if TYPE_CHECKING:
    from ._config import BridgeSettings

SIGNATURE_HEADERS = frozenset({SIGNATURE_HEADER, TIMESTAMP_HEADER, KEY_ID_HEADER})
"""The headers a signer adds; a message re-signed drops its old ones first."""

_HEX_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_HEX_KEY_ID = re.compile(f"[0-9a-f]{{{KEY_ID_LENGTH}}}")
# What the canonical form cannot hold: a value JSON cannot carry (datetime, bytes,
# Decimal from an AMQP table, NaN, a dict with keys of several types), a circular one
# (ValueError), one nested too deep to encode (RecursionError).
_UNENCODABLE = (TypeError, ValueError, RecursionError)

UNSIGNED = (
    "unsigned message: this worker runs only messages signed with its signing key "
    "(CELERYBRIDGE_SIGNING_KEY)"
)
MALFORMED = (
    f"malformed signature headers: {TIMESTAMP_HEADER} must be an integer, "
    f"{KEY_ID_HEADER} {KEY_ID_LENGTH} and {SIGNATURE_HEADER} 64 lowercase hex digits"
)
BAD_SIGNATURE = (
    "bad signature: the message was not signed with this worker's signing key, "
    "or was altered after signing"
)
OLD_SCHEME = (
    f"outdated signature ({SIGNATURE_SCHEME_V1}): it does not cover callbacks, chains or "
    f"most headers, and this worker accepts only {SIGNATURE_SCHEME}; upgrade the sender"
)
UNKNOWN_KEY = "signed with a key this worker does not know"
"""The start of the reason for a key id no key of the worker has: ``... (key id <id>)``."""
UNREADABLE_BODY = "cannot check the signature: the body is neither bytes nor UTF-8 text"
UNENCODABLE_HEADER = "cannot check the signature: a signed header holds a value JSON cannot carry"
"""The start of the reason for such a header: ``...: <name>``."""


class UnsignableError(ValueError):
    """A message that cannot be signed: a body neither bytes nor text, or a signed header,
    content type or encoding JSON cannot carry."""


def key_id(key: str | bytes) -> str:
    """The id of a signing key, sent with each signature: ``KEY_ID_LENGTH`` hex digits of
    SHA-256 over a domain-separation prefix and the key. It names the key without
    revealing it, and the prefix keeps it apart from any other hash of the key."""
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return hashlib.sha256(KEY_ID_DOMAIN + raw).hexdigest()[:KEY_ID_LENGTH]


def body_bytes(body: object) -> bytes | None:
    """``body`` as the bytes it travelled as, or ``None`` if it cannot be.

    kombu hands a worker the body as bytes; a client that decoded it hands over text,
    which was UTF-8 (the only encoding celerybridge sends).
    """
    if isinstance(body, bytes):
        return body
    if isinstance(body, bytearray | memoryview):
        return bytes(body)
    if isinstance(body, str):
        try:
            return body.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: never what a sender encoded
            return None
    return None


def canonical(
    kid: str,
    timestamp: int,
    headers: Mapping[str, Any],
    body: bytes,
    content_type: object,
    content_encoding: object,
) -> bytes:
    """The bytes a v2 signature by the key ``kid`` is the HMAC of (see the module docstring).

    Raises :class:`UnsignableError`, naming the header, when JSON cannot carry a value.
    """
    signed = {name: headers.get(name) for name in SIGNED_HEADERS}
    document = [
        SIGNATURE_SCHEME,
        kid,
        timestamp,
        signed,
        hashlib.sha256(body).hexdigest(),
        content_type,
        content_encoding,
    ]
    try:
        return _compact(document).encode("ascii")
    except _UNENCODABLE:
        pass
    # Only now, on the rare failure, find which value it was.
    named = {**signed, "content type": content_type, "content encoding": content_encoding}
    for name, value in named.items():
        try:
            _compact(value)
        except _UNENCODABLE:
            raise UnsignableError(f"{UNENCODABLE_HEADER}: {name}") from None
    raise UnsignableError(UNENCODABLE_HEADER)  # pragma: no cover - one of them failed


def _compact(value: object) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


class Signer:
    """Signs outgoing task messages with one key, checks incoming ones with several.

    ``key`` signs (and verifies); ``verify_keys`` are also accepted when checking, for
    key rotation. ``max_age`` is how many seconds after signing a message is still
    accepted; signatures up to ``SIGNING_CLOCK_SKEW`` seconds in the future are
    accepted too, for clocks that disagree a little. No key appears in ``repr``.
    """

    __slots__ = ("_key", "_keys", "key_id", "max_age")

    def __init__(
        self, key: str | bytes, max_age: float, verify_keys: Iterable[str | bytes] = ()
    ) -> None:
        self._key = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        self.key_id = key_id(self._key)
        """The id of the signing key, as messages it signs carry it."""
        self.max_age = max_age
        raws = [k.encode("utf-8") if isinstance(k, str) else bytes(k) for k in verify_keys]
        self._keys = {key_id(raw): raw for raw in raws}
        self._keys[self.key_id] = self._key

    @classmethod
    def from_settings(cls, settings: BridgeSettings) -> Signer | None:
        """The signer the settings ask for, or ``None`` when no signing key is set."""
        if settings.signing_key is None:
            return None
        return cls(
            settings.signing_key.get_secret_value(),
            settings.signing_max_age,
            [key.get_secret_value() for key in settings.signing_verify_keys],
        )

    @property
    def verify_key_ids(self) -> tuple[str, ...]:
        """The ids of every key this signer accepts, the signing key's first."""
        return (self.key_id, *sorted(set(self._keys) - {self.key_id}))

    def __repr__(self) -> str:
        others = self.verify_key_ids[1:]
        also = f" verify_key_ids={','.join(others)}" if others else ""
        return f"<Signer key_id={self.key_id}{also} max_age={self.max_age:g}s>"

    def headers(
        self,
        headers: Mapping[str, Any],
        body: bytes | str,
        *,
        content_type: str = CONTENT_TYPE,
        content_encoding: str = CONTENT_ENCODING,
        now: float | None = None,
    ) -> dict[str, Any]:
        """The headers that sign a message with these final ``headers`` and ``body``.

        ``headers`` must be the message's headers as it will be published (only those
        of ``SIGNED_HEADERS`` count), ``body`` its exact bytes before any transport
        framing. ``now`` (seconds since the epoch) is the signing time, the current
        time by default. Raises :class:`UnsignableError` for a signed header JSON
        cannot carry.
        """
        raw = body_bytes(body)
        if raw is None:
            raise UnsignableError(UNREADABLE_BODY)
        timestamp = int(time.time() if now is None else now)
        message = canonical(self.key_id, timestamp, headers, raw, content_type, content_encoding)
        return {
            TIMESTAMP_HEADER: timestamp,
            KEY_ID_HEADER: self.key_id,
            SIGNATURE_HEADER: hmac.new(self._key, message, hashlib.sha256).hexdigest(),
        }

    def refusal(
        self,
        headers: object,
        body: object,
        now: float | None = None,
        *,
        content_type: object = CONTENT_TYPE,
        content_encoding: object = CONTENT_ENCODING,
    ) -> str | None:
        """Why a received message must not run, or ``None`` if its signature is good.

        ``body`` is the message body as received (kombu has undone any transport
        encoding, such as base64 on Redis); ``content_type`` and ``content_encoding``
        are the message's (pass them: they are signed; the defaults are what
        celerybridge sends). Never raises and never parses the body: any headers and
        any body give a reason or ``None``.
        """
        if headers is None:
            headers = {}
        if not isinstance(headers, Mapping):
            return UNSIGNED  # nothing that could hold a signature
        signature = headers.get(SIGNATURE_HEADER)
        timestamp = headers.get(TIMESTAMP_HEADER)
        sent_key_id = headers.get(KEY_ID_HEADER)
        if signature is None and timestamp is None and sent_key_id is None:
            return UNSIGNED
        if (
            not isinstance(signature, str)
            or not _HEX_SIGNATURE.fullmatch(signature)
            or not isinstance(timestamp, int)
            or isinstance(timestamp, bool)
        ):
            return MALFORMED
        if sent_key_id is None:
            return OLD_SCHEME
        if not isinstance(sent_key_id, str) or not _HEX_KEY_ID.fullmatch(sent_key_id):
            return MALFORMED
        key = self._keys.get(sent_key_id)
        if key is None:
            return f"{UNKNOWN_KEY} (key id {sent_key_id})"
        raw = body_bytes(body)
        if raw is None:
            return UNREADABLE_BODY
        try:
            message = canonical(
                sent_key_id, timestamp, headers, raw, content_type, content_encoding
            )
        except UnsignableError as exc:
            return str(exc)
        expected = hmac.new(key, message, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return BAD_SIGNATURE
        # Only an authentic message learns about its age: a forged timestamp is a bad signature.
        return self._outside_window(timestamp, time.time() if now is None else now)

    def _outside_window(self, timestamp: int, now: float) -> str | None:
        try:
            age = now - timestamp
        except OverflowError:  # a timestamp no clock will reach: from the future
            age = float("-inf")
        if age <= self.max_age and -age <= SIGNING_CLOCK_SKEW:
            return None
        try:
            signed_at = datetime.fromtimestamp(timestamp, UTC).isoformat()
        except (OverflowError, OSError, ValueError):
            signed_at = f"{timestamp} s after the epoch"
        if age > self.max_age:
            return (
                f"expired signature: signed at {signed_at}, more than {self.max_age:g} s "
                "before this worker's clock (CELERYBRIDGE_SIGNING_MAX_AGE)"
            )
        return (
            f"signature from the future: signed at {signed_at}, more than "
            f"{SIGNING_CLOCK_SKEW} s ahead of this worker's clock"
        )

    def resigned(
        self,
        headers: Mapping[str, Any],
        body: bytes | str,
        *,
        content_type: str = CONTENT_TYPE,
        content_encoding: str = CONTENT_ENCODING,
    ) -> dict[str, Any] | None:
        """``headers`` of a received message, as given, with a fresh signature over them
        and ``body`` (its exact bytes), signed now; ``None`` if it cannot be signed (a
        body that is not bytes or text, a signed header JSON cannot carry).

        The old signature headers are dropped; every other header is kept and signed as
        it is (a ``retries`` reset by the caller included). Whoever does this vouches for
        the message.
        """
        kept = {k: v for k, v in headers.items() if k not in SIGNATURE_HEADERS}
        try:
            fresh = self.headers(
                kept, body, content_type=content_type, content_encoding=content_encoding
            )
        except UnsignableError:
            return None
        return {**kept, **fresh}


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
    worker's own publishes (retries, ``autoretry_for``, tasks sent from tasks) go
    through Celery's ``send_task_message``, which merges the custom ``headers=`` into
    the built message's headers, sends ``before_task_publish`` (whose receivers may
    change those headers) and has its producer publish. The signature is computed at
    that last step (:class:`_SigningProducer`), over exactly what is published: the
    final headers and the body bytes, serialised there once, as kombu would
    (``kombu.serialization.dumps`` with the serializer Celery passes).

    A retry carries its request's custom headers over, the old signature among them:
    those are replaced by the fresh ones.
    """

    def _create_task_sender(self) -> Any:
        send = super()._create_task_sender()  # type: ignore[misc]
        app = self.app

        def send_task_message(producer: Any, name: str, message: Any, *args: Any, **kw: Any) -> Any:
            signer = signer_of(app)
            if signer is not None:
                producer = _SigningProducer(producer, signer)
            return send(producer, name, message, *args, **kw)

        return send_task_message


class _SigningProducer:
    """A kombu ``Producer`` whose ``publish`` signs the message it is given, then
    publishes it already serialised; everything else is the producer's own."""

    def __init__(self, producer: Any, signer: Signer) -> None:
        self._producer = producer
        self._signer = signer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    def publish(
        self,
        body: Any,
        *,
        headers: dict[str, Any],
        serializer: str | None = None,
        **kw: Any,
    ) -> Any:
        content_type, content_encoding, payload = kombu_dumps(
            body, serializer=serializer or self._producer.serializer
        )
        # kombu sends a text payload encoded so (py-amqp; str_to_bytes on Redis).
        data = payload.encode(content_encoding) if isinstance(payload, str) else payload
        for stale in SIGNATURE_HEADERS:  # a retry's, carried over from its request
            headers.pop(stale, None)
        headers.update(
            self._signer.headers(
                headers, data, content_type=content_type, content_encoding=content_encoding
            )
        )
        return self._producer.publish(
            data,
            headers=headers,
            content_type=content_type,
            content_encoding=content_encoding,
            **kw,
        )
