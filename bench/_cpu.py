"""Where the CPU went during a measurement: the machine's, this process's, a worker's.

Used to show when a rate is bound by the CPU of the machine rather than by the path
being measured. For a worker it also records the peak number of threads (sampled from
``/proc/<pid>/task`` while the measurement runs) and its peak resident memory
(``VmHWM`` from ``/proc/<pid>/status``, over the worker's life so far).
"""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

SAMPLE_EVERY = 0.05
"""Seconds between two counts of a worker's threads."""


def _tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its live descendants, or nothing if it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tree_cpu(pid: int) -> float | None:
    """CPU seconds used so far by ``pid`` and its live descendants (threads included)."""
    processes = _tree(pid)
    if not processes:
        return None
    total = 0.0
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _threads(pids: list[int]) -> int:
    """Threads of these processes now (``/proc/<pid>/task`` entries)."""
    total = 0
    for pid in pids:
        with suppress(OSError):
            total += sum(1 for _ in Path(f"/proc/{pid}/task").iterdir())
    return total


def _peak_rss(pids: list[int]) -> int | None:
    """Sum of the processes' peak resident set sizes in bytes (``VmHWM``)."""
    total, seen = 0, False
    for pid in pids:
        with suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
                    seen = True
    return total if seen else None


@dataclass
class CpuUse:
    machine_busy: float
    """Share of all CPUs busy (any process), 0..1."""
    caller_s: float
    """CPU seconds of this process (the caller)."""
    worker_s: float | None
    """CPU seconds of the worker process tree, if one was given."""
    worker_threads: int | None = None
    """Most threads the worker process tree had at once during the measurement."""
    worker_rss: int | None = None
    """Peak resident memory of the worker process tree in bytes (sum of each process's)."""


class CpuMeter:
    """``with CpuMeter(worker_pid) as meter: ...`` then ``meter.use``."""

    def __init__(self, worker_pid: int | None = None) -> None:
        self.worker_pid = worker_pid
        self.use: CpuUse | None = None
        self._stop = threading.Event()
        self._peak_threads = 0
        self._sampler: threading.Thread | None = None
        self._pids: list[int] = []

    def _sample(self) -> None:
        while True:
            self._peak_threads = max(self._peak_threads, _threads(self._pids))
            if self._stop.wait(SAMPLE_EVERY):
                return

    def __enter__(self) -> CpuMeter:
        if self.worker_pid:
            self._pids = [p.pid for p in _tree(self.worker_pid)]
            self._sampler = threading.Thread(target=self._sample, name="bench-threads")
            self._sampler.start()
        psutil.cpu_percent()  # the machine-wide baseline for the call in __exit__
        self._caller = time.process_time()
        self._worker = _tree_cpu(self.worker_pid) if self.worker_pid else None
        return self

    def __exit__(self, *_: object) -> None:
        busy = psutil.cpu_percent() / 100
        caller = time.process_time()
        worker = _tree_cpu(self.worker_pid) if self.worker_pid else None
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        self.use = CpuUse(
            machine_busy=busy,
            caller_s=caller - self._caller,
            worker_s=worker - self._worker
            if worker is not None and self._worker is not None
            else None,
            worker_threads=self._peak_threads if self.worker_pid else None,
            worker_rss=_peak_rss(self._pids) if self.worker_pid else None,
        )
