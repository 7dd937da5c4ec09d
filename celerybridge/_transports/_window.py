"""Admission to a native publisher: a few builders at a time, a window of messages in flight.

Two bounds with two purposes. Building a message (validation, encoding, signing) is CPU
on the event loop: ``builders`` publishes at most build at once, so a thousand
delegations started together do not all encode in one iteration of the loop (loop lag).
Waiting for the broker costs nothing but memory and the broker's patience: the window
lets up to ``messages`` publishes, holding at most about ``size`` bytes, be admitted at
once, so a distant broker's round trips overlap instead of queueing. A publish holds its
builder only while it builds, and its place in the window until its caller leaves.

Everything a publish waits for, it waits for *before* its message is built: a caller
that times out while waiting was certainly not sent. The byte bound is checked on
admission and counted once the message is built (its size is not known earlier), so the
window may hold one message's worth more than ``size``.
"""

from __future__ import annotations

import asyncio
import collections
from contextvars import ContextVar, Token
from types import TracebackType

_TICKET: ContextVar[Ticket | None] = ContextVar("celerybridge_publish_ticket", default=None)


class Window:
    """The admission bounds of one publisher (see the module's docstring)."""

    def __init__(self, *, builders: int, messages: int, size: int) -> None:
        if builders < 1 or messages < 1 or size < 1:
            raise ValueError(f"window bounds must be positive: {builders}, {messages}, {size}")
        self._builders = asyncio.Semaphore(builders)
        self._max_messages = messages
        self._max_size = size
        self.messages = 0
        """Publishes admitted and not yet left (built or not)."""
        self.size = 0
        """Bytes of the admitted publishes that are built."""
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._turns = builders
        self._finishing = 0  # publishes that finished in this iteration of the loop
        self._queued: collections.deque[tuple[asyncio.Future[None], BaseException | None]] = (
            collections.deque()
        )
        self._turning = False  # a turn is scheduled

    async def finish(self) -> None:
        """Wait for a turn to finish a publish the broker accepted: at most ``builders``
        finish per iteration of the loop (with those :meth:`settle` resolves).

        A broker answers many publishes at once (a batch's replies, RabbitMQ's
        ``multiple`` acks), and each caller then goes on with its own work in the same
        iteration; paced, a thousand answered at once do not stall the loop.
        """
        if not self._queued and self._finishing < self._turns:
            self._take_turn()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._queued.append((waiter, None))
        self._schedule()
        await waiter  # cancelled: its caller had no more to do anyway

    def settle(self, outcome: asyncio.Future[None], error: BaseException | None = None) -> None:
        """Resolve a publish's ``outcome`` (with ``error``, if any) at its turn: the
        publisher's way to pace callers it wakes itself (see :meth:`finish`)."""
        if outcome.done():
            return
        if not self._queued and self._finishing < self._turns:
            self._take_turn()
            _resolve(outcome, error)
            return
        self._queued.append((outcome, error))
        self._schedule()

    def _take_turn(self) -> None:
        self._finishing += 1
        self._schedule()

    def _schedule(self) -> None:
        if not self._turning:
            self._turning = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        # Runs after the callers resolved in the previous turn were scheduled to resume:
        # they resume in this iteration, as those resolved now resume in the next.
        self._turning = False
        self._finishing = 0
        queued = self._queued
        while queued and self._finishing < self._turns:
            outcome, error = queued.popleft()
            if not outcome.done():
                _resolve(outcome, error)
                self._finishing += 1
        if self._finishing or queued:
            self._schedule()

    def ticket(self) -> Ticket:
        """Admission for one publish: ``async with window.ticket(): ...``."""
        return Ticket(self)

    def _has_room(self) -> bool:
        return self.messages < self._max_messages and self.size < self._max_size

    async def _enter(self) -> None:
        """Wait for room, first come first served; then the publish is counted."""
        if not self._waiters and self._has_room():
            self.messages += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # counted by whoever woke it (_wake)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._leave(0)  # woken and counted, then cancelled: pass the room on
            elif waiter in self._waiters:  # _wake may have dropped it already
                self._waiters.remove(waiter)
            raise

    def _leave(self, size: int) -> None:
        self.messages -= 1
        self.size -= size
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._has_room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.messages += 1
                waiter.set_result(None)


class Ticket:
    """One publish's admission: a place in the window, then a builder until it is built.

    The publisher finds the current ticket with :func:`current_ticket` (it runs in the
    caller's task, inside the ``async with``) and calls :meth:`built` once the message
    is built, which frees the builder for the next publish.
    """

    __slots__ = ("_building", "_size", "_token", "_window")

    def __init__(self, window: Window) -> None:
        self._window = window
        self._building = False
        self._size = 0
        self._token: Token[Ticket | None] | None = None

    async def __aenter__(self) -> Ticket:
        window = self._window
        await window._enter()
        try:
            await window._builders.acquire()
        except BaseException:
            window._leave(0)
            raise
        self._building = True
        self._token = _TICKET.set(self)
        return self

    def built(self, size: int) -> None:
        """The message is built and holds ``size`` bytes: free the builder.

        Freed at the next iteration of the loop, not now: a publish builds without
        yielding, so a builder freed now would be taken by a caller starting later in
        this same iteration, and a thousand started at once would all build in it.
        """
        if self._building:
            self._building = False
            asyncio.get_running_loop().call_soon(self._window._builders.release)
        self._window.size += size
        self._size += size

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _TICKET.reset(self._token)
            self._token = None
        if self._building:
            self._building = False
            self._window._builders.release()
        size, self._size = self._size, 0
        self._window._leave(size)


def _resolve(outcome: asyncio.Future[None], error: BaseException | None) -> None:
    if error is None:
        outcome.set_result(None)
    else:
        outcome.set_exception(error)


def current_ticket() -> Ticket | None:
    """The admission the current publish holds, if it was admitted by a window."""
    return _TICKET.get()
