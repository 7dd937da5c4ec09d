"""Settings from the environment, validated when built, with secrets masked."""

from __future__ import annotations

import string
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import kombu
import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kombu.utils.url import url_to_parts

from celerybridge import Bridge, BridgeSettings, ConfigurationError
from celerybridge._cli import main as cli
from celerybridge._config import broker_transport_options, kombu_url, load_settings, mask_url
from celerybridge._utils import to_seconds

from ._brokers import BROKERS


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
            {"result_backend": "mysql://x"},
            "invalid celerybridge settings: CELERYBRIDGE_RESULT_BACKEND (result_backend): "
            "unsupported scheme 'mysql'; supported: arangodb, azureblockblob, cassandra, consul, "
            "cosmosdbsql, couchbase, couchdb, dynamodb, elasticsearch, file, gs, mongodb, redis, "
            "rediss, rpc, s3, sentinel, cache+<url>, db+<url>",
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


# --- No password in any error, repr or log line ---------------------------------------

# Printable, but no "@" or "/": those would give the URL another shape. A password is
# wrapped in markers so that a short one ("a") is not found by chance in a message's words.
PASSWORDS = st.text(
    alphabet=sorted(set(string.printable) - set("@/")), min_size=1, max_size=20
).map(lambda core: f"Pw{core}Zq")
# Where a password goes in a URL that is malformed (no "//", one "/", no scheme, a bad
# port, a bad IPv6 host, unencoded characters that end the user info early) or well
# formed (with a supported scheme or not, alone or in a failover list).
URLS = [
    "{scheme}:/:{password}@host:6379/0",
    "{scheme}:{password}@host:6379/0",
    "{scheme}//:{password}@host/0",
    "{scheme}:///:{password}@host/0",
    " {scheme}://:{password}@host/0",
    ":{password}@host:6379/0",
    "{password}",
    "{scheme}://:{password}@host:port/0",
    "{scheme}://:{password}@host:99999/0",
    "{scheme}://user:{password}@[::1/0",
    "{scheme}://:{password}#x@host:6379/0",
    "{scheme}://:{password}?x@host:6379/0",
    "{scheme}://:{password}@host:6379/0",
    "{scheme}://user:{password}@host/0",
    "{scheme}://{password}@host/0",
    "{scheme}://user:{password}@h1:1;{scheme}://user:{password}@h2:2",
    "kafka://user:{password}@host/0",
    "mongodb+srv://user:{password}@host/0",
]
SCHEMES = {
    "broker_url": ["redis", "rediss", "amqp", "pyamqp", "sentinel", "filesystem", "memory"],
    "result_backend": ["redis", "rediss", "sentinel", "file"],
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception in its ``__cause__`` / ``__context__`` chain."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop()
        if any(current is s for s in seen):
            continue
        seen.append(current)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    yield from seen


def _assert_hidden(password: str, exc: ConfigurationError) -> None:
    assert password not in str(exc)
    assert password not in repr(exc)
    for link in _chain(exc):
        assert password not in str(link), type(link)
        assert password not in repr(link), type(link)
    # What a start-up error prints: the whole chained traceback.
    assert password not in "".join(traceback.format_exception(exc))


FIELDS_AND_SCHEMES = st.sampled_from(sorted(SCHEMES)).flatmap(
    lambda field: st.tuples(st.just(field), st.sampled_from(SCHEMES[field]))
)


@settings(max_examples=300, deadline=None)
@given(where=FIELDS_AND_SCHEMES, template=st.sampled_from(URLS), password=PASSWORDS)
@example(
    where=("broker_url", "redis"), template="{scheme}:/:{password}@host:6379/0", password="PASSWORD"
).via("the malformed URL of the report")
def test_no_password_in_any_error_or_repr(
    where: tuple[str, str], template: str, password: str
) -> None:
    field, scheme = where
    url = template.format(scheme=scheme, password=password)
    try:
        built = BridgeSettings(**{field: url})
    except ConfigurationError as exc:
        _assert_hidden(password, exc)
    else:
        assert password not in repr(built)
        assert password not in repr(Bridge(built))
        # An error in another field does not show the URL either.
        with pytest.raises(ConfigurationError) as caught:
            BridgeSettings(**{field: url, "publish_timeout": 0})
        _assert_hidden(password, caught.value)


@pytest.mark.parametrize(
    ("field", "variable"),
    [("broker_url", "CELERYBRIDGE_BROKER_URL"), ("result_backend", "CELERYBRIDGE_RESULT_BACKEND")],
)
def test_a_malformed_url_is_refused_without_being_quoted(
    monkeypatch: pytest.MonkeyPatch, field: str, variable: str
) -> None:
    monkeypatch.setenv(variable, "redis:/:PASSWORD@host:6379/0")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert str(caught.value) == (
        f"invalid celerybridge settings: {variable} ({field}): not a URL of the form "
        "scheme://[user:password@]host[:port][/path] ('redis:' must be followed by '//') "
        "(the value is not shown: it may hold a password)"
    )
    _assert_hidden("PASSWORD", caught.value)


@pytest.mark.parametrize(
    ("url", "encoded", "password"),
    [
        # kombu read "Pass" as the port, and its error quoted it
        ("redis://:Pass#word@host:6379/0", "redis://:Pass%23word@host:6379/0", "Pass#word"),
        ("redis://:Pass?word@host:6379/0", "redis://:Pass%3Fword@host:6379/0", "Pass?word"),
        # kombu splits failover URLs on ";"
        ("redis://u:Pass;word@host:6379/0", "redis://u:Pass%3Bword@host:6379/0", "Pass;word"),
        ("redis://u:Pass/word@host:6379/0", "redis://u:Pass%2Fword@host:6379/0", "Pass/word"),
        ("redis://:Pass[word@host/0", "redis://:Pass%5Bword@host/0", "Pass[word"),
    ],
)
def test_an_unencoded_password_is_refused_without_being_quoted(
    url: str, encoded: str, password: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        BridgeSettings(broker_url=url)
    assert str(caught.value) == (
        "invalid celerybridge settings: CELERYBRIDGE_BROKER_URL (broker_url): cannot be read "
        "as scheme://[user:password@]host[:port][/path]: percent-encode '/', '?', '#', '@', "
        "'[', ']', ';' and '%' in the user name and password (e.g. '%40' for '@') (the value "
        "is not shown: it may hold a password)"
    )
    _assert_hidden("Pass", caught.value)
    # Percent-encoded, the same password is accepted, and kombu reads it back whole.
    assert url_to_parts(BridgeSettings(broker_url=encoded).broker_url).password == password


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://user:Secret1@host:5672//", "amqp://user:**@host:5672//"),
        ("redis://:Secret1@host:6379/0", "redis://:**@host:6379/0"),
        ("redis://Secret1@host:6379/0", "redis://**@host:6379/0"),  # a lone user info
        ("redis://:p%40Secret1@host/0", "redis://:**@host/0"),
        ("redis://host:6379/0?password=Secret1&db=1", "redis://host:6379/0?password=**&db=1"),
        (
            "sentinel://:Secret1@h1:26379;sentinel://:Secret1@h2:26379",
            "sentinel://:**@h1:26379;sentinel://:**@h2:26379",
        ),
        ("redis:/:Secret1@host:6379/0", "redis:/**@host:6379/0"),  # malformed: masked too
        ("redis://us#er:Secret1@host/0", "redis://**@host/0"),
        ("filesystem:///var/spool/cb", "filesystem:///var/spool/cb"),
    ],
)
def test_mask_url_hides_credentials_even_in_malformed_urls(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "redis:/:SECRETPASS@h:1/0",
            "--broker: not a URL of the form scheme://[user:password@]host[:port][/path] "
            "('redis:' must be followed by '//') (the value is not shown: it may hold a password)",
        ),
        (
            "redis://u:SECRET/PASS@h:1/0",  # kombu's error quoted "SECRET" as the port
            "--broker: cannot be read as scheme://[user:password@]host[:port][/path]: "
            "percent-encode '/', '?', '#', '@', '[', ']', ';' and '%' in the user name and "
            "password (e.g. '%40' for '@') (the value is not shown: it may hold a password)",
        ),
        (
            "kafka://u:SECRETPASS@h:1/0",
            "--broker: unsupported scheme 'kafka'; supported: amqp, amqps, filesystem, memory, "
            "pyamqp, redis, rediss, sentinel",
        ),
    ],
)
def test_the_cli_refuses_a_malformed_broker_without_quoting_it(url: str, message: str) -> None:
    result = CliRunner().invoke(cli, ["dlq", "list", "q", "--broker", url])
    assert result.exit_code == 1
    assert result.output == f"Error: {message}\n"
    assert "SECRET" not in result.output


@pytest.mark.integration
def test_the_cli_does_not_show_a_refused_password() -> None:
    parts = urlsplit(BROKERS["amqp"])
    url = f"amqp://{parts.username}:SECRETPASS@{parts.hostname}:{parts.port}//"
    result = CliRunner().invoke(cli, ["dlq", "list", "q", "--broker", url])
    assert result.exit_code == 1
    assert "ACCESS_REFUSED" in result.output
    assert "SECRETPASS" not in result.output


def test_the_filesystem_broker_gets_a_host_kombu_does_not_warn_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"filesystem://{tmp_path}"
    assert kombu_url(url) == f"filesystem://localhost{tmp_path}"
    assert kombu_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    options = broker_transport_options(url)
    for passed in (url, kombu_url(url)):
        caplog.clear()
        with kombu.Connection(passed, transport_options=options) as connection:
            connection.SimpleQueue("q").put({"via": passed})
            connection.as_uri()
        warned = "No hostname was supplied" in caplog.text
        assert warned is (passed == url)  # kombu's own warning, gone with the host
    with kombu.Connection(url, transport_options=options) as connection:
        queue = connection.SimpleQueue("q")
        # Both arrived; kombu's filesystem transport orders two messages of one
        # millisecond by a random file name.
        received = [queue.get(timeout=1).payload["via"] for _ in range(2)]
        assert sorted(received) == sorted([url, kombu_url(url)])
