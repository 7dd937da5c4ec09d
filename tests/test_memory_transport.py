"""The public test double behaves like the real path: validation, JSON, outcomes."""

from __future__ import annotations

import anyio
import pytest
from celery import Celery

from celerybridge import Bridge, MemoryTransport, RemoteTaskError, remote_task


async def test_runs_registered_implementations_after_a_json_round_trip() -> None:
    @remote_task(name="mem.scale")
    def scale(values: list[float], factor: float = 2) -> list[float]: ...

    @remote_task(name="mem.fail")
    async def fail() -> None: ...

    app = Celery("mem", set_as_current=False)

    @scale.implement(app)
    def scale_impl(values: list[float], factor: float = 2) -> list[float]:
        return [v * factor for v in values]

    @fail.implement(app)
    async def fail_impl() -> None:
        raise KeyError("missing")

    transport = MemoryTransport()
    async with Bridge(publisher=transport, results=transport) as bridge:
        handle = await bridge.send(scale, ((1, "2"),), {})
        assert await handle == [2.0, 4.0]
        message = transport.messages[0]
        assert (message.task_name, message.args, message.kwargs) == (
            "mem.scale",
            ([1.0, 2.0], 2.0),
            {},
        )
        with pytest.raises(RemoteTaskError) as caught:
            await (await bridge.send(fail, (), {}))
    assert (caught.value.remote_type, caught.value.remote_message) == ("KeyError", "missing")
    assert "raise KeyError" in (caught.value.remote_traceback or "")


async def test_set_result_wakes_a_waiter_and_timeouts_clean_up() -> None:
    @remote_task(name="mem.later")
    def later() -> str: ...

    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        handle = await bridge.send(later, (), {})
        with pytest.raises(TimeoutError):
            await handle.result(timeout=0.05)
        assert transport.waiting == 0
        async with anyio.create_task_group() as group:
            group.start_soon(handle.result)
            await anyio.sleep(0.01)
            assert transport.waiting == 1
            transport.set_result(handle.id, "ready")
        assert await handle == "ready"
        assert transport.waiting == 0


async def test_a_handle_rebuilt_from_a_stored_id_polls_without_waiting() -> None:
    @remote_task(name="mem.report")
    def report_v1() -> str: ...

    @remote_task(name="mem.report", version=2)
    def report_v2() -> int: ...

    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        task_id = (await bridge.delegate("mem.report", version=2)).id
        later = bridge.handle("mem.report", task_id, version=2)  # e.g. after a restart
        assert (later.id, later.task_name, later.version) == (task_id, "mem.report_v2", 2)
        assert not await later.done()
        transport.set_result(task_id, "7")
        assert await later.done()
        assert await later == 7  # decoded with v2's return type
        assert bridge.handle(report_v1, task_id).version == 1


async def test_bytes_cross_as_base64_and_arrive_as_bytes() -> None:
    @remote_task(name="mem.reverse")
    def reverse(data: bytes) -> bytes: ...

    received: list[bytes] = []

    @reverse.implement(Celery("mem", set_as_current=False))
    def reverse_impl(data: bytes) -> bytes:
        received.append(data)
        return data[::-1]

    transport = MemoryTransport()
    async with Bridge(publisher=transport, results=transport) as bridge:
        handle = await bridge.send(reverse, (b"\x00\xff not UTF-8",), {})
        assert await handle == b"8-FTU ton \xff\x00"
    assert transport.messages[0].args == ("AP8gbm90IFVURi04",)  # base64 on the wire
    assert received == [b"\x00\xff not UTF-8"]


def test_sync_apply_async_and_delay_refuse_a_configured_test_double() -> None:
    """``configure(publisher=MemoryTransport())`` was ignored by the sync calls: they built
    a kombu publisher and sent to the real broker behind the test double's back."""
    import celerybridge
    from celerybridge import ConfigurationError

    @remote_task(name="memory.sync_add")
    def add(x: int, y: int) -> int: ...

    transport = MemoryTransport()
    # An unreachable broker: were anything sent, it would fail differently.
    celerybridge.configure(
        publisher=transport, results=transport, broker_url="redis://127.0.0.1:1/0"
    )
    message = (
        "apply_async() and delay() send through Celery's publisher and cannot use the "
        "publisher given to configure() (MemoryTransport); nothing was sent: use await "
        "stub.delegate(...), which sends through it"
    )
    with pytest.raises(ConfigurationError) as caught:
        add.apply_async((1, 2))
    assert str(caught.value) == message
    with pytest.raises(ConfigurationError) as caught:
        add.delay(1, 2)
    assert str(caught.value) == message
    assert transport.messages == []
