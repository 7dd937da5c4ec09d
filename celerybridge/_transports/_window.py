"""Admission to a native publisher: a few builds per loop iteration, a window in flight.

Two bounds with two purposes. Building a message (validation, encoding, signing) is CPU
on the event loop: at most ``turns`` publishes build per iteration of the loop, so a
thousand delegations started together do not all encode in one iteration (loop lag);
likewise at most ``turns`` callers resume per iteration once the broker answered
them (:meth:`Window.finish`, :meth:`Window.settle`). Waiting for the broker costs
nothing but memory and the broker's patience: the window lets up to ``messages``
publishes, holding at most about ``size`` bytes, be admitted at once, so a distant
broker's round trips overlap instead of queueing. A publish keeps its place in the
window until its caller leaves.

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


class Turns:
    """At most ``per_iteration`` turns per iteration of the event loop, first come first
    served; a turn is taken at once while the iteration has some left."""

    def __init__(self, per_iteration: int) -> None:
        self._per_iteration = per_iteration
        self._taken = 0  # in this iteration
        self._scheduled = False  # the next iteration's reset
        # Waiters only, the fewest objects per waiting caller (a thousand may wait, and
        # what they keep alive is what the garbage collector walks); errors aside.
        self._queued: collections.deque[asyncio.Future[None]] = collections.deque()
        self._errors: dict[asyncio.Future[None], BaseException] = {}

    async def take(self) -> None:
        """Return at a turn: now if this iteration has one left, else at a later one."""
        if not self._queued and self._taken < self._per_iteration:
            self._count()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._queued.append(waiter)
        self._schedule()
        await waiter

    def settle(self, outcome: asyncio.Future[None], error: BaseException | None = None) -> None:
        """Resolve ``outcome`` (with ``error``, if any) at a turn: whoever awaits it
        resumes then, and spends that turn."""
        if outcome.done():
            return
        if not self._queued and self._taken < self._per_iteration:
            self._count()
            _resolve(outcome, error)
            return
        self._queued.append(outcome)
        if error is not None:
            self._errors[outcome] = error
        self._schedule()

    def _count(self) -> None:
        self._taken += 1
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._next)

    def _next(self) -> None:
        # Runs after those given a turn in the last iteration were scheduled to resume:
        # they resume in this one, as those given a turn now resume in the next.
        self._scheduled = False
        self._taken = 0
        queued, errors = self._queued, self._errors
        while queued and self._taken < self._per_iteration:
            outcome = queued.popleft()
            error = errors.pop(outcome, None) if errors else None
            if not outcome.done():  # else its caller gave up (cancelled): no turn spent
                _resolve(outcome, error)
                self._taken += 1
        if self._taken or queued:
            self._schedule()


class Window:
    """The admission bounds of one publisher (see the module's docstring)."""

    def __init__(self, *, turns: int, messages: int, size: int) -> None:
        if turns < 1 or messages < 1 or size < 1:
            raise ValueError(f"window bounds must be positive: {turns}, {messages}, {size}")
        self._builds = Turns(turns)
        self._finishes = Turns(turns)
        self._max_messages = messages
        self._max_size = size
        self.messages = 0
        """Publishes admitted and not yet left (built or not)."""
        self.size = 0
        """Bytes of the admitted publishes that are built."""
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def ticket(self) -> Window:
        """Admission for one publish: ``async with window.ticket(): ...`` (the window
        itself: what a publish holds once admitted is its :class:`Ticket`, made then, so
        a caller waiting for room or a turn keeps no object of its own alive)."""
        return self

    async def __aenter__(self) -> Ticket:
        await self._enter()
        try:
            await self._builds.take()
        except BaseException:
            self._leave(0)
            raise
        ticket = Ticket(self)
        ticket._token = _TICKET.set(ticket)
        return ticket

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ticket = _TICKET.get()
        assert ticket is not None, "not entered in this task"
        assert ticket._window is self, "entered in another window"
        _TICKET.reset(ticket._token)  # type: ignore[arg-type]
        self._leave(ticket._size)

    async def finish(self) -> None:
        """Wait for a turn to finish a publish the broker accepted.

        A broker answers many publishes at once (a batch's replies, RabbitMQ's
        ``multiple`` acks), and each caller then goes on with its own work in the same
        iteration; paced, a thousand answered at once do not stall the loop.
        """
        await self._finishes.take()

    def settle(self, outcome: asyncio.Future[None], error: BaseException | None = None) -> None:
        """Resolve a publish's ``outcome`` at a turn to finish (see :meth:`finish`): the
        pace for a publisher that resolves its callers' outcomes itself."""
        self._finishes.settle(outcome, error)

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
    """One admitted publish: its place in the window and the bytes it holds there.

    The publisher finds it with :func:`current_ticket` (it runs in the caller's task,
    inside the ``async with``) and calls :meth:`built` once the message is built.
    """

    __slots__ = ("_size", "_token", "_window")

    def __init__(self, window: Window) -> None:
        self._window = window
        self._size = 0
        self._token: Token[Ticket | None] | None = None

    def built(self, size: int) -> None:
        """The message is built and holds ``size`` bytes."""
        self._window.size += size
        self._size += size


def _resolve(outcome: asyncio.Future[None], error: BaseException | None) -> None:
    if error is None:
        outcome.set_result(None)
    else:
        outcome.set_exception(error)


def current_ticket() -> Ticket | None:
    """The admission the current publish holds, if it was admitted by a window."""
    return _TICKET.get()
