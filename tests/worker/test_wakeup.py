"""A signal wakes the worker's hub; a forked pool process forgets the wakeup pipe."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from kombu.asynchronous import Hub

from celerybridge import celery_app
from celerybridge._worker.wakeup import SignalWakeup


@pytest.fixture
def started() -> Iterator[tuple[SignalWakeup, Hub]]:
    hub = Hub()
    parent = SimpleNamespace(hub=hub)
    step = SignalWakeup(parent)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    step.start(parent)
    try:
        yield step, hub
    finally:
        step.stop(parent)
        signal.signal(signal.SIGUSR1, previous)
        hub.close()


def test_a_signal_makes_the_hubs_poll_return(started: tuple[SignalWakeup, Hub]) -> None:
    _, hub = started
    hub.poller.poll(0)  # nothing pending
    os.kill(os.getpid(), signal.SIGUSR1)
    begun = time.monotonic()
    events = hub.poller.poll(10)
    assert time.monotonic() - begun < 5
    assert events  # the wakeup pipe became readable


def test_stopping_restores_the_previous_wakeup_fd() -> None:
    hub = Hub()
    parent = SimpleNamespace(hub=hub)
    step = SignalWakeup(parent)
    step.start(parent)
    step.start(parent)  # a consumer restart starts its steps again: one pipe still
    step.stop(parent)
    step.stop(parent)
    hub.close()
    assert signal.set_wakeup_fd(-1) == -1  # nothing left behind


def test_a_forked_child_does_not_write_signals_into_an_inherited_fd(
    started: tuple[SignalWakeup, Hub],
) -> None:
    pid = os.fork()
    if pid == 0:  # the child: its wakeup fd must be unset
        os._exit(0 if signal.set_wakeup_fd(-1) == -1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_workers_built_by_celery_app_wake_on_signals() -> None:
    # An idle worker's event loop slept up to 10 s (its next timer) before it read the
    # flag SIGTERM had set: 6.6 to 10.7 s from SIGTERM to exit on RabbitMQ, 0.5 s with
    # the step.
    assert SignalWakeup in celery_app("wakes").steps["consumer"]
