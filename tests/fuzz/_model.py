"""The parts of a fuzz case: the context it is built in, the message being mutated,
mutations, raw Redis entries, recipes (what hypothesis draws) and cases (what is sent)."""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from celerybridge._signing import Signer
from pusher.bindings import send_to_s3

from ._wire import BrokerName, Expect, Wire

TASK = send_to_s3.wire_name
EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")
MIB = 1024 * 1024
MAX_MESSAGE_BYTES = MIB
"""The fuzz workers' CELERYBRIDGE_MAX_MESSAGE_BYTES."""
MAX_DEPTH = 32
"""How deep JSON may nest in a body or a header (``celerybridge._worker.intake.shape``)."""
MAX_NAME = 255
"""Characters in a task name, an id and the other identifiers of a message."""
BOTH: frozenset[BrokerName] = frozenset({"redis", "amqp"})
REDIS: frozenset[BrokerName] = frozenset({"redis"})
AMQP: frozenset[BrokerName] = frozenset({"amqp"})
Sign = Literal["none", "before", "after"]
Base = Literal["v1", "kw", "v2", "v3"]


@dataclass(frozen=True)
class Ctx:
    """What a case is built with: its run, number, queue and the worker's keys."""

    run: str
    n: int
    queue: str
    broker: BrokerName
    signer: Signer | None = None
    other_signer: Signer | None = None
    cls: str = "either"
    """``bad``, ``either`` or ``ok``: the folder of the main key."""
    links_signed: bool = False
    """Whether embedded calls were signed with the worker's key (signed after mutation)."""

    @property
    def marker(self) -> str:
        return f"fz{self.run}n{self.n:06d}"

    @property
    def key(self) -> str:
        return f"fuzz/{self.run}/{self.cls}/{self.marker}"

    @property
    def task_id(self) -> str:
        return f"{self.marker}-{uuid.UUID(int=self.n)}"

    @property
    def content(self) -> str:
        return json.dumps({"fuzz": self.marker, "note": "caf\u00e9"})

    def link_key(self, index: int) -> str:
        folder = "bad" if self.signer is not None and not self.links_signed else "either"
        return f"fuzz/{self.run}/{folder}/{self.marker}-l{index}"


@dataclass
class Draft:
    """A message being mutated: the body as a JSON document until bytes replace it."""

    headers: Any
    document: Any
    content_type: str | None
    content_encoding: str | None
    properties: dict[str, Any]
    body: bytes | None = None
    codec: str = "utf-8"
    envelope: dict[str, Any] | None = None
    links: list[str] = field(default_factory=list)

    def encoded(self) -> bytes:
        if self.body is not None:
            return self.body
        text = json.dumps(self.document, ensure_ascii=self.codec == "utf-8")
        return text.encode(self.codec)

    def saved(self) -> Draft:
        """A copy to go back to if a mutation fails half-way. Mutations set top-level
        headers and properties, and parts of the document: copies of those suffice (and
        a header nested 15,000 deep is shared, not copied)."""
        return replace(
            self,
            headers=copy.copy(self.headers),
            document=copy.deepcopy(self.document),
            properties=dict(self.properties),
            envelope=copy.copy(self.envelope),
            links=list(self.links),
        )

    def same_as(self, other: Draft) -> bool:
        """Whether nothing differs that goes on the wire (values shared with ``other``
        compare by identity first, so a deep header is not walked)."""
        return (
            self.headers == other.headers
            and self.encoded() == other.encoded()
            and (self.content_type, self.content_encoding)
            == (other.content_type, other.content_encoding)
            and self.properties == other.properties
            and self.envelope == other.envelope
            and self.links == other.links
        )


Apply = Callable[[Draft, Ctx], None]


@dataclass(frozen=True)
class Mutation:
    family: str
    label: str
    expect: Expect
    apply: Apply = field(compare=False)
    brokers: frozenset[BrokerName] = BOTH

    def __repr__(self) -> str:
        return f"{self.family}:{self.label}"


@dataclass(frozen=True)
class Raw:
    """A Redis list entry that is not (or not quite) a kombu envelope."""

    family: str
    label: str
    expect: Expect
    make: Callable[[Ctx, bytes], bytes] = field(compare=False)
    """From the context and a valid envelope of the case's call, the entry."""

    def __repr__(self) -> str:
        return f"{self.family}:{self.label}"


@dataclass(frozen=True)
class Recipe:
    mutations: tuple[Mutation, ...] = ()
    sign: Sign = "none"
    base: Base = "v1"
    raw: Raw | None = None
    copies: int = 1

    @property
    def family(self) -> str:
        if self.raw is not None:
            return self.raw.family
        if self.copies > 1:
            return "replay"
        families = sorted({m.family for m in self.mutations})
        return "+".join(families) if families else "valid"

    @property
    def label(self) -> str:
        parts = [repr(self.raw)] if self.raw is not None else [repr(m) for m in self.mutations]
        return " + ".join(parts or ["valid call"]) + f" [{self.base}, signed {self.sign}]"

    @property
    def brokers(self) -> frozenset[BrokerName]:
        allowed = REDIS if self.raw is not None else BOTH
        for mutation in self.mutations:
            allowed &= mutation.brokers
        return allowed


@dataclass(frozen=True)
class Case:
    """One recipe built for one run: what is sent and what must become of it."""

    n: int
    marker: str
    recipe: Recipe
    expect: Expect
    wire: Wire
    key: str
    links: tuple[str, ...]
    task_id: str | None
    """The task id a refusal must mark failed, when the message carries it intact."""
    applied: tuple[Mutation, ...] = ()
    """The recipe's mutations that changed the message (a later one can find nothing to
    change: a body already replaced by bytes, headers that are not a dict)."""

    @property
    def family(self) -> str:
        return replace(self.recipe, mutations=self.applied).family

    @property
    def label(self) -> str:
        return replace(self.recipe, mutations=self.applied).label

    @property
    def copies(self) -> int:
        return self.recipe.copies

    def describe(self) -> str:
        return f"#{self.n} {self.marker} {self.label} (expect {self.expect})"


def args_of(d: Draft) -> Any:
    return d.document[0]


def kwargs_of(d: Draft) -> Any:
    return d.document[1]


def embed_of(d: Draft) -> Any:
    return d.document[2]


def signature(task: str, args: list[Any], queue: str, **kwargs: Any) -> dict[str, Any]:
    """A Celery signature as JSON, immutable, routed back to the fuzz queue."""
    return {
        "task": task,
        "args": args,
        "kwargs": kwargs,
        "options": {"queue": queue},
        "subtask_type": None,
        "immutable": True,
        "chord_size": None,
    }


def upload(ctx: Ctx, key: str) -> dict[str, Any]:
    """``send_to_s3(key, ...)`` as an embedded signature. Its content names the key, not the
    case's marker alone, so a dead letter of this call is told apart from the case's own."""
    return signature(TASK, [key, json.dumps({"link": key})], ctx.queue)


def header(family: str, name: str, value: Any, expect: Expect = "refuse") -> Mutation:
    label = f"{name} = {value!r}"[:80] if not callable(value) else f"{name} = {value.__doc__}"

    def apply(draft: Draft, ctx: Ctx) -> None:
        draft.headers[name] = value(ctx) if callable(value) else value

    return Mutation(family, label, expect, apply)


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether lists and dicts nest in ``value`` more than ``limit`` deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in children)
    return False
