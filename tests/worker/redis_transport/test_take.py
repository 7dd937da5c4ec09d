"""The take script against a real Redis: what it records, what it dead-letters, for
whatever a list entry is.

Every entry taken ends in exactly one of two places: delivered, with kombu's own record
in ``unacked`` (restorable by a stock worker), or in ``<queue>.dead`` carrying its exact
bytes. None is lost, none raises out of the channel.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import kombu
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from celerybridge import BridgeSettings, celery_app
from celerybridge._constants import DEAD_KIND_RAW, DEFAULT_MAX_MESSAGE_BYTES
from celerybridge._dlq import DeadLetter, _from_redis
from celerybridge._worker.intake.envelope import envelope_refusal
from celerybridge._worker.redis_transport import SentinelTransport, TlsTransport, Transport
from celerybridge._worker.redis_transport.channel import ReliableChannel
from celerybridge._worker.redis_transport.transport import TlsChannel

from ...faults._private_brokers import PrivateRedis
from ...pusher._s3server import free_port
from ._envelopes import envelope
from .conftest import URL, reliable

pytestmark = pytest.mark.integration


def test_a_message_is_taken_and_recorded_in_one_step(queue: str, raw: redis.Redis) -> None:
    with kombu.Connection(URL) as producer:
        producer.Producer().publish({"n": 1}, routing_key=queue, declare=[kombu.Queue(queue)])
    with reliable() as connection:
        message = connection.default_channel.basic_get(queue)
        assert message is not None
        assert message.payload == {"n": 1}
        tag = message.delivery_tag
        # kombu's own record: restorable by a stock worker's sweep.
        stored, exchange, routing_key = json.loads(raw.hget("unacked", tag))
        assert stored["properties"]["delivery_tag"] == tag
        assert (exchange, routing_key) == ("", queue)
        assert raw.zscore("unacked_index", tag) is not None
        # First delivery: no count in the message yet; nothing else is written.
        assert "x-celerybridge-deliveries" not in stored["properties"]
        message.ack()
        assert not raw.hexists("unacked", tag)
        assert raw.zscore("unacked_index", tag) is None
        assert not list(raw.scan_iter(f"*{tag}*", count=1000))


def test_priorities_come_first_and_all_are_taken(queue: str) -> None:
    with kombu.Connection(URL) as producer:
        publish = producer.Producer().publish
        publish({"n": "low"}, routing_key=queue, declare=[kombu.Queue(queue)], priority=9)
        publish({"n": "high"}, routing_key=queue, priority=0)
    with reliable() as connection:
        channel = connection.default_channel
        got = [channel.basic_get(queue) for _ in range(3)]
        assert [m.payload["n"] for m in got[:2]] == ["high", "low"]
        assert got[2] is None
        for message in got[:2]:
            message.ack()


def test_a_second_copy_of_a_held_tag_is_recorded_apart(queue: str, raw: redis.Redis) -> None:
    """A message restored or replayed with its tag while another copy is held: each copy
    has a record of its own, and acknowledging one leaves the other's."""
    entry = json.dumps(envelope()).encode()
    raw.lpush(queue, entry, entry)
    with reliable() as connection:
        channel = connection.default_channel
        first, second = channel.basic_get(queue), channel.basic_get(queue)
        tags = [first.delivery_tag, second.delivery_tag]
        assert tags[0] != tags[1]
        assert tags[1].startswith(tags[0] + "#celerybridge-")
        assert raw.hexists("unacked", tags[0])
        assert raw.hexists("unacked", tags[1])
        first.ack()
        assert raw.hexists("unacked", tags[1])
        second.ack()
        assert not raw.hexists("unacked", tags[1])


def test_a_requeued_message_counts_its_deliveries(queue: str, raw: redis.Redis) -> None:
    raw.lpush(queue, json.dumps(envelope(queue)).encode())
    with reliable(celerybridge_max_deliveries=2) as connection:
        channel = connection.default_channel
        seen = []
        for _ in range(3):
            message = channel.basic_get(queue)
            tag = message.delivery_tag
            seen.append(
                (
                    message.properties.get("x-celerybridge-deliveries", 0),
                    tag in channel.celerybridge_over_limit,
                )
            )
            message.reject(requeue=True)  # as Celery does when a pool process dies
        # The count travels in the message: put back with one more each time.
        assert seen == [(0, False), (1, False), (2, True)]
        channel.basic_get(queue).ack()  # acknowledged: nothing of it is left
        assert not list(raw.scan_iter(f"*{tag}*", count=1000))
        assert tag not in channel.celerybridge_over_limit


def test_global_keyprefix_applies_to_every_key(queue: str, raw: redis.Redis) -> None:
    prefix = f"cbpfx-{uuid.uuid4().hex[:6]}:"
    options = {"global_keyprefix": prefix}
    with kombu.Connection(URL, transport_options=options) as producer:
        producer.Producer().publish({"n": 1}, routing_key=queue, declare=[kombu.Queue(queue)])
    assert raw.llen(prefix + queue) == 1
    raw.lpush(prefix + queue, b"not json")
    try:
        with reliable(**options) as connection:
            channel = connection.default_channel
            message = channel.basic_get(queue)
            assert message.payload == {"n": 1}
            assert raw.hexists(prefix + "unacked", message.delivery_tag)
            assert raw.zscore(prefix + "unacked_index", message.delivery_tag) is not None
            assert channel.basic_get(queue) is None  # the raw entry went to dead letters
            assert raw.llen(prefix + queue + ".dead") == 1
            message.ack()
            assert not raw.hexists(prefix + "unacked", message.delivery_tag)
    finally:
        raw.delete(*raw.keys(prefix + "*") or [prefix])
    assert not raw.hexists("unacked", message.delivery_tag)


def test_taking_goes_on_after_a_redis_restart(tmp_path: Path) -> None:
    """Redis forgets its scripts when it restarts: the next take loads the script again,
    and what the first take recorded survived (appendfsync always)."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        queue = "cb-restart"
        with kombu.Connection(server.url) as producer:
            for n in (1, 2):
                producer.Producer().publish(
                    {"n": n}, routing_key=queue, declare=[kombu.Queue(queue)]
                )
        with reliable(server.url) as holder:
            held = holder.default_channel.basic_get(queue)
            assert held.payload == {"n": 1}
            server.restart(0)
            with reliable(server.url) as connection:
                message = connection.default_channel.basic_get(queue)
                assert message.payload == {"n": 2}
                message.ack()
            with redis.Redis.from_url(server.url) as client:
                assert client.hexists("unacked", held.delivery_tag)
    finally:
        server.stop()


# What a raw list entry can be: anything, JSON of any shape, and kombu envelopes with one
# field changed to any JSON value.
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_fields = st.sampled_from(
    ["headers", "properties", "properties.delivery_tag", "properties.delivery_info",
     "properties.delivery_info.exchange", "properties.delivery_info.routing_key",
     "body", "content-type", "properties.body_encoding", "properties.priority"]
)  # fmt: skip


@st.composite
def _changed_envelope(draw: st.DrawFn) -> bytes:
    document = envelope()
    path = draw(_fields).split(".")
    target = document
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = draw(_json)
    return json.dumps(document).encode()


_entries = st.one_of(
    st.binary(max_size=64),
    _json.map(lambda v: json.dumps(v).encode()),
    _changed_envelope(),
    st.just(json.dumps(envelope()).encode()),
    _changed_envelope().map(lambda b: b.replace(b'"', b'\xff"', 1)),  # not UTF-8
    _changed_envelope().map(lambda b: b.replace(b"{", b"{" + b'"NaN": nan,', 1)),
    # Lone surrogates: Python's JSON reads their escapes, the script's cjson does not.
    _changed_envelope().map(lambda b: b.replace(b"{", b'{"x": "\\udcff",', 1)),
    st.just(json.dumps({**envelope(), "body": "\ud800"}).encode()),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(entries=st.lists(_entries, min_size=1, max_size=4))
# A lone surrogate beside empty headers: the script's second look at an empty table read
# the entry without the surrogate's patch, and held a message Python accepts.
@example(entries=[json.dumps(envelope()).encode().replace(b"{", b'{"x": "\\udcff",', 1)])
def test_whatever_an_entry_is_it_is_delivered_or_dead_lettered_as_it_came(
    entries: list[bytes], queue: str, raw: redis.Redis
) -> None:
    raw.delete(queue, f"{queue}.dead")
    raw.lpush(queue, *entries)
    delivered: list[bytes] = []
    with reliable() as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(queue)) is not None:
            # kombu's record of it, as a stock worker's sweep would restore it.
            record, exchange, routing_key = json.loads(raw.hget("unacked", message.delivery_tag))
            assert record == message._raw
            assert isinstance(exchange + routing_key, str)
            delivered.append(message._raw)
            message.ack()
        assert raw.llen(queue) == 0
    kept = []
    for entry in raw.lrange(f"{queue}.dead", 0, -1):
        letter = _from_redis(entry, queue)  # as ``celerybridge dlq list`` reads it
        assert isinstance(letter, DeadLetter), letter
        assert letter.kind == DEAD_KIND_RAW
        assert letter.source == queue
        assert letter.reason.startswith(("not a kombu message", "a raw entry")), letter.reason
        kept.append(letter.body)
    # Nothing lost: what the intake accepts was delivered, the rest kept as it came.
    refused = [e for e in entries if envelope_refusal(e, DEFAULT_MAX_MESSAGE_BYTES) is not None]
    assert sorted(kept) == sorted(refused)
    assert len(delivered) == len(entries) - len(refused)


def test_taking_through_sentinel(tmp_path: Path) -> None:
    """A ``sentinel://`` broker: the transport asks a Sentinel (ours, on a private Redis)
    for the master, and takes and records there."""
    master = PrivateRedis(tmp_path / "master")
    master.start()
    sentinel_port = free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor cbmaster 127.0.0.1 {master.port} 1\n"
    )
    sentinel = subprocess.Popen(
        ["redis-server", str(config), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with redis.Redis(port=sentinel_port) as client:
            deadline = time.monotonic() + 10
            while True:
                try:
                    if client.sentinel_get_master_addr_by_name("cbmaster"):
                        break
                except redis.ConnectionError:
                    pass
                assert time.monotonic() < deadline, "the sentinel did not start"
                time.sleep(0.05)
        queue = "cb-sentinel"
        with kombu.Connection(master.url) as producer:
            producer.Producer().publish({"n": 1}, routing_key=queue, declare=[kombu.Queue(queue)])
        url = f"sentinel://127.0.0.1:{sentinel_port}"
        options = {"master_name": "cbmaster"}
        with kombu.Connection(url, transport=SentinelTransport, transport_options=options) as c:
            message = c.default_channel.basic_get(queue)
            assert message.payload == {"n": 1}
            with redis.Redis.from_url(master.url) as client:
                assert client.hexists("unacked", message.delivery_tag)
                message.ack()
                assert not client.hexists("unacked", message.delivery_tag)
    finally:
        os.killpg(sentinel.pid, signal.SIGKILL)
        sentinel.wait()
        master.stop()


def test_rediss_uses_tls_without_ssl_parameters() -> None:
    """kombu turns TLS on for rediss:// only when the URL picks the transport: named
    through broker_transport, ours must do it."""
    connection = kombu.Connection("rediss://127.0.0.1:6390/0", transport=TlsTransport)
    channel = TlsChannel.__new__(TlsChannel)
    channel.connection = connection.transport
    params = TlsChannel._connparams(channel)
    assert issubclass(params["connection_class"], redis.SSLConnection)


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("redis://127.0.0.1:6379/0", Transport),
        ("rediss://127.0.0.1:6379/0", TlsTransport),
        ("sentinel://127.0.0.1:26379", SentinelTransport),
    ],
)
def test_celery_app_picks_the_reliable_transport(url: str, transport: type) -> None:
    options = {"master_name": "m"} if url.startswith("sentinel") else {}
    app = celery_app("t", BridgeSettings(broker_url=url, broker_transport_options=options))
    with app.connection_for_read() as connection:
        assert type(connection.transport) is transport
        assert issubclass(connection.transport.Channel, ReliableChannel)
    app.close()


def test_a_channel_closing_without_its_broker_leaves_the_records(
    queue: str, raw: redis.Redis
) -> None:
    """Closing a channel puts back what it holds; when that fails (the broker went away:
    kombu's QoS raised ``'NoneType' object has no attribute 'hostname'`` and the worker
    exited), the close goes on and the records stay for the visibility sweep."""
    with kombu.Connection(URL) as producer:
        producer.Producer().publish({"n": 1}, routing_key=queue, declare=[kombu.Queue(queue)])
    connection = reliable()
    channel = connection.default_channel
    held = channel.basic_get(queue)
    channel._disconnect_pools()
    client, connection.transport.client = connection.transport.client, None
    try:
        channel.close()
    finally:
        connection.transport.client = client
        connection.close()
    assert raw.hexists("unacked", held.delivery_tag)
    # Its task ends later: acknowledged through the closed channel's pool, not a crash.
    held.ack()
    assert not raw.hexists("unacked", held.delivery_tag)
    assert raw.zscore("unacked_index", held.delivery_tag) is None
    assert not raw.hexists("celerybridge.deliveries", held.delivery_tag)
