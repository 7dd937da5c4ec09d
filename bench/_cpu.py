"""Where the CPU went during a measurement: the machine's, this process's, a worker's.

Read from /proc (Linux); elsewhere every figure is ``None``. Used to show when a rate is
bound by the CPU of the machine rather than by the path being measured.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine() -> tuple[int, int] | None:
    """(all, idle) jiffies since boot, summed over CPUs."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    return sum(fields), fields[3] + fields[4]  # idle + iowait


def _process_tree(pid: int) -> float | None:
    """CPU seconds used by ``pid`` and its live children (threads included)."""
    total = 0.0
    found = False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            found = True
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total if found else None


@dataclass
class CpuUse:
    machine_busy: float | None
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
        self._machine = _machine()
        self._caller = time.process_time()
        self._worker = _process_tree(self.worker_pid) if self.worker_pid else None
        return self

    def __exit__(self, *_: object) -> None:
        machine, caller = _machine(), time.process_time()
        worker = _process_tree(self.worker_pid) if self.worker_pid else None
        busy = None
        if machine and self._machine and machine[0] > self._machine[0]:
            spent, idle = machine[0] - self._machine[0], machine[1] - self._machine[1]
            busy = 1 - idle / spent
        self.use = CpuUse(
            machine_busy=busy,
            caller_s=caller - self._caller,
            worker_s=worker - self._worker if worker is not None and self._worker else None,
        )
