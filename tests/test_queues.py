"""Queues as the worker declares them: quorum queues, priorities, TTLs, either start order."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import kombu
import pytest
from amqp.exceptions import NotFound, PreconditionFailed
from celery import Celery
from hypothesis import given, settings
from hypothesis import strategies as st

import celerybridge
from celerybridge import Bridge, BridgeSettings, ConfigurationError, DelegationError
from celerybridge._queues import QueueDeclaration, QueuePlan, celery_declaration
from celerybridge._transports import amqp as amqp_transport
from celerybridge._transports import kombu as kombu_transport
from celerybridge._worker.app import celery_app

from ._brokers import BROKERS, RESULT_BACKEND
from ._workers import Worker
from .workers import bindings
from .workers.queues import QUORUM, quorum_task_queues

AMQP_URL = BROKERS["amqp"]
PATHS = pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "kombu"])
SETTING = "invalid celerybridge settings: CELERYBRIDGE_QUEUES (queues): "


def _name(kind: str) -> str:
    return f"cb-test-{kind}-{uuid.uuid4().hex[:10]}"


@contextmanager
def _amqp() -> Iterator[Any]:
    with kombu.Connection(AMQP_URL) as connection:
        yield connection.default_channel


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    """A queue name of its own, deleted (with its exchange) at the end on RabbitMQ."""
    name = _name("queue")
    yield name
    if broker_url.startswith("amqp"):
        _delete(name)


@pytest.fixture
def amqp_queue() -> Iterator[str]:
    name = _name("queue")
    yield name
    _delete(name)


def _delete(name: str) -> None:
    with _amqp() as channel:
        for queue in (name, f"{name}.dead"):
            channel.queue_delete(queue)
        channel.exchange_delete(name)


def _settings(broker_url: str, *, fast_path: bool = True, **values: Any) -> BridgeSettings:
    return BridgeSettings(
        broker_url=broker_url,
        result_backend=RESULT_BACKEND,
        publish_timeout=10,
        result_timeout=60,
        fast_path=fast_path,
        **values,
    )


def _declared_with(queue: str, arguments: dict[str, Any]) -> bool:
    """Whether RabbitMQ has ``queue`` with exactly these arguments (a declaration with
    other ones is refused)."""
    with _amqp() as channel:
        try:
            channel.queue_declare(queue, durable=True, auto_delete=False, arguments=arguments)
        except PreconditionFailed:
            return False
    return True


def _exchange_exists(name: str) -> bool:
    with _amqp() as channel:
        try:
            channel.exchange_declare(name, "direct", passive=True)
        except NotFound:
            return False
    return True


def _take_all(queue: str, broker_url: str = AMQP_URL) -> list[Any]:
    """The first argument of each task message on ``queue``, in the order the broker gives
    them to a consumer."""
    taken = []
    with kombu.Connection(broker_url) as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            args, _kwargs, _embed = json.loads(message.body)
            taken.append(args[0])
    return taken


# --- CELERYBRIDGE_QUEUES and CELERYBRIDGE_DEFAULT_QUEUE_TYPE ------------------------------


def test_queues_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CELERYBRIDGE_QUEUES",
        '{"pusher": {"x-queue-type": "quorum"}, "mail": {"x-max-priority": 10, '
        '"x-message-ttl": 60000, "x-dead-letter-exchange": ""}}',
    )
    monkeypatch.setenv("CELERYBRIDGE_DEFAULT_QUEUE_TYPE", "quorum")
    built = BridgeSettings()
    assert built.queues == {
        "pusher": {"x-queue-type": "quorum"},
        "mail": {"x-max-priority": 10, "x-message-ttl": 60000, "x-dead-letter-exchange": ""},
    }
    assert built.default_queue_type == "quorum"
    monkeypatch.setenv("CELERYBRIDGE_QUEUES", " ")
    assert BridgeSettings().queues == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "pusher=quorum",
            "is not JSON; expected a JSON object mapping queue names to their AMQP arguments, "
            """e.g. '{"pusher": {"x-queue-type": "quorum"}}'""",
        ),
        (
            '["pusher"]',
            "expected a JSON object mapping queue names to their AMQP arguments, "
            """e.g. '{"pusher": {"x-queue-type": "quorum"}}'""",
        ),
        (
            '{"pusher": "quorum"}',
            """queue 'pusher': its arguments must be a JSON object, e.g. {"x-queue-type": """
            '"quorum"} (got str)',
        ),
        (
            '{"pusher": {"x-queue-type": "stream"}}',
            "queue 'pusher': x-queue-type must be 'classic' or 'quorum' (got 'stream')",
        ),
        (
            '{"pusher": {"queue-type": "quorum"}}',
            "queue 'pusher': argument 'queue-type' is not a queue argument (they start with 'x-')",
        ),
        (
            '{"pusher": {"x-max-priority": 256}}',
            "queue 'pusher': x-max-priority must be an integer from 1 to 255 (got 256)",
        ),
        (
            '{"pusher": {"x-message-ttl": "1h"}}',
            "queue 'pusher': x-message-ttl must be an integer from 0 to 9223372036854775807 "
            "(got '1h')",
        ),
        (
            '{"pusher": {"x-queue-type": "quorum", "x-max-priority": 5}}',
            "queue 'pusher': quorum queues do not support priorities; drop x-max-priority or "
            "make it a classic queue",
        ),
        (
            '{"amq.pusher": {}}',
            "queue names starting with 'amq.' are reserved by RabbitMQ (got 'amq.pusher')",
        ),
        ('{"": {}}', "queue names must be 1 to 255 bytes of UTF-8 (got '')"),
        (
            '{"pusher": {"x-custom": [1, 2]}}',
            "queue 'pusher': x-custom must be a string, an integer or a boolean (got [1, 2])",
        ),
    ],
)
def test_bad_queues_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("CELERYBRIDGE_QUEUES", value)
    with pytest.raises(ConfigurationError) as caught:
        BridgeSettings()
    assert str(caught.value) == SETTING + message


def test_a_bad_default_queue_type_is_refused() -> None:
    with pytest.raises(ConfigurationError) as caught:
        BridgeSettings(default_queue_type="stream")
    assert str(caught.value) == (
        "invalid celerybridge settings: CELERYBRIDGE_DEFAULT_QUEUE_TYPE (default_queue_type): "
        "Input should be 'classic' or 'quorum'"
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
ARGUMENT_NAMES = st.sampled_from(
    ["x-queue-type", "x-max-priority", "x-message-ttl", "x-dead-letter-exchange", "x-overflow"]
) | st.text(max_size=12)
QUEUES = st.dictionaries(
    st.text(max_size=6) | st.just("amq.q"),
    st.dictionaries(ARGUMENT_NAMES, JSON, max_size=3) | JSON,
    max_size=3,
)


@settings(max_examples=400, deadline=None)
@given(
    value=st.one_of(
        st.text(max_size=40),
        QUEUES.map(json.dumps),
        JSON.map(json.dumps),
        QUEUES.map(lambda queues: json.dumps(queues)[:-1]),  # cut short
        QUEUES,  # from Python
        JSON,
    )
)
def test_any_junk_in_the_setting_is_a_configuration_error(value: object) -> None:
    # Strings as the environment gives them, passed directly: an environment variable
    # cannot hold every string (NUL, lone surrogates).
    try:
        built = BridgeSettings(queues=value)
    except ConfigurationError as exc:
        refused = str(exc)
    else:
        # What is accepted is what RabbitMQ accepts, and survives a copy of the settings.
        for name, arguments in built.queues.items():
            assert name
            assert not name.startswith("amq.")
            assert all(key.startswith("x-") for key in arguments)
            assert all(isinstance(v, bool | int | str) for v in arguments.values())
        assert BridgeSettings(**built.model_dump()).queues == built.queues
        return
    assert refused.startswith(SETTING)


# --- Where a missing queue's arguments come from -----------------------------------------


def test_a_queue_is_declared_from_the_setting_then_the_celery_app_then_the_default() -> None:
    app = Celery("caller", set_as_current=False)
    app.conf.update(task_queues=quorum_task_queues("pusher"))
    plan = QueuePlan.from_settings(
        BridgeSettings(queues={"mail": {"x-max-priority": 10}}, default_queue_type="quorum"),
        celery=app,
    )
    assert plan.declaration("mail") == QueueDeclaration("mail", {"x-max-priority": 10})
    # As the Celery app's workers declare it: bound to Celery's default exchange.
    pusher = plan.declaration("pusher")
    assert pusher == QueueDeclaration("pusher", QUORUM, exchange="celery")
    assert (pusher.exchange_name, pusher.binding_key) == ("celery", "pusher")
    # Not in task_queues: created as Celery creates a missing queue (classic by default).
    assert plan.declaration("other") == QueueDeclaration("other", {})
    assert "other" not in app.amqp.queues  # the app's own queues are left as they were
    # Without an app, the default type.
    assert QueuePlan.from_settings(BridgeSettings(default_queue_type="quorum")).declaration(
        "other"
    ) == QueueDeclaration("other", QUORUM)
    assert QueuePlan().declaration("other") == QueueDeclaration("other", {})


@pytest.mark.parametrize(
    ("conf", "queue", "arguments"),
    [
        ({"task_create_missing_queue_type": "quorum"}, "svc", QUORUM),
        # Celery's default queue type is the type of its default queue only, not of -Q ones.
        ({"task_default_queue_type": "quorum"}, "celery", QUORUM),
        ({"task_default_queue_type": "quorum"}, "svc", {}),
        ({"task_queue_max_priority": 10}, "svc", {"x-max-priority": 10}),
    ],
)
def test_a_celery_app_declares_as_its_worker_would(
    conf: dict[str, Any], queue: str, arguments: dict[str, Any]
) -> None:
    worker = Celery("worker", set_as_current=False)
    worker.conf.update(conf)
    declared = celery_declaration(worker, queue)
    assert declared is not None
    assert dict(declared.arguments) == arguments
    # What Celery's worker declares for -Q <queue>.
    worker.amqp.queues.select([queue])
    assert (worker.amqp.queues[queue].queue_arguments or {}) == arguments


def test_celery_app_workers_declare_the_configured_queues() -> None:
    settings = BridgeSettings(
        queues={"pusher": QUORUM, "mail": {"x-max-priority": 10}, "celery": QUORUM}
    )
    app = celery_app("svc", settings, task_queues=[*quorum_task_queues("mail")])
    app.amqp.queues.select(["pusher", "mail", "other"])
    declared = {name: q.queue_arguments for name, q in app.amqp.queues.consume_from.items()}
    # CELERYBRIDGE_QUEUES wins over task_queues, as on the caller's side.
    assert declared == {"pusher": QUORUM, "mail": {"x-max-priority": 10}, "other": None}
    # Celery's default queue too (a worker without -Q consumes it).
    assert celery_app("svc", settings).amqp.queues["celery"].queue_arguments == QUORUM
    quorum = celery_app("svc", BridgeSettings(default_queue_type="quorum"))
    assert quorum.amqp.queues["other"].queue_arguments == QUORUM
    assert quorum.amqp.queues["celery"].queue_arguments == QUORUM


# --- Real brokers and workers ------------------------------------------------------------


def _stop_quorum_worker(worker: Worker) -> None:
    """Stop a worker whose shutdown these tests do not look at: Celery's warm shutdown of a
    quorum queue's consumer takes about 10 s (a plain Celery worker's too), so it is
    killed; what it ran was acknowledged, and the queue is deleted afterwards."""
    if worker.running:
        worker.kill()


@pytest.mark.integration
@PATHS
@pytest.mark.parametrize("order", ["worker-first", "caller-first"])
async def test_quorum_queue_in_either_start_order(
    broker: str, broker_url: str, queue: str, fast_path: bool, order: str, tmp_path: Path
) -> None:
    quorum = {queue: QUORUM}
    worker = Worker(
        "tests.workers.bridge_worker",
        broker_url,
        RESULT_BACKEND,
        queue=queue,
        extra_env={"CELERYBRIDGE_QUEUES": json.dumps(quorum)},
    )
    add = bindings.add.with_options(queue=queue)
    try:
        if order == "worker-first":
            # The caller knows nothing of the queue: it publishes to it as it is.
            await anyio.to_thread.run_sync(worker.start, tmp_path)
            async with Bridge(_settings(broker_url, fast_path=fast_path)) as bridge:
                total = await (await bridge.send(add, (2, 40), {})).result(timeout=30)
        else:
            # The caller creates the queue as the worker will declare it.
            async with Bridge(_settings(broker_url, fast_path=fast_path, queues=quorum)) as bridge:
                handle = await bridge.send(add, (2, 40), {})
                await anyio.to_thread.run_sync(worker.start, tmp_path)
                total = await handle.result(timeout=30)
        assert total.value == 42
        assert worker.running, worker.log()
    finally:
        _stop_quorum_worker(worker)
    if broker == "amqp":
        assert _declared_with(queue, QUORUM)


@pytest.mark.integration
@PATHS
async def test_a_celery_app_gives_the_callers_declaration(
    amqp_queue: str, fast_path: bool, tmp_path: Path
) -> None:
    # The worker defines its quorum queue in Celery's task_queues; the caller is given a
    # Celery app configured the same way, and publishes before the worker starts.
    caller_app = Celery("caller", set_as_current=False)
    caller_app.conf.task_queues = quorum_task_queues(amqp_queue)
    worker = Worker(
        "tests.workers.quorum_worker",
        AMQP_URL,
        RESULT_BACKEND,
        queue=amqp_queue,
        extra_env={"CB_TEST_QUEUE": amqp_queue},
    )
    add = bindings.add.with_options(queue=amqp_queue)
    try:
        async with Bridge(_settings(AMQP_URL, fast_path=fast_path), celery=caller_app) as bridge:
            handle = await bridge.send(add, (40, 2), {})
            assert _declared_with(amqp_queue, QUORUM)
            await anyio.to_thread.run_sync(worker.start, tmp_path)
            assert (await handle.result(timeout=30)).value == 42
        assert worker.running, worker.log()
    finally:
        # The "celery" exchange its queue was bound to is Celery's, left in place.
        _stop_quorum_worker(worker)


@pytest.mark.integration
@PATHS
async def test_a_plain_celery_quorum_worker_starts_after_the_caller(
    amqp_queue: str, fast_path: bool, tmp_path: Path
) -> None:
    # Celery itself, not celerybridge, declares the queue on the worker: the caller,
    # given an app configured like it, declared it first the same way.
    from .workers.plain_quorum_worker import CONFIG

    caller_app = Celery("caller", set_as_current=False)
    caller_app.conf.update(CONFIG)
    worker = Worker("tests.workers.plain_quorum_worker", AMQP_URL, RESULT_BACKEND, queue=amqp_queue)
    store = bindings.store.with_options(queue=amqp_queue)
    try:
        async with Bridge(_settings(AMQP_URL, fast_path=fast_path), celery=caller_app) as bridge:
            handle = await bridge.send(store, ("k", "v"), {})
            assert _declared_with(amqp_queue, QUORUM)
            await anyio.to_thread.run_sync(worker.start, tmp_path)
            stored = await handle.result(timeout=30)
        assert stored == {"key": "k", "content": "v", "bridge_loaded": "False"}
        assert worker.running, worker.log()
    finally:
        _stop_quorum_worker(worker)


PREDECLARED = [
    pytest.param({"x-message-ttl": 60000}, id="ttl"),
    pytest.param({"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "dead"}, id="dlx"),
    pytest.param({"x-max-priority": 5}, id="priority"),
    pytest.param({"x-max-length": 5, "x-overflow": "reject-publish"}, id="max-length"),
    pytest.param(QUORUM, id="quorum"),
]


@pytest.mark.integration
@PATHS
@pytest.mark.parametrize("arguments", PREDECLARED)
@pytest.mark.parametrize("configured", [False, True], ids=["unconfigured", "configured-otherwise"])
async def test_an_existing_queue_is_published_to_as_it_is(
    amqp_queue: str, fast_path: bool, arguments: dict[str, Any], configured: bool
) -> None:
    with _amqp() as channel:
        channel.queue_declare(amqp_queue, durable=True, auto_delete=False, arguments=arguments)
    # Configured with other arguments than the queue has: the queue wins, nothing is refused.
    queues = {amqp_queue: {"x-queue-type": "classic", "x-expires": 3_600_000}} if configured else {}
    async with Bridge(_settings(AMQP_URL, fast_path=fast_path, queues=queues)) as bridge:
        for i in range(2):
            await bridge.send(bindings.add.with_options(queue=amqp_queue), (i, 0), {})
    assert _take_all(amqp_queue) == [0, 1]
    assert _declared_with(amqp_queue, arguments)
    # Found by the passive check, nothing was declared: not even Celery's exchange.
    assert not _exchange_exists(amqp_queue)


@pytest.mark.integration
@PATHS
async def test_priorities_order_consumption(
    broker: str, broker_url: str, queue: str, fast_path: bool
) -> None:
    # x-max-priority makes RabbitMQ order by priority; on Redis the setting is ignored and
    # kombu's priority lists order them as before.
    queues = {queue: {"x-max-priority": 9}}
    priorities = [1, 5, 0, 9, 3, 7]
    async with Bridge(_settings(broker_url, fast_path=fast_path, queues=queues)) as bridge:
        for priority in priorities:
            stub = bindings.add.with_options(queue=queue, priority=priority)
            await bridge.send(stub, (priority, 0), {})
    # No consumer while they were published: the broker hands out the first one first.
    if broker == "amqp":
        assert _declared_with(queue, {"x-max-priority": 9})
        assert _take_all(queue) == [9, 7, 5, 3, 1, 0]
    else:
        # kombu's Redis transport: lists for priority steps 0, 3, 6, 9 (lowest first),
        # each in the order sent.
        assert _take_all(queue, broker_url) == [1, 0, 5, 3, 7, 9]


@pytest.mark.integration
@PATHS
async def test_a_queue_locked_by_another_connection_is_a_delegation_error(
    amqp_queue: str, fast_path: bool
) -> None:
    with kombu.Connection(AMQP_URL) as owner:
        owner.default_channel.queue_declare(amqp_queue, exclusive=True)
        async with Bridge(_settings(AMQP_URL, fast_path=fast_path)) as bridge:
            with pytest.raises(DelegationError) as caught:
                await bridge.send(bindings.add.with_options(queue=amqp_queue), (1, 2), {})
    assert str(caught.value) == (
        f"RabbitMQ refused to check queue {amqp_queue!r}: RESOURCE_LOCKED - cannot obtain "
        f"exclusive access to locked queue '{amqp_queue}' in vhost '/'. It could be originally "
        "declared on another connection or the exclusive property value does not match that "
        "of the original declaration."
    )


@pytest.mark.integration
@PATHS
async def test_a_refused_declaration_is_a_delegation_error_and_publishing_goes_on(
    amqp_queue: str, fast_path: bool
) -> None:
    # The queue is missing, but an exchange of its name is not Celery's direct one.
    with _amqp() as channel:
        channel.exchange_declare(amqp_queue, "fanout", durable=True, auto_delete=False)
    other = _name("other")
    try:
        async with Bridge(_settings(AMQP_URL, fast_path=fast_path)) as bridge:
            with pytest.raises(DelegationError) as caught:
                await bridge.send(bindings.add.with_options(queue=amqp_queue), (1, 2), {})
            with anyio.fail_after(10):
                await bridge.send(bindings.add.with_options(queue=other), (3, 4), {})
        assert _take_all(other) == [3]
    finally:
        _delete(other)
    assert str(caught.value) == (
        f"RabbitMQ refused to declare queue {amqp_queue!r} with arguments {{}}: "
        f"PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{amqp_queue}' in vhost "
        "'/': received 'direct' but current is 'fanout'"
    )


@pytest.mark.integration
@PATHS
async def test_a_queue_declared_between_the_check_and_the_declaration_stands(
    amqp_queue: str, fast_path: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker declares the quorum queue just after the caller found it missing: the
    # caller's classic declaration is refused, the queue is there, the message goes to it.
    with _amqp() as channel:
        channel.queue_declare(amqp_queue, durable=True, auto_delete=False, arguments=QUORUM)
    module: Any = amqp_transport if fast_path else kombu_transport
    exists = module._queue_exists
    checks: list[bool] = []

    def missing_at_first(*args: Any) -> Any:
        if not checks:
            checks.append(False)
            return _not_found(fast_path)
        checks.append(True)
        return exists(*args)

    monkeypatch.setattr(module, "_queue_exists", missing_at_first)
    async with Bridge(_settings(AMQP_URL, fast_path=fast_path)) as bridge:
        await bridge.send(bindings.add.with_options(queue=amqp_queue), (5, 0), {})
    assert checks == [False, True]  # checked again after the refusal
    assert _take_all(amqp_queue) == [5]
    assert _declared_with(amqp_queue, QUORUM)


def _not_found(fast_path: bool) -> Any:
    if not fast_path:
        return False

    async def missing() -> bool:
        return False

    return missing()


@pytest.mark.integration
async def test_the_default_bridge_and_the_sync_path_take_the_celery_app(
    amqp_queue: str,
) -> None:
    app = Celery("caller", set_as_current=False)
    app.conf.task_create_missing_queue_type = "quorum"
    other = _name("sync")
    celerybridge.configure(_settings(AMQP_URL), celery=app)
    try:
        await bindings.add.with_options(queue=amqp_queue).delegate(1, 2)
        await anyio.to_thread.run_sync(
            lambda: bindings.add.with_options(queue=other).apply_async((3, 4))
        )
        assert _declared_with(amqp_queue, QUORUM)
        assert _declared_with(other, QUORUM)
        assert (_take_all(amqp_queue), _take_all(other)) == ([1], [3])
    finally:
        await celerybridge.close_default_bridge()
        _delete(other)
