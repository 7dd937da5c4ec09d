"""Results through every kind of Celery result backend, against real ``celery worker``
processes: rpc:// (pushed to a reply queue of the bridge), a database (PostgreSQL, polled
through Celery's own backend class) and Redis Sentinel."""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import kombu
import pytest
from amqp.exceptions import NotFound
from celery import Celery

from celerybridge import (
    Bridge,
    DelegationError,
    RemoteTaskError,
    ResultBackendError,
    ResultTimeoutError,
)
from celerybridge._constants import POLL_MAX
from celerybridge._transports.celery_results import CeleryResultSource, KombuRpcResultSource
from celerybridge._transports.kombu import close_celery_app
from celerybridge._transports.rpc_results import RpcResultSource

from ._brokers import BROKERS
from ._workers import Worker, stop_all
from .workers import bindings, results_bindings

pytestmark = pytest.mark.integration

POSTGRES = os.environ.get(
    "CELERYBRIDGE_TEST_POSTGRES_URL", "db+postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
EXPLOSIVE = "tests.workers.explosive"


@pytest.fixture(scope="module")
def backend_worker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Worker]]:
    """Start (once per module and configuration) a worker storing results in ``backend``."""
    started: dict[tuple[str, str, str], Worker] = {}
    log_dir = tmp_path_factory.mktemp("backend-workers")

    def start(
        broker_url: str,
        backend: str,
        env: dict[str, str] | None = None,
        module: str = "tests.workers.results_worker",
    ) -> Worker:
        key = (module, broker_url, backend)
        if key not in started:
            started[key] = Worker(module, broker_url, backend, extra_env=env or {}).start(log_dir)
        return started[key]

    yield start
    stop_all(started.values())


def on(worker: Worker, stub: Any) -> Any:
    """``stub`` sent to the queue ``worker`` consumes."""
    return stub.with_options(queue=worker.queue)


async def assert_failure_stays_data(bridge: Bridge, worker: Worker) -> None:
    handle = await bridge.send(on(worker, results_bindings.explode), ("kaboom",), {})
    with pytest.raises(RemoteTaskError) as caught:
        await handle.result(timeout=20)
    error = caught.value
    assert (error.remote_type, error.remote_module) == ("Explosive", EXPLOSIVE)
    assert error.remote_message == "kaboom"
    assert error.remote_traceback is not None
    assert "raise Explosive(message)" in error.remote_traceback
    # Nothing rebuilt the remote exception: its module (importable here) was never imported.
    assert EXPLOSIVE not in sys.modules


# -- rpc:// -------------------------------------------------------------------------------

# (broker, fast_path) and the source that awaits results there.
RPC_SETUPS = {
    "amqp-native": ("amqp", True, RpcResultSource),
    "amqp-kombu": ("amqp", False, KombuRpcResultSource),
    "redis-kombu": ("redis", True, KombuRpcResultSource),
}


@pytest.fixture(params=sorted(RPC_SETUPS))
def rpc_setup(request: pytest.FixtureRequest) -> tuple[str, bool, type[Any]]:
    return RPC_SETUPS[str(request.param)]


@pytest.fixture
def rpc_worker(backend_worker: Callable[..., Worker], rpc_setup: tuple[str, bool, Any]) -> Worker:
    return backend_worker(BROKERS[rpc_setup[0]], "rpc://")


@pytest.fixture
async def rpc_bridge(rpc_setup: tuple[str, bool, Any]) -> Any:
    broker, fast_path, _ = rpc_setup
    async with Bridge(
        broker_url=BROKERS[broker], result_backend="rpc://", fast_path=fast_path
    ) as bridge:
        yield bridge


async def test_rpc_round_trip(
    rpc_bridge: Bridge, rpc_worker: Worker, rpc_setup: tuple[str, bool, type[Any]]
) -> None:
    handle = await rpc_bridge.send(on(rpc_worker, bindings.add), (2, 40), {})
    assert isinstance(rpc_bridge._results, rpc_setup[2])
    assert (await handle.result(timeout=20)).value == 42
    # A reply is consumed once; the bridge keeps it: awaiting again gives it again.
    assert (await handle.result(timeout=1)).value == 42
    assert await handle.done()


async def test_rpc_result_that_arrived_before_anyone_waited(
    rpc_bridge: Bridge, rpc_worker: Worker
) -> None:
    first = await rpc_bridge.send(on(rpc_worker, bindings.add), (1, 1), {})
    second = await rpc_bridge.send(on(rpc_worker, bindings.add), (2, 2), {})
    assert (await second.result(timeout=20)).value == 4
    await anyio.sleep(0.5)  # the first has long finished: its reply waits on our side
    if isinstance(rpc_bridge._results, RpcResultSource):
        assert rpc_bridge._results._replies.get(first.id) is not None  # pushed, not asked for
    assert (await first.result(timeout=5)).value == 2


async def test_rpc_many_concurrent_waits(rpc_bridge: Bridge, rpc_worker: Worker) -> None:
    add = on(rpc_worker, bindings.add)
    handles = [await rpc_bridge.send(add, (i, i), {}) for i in range(200)]
    totals = await asyncio.gather(*(h.result(timeout=60) for h in handles))
    assert [t.value for t in totals] == [2 * i for i in range(200)]
    assert rpc_bridge._get_results().waiting == 0


async def test_rpc_intermediate_states_are_not_results(
    rpc_bridge: Bridge, rpc_worker: Worker
) -> None:
    # STARTED (task_track_started) and five PROGRESS states come first, then SUCCESS.
    handle = await rpc_bridge.send(on(rpc_worker, results_bindings.progress), (5,), {})
    assert await handle.result(timeout=20) == 5


async def test_rpc_failure_is_a_remote_task_error_never_an_instance(
    rpc_bridge: Bridge, rpc_worker: Worker
) -> None:
    await assert_failure_stays_data(rpc_bridge, rpc_worker)


async def test_rpc_task_of_another_bridge_cannot_be_awaited(
    rpc_bridge: Bridge, rpc_worker: Worker, rpc_setup: tuple[str, bool, Any]
) -> None:
    handle = await rpc_bridge.send(on(rpc_worker, bindings.add), (3, 4), {})
    assert (await handle).value == 7
    broker, fast_path, _ = rpc_setup
    async with Bridge(
        broker_url=BROKERS[broker], result_backend="rpc://", fast_path=fast_path
    ) as other:
        with pytest.raises(ResultTimeoutError):
            await other.handle(bindings.add, handle.id).result(timeout=0.5)


async def test_rpc_stock_celery_client_beside_the_bridge(
    rpc_bridge: Bridge, rpc_worker: Worker, rpc_setup: tuple[str, bool, Any]
) -> None:
    app = Celery("stock-client", broker=BROKERS[rpc_setup[0]], backend="rpc://")
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])

    def stock_round_trip() -> Any:
        return app.send_task("calc.add", args=(20, 22), queue=rpc_worker.queue).get(timeout=20)

    try:
        handle = await rpc_bridge.send(on(rpc_worker, bindings.add), (1, 2), {})
        stock = await anyio.to_thread.run_sync(stock_round_trip)
        assert stock["value"] == 42
        assert (await handle.result(timeout=20)).value == 3
    finally:
        await anyio.to_thread.run_sync(close_celery_app, app)


async def test_rpc_junk_on_the_reply_queue_is_ignored(
    rpc_bridge: Bridge,
    rpc_worker: Worker,
    rpc_setup: tuple[str, bool, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = rpc_bridge._get_results()
    assert isinstance(source, RpcResultSource | KombuRpcResultSource)
    await source.prepare()

    def send_junk() -> None:  # a pickle: never read, whoever sent it
        with kombu.Connection(BROKERS[rpc_setup[0]]) as connection:
            connection.Producer().publish(
                b"\x80\x04K\x01.",
                exchange="",
                routing_key=source.reply_to,
                content_type="application/x-python-serialize",
                content_encoding="binary",
                correlation_id="junk",
            )

    await anyio.to_thread.run_sync(send_junk)
    handle = await rpc_bridge.send(on(rpc_worker, bindings.add), (5, 5), {})
    assert (await handle.result(timeout=20)).value == 10
    assert f"ignored a message on {source.reply_to}: decoding a reply" in caplog.text


async def test_rpc_plain_celery_worker_replies_to_the_bridge(
    rpc_bridge: Bridge, backend_worker: Callable[..., Worker], rpc_setup: tuple[str, bool, Any]
) -> None:
    # A worker that never imports celerybridge: Celery's own rpc backend replies.
    plain = backend_worker(BROKERS[rpc_setup[0]], "rpc://", module="tests.workers.plain_worker")
    handle = await rpc_bridge.send(on(plain, bindings.store), ("k", "v"), {})
    assert await handle.result(timeout=20) == {"key": "k", "content": "v", "bridge_loaded": "False"}


# RabbitMQ only: it compares declarations (Redis has none), and lists queues and
# connections (on Redis the reply list is a key).
ON_RABBITMQ = pytest.mark.parametrize("rpc_setup", ["amqp-native", "amqp-kombu"], indirect=True)


@ON_RABBITMQ
async def test_rpc_reply_queue_is_declared_as_celery_declares_it(rpc_bridge: Bridge) -> None:
    source = rpc_bridge._get_results()
    await source.prepare()
    assert isinstance(source, RpcResultSource | KombuRpcResultSource)
    app = Celery("stock-client", broker=BROKERS["amqp"], backend="rpc://")
    try:
        binding = app.backend.binding  # what Celery's client declares for its own queue
        binding.name = binding.routing_key = source.reply_to
        with app.connection_for_write() as connection:
            # RabbitMQ refuses (PRECONDITION_FAILED) a declaration whose arguments differ.
            assert binding(connection.default_channel).declare() == source.reply_to
    finally:
        close_celery_app(app)  # its rpc:// consumer never started: closing must not fail


def _rabbit(*command: str) -> str:
    done = subprocess.run(["rabbitmqctl", "-q", *command], capture_output=True, text=True)
    return done.stdout


def _queue_exists(broker_url: str, queue: str) -> bool:
    with kombu.Connection(broker_url) as connection:
        try:
            connection.default_channel.queue_declare(queue=queue, passive=True)
        except NotFound:
            return False
        return True


@ON_RABBITMQ
async def test_rpc_close_leaves_no_queue_and_no_connection(
    rpc_worker: Worker, rpc_setup: tuple[str, bool, Any]
) -> None:
    broker, fast_path, _ = rpc_setup
    bridge = Bridge(broker_url=BROKERS[broker], result_backend="rpc://", fast_path=fast_path)
    assert (await (await bridge.send(on(rpc_worker, bindings.add), (1, 1), {}))).value == 2
    source = bridge._results
    assert isinstance(source, RpcResultSource | KombuRpcResultSource)
    queue = source.reply_to
    if isinstance(source, RpcResultSource):
        assert source.connection_name in await anyio.to_thread.run_sync(
            _rabbit, "list_connections", "client_properties"
        )
        gone: Callable[[str], bool] = lambda listed: source.connection_name not in listed  # noqa: E731
        listing = ("list_connections", "client_properties")
    else:
        port = str(source._connection.connection.sock.getsockname()[1])
        gone = lambda listed: port not in listed.split()  # noqa: E731
        listing = ("list_connections", "peer_port")
    assert await anyio.to_thread.run_sync(_queue_exists, BROKERS[broker], queue)
    await bridge.aclose()
    assert not await anyio.to_thread.run_sync(_queue_exists, BROKERS[broker], queue)
    deadline = time.monotonic() + 10  # RabbitMQ lists a closed connection for a moment
    while not gone(await anyio.to_thread.run_sync(_rabbit, *listing)):
        assert time.monotonic() < deadline, "the connection is still open"
        await anyio.sleep(0.2)


# -- a database (PostgreSQL) ----------------------------------------------------------------


@pytest.fixture
def db_worker(backend_worker: Callable[..., Worker], broker_url: str) -> Worker:
    return backend_worker(broker_url, POSTGRES)


@pytest.fixture
async def db_bridge(broker_url: str) -> Any:
    async with Bridge(broker_url=broker_url, result_backend=POSTGRES) as bridge:
        yield bridge


async def test_database_round_trip(db_bridge: Bridge, db_worker: Worker) -> None:
    handle = await db_bridge.send(on(db_worker, bindings.add), (2, 40), {})
    assert (await handle.result(timeout=20)).value == 42
    assert isinstance(db_bridge._results, CeleryResultSource)
    assert (await handle.result(timeout=5)).value == 42
    assert await handle.done()
    assert not await db_bridge.handle(bindings.add, "never-sent").done()


async def test_database_failure_is_a_remote_task_error_never_an_instance(
    db_bridge: Bridge, db_worker: Worker
) -> None:
    await assert_failure_stays_data(db_bridge, db_worker)


async def test_database_timeout(db_bridge: Bridge, db_worker: Worker) -> None:
    handle = await db_bridge.send(on(db_worker, bindings.sleep), (3,), {})
    with pytest.raises(ResultTimeoutError) as caught:
        await handle.result(timeout=0.5)
    assert str(caught.value) == f"task 'calc.sleep' v1 ({handle.id}) did not finish within 0.5 s"
    assert db_bridge._get_results().waiting == 0


async def test_database_polling_backs_off_to_a_bounded_pause(broker_url: str) -> None:
    async with Bridge(broker_url=broker_url, result_backend=POSTGRES) as bridge:
        source = bridge._get_results()
        assert isinstance(source, CeleryResultSource)
        reads: list[float] = []
        fetch = source.fetch

        def counted(task_id: str) -> Any:
            reads.append(time.monotonic())
            return fetch(task_id)

        source.fetch = counted  # type: ignore[method-assign]
        await source.poll("warm-up")  # the backend connects (and checks its tables) once
        reads.clear()
        with pytest.raises(ResultTimeoutError):
            await bridge.handle(bindings.add, "never-sent").result(timeout=1.5)
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    # Fast at first (0.002 s, growing by half), then never more than POLL_MAX apart (plus
    # the read itself): ~10 reads while it grows, ~10 a second after.
    assert 12 <= len(reads) <= 40, reads
    assert gaps[0] < 0.05
    assert max(gaps) < POLL_MAX + 0.1


async def test_database_row_is_never_unpickled(
    broker_url: str, tmp_path: Path, db_worker: Worker
) -> None:
    marker = tmp_path / "unpickled"
    task_id = f"legacy-{uuid.uuid4()}"

    class Trap:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    async with Bridge(broker_url=broker_url, result_backend=POSTGRES) as bridge:
        source = bridge._get_results()
        assert isinstance(source, CeleryResultSource)
        backend = await anyio.to_thread.run_sync(source.backend)

        def store_legacy_row() -> None:  # as Celery < 5.x stored results: a pickle
            session = backend.ResultSession()
            try:
                row = backend.task_cls(task_id)
                row.status, row.result = "SUCCESS", pickle.dumps(Trap(), protocol=2)
                session.add(row)
                session.commit()
            finally:
                session.close()

        await anyio.to_thread.run_sync(store_legacy_row)
        with pytest.raises(ResultBackendError, match="reading the result of task legacy-"):
            await bridge.poll(task_id)
    assert not marker.exists()


async def test_sqlite_results_written_by_celery_are_read(tmp_path: Path) -> None:
    # Any SQLAlchemy database: what Celery's own backend stored, read back by the bridge.
    url = f"db+sqlite:///{tmp_path / 'results.sqlite'}"
    app = Celery("writer", backend=url)
    app.conf.update(result_serializer="json", accept_content=["json"])
    app.backend.store_result("sqlite-ok", {"value": 5, "pid": 1}, "SUCCESS")
    app.backend.mark_as_failure("sqlite-failed", KeyError("missing"), traceback="Traceback...")
    app.close()
    async with Bridge(broker_url="memory://", result_backend=url) as bridge:
        assert (await bridge.handle(bindings.add, "sqlite-ok").result(timeout=5)).value == 5
        with pytest.raises(RemoteTaskError) as caught:
            await bridge.handle(bindings.add, "sqlite-failed").result(timeout=5)
        assert (caught.value.remote_type, caught.value.remote_message) == ("KeyError", "missing")
        assert not await bridge.handle(bindings.add, "sqlite-unknown").done()


def test_rpc_and_database_results_under_trio(backend_worker: Callable[..., Worker]) -> None:
    import trio

    rpc_worker = backend_worker(BROKERS["amqp"], "rpc://")
    db_worker = backend_worker(BROKERS["redis"], POSTGRES)

    async def main() -> tuple[int, int]:
        # aio-pika cannot run under trio: rpc:// replies are drained with kombu instead.
        async with Bridge(broker_url=BROKERS["amqp"], result_backend="rpc://") as bridge:
            handle = await bridge.send(on(rpc_worker, bindings.add), (1, 2), {})
            assert isinstance(bridge._results, KombuRpcResultSource)
            by_rpc = (await handle.result(timeout=20)).value
        async with Bridge(broker_url=BROKERS["redis"], result_backend=POSTGRES) as bridge:
            handle = await bridge.send(on(db_worker, bindings.add), (3, 4), {})
            by_database = (await handle.result(timeout=20)).value
        return by_rpc, by_database

    assert trio.run(main) == (3, 7)


# -- Redis Sentinel -------------------------------------------------------------------------

MASTER = '{"master_name": "mymaster"}'


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A Redis Sentinel watching the test Redis (127.0.0.1:6379) as ``mymaster``; its port."""
    import redis

    folder = tmp_path_factory.mktemp("sentinel")
    port = _free_port()
    config = folder / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
        "sentinel monitor mymaster 127.0.0.1 6379 1\n"
        "sentinel down-after-milliseconds mymaster 60000\n"
    )
    log = (folder / "sentinel.log").open("wb")
    process = subprocess.Popen(
        ["redis-server", str(config), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        client = redis.Redis(port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.execute_command("SENTINEL", "get-master-addr-by-name", "mymaster"):
                    break
            except redis.exceptions.ConnectionError:
                pass
            assert time.monotonic() < deadline, (folder / "sentinel.log").read_text()
            time.sleep(0.1)
        client.close()
        yield port
    finally:
        process.terminate()
        process.wait(10)
        log.close()


async def test_sentinel_broker_and_backend(
    sentinel: int, backend_worker: Callable[..., Worker]
) -> None:
    broker = f"sentinel://127.0.0.1:{sentinel}/2"
    backend = f"sentinel://127.0.0.1:{sentinel}/3"
    worker = backend_worker(
        broker,
        backend,
        {
            "CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS": MASTER,
            "CELERYBRIDGE_RESULT_BACKEND_TRANSPORT_OPTIONS": MASTER,
        },
    )
    async with Bridge(
        broker_url=broker,
        result_backend=backend,
        broker_transport_options={"master_name": "mymaster"},
        result_backend_transport_options={"master_name": "mymaster"},
    ) as bridge:
        handle = await bridge.send(on(worker, bindings.add), (2, 40), {})
        assert (await handle.result(timeout=20)).value == 42
        assert isinstance(bridge._results, CeleryResultSource)
        await assert_failure_stays_data(bridge, worker)


async def test_sentinel_with_an_unknown_master_is_our_error(sentinel: int) -> None:
    url = f"sentinel://127.0.0.1:{sentinel}/3"
    unknown = {"master_name": "nosuchmaster"}
    async with Bridge(
        broker_url=url,
        result_backend=url,
        broker_transport_options=unknown,
        result_backend_transport_options=unknown,
        publish_timeout=2,
    ) as bridge:
        with pytest.raises(ResultBackendError) as caught:
            await bridge.poll("some-task")
        assert str(caught.value).startswith(
            "reading the result of task some-task: MasterNotFoundError: No master found for "
            "'nosuchmaster'"
        )
        with pytest.raises(DelegationError) as refused:
            await bridge.send(bindings.add, (1, 2), {})
        assert str(refused.value) == (
            "publishing 'calc.add' to 'cb-test': OperationalError: No master found for "
            "'nosuchmaster'"
        )
