"""Where the CPU went during a measurement: the machine's, this process's, a worker's.

Used to show when a rate is bound by the CPU of the machine rather than by the path
being measured.
"""

from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import dataclass

import psutil


def _tree_cpu(pid: int) -> float | None:
    """CPU seconds used so far by ``pid`` and its live descendants (threads included)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0.0
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


@dataclass
class CpuUse:
    machine_busy: float
    """Share of all CPUs busy (any process), 0..1."""
    caller_s: float
    """CPU seconds of this process (the caller)."""
    worker_s: float | None
    """CPU seconds of the worker process tree, if one was given."""


class CpuMeter:
    """``with CpuMeter(worker_pid) as meter: ...`` then ``meter.use``."""

    def __init__(self, worker_pid: int | None = None) -> None:
        self.worker_pid = worker_pid
        self.use: CpuUse | None = None

    def __enter__(self) -> CpuMeter:
        psutil.cpu_percent()  # the machine-wide baseline for the call in __exit__
        self._caller = time.process_time()
        self._worker = _tree_cpu(self.worker_pid) if self.worker_pid else None
        return self

    def __exit__(self, *_: object) -> None:
        busy = psutil.cpu_percent() / 100
        caller = time.process_time()
        worker = _tree_cpu(self.worker_pid) if self.worker_pid else None
        self.use = CpuUse(
            machine_busy=busy,
            caller_s=caller - self._caller,
            worker_s=worker - self._worker
            if worker is not None and self._worker is not None
            else None,
        )
