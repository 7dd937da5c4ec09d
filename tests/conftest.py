from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from celerybridge import Bridge, BridgeSettings, _default
from celerybridge._registry import registry

from . import _summary as summary
from ._brokers import BROKERS, RESULT_BACKEND
from ._workers import Worker, stop_all

# No hypothesis deadline: a generated case that takes 469 ms on a loaded machine is not a
# defect, and how long a test takes is measured in bench/, never asserted here.
settings.register_profile("celerybridge", deadline=None)
settings.load_profile("celerybridge")

pytest_plugins = ("tests._pusher_fixtures",)


@pytest.fixture(autouse=True)
def _restore_registry() -> Iterator[None]:
    """Contracts declared inside a test do not leak into the next one."""
    saved = (
        copy.copy(registry._contracts),
        {name: copy.copy(c.versions) for name, c in registry._contracts.items()},
        copy.copy(registry._wire),
        copy.copy(registry.implementations),
    )
    yield
    contracts, versions, wire, implementations = saved
    registry._contracts = contracts
    for name, contract in contracts.items():
        contract.versions = versions[name]
    registry._wire = wire
    registry.implementations = implementations


@pytest.fixture(autouse=True)
def _reset_default_bridge() -> Iterator[None]:
    """``celerybridge.configure`` in one test does not reach the next one."""
    yield
    _default._config = None
    if _default._sync is not None:
        _default._sync[2].close()
    _default._sync = None


@pytest.fixture(params=sorted(BROKERS))
def broker(request: pytest.FixtureRequest) -> str:
    """The name of a real broker: every integration test runs on Redis and on RabbitMQ."""
    return str(request.param)


@pytest.fixture
def broker_url(broker: str) -> str:
    return BROKERS[broker]


@pytest.fixture
def settings(broker_url: str) -> BridgeSettings:
    return BridgeSettings(
        broker_url=broker_url,
        result_backend=RESULT_BACKEND,
        publish_timeout=10,
        result_timeout=30,
    )


@pytest.fixture
async def bridge(settings: BridgeSettings) -> AsyncIterator[Bridge]:
    async with Bridge(settings) as bridge:
        yield bridge


@pytest.fixture(scope="session")
def start_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Worker]]:
    """Start (once per session and configuration) a real ``celery worker`` process."""
    started: dict[tuple[object, ...], Worker] = {}
    log_dir: Path = tmp_path_factory.mktemp("workers")

    def start(module: str, broker: str, *, pool: str = "threads", concurrency: int = 4) -> Worker:
        key = (module, broker, pool, concurrency)
        if key not in started:
            worker = Worker(module, BROKERS[broker], RESULT_BACKEND, pool, concurrency)
            started[key] = worker.start(log_dir)
        return started[key]

    yield start
    stop_all(started.values())


@pytest.fixture
def bridge_worker(start_worker: Callable[..., Worker], broker: str) -> Worker:
    """A celerybridge worker implementing ``tests.workers.bindings``."""
    return start_worker("tests.workers.bridge_worker", broker)


@pytest.fixture
def plain_worker(start_worker: Callable[..., Worker], broker: str) -> Worker:
    """A plain Celery worker that never imports celerybridge."""
    return start_worker("tests.workers.plain_worker", broker)


def pytest_configure(config: pytest.Config) -> None:
    summary.start(config)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    summary.write(terminalreporter)


# scripts/test runs the tests in two processes (pytest-xdist). A test module runs whole
# in one of them, so its module- and session-scoped workers start once; the modules that
# start a pusher on the seed's own queue, "pusher", share one, so that two of them never
# take each other's messages. (xdist's own `--dist loadgroup` marks are lost on pytest 9:
# it renames node ids that pytest no longer reads.)
SEED_QUEUE_MODULES = ("tests/fastapi_app/", "tests/pusher/test_pusher.py")


@pytest.hookimpl(optionalhook=True)  # without xdist (-p no:xdist) there is no such hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

    class ByModule(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "seed-queue" if module.startswith(SEED_QUEUE_MODULES) else module

    return ByModule(config, log)
