"""The default bridge behind the module-level ``delegate`` and the stubs' own methods.

One bridge per event loop (pytest-asyncio gives each test its own loop) and per
process (a bridge inherited through ``fork`` is never reused).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sniffio

from ._bridge import Bridge
from ._config import BridgeSettings, load_settings
from ._exceptions import ConfigurationError
from ._registry import registry
from ._result import TaskHandle

if TYPE_CHECKING:
    from celery import Celery

    from ._transports.base import Publisher, ResultSource
    from ._transports.kombu import KombuPublisher


@dataclass(frozen=True, eq=False)
class _Config:
    settings: BridgeSettings
    publisher: Publisher | None = None
    results: ResultSource | None = None
    celery: Celery | None = None

    def bridge(self) -> Bridge:
        return Bridge(
            self.settings, publisher=self.publisher, results=self.results, celery=self.celery
        )


_config: _Config | None = None
# (config the bridge was built from, bridge); asyncio bridges by loop, others by library.
_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[_Config, Bridge]] = (
    weakref.WeakKeyDictionary()
)
_other: dict[str, tuple[_Config, Bridge]] = {}
_sync: tuple[int, _Config, KombuPublisher] | None = None


def configure(
    settings: BridgeSettings | None = None,
    *,
    publisher: Publisher | None = None,
    results: ResultSource | None = None,
    celery: Celery | None = None,
    **overrides: Any,
) -> None:
    """Configure the default bridge (otherwise built from ``CELERYBRIDGE_*`` variables).

    ``publisher`` and ``results`` replace its transports, e.g. with a
    :class:`~celerybridge.MemoryTransport` in tests. ``celery`` is a Celery app whose queue
    definitions say how to declare missing queues, as for :class:`~celerybridge.Bridge`.
    Default bridges built before are closed on their next use.
    """
    global _config
    _config = _Config(load_settings(settings, **overrides), publisher, results, celery)


def _current() -> _Config:
    global _config
    if _config is None:
        _config = _Config(load_settings())
    return _config


async def default_bridge() -> Bridge:
    """The default bridge of the running event loop, created on first use."""
    config = _current()
    library = sniffio.current_async_library()
    loop = asyncio.get_running_loop() if library == "asyncio" else None
    entry = _by_loop.get(loop) if loop is not None else _other.get(library)
    if entry is not None:
        built_from, bridge = entry
        if built_from is config and bridge._pid == os.getpid():
            return bridge
        if bridge._pid == os.getpid():
            await bridge.aclose()
    bridge = config.bridge()
    if loop is not None:
        _by_loop[loop] = (config, bridge)
    else:
        _other[library] = (config, bridge)
    return bridge


async def close_default_bridge() -> None:
    """Close the running event loop's default bridge, if it has one (call at shutdown)."""
    library = sniffio.current_async_library()
    if library == "asyncio":
        entry = _by_loop.pop(asyncio.get_running_loop(), None)
    else:
        entry = _other.pop(library, None)
    if entry is not None and entry[1]._pid == os.getpid():
        await entry[1].aclose()


async def delegate(
    name: str,
    /,
    *args: Any,
    version: int | str | None = None,
    send_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> TaskHandle[Any]:
    """Send the task registered as ``name`` through the default bridge.

    ``await delegate("pusher.send_to_s3", key, content)`` calls the default version;
    ``version=2`` picks another (``"2"`` works too, as in the seed). ``send_options``
    are those of :meth:`RemoteTask.with_options` (``{"countdown": 5}``). Arguments and
    options are validated against that version's contract before anything is sent.
    """
    bridge = await default_bridge()
    stub = registry.resolve(name, version)
    if send_options:
        stub = stub._with(send_options)
    return await bridge.send(stub, args, kwargs, stacklevel=2)


def sync_publisher() -> KombuPublisher:
    """The process's publisher for the stubs' sync ``apply_async`` and ``delay``.

    They send through Celery's own publisher (kombu) and return Celery's ``AsyncResult``:
    a publisher given to :func:`configure` (a :class:`~celerybridge.MemoryTransport` in
    tests) cannot stand in, and rather than sending to the real broker behind the test
    double's back, they raise :class:`ConfigurationError`.
    """
    global _sync
    config = _current()
    if config.publisher is not None:
        raise ConfigurationError(
            f"apply_async() and delay() send through Celery's publisher and cannot use the "
            f"publisher given to configure() ({type(config.publisher).__name__}); nothing "
            "was sent: use await stub.delegate(...), which sends through it"
        )
    if _sync is None or _sync[0] != os.getpid() or _sync[1] is not config:
        from ._queues import QueuePlan
        from ._transports.kombu import KombuPublisher

        if _sync is not None and _sync[0] == os.getpid():
            _sync[2].close()
        queues = QueuePlan.from_settings(config.settings, config.celery)
        publisher = KombuPublisher(config.settings, with_backend=True, queues=queues)
        _sync = (os.getpid(), config, publisher)
    return _sync[2]
