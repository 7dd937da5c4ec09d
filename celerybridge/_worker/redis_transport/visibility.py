"""Keeping the tasks a worker still runs out of Redis's visibility sweep.

kombu restores an unacknowledged message once its score in ``unacked_index`` (the time
it was taken) is older than the visibility timeout, whether or not its worker is still
running it. :class:`VisibilityRefresher` moves the scores of the messages a channel
holds to now, every quarter of the timeout by default, with ``ZADD XX`` (a message the
sweep already restored is not recorded again). A thread, not the event loop's timer: a
solo pool or a long acknowledgement can stall the loop for longer than the timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("celerybridge.redis")


class VisibilityRefresher:
    """A daemon thread refreshing the ``unacked_index`` scores of ``held()`` tags."""

    def __init__(
        self,
        name: str,
        interval: float,
        held: Callable[[], list[str]],
        client: Callable[[], Any],
        index_key: str,
        errors: tuple[type[BaseException], ...],
    ) -> None:
        self.interval = interval
        self._held = held
        self._client = client
        self._index_key = index_key
        self._errors = errors
        self._until_idle = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.refreshed = 0
        """Scores moved so far (for tests and logs)."""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 1)

    def follow(self, held: Callable[[], list[str]]) -> None:
        """Refresh ``held()`` from now on, and stop once it is empty (a closed channel's
        running tasks, acknowledged as they end)."""
        self._held = held
        self._until_idle = True

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def refresh_once(self) -> int:
        """Move the scores of the held tags to now; how many Redis moved."""
        tags = self._held()
        if not tags:
            if self._until_idle:
                self._stop.set()
            return 0
        now = time.time()
        scores = dict.fromkeys(tags, now)
        moved = int(self._client().zadd(self._index_key, scores, xx=True, ch=True))
        self.refreshed += moved
        return moved

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh_once()
            except self._errors:
                log.debug("refreshing unacknowledged messages failed; will retry", exc_info=True)
            except Exception:
                log.exception("refreshing unacknowledged messages failed; will retry")
