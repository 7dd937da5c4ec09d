"""Settings from the environment, validated when built, with secrets masked."""

from __future__ import annotations

from datetime import timedelta

import pytest

from celerybridge import Bridge, BridgeSettings, ConfigurationError
from celerybridge._config import load_settings
from celerybridge._utils import to_seconds


def test_settings_come_from_celerybridge_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELERYBRIDGE_BROKER_URL", "redis://:s3cret@10.0.0.1:6379/0")
    monkeypatch.setenv("CELERYBRIDGE_RESULT_BACKEND", "redis://:s3cret@10.0.0.1:6379/1")
    monkeypatch.setenv("CELERYBRIDGE_RESULT_TIMEOUT", "5")
    settings = load_settings()
    assert settings.broker_url == "redis://:s3cret@10.0.0.1:6379/0"
    assert settings.result_timeout == 5.0
    # Overrides win over the environment.
    assert load_settings(publish_timeout=2).publish_timeout == 2.0


def test_repr_masks_credentials() -> None:
    settings = BridgeSettings(
        broker_url="amqp://user:s3cret@host:5672//", result_backend="redis://:s3cret@host/1"
    )
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in repr(Bridge(settings))
    assert "amqp://user:**@host:5672//" in repr(settings)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"broker_url": "kafka://x"},
            "invalid celerybridge settings: CELERYBRIDGE_BROKER_URL (broker_url): unsupported "
            "scheme 'kafka'; supported: amqp, amqps, filesystem, memory, pyamqp, redis, rediss, "
            "sentinel",
        ),
        (
            {"broker_url": "filesystem://spool"},
            "invalid celerybridge settings: CELERYBRIDGE_BROKER_URL (broker_url): the filesystem "
            "transport needs an absolute folder, e.g. filesystem:///var/spool/cb",
        ),
        (
            {"result_backend": "rpc://"},
            "invalid celerybridge settings: CELERYBRIDGE_RESULT_BACKEND (result_backend): "
            "unsupported scheme 'rpc'; supported: file, redis, rediss, sentinel",
        ),
        (
            {"publish_timeout": 0},
            "invalid celerybridge settings: CELERYBRIDGE_PUBLISH_TIMEOUT (publish_timeout): "
            "Input should be greater than 0",
        ),
        (
            {"colour": "red"},
            "invalid celerybridge settings: CELERYBRIDGE_COLOUR (colour): Extra inputs are not "
            "permitted",
        ),
    ],
)
def test_bad_settings_fail_when_built(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Bridge(**overrides)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_settings_built_directly_raise_our_error() -> None:
    with pytest.raises(ConfigurationError, match=r"CELERYBRIDGE_RESULT_TIMEOUT \(result_timeout\)"):
        BridgeSettings(result_timeout=-1)


async def test_configure_takes_a_test_double_for_the_default_bridge() -> None:
    import celerybridge
    from celerybridge import MemoryTransport, remote_task

    @remote_task(name="cfg.double")
    def double(x: int) -> int: ...

    transport = MemoryTransport(execute=False)
    celerybridge.configure(publisher=transport, results=transport)
    try:
        handle = await double.delegate(21)
        other = await celerybridge.delegate("cfg.double", 1)
        transport.set_result(handle.id, 42)
        assert await handle == 42
        assert [m.args for m in transport.messages] == [(21,), (1,)]
        assert other.id == transport.messages[1].task_id
    finally:
        await celerybridge.close_default_bridge()


async def test_via_sends_through_an_explicit_bridge() -> None:
    from celerybridge import MemoryTransport, remote_task

    @remote_task(name="cfg.via")
    def via(x: int) -> int: ...

    transport = MemoryTransport(execute=False)
    async with Bridge(publisher=transport, results=transport) as bridge:
        handle = await via.via(bridge).delegate(3)
    assert transport.messages[0].task_id == handle.id
    assert via.bridge is None  # the original stub is untouched


def test_timeouts_accept_seconds_and_timedelta_only() -> None:
    assert to_seconds(timedelta(milliseconds=1500)) == 1.5
    assert to_seconds(2) == 2.0
    assert to_seconds(None) is None
    for bad in (0, -1, float("inf"), float("nan"), True, "3"):
        with pytest.raises(ConfigurationError):
            to_seconds(bad)  # type: ignore[arg-type]


async def test_results_without_backend_say_what_to_set() -> None:
    from celerybridge import MemoryTransport, remote_task

    @remote_task(name="cfg.noop")
    def noop() -> None: ...

    async with Bridge(publisher=MemoryTransport(execute=False), result_backend=None) as bridge:
        handle = await bridge.send(noop, (), {})
        with pytest.raises(ConfigurationError) as caught:
            await handle
    assert str(caught.value) == (
        "no result backend is configured; set CELERYBRIDGE_RESULT_BACKEND "
        "(e.g. redis://127.0.0.1:6379/1) to await results"
    )


async def test_closed_bridge_refuses_to_send() -> None:
    from celerybridge import DelegationError, MemoryTransport, remote_task

    @remote_task(name="cfg.closed")
    def closed() -> None: ...

    bridge = Bridge(publisher=MemoryTransport())
    await bridge.aclose()
    with pytest.raises(DelegationError, match=r"^this bridge is closed$"):
        await bridge.send(closed, (), {})


@pytest.mark.parametrize(
    ("value", "expected"), [("true", "RedisPublisher"), ("0", "KombuPublisher")]
)
async def test_fast_path_setting_picks_the_transport(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("CELERYBRIDGE_FAST_PATH", value)
    settings = load_settings(
        broker_url="redis://127.0.0.1:1/0", result_backend="redis://127.0.0.1:1/1"
    )
    async with Bridge(settings) as bridge:  # building transports connects nothing
        assert type(bridge._get_publisher()).__name__ == expected
        results = "RedisResultSource" if expected == "RedisPublisher" else "KombuResultSource"
        assert type(bridge._get_results()).__name__ == results
    native = expected == "RedisPublisher"
    for scheme in ("amqp", "amqps", "pyamqp"):
        url = f"{scheme}://guest:guest@127.0.0.1:1//"
        async with Bridge(settings, broker_url=url) as amqp:
            publisher = type(amqp._get_publisher()).__name__
            assert publisher == ("AmqpPublisher" if native else "KombuPublisher")
