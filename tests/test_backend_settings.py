"""Settings for result backends and transport options, checked when they are built."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from celerybridge import Bridge, BridgeSettings, ConfigurationError, MemoryTransport, celery_app
from celerybridge._config import mask_url, url_problem

SENTINEL = "sentinel://127.0.0.1:26379"
MASTER = {"master_name": "mymaster"}


@pytest.mark.parametrize(
    "backend",
    [
        "rpc://",
        "db+postgresql://postgres@127.0.0.1:5432/test",
        "db+sqlite:///results.sqlite",
        "mongodb://127.0.0.1:27017/results",
        "cache+memcached://127.0.0.1:11211/",
        "redis://127.0.0.1:6379/1",
        "file:///var/results",
    ],
)
def test_every_celery_backend_url_is_accepted(backend: str) -> None:
    assert BridgeSettings(result_backend=backend).result_backend == backend


@pytest.mark.parametrize("backend", ["db://x", "db+://x", "mysql://x", "cache://x", "rpc:x"])
def test_junk_backend_urls_are_still_refused(backend: str) -> None:
    with pytest.raises(ConfigurationError, match="CELERYBRIDGE_RESULT_BACKEND"):
        BridgeSettings(result_backend=backend)


def test_database_url_credentials_are_masked() -> None:
    url = "db+postgresql://user:Secret1@db.example:5432/results"
    assert mask_url(url) == "db+postgresql://user:**@db.example:5432/results"
    settings = BridgeSettings(result_backend=url)
    assert "Secret1" not in repr(settings)
    assert "db+postgresql://user:**@db.example:5432/results" in repr(settings)
    # A database password with an unencoded '#' is refused without being quoted.
    problem = url_problem("db+postgresql://user:Se#cret1@db/r", frozenset(), frozenset({"db"}))
    assert problem is not None
    assert problem.startswith("cannot be read as scheme://[user:password@]host[:port][/path]")
    assert "cret1" not in problem


def test_sentinel_broker_without_master_name_is_refused_when_built() -> None:
    with pytest.raises(ConfigurationError) as caught:
        BridgeSettings(broker_url=SENTINEL)
    assert str(caught.value) == (
        "invalid celerybridge settings: CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS "
        "(broker_transport_options): a sentinel:// broker needs the name of the Redis master "
        "its Sentinels watch: set CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS="
        """'{"master_name": "mymaster"}' (the name in the Sentinels' configuration)"""
    )


def test_sentinel_backend_without_master_name_is_refused_when_built() -> None:
    with pytest.raises(ConfigurationError) as caught:
        BridgeSettings(result_backend=SENTINEL, result_backend_transport_options={"db": 1})
    assert str(caught.value) == (
        "invalid celerybridge settings: CELERYBRIDGE_RESULT_BACKEND_TRANSPORT_OPTIONS "
        "(result_backend_transport_options): a sentinel:// result backend needs the name of "
        "the Redis master its Sentinels watch: set CELERYBRIDGE_RESULT_BACKEND_TRANSPORT_OPTIONS="
        """'{"master_name": "mymaster"}' (the name in the Sentinels' configuration)"""
    )


def test_transport_options_come_from_the_environment_as_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CELERYBRIDGE_BROKER_URL", SENTINEL)
    monkeypatch.setenv("CELERYBRIDGE_BROKER_TRANSPORT_OPTIONS", json.dumps(MASTER))
    monkeypatch.setenv("CELERYBRIDGE_RESULT_BACKEND", SENTINEL + "/1")
    monkeypatch.setenv(
        "CELERYBRIDGE_RESULT_BACKEND_TRANSPORT_OPTIONS",
        json.dumps({**MASTER, "sentinel_kwargs": {"password": "Secret1"}}),
    )
    settings = BridgeSettings()
    assert settings.broker_transport_options == MASTER
    assert settings.result_backend_transport_options["sentinel_kwargs"] == {"password": "Secret1"}
    assert "Secret1" not in repr(settings)
    # A worker passes them on to Celery.
    app = celery_app("sentinel-worker", settings)
    assert app.conf.broker_transport_options["master_name"] == "mymaster"
    assert app.conf.result_backend_transport_options["master_name"] == "mymaster"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)


@pytest.mark.parametrize("name", ["broker_transport_options", "result_backend_transport_options"])
@given(junk=st.one_of(st.text(max_size=40), JSON_VALUES.map(json.dumps)))
def test_junk_transport_options_are_a_configuration_error(name: str, junk: str) -> None:
    try:
        parsed = json.loads(junk)
    except ValueError:
        parsed = None
    if not junk.strip() or isinstance(parsed, dict):
        assert getattr(BridgeSettings(**{name: junk}), name) == (parsed or {})
        return
    with pytest.raises(ConfigurationError) as caught:
        BridgeSettings(**{name: junk})
    assert str(caught.value) == (
        f"invalid celerybridge settings: CELERYBRIDGE_{name.upper()} ({name}): must be a JSON "
        """object, e.g. '{"master_name": "mymaster"}' (the value is not shown: it may hold a """
        "password)"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"result_backend": "cache+memory://"},
            "result backend cache+memory:// keeps results in the memory of each process, so a "
            "worker's results never reach this bridge; use redis://, rpc:// (with RabbitMQ) or "
            "db+postgresql:// instead",
        ),
        (
            {"broker_url": "memory://", "result_backend": "rpc://"},
            "result backend rpc:// sends results through the broker, and a memory:// broker "
            "lives in one process: a worker's results never reach this bridge; use redis://, "
            "rpc:// (with RabbitMQ) or db+postgresql:// instead",
        ),
    ],
)
def test_a_backend_that_cannot_be_awaited_is_refused_by_bridge(
    settings: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Bridge(**settings)
    assert str(caught.value) == message


def test_rpc_results_need_the_bridges_own_publisher() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Bridge(result_backend="rpc://", publisher=MemoryTransport())
    assert str(caught.value) == (
        "result backend rpc:// needs the bridge's own publisher, which names the bridge's reply "
        "queue in every message; pass results= along with publisher=, or use another result "
        "backend"
    )
    transport = MemoryTransport()
    Bridge(result_backend="rpc://", publisher=transport, results=transport)  # both replaced
