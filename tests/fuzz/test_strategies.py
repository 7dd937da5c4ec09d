"""The fuzz suite's own strategies, without brokers: every case can be traced back from a
dead letter, refused cases are malformed by an independent reading of the intake
contract, valid ones are not, and the strategies reach every family."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celerybridge._signing import Signer

from ._model import (
    EMBED_KEYS,
    MAX_DEPTH,
    MAX_MESSAGE_BYTES,
    MAX_NAME,
    Case,
    Ctx,
    Mutation,
    nests_deeper,
)
from ._wire import BrokerName, Wire, text_of
from .strategies import build, recipes

COMBINATIONS = [("redis", False), ("redis", True), ("amqp", False), ("amqp", True)]
KEY = "fuzz-" + "0123456789abcdef" * 3
FAST = settings(
    max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


def _cases(broker: BrokerName, keyed: bool) -> st.SearchStrategy[list[Case]]:
    signer = Signer(KEY, 300) if keyed else None
    other = Signer("other-" + "fedcba9876543210" * 3, 300)

    def built(batch: list[Any]) -> list[Case]:
        return [
            build(recipe, Ctx("abcdef", n, "fuzz-q", broker, signer, other))
            for n, recipe in enumerate(batch, 1)
        ]

    return st.lists(recipes(broker, keyed), min_size=10, max_size=10).map(built)


@pytest.mark.parametrize(("broker", "keyed"), COMBINATIONS)
def test_every_case_can_be_told_from_its_dead_letter(broker: BrokerName, keyed: bool) -> None:
    @FAST
    @given(_cases(broker, keyed))
    def check(cases: list[Case]) -> None:
        for case in cases:
            wire = case.wire
            if wire.raw is not None:
                text = wire.raw.decode("latin-1")
                assert case.marker in text or not wire.raw.strip(), case.describe()
            else:
                text = wire.body.decode("latin-1") + text_of(wire.headers)
                assert case.marker in text, case.describe()

    check()


# An independent reading of the intake contract (the worker's is celerybridge._worker.intake).

_IDENTIFIER = re.compile(rf"[^\x00-\x1f\x7f]{{1,{MAX_NAME}}}")
_RESERVED = {*EMBED_KEYS, "args", "kwargs", "hostname", "is_eager", "delivery_info"}
_RESERVED |= {"reply_to", "correlation_id", "called_directly", "utc"}


def _identifier(value: Any, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, str) and _IDENTIFIER.fullmatch(value) is not None


def _count(value: Any) -> bool:
    return value is None or (type(value) is int and value >= 0)


def _iso(value: Any) -> bool:
    if value is None:
        return True
    try:
        datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


def _limits(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(v is None or (type(v) in (int, float) and v >= 0) for v in value)
    )


def _signature(step: Any) -> bool:
    # Celery cannot apply a signature without its args, kwargs and options.
    return (
        isinstance(step, dict)
        and _identifier(step.get("task"))
        and isinstance(step.get("args"), list)
        and isinstance(step.get("kwargs"), dict)
        and isinstance(step.get("options"), dict)
        and set(step) <= {
            "task", "args", "kwargs", "options", "subtask_type", "immutable", "chord_size",
        }
    )  # fmt: skip


def malformation(wire: Wire) -> str | None:
    """Why ``wire`` is not a well-formed protocol 2 JSON task message, or ``None``."""
    headers = wire.headers
    if not isinstance(headers, dict) or nests_deeper(headers, MAX_DEPTH):
        return "headers"
    if wire.content_type != "application/json":
        return "content type"
    encoding = wire.content_encoding
    if not isinstance(encoding, str) or encoding.lower() not in ("utf-8", "utf8", "binary"):
        return "content encoding"
    if headers.get("compression") is not None:
        return "compression"
    checks = {
        "task": _identifier(headers.get("task")),
        "id": _identifier(headers.get("id")),
        "ids": all(_identifier(headers.get(h), True) for h in ("root_id", "parent_id", "group")),
        "retries": _count(headers.get("retries")),
        "eta": _iso(headers.get("eta")) and _iso(headers.get("expires")),
        "timelimit": "timelimit" not in headers or _limits(headers["timelimit"]),
        "reserved": not set(headers) & _RESERVED,
        "properties": all(
            isinstance(wire.properties.get(p, ""), str) for p in ("correlation_id", "reply_to")
        )
        and _count(wire.properties.get("priority")),
    }
    if failed := [name for name, ok in checks.items() if not ok]:
        return f"header {failed[0]}"
    if len(wire.body) > MAX_MESSAGE_BYTES:
        return "size"
    try:
        document = json.loads(wire.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "body not UTF-8 JSON"
    if nests_deeper(document, MAX_DEPTH):
        return "depth"
    if not (isinstance(document, list) and len(document) == 3):
        return "body shape"
    args, kwargs, embed = document
    if not (isinstance(args, list) and isinstance(kwargs, dict) and isinstance(embed, dict)):
        return "body types"
    if not set(embed) <= set(EMBED_KEYS):
        return "embed keys"
    for slot in ("callbacks", "errbacks", "chain"):
        steps = embed.get(slot)
        if steps is not None and not (isinstance(steps, list) and all(map(_signature, steps))):
            return f"embed {slot}"
    if embed.get("chord") is not None and not _signature(embed["chord"]):
        return "embed chord"
    return None


# Families refused for what they are, not for what they ask (contract, task) or who
# sent them (signature); raw Redis entries are checked by the envelope's own reading.
_SHAPE_FAMILIES = {
    "body-shape", "body-types", "embed-keys", "embed-values", "header-types", "header-typed",
    "header-missing", "header-huge", "protocol-v1", "content-type", "content-encoding",
    "compression", "oversized", "deep-nesting", "properties", "header-request-fields",
}  # fmt: skip
_CONTRACT_LABELS = ("lone surrogate escape in the key", "NUL escape in the key")


def _refused_by_shape(mutation: Mutation) -> bool:
    """Whether this mutation alone makes the message fail the intake's shape check."""
    if mutation.expect != "refuse":
        return False
    if mutation.family == "non-utf8":  # in a task name or a contract key: refused later
        return not (mutation.label in _CONTRACT_LABELS or mutation.label.startswith("task"))
    return mutation.family in _SHAPE_FAMILIES


def _shape_refused(case: Case) -> bool:
    # Mutation by mutation: a case refused for another reason (a lone surrogate in the task
    # name) may also carry a shape family's mutation that runs (content-encoding 'binary').
    if case.expect != "refuse" or case.recipe.raw is not None:
        return False
    if "signature" in {m.family for m in case.applied}:
        return False
    return any(_refused_by_shape(m) for m in case.applied)


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_refused_cases_are_malformed_and_valid_ones_are_not(broker: BrokerName) -> None:
    @FAST
    @given(_cases(broker, False))
    def check(cases: list[Case]) -> None:
        for case in cases:
            wire = case.wire
            if _shape_refused(case):
                assert malformation(wire) is not None, case.describe()
            elif case.expect == "run":
                assert malformation(wire) is None, case.describe()

    check()


@pytest.mark.parametrize(("broker", "keyed"), COMBINATIONS)
def test_the_strategies_reach_every_family(broker: BrokerName, keyed: bool) -> None:
    families: set[str] = set()
    expected = {
        "body-shape", "body-types", "embed-keys", "embed-values", "embed-signatures",
        "header-types", "header-typed", "header-missing", "header-huge", "header-custom",
        "header-request-fields", "protocol-v1", "content-type", "content-encoding",
        "compression", "non-utf8", "oversized", "deep-nesting", "properties",
        "unknown-task", "builtin-task", "contract", "valid",
    }  # fmt: skip
    expected |= {"redis-raw"} if broker == "redis" else set()
    expected |= {"signature", "replay"} if keyed else set()

    # Derandomized: 60 examples of hypothesis are not 1,500 independent draws (it starts
    # from the simplest and mutates), and a family a random seed missed failed a run.
    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(recipes(broker, keyed), min_size=25, max_size=25))
    def draw(batch: list[Any]) -> None:
        for recipe in batch:
            families.update(recipe.family.split("+"))

    draw()
    assert expected <= families, sorted(expected - families)
