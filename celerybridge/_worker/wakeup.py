"""A worker's event loop wakes when a signal arrives, so a warm shutdown starts at once.

Celery's signal handlers only set a flag (``should_stop``) that its event loop reads
between two polls, and kombu's hub polls for as long as its next timer allows: up to
10 s. On RabbitMQ an idle worker had nothing else to wake it, so ``SIGTERM`` (a
deployment, ``docker stop``, Ctrl-C) took up to 10 s to begin the shutdown it asked
for. :class:`SignalWakeup` gives the hub a pipe that Python writes to whenever a signal
arrives (:func:`signal.set_wakeup_fd`): the poll returns, the loop reads the flag.

A forked child (a prefork pool process) forgets that pipe at once: the number it would
write to is closed or reused there, and a signal must not write into someone's socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

from celery import bootsteps

_active = False
"""Whether this process's wakeup fd is the pipe of a :class:`SignalWakeup`."""


def _forget_in_child() -> None:
    global _active
    if _active:
        _active = False
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_forget_in_child)


class SignalWakeup(bootsteps.StartStopStep):
    """A consumer step: the worker's hub wakes on every signal the process receives."""

    label = "signal wakeup"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._pipe: tuple[int, int] | None = None
        self._previous = -1
        self._hub: Any = None

    def start(self, parent: Any) -> None:
        hub = getattr(parent, "hub", None)
        if hub is None or self._pipe is not None:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set the wakeup fd (an embedded worker)
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self._previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        global _active
        _active = True
        self._pipe = (read, write)
        self._hub = hub
        hub.add_reader(read, self._drain, read)

    @staticmethod
    def _drain(fd: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(fd, 512):
                pass

    def stop(self, parent: Any) -> None:
        if self._pipe is None:
            return
        read, write = self._pipe
        self._pipe = None
        global _active
        _active = False
        with contextlib.suppress(ValueError):  # not the main thread: nothing was set
            signal.set_wakeup_fd(self._previous)
        with contextlib.suppress(Exception):  # the hub may be closed already
            self._hub.remove_reader(read)
        self._hub = None
        os.close(read)
        os.close(write)

    shutdown = stop
