"""What the reliable transport needs of the Redis server, checked as a channel first
consumes: ``BLMOVE`` (Redis 6.2) and Lua scripts. On an older server the worker stops
with an error naming the way out, instead of a consumer restarting forever on
``unknown command 'BLMOVE'``."""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

from ..._constants import REDIS_MIN_VERSION
from ..._exceptions import ConfigurationError


def server_version(client: Any) -> tuple[int, ...] | None:
    """The server's ``redis_version`` as numbers, or ``None`` when ``INFO`` is refused
    (renamed or disabled on some managed services) or says none."""
    try:
        info = client.info("server")
    except ResponseError:
        return None
    text = str(info.get("redis_version", "")) if isinstance(info, dict) else ""
    numbers = []
    for part in text.split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers) or None


def version_problem(version: tuple[int, ...] | None) -> str | None:
    """Why a server of ``version`` cannot run the reliable transport, or ``None``."""
    if version is None or version >= REDIS_MIN_VERSION:
        return None
    have = ".".join(map(str, version))
    need = ".".join(map(str, REDIS_MIN_VERSION))
    return (
        f"the Redis broker runs Redis {have}; celerybridge's reliable Redis transport needs "
        f"Redis {need} or later (BLMOVE) with Lua scripting. Upgrade Redis, or opt out with "
        "broker_transport=\"redis\" in the app's config (kombu's transport: a worker killed "
        "while it takes a message may lose it)"
    )


def check_server(client: Any) -> None:
    """Raise :class:`ConfigurationError` when the server cannot run the transport."""
    problem = version_problem(server_version(client))
    if problem is not None:
        raise ConfigurationError(problem)
