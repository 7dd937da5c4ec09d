"""FastAPI integration: a lifespan that owns the bridge, and a dependency that hands it out.

Needs the ``fastapi`` extra::

    from celerybridge.fastapi import BridgeDep, bridge_lifespan

    app = FastAPI(lifespan=bridge_lifespan())

    @app.post("/items")
    async def save(item: Item, bridge: BridgeDep) -> ...:
        handle = await bridge.delegate("pusher.send_to_s3", key, content)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

try:
    from fastapi import Depends, FastAPI, Request
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "celerybridge.fastapi needs FastAPI: pip install 'celerybridge[fastapi]'"
    ) from exc

from ._bridge import Bridge
from ._config import BridgeSettings
from ._exceptions import ConfigurationError
from ._transports.base import Publisher, ResultSource

STATE_KEY = "celerybridge"

__all__ = ["BridgeDep", "bridge_lifespan", "get_bridge"]


def bridge_lifespan(
    settings: BridgeSettings | None = None,
    *,
    publisher: Publisher | None = None,
    results: ResultSource | None = None,
    **overrides: Any,
) -> Callable[[FastAPI], AbstractAsyncContextManager[dict[str, Any]]]:
    """A FastAPI ``lifespan`` that opens one bridge per worker process and closes it.

    Arguments are those of :class:`~celerybridge.Bridge`. To combine it with a lifespan
    of your own, enter it inside yours:
    ``async with bridge_lifespan()(app) as state: yield state``.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        bridge = Bridge(settings, publisher=publisher, results=results, **overrides)
        async with bridge:
            # Lifespan state reaches requests; app.state also serves clients that skip it.
            app.state.celerybridge = bridge
            try:
                yield {STATE_KEY: bridge}
            finally:
                del app.state.celerybridge

    return lifespan


def get_bridge(request: Request) -> Bridge:
    """The dependency behind :data:`BridgeDep`: the bridge the lifespan opened."""
    bridge = getattr(request.state, STATE_KEY, None) or getattr(request.app.state, STATE_KEY, None)
    if not isinstance(bridge, Bridge):
        raise ConfigurationError(
            "no celerybridge Bridge in the app's state; create the app with "
            "FastAPI(lifespan=bridge_lifespan())"
        )
    return bridge


BridgeDep = Annotated[Bridge, Depends(get_bridge)]
"""Use as a parameter type in a route: ``async def route(bridge: BridgeDep)``."""
