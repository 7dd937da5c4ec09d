"""kombu's JSON, written faster where that cannot change what a worker reads.

kombu's ``json`` serializer is the standard library's encoder with kombu's ``default``
(``kombu.utils.json``). Every task message is encoded twice: its body, and on Redis the
envelope around it (headers, properties, the body in base64). Both are most of what a
publish costs in Python, so:

- :func:`flat_body` writes the usual body, a few plain arguments and no workflow,
  byte for byte as kombu's encoder does (a signature covers those bytes, and
  ``tests/test_wire.py`` compares them with kombu's), at a fraction of the cost;
- :func:`envelope_json` writes the envelope with orjson when its headers are plain JSON
  values: compact UTF-8 rather than kombu's spaced ASCII, the same document once decoded.

Anything else goes through kombu's encoder, as before.
"""

from __future__ import annotations

from json.encoder import encode_basestring_ascii
from typing import Any

import orjson
from kombu.utils.json import JSONEncoder

from .._constants import CONTENT_ENCODING

KOMBU_JSON = JSONEncoder()
"""What kombu's ``json`` serializer (``kombu.utils.json.dumps``) encodes with: its
encoder class with ``json.dumps``' defaults. Built once; ``dumps`` builds one per call."""

_NO_EMBED = (("callbacks", None), ("errbacks", None), ("chain", None), ("chord", None))
"""The body's third part for a task sent on its own: no callbacks, no workflow."""
_NO_EMBED_JSON = b'{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'

_ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
"""What orjson would write its own way is handed to ``default``, which it has none of:
it raises, and kombu's encoder writes the document instead."""
_PLAIN_DEPTH = 16
"""Deepest nesting :func:`_plain` follows in headers before leaving them to kombu's encoder."""
_SCALARS = frozenset({str, int, bool, type(None)})
"""Exact types orjson and kombu's encoder write alike (an integer beyond 64 bits makes
orjson raise, and kombu's encoder is used)."""


def kombu_json(value: Any) -> bytes:
    """``value`` as kombu's ``json`` serializer writes it, UTF-8."""
    return KOMBU_JSON.encode(value).encode(CONTENT_ENCODING)


def flat_body(args: Any, kwargs: Any, embed: Any) -> bytes | None:
    """The body ``[args, kwargs, embed]`` byte for byte as kombu's encoder writes it, or
    ``None`` unless it is flat: exact ``str``, ``int``, ``bool``, ``None`` and finite
    ``float`` arguments (keywords by ``str`` names), and no callbacks or workflow.

    A flat body nests two levels deep, well within what a worker reads.
    """
    if type(embed) is not dict or tuple(embed.items()) != _NO_EMBED:
        return None
    if (type(args) is not tuple and type(args) is not list) or type(kwargs) is not dict:
        return None
    parts = []
    for value in args:
        text = _scalar(value)
        if text is None:
            return None
        parts.append(text)
    pairs = []
    for name, value in kwargs.items():
        text = _scalar(value)
        if type(name) is not str or text is None:
            return None
        pairs.append(_string(name) + b": " + text)
    return b"[[" + b", ".join(parts) + b"], {" + b", ".join(pairs) + b"}, " + _NO_EMBED_JSON + b"]"


def _scalar(value: Any) -> bytes | None:
    """One value as the standard library's C encoder writes it (``ensure_ascii``,
    ``allow_nan``), or ``None`` for a type this module leaves to it."""
    kind = type(value)
    if kind is str:
        return _string(value)
    if value is None:
        return b"null"
    if kind is bool:
        return b"true" if value else b"false"
    if kind is int:
        return int.__repr__(value).encode()  # as the encoder: its digit limit raises alike
    if kind is float and value - value == 0.0:  # finite: NaN and infinities give NaN
        return float.__repr__(value).encode()
    return None


def _string(text: str) -> bytes:
    """A string as the encoder writes it with ``ensure_ascii``. For ASCII with nothing
    to escape, orjson writes the same bytes some twenty times faster: unescaped, its
    result is the text in quotes, as long as the text and two. Whatever it escaped
    goes to the encoder (orjson's escapes are the encoder's today; no need to rely on
    it), and so does DEL, which orjson leaves as it is and the encoder writes
    ``\\u007f``."""
    if text.isascii():
        quoted = orjson.dumps(text)
        if len(quoted) == len(text) + 2 and "\x7f" not in text:
            return quoted
    return encode_basestring_ascii(text).encode()


def envelope_json(document: dict[str, Any], headers: dict[str, Any]) -> bytes:
    """``document`` (a Redis envelope, ``headers`` in it) as JSON a worker decodes to
    what kombu's encoder would have written; orjson when :func:`_plain` ``headers`` (the
    rest is ours: strings, numbers, a dict of strings)."""
    if _plain(headers):
        try:
            return orjson.dumps(document, option=_ORJSON_OPTIONS)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits, a lone surrogate
            pass
    return kombu_json(document)


def _plain(headers: dict[str, Any]) -> bool:
    """Whether orjson writes ``headers`` as JSON that decodes to what kombu's encoder's
    does: only exact ``str``, ``int``, ``bool``, ``None``, finite ``float``, and lists,
    tuples and ``str``-keyed dicts of them, at most ``_PLAIN_DEPTH`` deep.

    orjson would write a UUID, an enum or a datetime its own way, and a NaN as
    ``null``; kombu's encoder writes those differently (or refuses them), so any value
    of another type, subclasses included, leaves the document to kombu's encoder.
    """
    for value in headers.values():
        if type(value) not in _SCALARS and not _plain_value(value, 1):
            return False
    return True


def _plain_value(value: Any, depth: int) -> bool:
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is float:
        return bool(value - value == 0.0)  # finite: NaN and the infinities give NaN
    if depth >= _PLAIN_DEPTH:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not _plain_value(item, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        for item in value:  # noqa: SIM110 - all() over a generator costs twice this
            if not _plain_value(item, depth + 1):
                return False
        return True
    return False
