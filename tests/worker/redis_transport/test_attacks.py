"""Red-team cases against the reliable Redis transport (``celerybridge._worker.redis_transport``).

Each test states what a user would observe if the promise held (0 lost, 0 vanished, stock
and celerybridge workers mixing freely, no stall of the broker) and fails on the branch.

Anything that runs the visibility sweep, or that could stall Redis, runs against a private
``redis-server`` (``tests/faults/_private_brokers.py``): the sweep restores every stale
record of the broker, and the shared server must not be stalled or have its records moved.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis

from celerybridge import Bridge
from celerybridge._worker.redis_transport.scripts import run_take
from tests.workers import reliable_bindings

from ..._brokers import BROKERS, RESULT_BACKEND
from ..._workers import Worker
from ...faults._private_brokers import PrivateRedis
from ._envelopes import envelope

pytestmark = pytest.mark.integration

TRANSPORT = "celerybridge._worker.redis_transport:Transport"
SHARED = BROKERS["redis"]


def _reliable(url: str, **options: Any) -> kombu.Connection:
    return kombu.Connection(url, transport=TRANSPORT, transport_options=options)


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redteam-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def queue() -> Iterator[str]:
    name = f"cb-rt-{uuid.uuid4().hex[:10]}"
    yield name
    with redis.Redis.from_url(SHARED) as client:
        keys = client.keys(f"*{name}*")
        if keys:
            client.delete(*keys)


def _take_but_lose_the_reply(connection: kombu.Connection, queue: str) -> None:
    """What Redis does when the connection drops between ``EVALSHA`` and its reply (or
    the worker is SIGKILLed after the script ran, before the entries reach kombu): the
    script runs in full; the client never sees what it took."""
    channel = connection.default_channel
    with channel.conn_or_acquire() as client:
        run_take(client, channel._take_arguments(channel._candidates([queue]), 16))


# -- loss: a record the script wrote that kombu's restore cannot put back -------------


def test_an_entry_the_script_records_is_restored_after_a_lost_reply(
    private: PrivateRedis,
) -> None:
    """``"headers": []`` decodes in cjson to an empty table, which the script's
    ``headers[1] ~= nil`` test takes for an object: the entry is recorded. Python's
    intake would refuse it (dead-lettered as it came) but only if the reply reaches
    the worker. When it does not, the sweep restores the record: kombu's
    ``_do_restore_message`` sets ``payload['headers']['redelivered']`` on a list,
    logs ``Could not restore message`` and drops it: gone from ``unacked``, from the
    queue and from the dead letters."""
    queue = f"cb-rt-hdr-{uuid.uuid4().hex[:8]}"
    raw = redis.Redis.from_url(private.url)
    raw.lpush(queue, json.dumps(envelope(queue, headers=[])))
    with _reliable(private.url, visibility_timeout=1) as connection:
        _take_but_lose_the_reply(connection, queue)
        assert raw.llen(queue) == 0
        # Fixed: the script no longer records it; it is held as it came for the worker to
        # dead-letter.
        assert raw.hlen("unacked") == 0
        assert raw.llen(f"{queue}.dead.held") == 1
        # A record the sweep cannot put back (written by an older take, or by hand) is
        # dead-lettered as it came instead of dropped.
        entry = json.dumps(envelope(queue, headers=[]))
        raw.hset("unacked", "hand-written", f'[{entry},"",{json.dumps(queue)}]')
        raw.zadd("unacked_index", {"hand-written": time.time() - 100})
        time.sleep(1.2)
        connection.default_channel.qos.restore_visible(num=10, interval=1)
    held = raw.llen(f"{queue}.dead.held")
    back = raw.llen(queue) + raw.llen(f"{queue}.dead") + raw.hlen("unacked") + held
    assert back == 2, "the entry vanished: not on the queue, not dead-lettered, no record"
    letter = json.loads(raw.lindex(f"{queue}.dead", 0))
    assert base64.b64decode(letter["body"]).decode() == entry


# -- crash: a record the script wrote that Python cannot parse -------------------------


def _poison_and_victim(private: PrivateRedis, queue: str) -> redis.Redis:
    """A stale record only cjson can read (``0x0``: lua-cjson's decode_invalid_numbers),
    next to a stale ordinary record; both taken by a script whose reply was lost."""
    raw = redis.Redis.from_url(private.url)
    raw.delete("unacked", "unacked_index", "unacked_mutex")
    poison = json.dumps(envelope(queue)).replace('"priority": 0', '"priority": 0x0')
    raw.lpush(queue, json.dumps(envelope(queue)), poison)
    with _reliable(private.url) as connection:
        _take_but_lose_the_reply(connection, queue)
    # Fixed: the script refuses it (held for the dead letters); a record written before
    # the fix (or by hand) is what the sweep must survive.
    assert raw.hlen("unacked") == 1
    assert raw.rpop(f"{queue}.dead.held") == poison.encode()
    raw.hset("unacked", "poison", f'[{poison},"",{json.dumps(queue)}]')
    assert raw.hlen("unacked") == 2
    # Taken long ago: both are past any visibility timeout.
    for tag in raw.hkeys("unacked"):
        raw.zadd("unacked_index", {tag: time.time() - 100})
    return raw


def test_a_record_python_cannot_parse_does_not_stop_the_sweep(private: PrivateRedis) -> None:
    """cjson reads ``0x0``, ``+1``, ``inf`` and ``nan``; Python's json refuses them. The
    script records such an entry; if its reply is lost, every sweep (ours and stock
    kombu's) raises ``JSONDecodeError`` on it, and the ordinary message recorded beside
    it is never restored."""
    queue = f"cb-rt-hex-{uuid.uuid4().hex[:8]}"
    raw = _poison_and_victim(private, queue)
    with _reliable(private.url, visibility_timeout=1) as connection:
        connection.default_channel.qos.restore_visible(num=10, interval=1)
    # Both out of ``unacked``: the ordinary one back on its queue, the other on it or in
    # its dead letters.
    assert raw.hlen("unacked") == 0
    assert raw.llen(queue) + raw.llen(f"{queue}.dead") == 2


def test_a_worker_starts_although_a_record_is_unparsable(
    private: PrivateRedis, tmp_path: Path
) -> None:
    """kombu runs the sweep in ``on_poll_init``, as the worker's consumer starts: with the
    record above on the broker, every worker (celerybridge's or stock) exits with an
    unrecoverable ``JSONDecodeError`` instead of becoming ready."""
    queue = f"cb-rt-boot-{uuid.uuid4().hex[:8]}"
    _poison_and_victim(private, queue)
    worker = Worker("tests.workers.reliable_worker", private.url, RESULT_BACKEND, queue=queue)
    worker.concurrency = 1
    worker.extra_env["CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS"] = json.dumps(
        {"visibility_timeout": 1}
    )
    try:
        worker.start(tmp_path, timeout=40)
        time.sleep(2)
        assert worker.running, worker.log()[-3000:]
    except RuntimeError as exc:  # did not start
        pytest.fail(str(exc)[-3000:])
    finally:
        worker.stop()


# -- delivery counts -------------------------------------------------------------------


def test_messages_put_back_at_a_clean_close_are_not_counted_as_deliveries(
    queue: str,
) -> None:
    """Celery closes its channel (warm shutdown, a scale-in, a deploy) after its running
    tasks ended: what ``restore_unacked`` puts back then was prefetched and never ran.
    The take counted it anyway, so a backlog's head, prefetched by each of a few workers
    stopping in turn, is dead-lettered as "delivered 3 times ... its worker died or lost
    the broker while it ran, every time" without having run once."""
    with redis.Redis.from_url(SHARED) as raw:
        raw.lpush(queue, json.dumps(envelope(queue)))
        for _ in range(2):  # two workers stopping cleanly while holding it
            with _reliable(SHARED, celerybridge_max_deliveries=2) as connection:
                assert connection.default_channel.basic_get(queue) is not None
        assert raw.llen(queue) == 1  # put back both times
        with _reliable(SHARED, celerybridge_max_deliveries=2) as connection:
            channel = connection.default_channel
            message = channel.basic_get(queue)
            marked = message.delivery_tag in channel.celerybridge_over_limit
            message.ack()
    assert not marked, "a message that never ran was marked for the dead letters"


def test_a_stock_worker_acknowledging_leaves_no_delivery_count(queue: str) -> None:
    """Mixed fleet: a celerybridge worker takes a message and puts it back (clean close,
    requeue, or the sweep); a stock worker takes it and acknowledges it. Its entry in
    ``celerybridge.deliveries`` is never removed: the hash grows by one field for every
    such message, forever (no expiry, nothing sweeps it)."""
    with redis.Redis.from_url(SHARED) as raw:
        raw.lpush(queue, json.dumps(envelope(queue)))
        with _reliable(SHARED) as connection:
            message = connection.default_channel.basic_get(queue)
            tag = message.delivery_tag
            message.requeue()  # counted: the count now travels in the message
        with kombu.Connection(SHARED) as stock:
            message = stock.default_channel.basic_get(queue)
            assert message.delivery_tag == tag
            assert message.properties["x-celerybridge-deliveries"] == 1
            message.ack()
        leaked = raw.hexists("celerybridge.deliveries", tag) or [
            key for key in raw.scan_iter(f"*{tag}*", count=1000)
        ]
    assert not leaked, "the delivery count outlived the message"


def test_a_tag_containing_the_alias_separator_leaves_no_delivery_count(queue: str) -> None:
    """The script counts under the tag as it came; the acknowledgement forgets
    ``original_tag(tag)``, i.e. the tag cut at ``#celerybridge-``. A producer's tag with
    that text leaves its count behind on every acknowledgement (and deletes the count of
    the message whose tag is the prefix)."""
    tag = f"{uuid.uuid4()}#celerybridge-x"
    with redis.Redis.from_url(SHARED) as raw:
        raw.lpush(queue, json.dumps(envelope(queue, tag=tag)))
        with _reliable(SHARED) as connection:
            message = connection.default_channel.basic_get(queue)
            assert message.delivery_tag == tag
            message.ack()
        leaked = raw.hexists("celerybridge.deliveries", tag)
        raw.hdel("celerybridge.deliveries", tag)
    assert not leaked, "the delivery count outlived the message"


# -- duplicate: the sweep's re-check is void under global_keyprefix ---------------------


def test_the_sweep_spares_a_record_refreshed_meanwhile_under_a_keyprefix(
    private: PrivateRedis,
) -> None:
    """``_restore_if_stale`` re-reads the score inside the transaction so a record the
    refresher moved between the sweep's ``ZRANGE`` and the restore is spared. kombu's
    prefixing client does not prefix ``ZSCORE``: under ``global_keyprefix`` the re-read
    looks at the unprefixed index, finds nothing, and the running task's message is
    restored (and run a second time)."""
    queue = f"cb-rt-pfx-{uuid.uuid4().hex[:8]}"
    prefix = f"app{uuid.uuid4().hex[:4]}:"
    raw = redis.Redis.from_url(private.url)
    raw.lpush(prefix + queue, json.dumps(envelope(queue)))
    with _reliable(private.url, global_keyprefix=prefix, visibility_timeout=1) as connection:
        channel = connection.default_channel
        held = channel.basic_get(queue)
        raw.zadd(prefix + "unacked_index", {held.delivery_tag: time.time() - 100})
        qos = channel.qos
        original = qos._restore_if_stale

        def refreshed_meanwhile(tag: Any, ceil: float, client: Any) -> None:
            # The refresher thread runs between the sweep's ZRANGE and its transaction.
            raw.zadd(prefix + "unacked_index", {tag: time.time()}, xx=True)
            original(tag, ceil, client)

        qos._restore_if_stale = refreshed_meanwhile
        qos.restore_visible(num=10, interval=1)
        duplicated = raw.llen(prefix + queue)
        still_recorded = raw.hexists(prefix + "unacked", held.delivery_tag)
        held.ack()
    assert (duplicated, still_recorded) == (0, True), "a refreshed, running message was restored"


# -- hazard: one entry stalls the whole broker --------------------------------------------


def test_an_oversized_entry_does_not_stall_redis(private: PrivateRedis) -> None:
    """An entry over the size limit is base64-encoded inside the Lua script (a Lua table
    of one string per 3 bytes, then concatenated and cjson-encoded). Redis runs nothing
    else meanwhile: 16 MB stalls every client for seconds; from ~40 MB the script passes
    lua-time-limit (5 s) after its first write (``RPOP``), so every other client gets
    ``BUSY`` and ``SCRIPT KILL`` cannot stop it. One producer's entry stalls the broker.

    Redis's own slow log times the script, inside the server: a client's view (pinging
    meanwhile) also counts its own scheduling, which a loaded machine stretches past
    any bound. Moving 16 MB as it came takes milliseconds; encoding it took seconds."""
    queue = f"cb-rt-big-{uuid.uuid4().hex[:8]}"
    raw = redis.Redis.from_url(private.url)
    raw.lpush(queue, b"x" * (16 * 1024 * 1024))
    raw.config_set("slowlog-log-slower-than", SLOW_SCRIPT_US)
    raw.slowlog_reset()
    with _reliable(private.url) as connection:
        assert connection.default_channel.basic_get(queue) is None
    assert raw.llen(f"{queue}.dead") == 1
    raw.delete(f"{queue}.dead")
    slow = [
        (entry["command"][:40], entry["duration"])
        for entry in raw.slowlog_get(128)
        if b"EVAL" in entry["command"].upper()
    ]
    assert slow == [], f"the take script ran for more than {SLOW_SCRIPT_US / 1e6:g} s: {slow}"


SLOW_SCRIPT_US = 1_000_000
"""One second of the server's time, in microseconds. The script that encoded the entry
ran for seconds; the one that moves it as it came took 0.25-0.36 s on this test's
private server on a loaded 2-core machine (66 ms on the shared one when idle)."""


# -- hazard: latency of messages on lists the BLMOVE does not watch ----------------------


def test_a_priority_message_reaches_an_idle_consumer_promptly(queue: str) -> None:
    """``BLMOVE`` watches only the first queue's priority-0 list. A message published
    with a priority (any of kombu's other priority lists) to an idle worker waits for
    the ``BLMOVE`` timeout (``brpop_timeout``, 1 s) before the take looks at its list;
    kombu's ``BRPOP`` on all the lists hands it over at once."""
    arrived: list[float] = []
    with _reliable(SHARED) as connection:
        consumer = kombu.Consumer(
            connection,
            [kombu.Queue(queue)],
            callbacks=[lambda body, message: (arrived.append(time.monotonic()), message.ack())],
        )
        with consumer:
            # Idle: publish just after the channel began a wait on its (empty) lists,
            # as happens to any message arriving at an idle worker, at some point of the wait.
            channel = connection.default_channel
            began = channel._brpop_sent_at
            while channel._brpop_sent_at == began:
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.05)
            with kombu.Connection(SHARED) as producer:
                sent = time.monotonic()
                producer.Producer().publish({"n": 1}, routing_key=queue, priority=9)
            deadline = time.monotonic() + 5
            while not arrived and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.1)
    assert arrived, "never delivered"
    assert arrived[0] - sent < 0.3, f"delivered after {arrived[0] - sent:.2f} s"


# -- duplicate: a long task after the worker's connection dropped once ---------------------


async def test_a_long_task_runs_once_across_a_dropped_connection(
    private: PrivateRedis, tmp_path: Path
) -> None:
    """Visibility timeout 2 s and a task of 8 s, as in the branch's own long-task test,
    but the worker's connections are dropped (``CLIENT KILL``: a failover, a proxy or
    NAT idle timeout) once the task runs; Redis itself stays up. Celery reconnects; the
    old channel's close runs ``QoS.restore_unacked``, which succeeds (the broker is
    reachable) and pushes the *running* task's message back to the head of its queue:
    the new channel takes it within milliseconds and the task runs twice at once.
    (Were the close's restore skipped, the old channel's refresher is stopped at close
    too, so the sweep would restore it after the visibility timeout instead.)"""
    queue = f"cb-rt-drop-{uuid.uuid4().hex[:8]}"
    worker = Worker("tests.workers.reliable_worker", private.url, RESULT_BACKEND, queue=queue)
    worker.concurrency = 2
    worker.extra_env["CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS"] = json.dumps(
        {"visibility_timeout": 2, "unacked_restore_interval": 0.5, "unacked_restore_throttle": 1}
    )
    raw = redis.Redis.from_url(private.url)
    raw.delete("unacked", "unacked_index", "unacked_mutex")
    worker.start(tmp_path)
    try:
        async with Bridge(broker_url=private.url, result_backend=RESULT_BACKEND) as bridge:
            handle = await bridge.send(
                reliable_bindings.sleep.with_options(queue=queue), (8.0,), {}
            )
            deadline = time.monotonic() + 20
            while f"[{handle.id}] received" not in worker.log():
                assert time.monotonic() < deadline, worker.log()[-3000:]
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            raw.client_kill_filter(_type="normal", skipme=True)
            await handle.result(timeout=40)
            await asyncio.sleep(1.5)
        received = worker.log().count(f"[{handle.id}] received")
        assert received == 1, worker.log()[-4000:]
    finally:
        worker.stop()
