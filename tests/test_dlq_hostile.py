"""``celerybridge dlq`` against a hostile ``<queue>.dead``: whoever can write to the broker
can write there, so nothing read there may forge output, crash the command, vanish,
choose where a replay goes or get itself signed by ``--all --sign``."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import kombu
import pytest
import redis
from amqp.exceptions import NotFound
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.exceptions import ChannelError

from celerybridge._cli import main
from celerybridge._signing import Signer
from celerybridge._utils import printable

from ._brokers import BROKERS, purge, queue_length

pytestmark = pytest.mark.integration
KEY = "dlq-" + "0123456789abcdef" * 3
REASON, FROM, KIND = (
    "x-celerybridge-dead-reason",
    "x-celerybridge-dead-from",
    "x-celerybridge-dead-kind",
)
BODY = json.dumps([[2, 3], {}, {"callbacks": None, "errbacks": None, "chain": None}]).encode()
# What a terminal or a reader of lines would take for structure.
HOSTILE = [
    "\n",
    "\r",
    "\r\n",
    "\t",
    "\x1b[2J",
    "\x1b]0;owned\x07",
    "\x00",
    "\x7f",
    "\x85",
    "\u2028",
    "\u202e",
    "\\",
    "\\n",
    "\\x1b",
    "replayed fake (calc.add) to admin",
]
hostile_text = st.lists(st.sampled_from(HOSTILE) | st.characters(), max_size=10).map("".join)
_ESCAPE = re.compile(r"\\(\\|[ntr]|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")
_SHORT = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


def unescape(text: str) -> str:
    """What an escaped field stood for (backslash escapes as in a Python string)."""
    return _ESCAPE.sub(lambda m: _SHORT.get(m[1]) or chr(int(m[1][1:], 16)), text)


def dlq(*args: str, key: str | None = None, **settings: str) -> Result:
    """``celerybridge dlq ...`` in this process, with no CELERYBRIDGE_* setting but ``key``
    and ``settings`` (``BROKER_TRANSPORT_OPTIONS="..."``)."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CELERYBRIDGE_")}
    env["CELERYBRIDGE_SIGNING_KEY"] = key
    env.update({f"CELERYBRIDGE_{name}": value for name, value in settings.items()})
    return CliRunner().invoke(main, ["dlq", *args], env=env)


def printable_lines(text: str) -> bool:
    return all(line.isprintable() for line in text.split("\n"))


def plant(
    broker_url: str,
    queue: str,
    headers: dict[str, Any],
    body: bytes = BODY,
    content_type: str = "application/json",
    content_encoding: str = "utf-8",
) -> None:
    """A message with exactly these headers on ``queue``'s dead-letter queue, published
    the way a worker moves one there (or a hostile writer forges one)."""
    with kombu.Connection(broker_url) as connection:
        connection.Producer().publish(
            body,
            exchange="",
            routing_key=f"{queue}.dead",
            declare=[kombu.Queue(f"{queue}.dead", durable=True)],
            headers=headers,
            content_type=content_type,
            content_encoding=content_encoding,
        )


def letter(task_id: str, reason: str = "S3 was down") -> dict[str, Any]:
    return {"lang": "py", "task": "calc.add", "id": task_id, "root_id": task_id, REASON: reason}


def drain(broker_url: str, queue: str) -> list[tuple[dict[str, Any], bytes]]:
    """Headers and body of every message on ``queue``, consumed."""
    found = []
    with kombu.Connection(broker_url) as connection:
        channel: Any = connection.channel()
        channel.auto_decode = False  # py-amqp: the body as it travelled
        with suppress(ChannelError, NotFound):  # no such queue: nothing on it
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                found.append((dict(message.headers or {}), message.body))
    return found


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    """A fresh queue name; it, its dead letters and the queues replays went to are deleted."""
    name = f"dlq-hostile-{uuid.uuid4().hex[:12]}"
    yield name
    with kombu.Connection(broker_url) as connection:
        for suffix in ("", ".dead", "-to", "-victim"):
            with suppress(Exception):
                connection.channel().queue_delete(name + suffix)
            with suppress(Exception):
                connection.channel().exchange_delete(name + suffix)


def test_printable_escapes_what_forges_lines() -> None:
    hostile = "a\nb\x1b[31m\\\u202e\t\ud800é"
    assert printable(hostile) == "a\\nb\\x1b[31m\\\\\\u202e\\t\\ud800é"
    assert unescape(printable(hostile)) == hostile
    assert printable("7f3c-uuid: ok") == "7f3c-uuid: ok"


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    letters=st.lists(st.tuples(hostile_text, hostile_text, hostile_text), min_size=1, max_size=3)
)
def test_list_prints_one_printable_line_per_letter(
    broker_url: str, queue: str, letters: list[tuple[str, str, str]]
) -> None:
    purge(broker_url, f"{queue}.dead")
    for task_id, task, reason in letters:
        plant(broker_url, queue, {"id": task_id, "task": task, REASON: reason})

    listed = dlq("list", "--broker", broker_url, "--", queue)

    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.split("\n")
    assert lines.pop() == ""
    assert len(lines) == len(listed.stdout.splitlines()) == len(letters)
    fields = [line.split("\t") for line in lines]
    assert all(len(row) == 4 and all(f.isprintable() for f in row) for row in fields), lines
    assert all(row[2] == "-" for row in fields), lines  # no kind header
    rows = [(row[0], row[1], row[3]) for row in fields]
    assert sorted(tuple(unescape(f) for f in row) for row in rows) == sorted(letters)
    assert listed.stderr == f"{len(letters)} dead letter(s) on {queue}.dead\n"


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(task_id=hostile_text, task=hostile_text, reason=hostile_text, source=hostile_text)
def test_show_replay_and_errors_print_hostile_fields_escaped(
    broker_url: str, queue: str, task_id: str, task: str, reason: str, source: str
) -> None:
    purge(broker_url, f"{queue}.dead")
    purge(broker_url, queue)
    plant(broker_url, queue, {"id": task_id, "task": task, REASON: reason, FROM: source})
    absent = task_id + "\x1b[0m\n"

    shown = dlq("show", "--broker", broker_url, "--", queue, task_id)
    assert shown.exit_code == 0, shown.output
    assert printable_lines(shown.stdout)
    assert json.loads(shown.stdout)["id"] == task_id
    as_listed = dlq("show", "--broker", broker_url, "--", queue, printable(task_id))
    assert as_listed.stdout == shown.stdout  # the id as `list` printed it names it too
    for missing in (dlq("show", "--broker", broker_url, "--", queue, absent),
                    dlq("replay", "--broker", broker_url, "--", queue, absent)):  # fmt: skip
        assert missing.exit_code == 1
        assert missing.stdout == ""
        assert missing.stderr.count("\n") == 1
        assert printable_lines(missing.stderr)

    replayed = dlq("replay", "--broker", broker_url, "--", queue, task_id)
    assert replayed.exit_code == 0, replayed.output
    assert replayed.stdout.count("\n") == 1
    assert printable_lines(replayed.stdout)
    assert unescape(printable(task_id)) == task_id
    assert replayed.stdout.startswith(f"replayed {printable(task_id)} (")
    assert [headers["id"] for headers, _ in drain(broker_url, queue)] == [task_id]


GARBAGE = [
    b"\x00\xffnot JSON at all\n\x1b[31m",
    b'"a JSON string"',
    b"[" * 100_000,  # too deep for the JSON parser
    json.dumps({"body": "", "headers": "not a mapping", "properties": {}}).encode(),
    json.dumps(
        {"body": "%% not base64 %%", "headers": {}, "properties": {"body_encoding": "base64"}}
    ).encode(),
    json.dumps({"body": "", "headers": {"id": "no-properties"}}).encode(),
    json.dumps({"body": "", "headers": {}, "properties": {"body_encoding": "rot13"}}).encode(),
]


@pytest.mark.parametrize("broker", ["redis"])  # raw list entries: RabbitMQ has none
def test_garbage_on_redis_is_listed_kept_and_only_purged(broker_url: str, queue: str) -> None:
    url = broker_url
    client = redis.Redis.from_url(url)
    plant(url, queue, letter("genuine"))
    client.lpush(f"{queue}.dead", *GARBAGE)
    before = client.lrange(f"{queue}.dead", 0, -1)

    listed = dlq("list", queue, "--broker", url)
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0] == "genuine\tcalc.add\t-\tS3 was down"
    assert len(lines) == 1 + len(GARBAGE)
    assert all(line.startswith("-\tgarbage\t") for line in lines[1:])
    assert all(all(f.isprintable() for f in line.split("\t")) for line in lines)
    assert f"-\tgarbage\t-\tnot JSON; {len(GARBAGE[0])} bytes: {GARBAGE[0]!r}\n" in listed.stdout
    assert listed.stderr == f"1 dead letter(s) and {len(GARBAGE)} garbage entries on {queue}.dead\n"
    assert client.lrange(f"{queue}.dead", 0, -1) == before  # nothing taken, nothing moved
    assert dlq("show", queue, "genuine", "--broker", url).exit_code == 0

    replayed = dlq("replay", queue, "--all", "--broker", url)
    assert replayed.exit_code == 0, replayed.output
    assert replayed.stdout == f"replayed genuine (calc.add) to {queue}\n"
    assert replayed.stderr.count(f"kept garbage on {queue}.dead: ") == len(GARBAGE)
    assert client.lrange(f"{queue}.dead", 0, -1) == before[: len(GARBAGE)]  # the garbage
    assert [body for _, body in drain(url, queue)] == [BODY]

    purged = dlq("purge", queue, "--yes", "--broker", url)
    assert purged.stdout == f"purged {len(GARBAGE)} dead letter(s) from {queue}.dead\n"
    assert client.llen(f"{queue}.dead") == 0


def test_odd_messages_are_listed_shown_and_replayed_as_they_came(
    broker_url: str, queue: str
) -> None:
    odd = {
        "no-headers": ({}, BODY, "application/json", "utf-8"),
        "12345": (
            {"id": 12345, "task": ["calc", "add"], REASON: {"nested": [1, 2]}, FROM: 7},
            BODY,
            "application/json",
            "utf-8",
        ),
        "hex-encoded": (letter("hex-encoded"), BODY, "application/json", "hex"),
        "compressed": (
            {**letter("compressed"), "compression": "application/x-gzip"},
            b"\x00 not gzip \xff",
            "application/json",
            "utf-8",
        ),
        "not-utf8": (letter("not-utf8"), b"\xff\xfe[[1", "application/json", "utf-8"),
    }
    for headers, body, content_type, encoding in odd.values():
        plant(broker_url, queue, headers, body, content_type, encoding)

    listed = dlq("list", queue, "--broker", broker_url)
    assert listed.exit_code == 0, listed.output
    ids = [line.split("\t")[0] for line in listed.stdout.splitlines()]
    assert ids == ["", "12345", "hex-encoded", "compressed", "not-utf8"]
    assert queue_length(broker_url, f"{queue}.dead") == len(odd)
    for task_id in odd:
        shown = dlq(
            "show", queue, "" if task_id == "no-headers" else task_id, "--broker", broker_url
        )
        assert shown.exit_code == 0, shown.output
        assert printable_lines(shown.stdout)
        assert json.loads(shown.stdout)["id"] == ("" if task_id == "no-headers" else task_id)
    assert queue_length(broker_url, f"{queue}.dead") == len(odd)

    replayed = dlq("replay", queue, "--all", "--broker", broker_url)
    assert replayed.exit_code == 0, replayed.output
    assert queue_length(broker_url, f"{queue}.dead") == 0
    assert [body for _, body in drain(broker_url, queue)] == [v[1] for v in odd.values()]


def test_replay_goes_to_the_named_queue_never_where_the_letter_says(
    broker_url: str, queue: str
) -> None:
    victim = f"{queue}-victim"
    plant(broker_url, queue, {**letter("forged"), FROM: victim})
    plant(broker_url, queue, {**letter("elsewhere"), FROM: queue})

    replayed = dlq("replay", queue, "forged", "--broker", broker_url)
    assert replayed.exit_code == 0, replayed.output
    assert replayed.stdout == (
        f"replayed forged (calc.add) to {queue}; its x-celerybridge-dead-from header names "
        f"{victim}, not {queue}\n"
    )
    assert queue_length(broker_url, victim) == 0
    assert [h["id"] for h, _ in drain(broker_url, queue)] == ["forged"]

    moved = dlq("replay", queue, "elsewhere", "--to", f"{queue}-to", "--broker", broker_url)
    assert moved.stdout == f"replayed elsewhere (calc.add) to {queue}-to\n", moved.output
    assert [h["id"] for h, _ in drain(broker_url, f"{queue}-to")] == ["elsewhere"]
    assert queue_length(broker_url, queue) == 0

    onto_itself = dlq("replay", queue, "--all", "--to", f"{queue}.dead", "--broker", broker_url)
    assert onto_itself.exit_code == 2
    assert f"--to must name a queue other than {queue}.dead" in onto_itself.stderr


def test_replay_resets_retries(broker_url: str, queue: str) -> None:
    plant(broker_url, queue, {**letter("tired"), "retries": 3, KIND: "retries"})
    plant(broker_url, queue, {**letter("signed-tired"), "retries": 5, KIND: "retries"})

    assert dlq("replay", queue, "tired", "--broker", broker_url).exit_code == 0
    assert (
        dlq("replay", queue, "signed-tired", "--sign", "--broker", broker_url, key=KEY).exit_code
        == 0
    )

    replayed = {h["id"]: (h, body) for h, body in drain(broker_url, queue)}
    assert replayed["tired"][0]["retries"] == 0
    headers, body = replayed["signed-tired"]
    assert headers["retries"] == 0
    assert Signer(KEY, 300).refusal(headers, body) is None
    assert KIND not in headers
    assert REASON not in headers


def test_all_sign_never_resigns_signature_letters_but_a_named_one_is(
    broker_url: str, queue: str
) -> None:
    refused = {
        "bad": {**letter("bad", "bad signature: ..."), KIND: "signature"},
        "old-expired": letter("old-expired", "expired signature: signed at 2020-01-01"),
        "replayed": {**letter("replayed", "seen before"), KIND: "replay"},
        "lying-kind": {**letter("lying-kind", "unsigned message: ..."), KIND: "contract"},
    }
    for headers in refused.values():
        plant(broker_url, queue, headers)
    pickle = "application/x-python-serialize"
    plant(broker_url, queue, {**letter("pickled"), KIND: "malformed"}, content_type=pickle)
    plant(broker_url, queue, {**letter("contract", "ArgumentError: a"), KIND: "contract"})

    everything = dlq("replay", queue, "--all", "--sign", "--broker", broker_url, key=KEY)
    assert everything.exit_code == 0, everything.output
    assert everything.stdout == f"replayed contract (calc.add) to {queue}\n"
    skipped = everything.stderr.splitlines()
    assert [line.split(" ")[1] for line in skipped] == [*refused, "pickled"]
    assert (
        "skipped bad (calc.add): refused as 'signature': --all --sign never re-signs"
        in (skipped[0])
    )
    assert "refused as 'replay'" in skipped[2]
    assert "skipped lying-kind (calc.add): its reason is a signature refusal" in skipped[3]
    assert skipped[4] == (
        "skipped pickled (calc.add): cannot sign dead letter pickled: only application/json "
        "bodies, with headers JSON can carry, can be signed"
    )
    [(headers, body)] = drain(broker_url, queue)
    assert headers["id"] == "contract"
    assert Signer(KEY, 300).refusal(headers, body) is None
    listed = dlq("list", queue, "--broker", broker_url).stdout
    assert sorted(line.split("\t")[0] for line in listed.splitlines()) == sorted(
        [*refused, "pickled"]
    )

    vouched = dlq("replay", queue, "bad", "--sign", "--broker", broker_url, key=KEY)
    assert vouched.stdout == f"replayed bad (calc.add) to {queue}\n", vouched.output
    [(headers, body)] = drain(broker_url, queue)
    assert headers["id"] == "bad"
    assert Signer(KEY, 300).refusal(headers, body) is None


def test_sign_refuses_an_id_shared_by_different_letters(broker_url: str, queue: str) -> None:
    plant(broker_url, queue, letter("twin"))
    plant(broker_url, queue, letter("twin"), body=json.dumps([["rm -rf /"], {}]).encode())

    signed = dlq("replay", queue, "twin", "--sign", "--broker", broker_url, key=KEY)
    assert signed.exit_code == 1
    assert signed.stdout == ""
    assert signed.stderr.count("skipped twin (calc.add): different dead letters have this id") == 2
    assert signed.stderr.endswith("Error: not replayed: twin, twin\n")
    assert queue_length(broker_url, f"{queue}.dead") == 2
    shown = dlq("show", queue, "twin", "--broker", broker_url)
    assert shown.stderr == "2 dead letters have this id; showing the oldest\n"
    assert json.loads(shown.stdout)["body"] == BODY.decode()


def test_dlq_uses_the_broker_transport_options_of_the_settings() -> None:
    """Workers and the bridge read CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS (Sentinel's master
    name, a ``global_keyprefix``); ``dlq`` ignored it, so it listed nothing under a key
    prefix, and once told, kombu's prefixing client does not prefix LRANGE nor LREM."""
    url = BROKERS["redis"]
    queue = f"dlq-prefix-{uuid.uuid4().hex[:10]}"
    prefix = f"pfx-{uuid.uuid4().hex[:6]}:"
    options = {"global_keyprefix": prefix}
    client = redis.Redis.from_url(url)
    try:
        with kombu.Connection(url, transport_options=options) as connection:
            connection.Producer().publish(
                BODY,
                exchange="",
                routing_key=f"{queue}.dead",
                declare=[kombu.Queue(f"{queue}.dead", durable=True)],
                headers=letter("prefixed"),
                content_type="application/json",
                content_encoding="utf-8",
            )
        assert client.llen(f"{prefix}{queue}.dead") == 1
        setting = json.dumps(options)

        listed = dlq("list", queue, "--broker", url, BROKER_TRANSPORT_OPTIONS=setting)
        assert listed.stdout == "prefixed\tcalc.add\t-\tS3 was down\n", listed.output

        replayed = dlq("replay", queue, "--all", "--broker", url, BROKER_TRANSPORT_OPTIONS=setting)
        assert replayed.stdout == f"replayed prefixed (calc.add) to {queue}\n", replayed.output
        assert client.llen(f"{prefix}{queue}.dead") == 0  # removed once replayed
        assert client.llen(f"{prefix}{queue}") == 1  # where a prefixed worker takes it
        assert client.llen(queue) == 0
    finally:
        client.delete(*client.keys(f"*{queue}*") or ["-"])
        client.close()


def test_entries_held_by_the_take_script_are_listed_raw_and_purged() -> None:
    """The take script sets entries kombu cannot read apart on ``<queue>.dead.held`` for
    a worker to wrap as dead letters; what no worker wrapped yet was invisible to
    ``dlq list`` and survived ``dlq purge``."""
    url = BROKERS["redis"]
    queue = f"dlq-held-{uuid.uuid4().hex[:10]}"
    client = redis.Redis.from_url(url)
    try:
        client.lpush(f"{queue}.dead.held", b"\xff raw")
        listed = dlq("list", queue, "--broker", url)
        assert listed.stdout == (
            "-\tgarbage\t-\traw: set apart by the take script, not yet wrapped by a worker "
            f"(on {queue}.dead.held); 5 bytes: b'\\xff raw'\n"
        ), listed.output
        assert client.llen(f"{queue}.dead.held") == 1  # left where it is
        purged = dlq("purge", queue, "--yes", "--broker", url)
        assert purged.stdout == f"purged 1 dead letter(s) from {queue}.dead\n", purged.output
        assert client.llen(f"{queue}.dead.held") == 0
    finally:
        client.delete(*client.keys(f"*{queue}*") or ["-"])
        client.close()


def test_replay_all_leaves_deliveries_letters_unless_asked(broker_url: str, queue: str) -> None:
    """A ``deliveries`` letter was taken more than CELERYBRIDGE_MAX_DELIVERIES times: it
    may kill a worker again. ``list`` shows the kind; ``replay --all`` skips such letters
    unless ``--kind deliveries`` asks for them."""
    purge(broker_url, f"{queue}.dead")
    plant(broker_url, queue, letter("ran"))
    plant(broker_url, queue, {**letter("killer", "delivered 11 times"), KIND: "deliveries"})

    listed = dlq("list", queue, "--broker", broker_url)
    assert sorted(listed.stdout.splitlines()) == [
        "killer\tcalc.add\tdeliveries\tdelivered 11 times",
        "ran\tcalc.add\t-\tS3 was down",
    ]

    replayed = dlq("replay", queue, "--all", "--broker", broker_url)
    assert replayed.exit_code == 0, replayed.output
    assert replayed.stdout == f"replayed ran (calc.add) to {queue}\n"
    assert replayed.stderr == (
        "skipped killer (calc.add): refused as 'deliveries': --all replays those only with "
        "--kind deliveries; or name its id\n"
    )
    again = dlq("replay", queue, "--all", "--kind", "deliveries", "--broker", broker_url)
    assert again.stdout == f"replayed killer (calc.add) to {queue}\n", again.output
    assert sorted(h["id"] for h, _ in drain(broker_url, queue)) == ["killer", "ran"]
    assert dlq("replay", queue, "x", "--kind", "deliveries", "--broker", broker_url).exit_code == 2
