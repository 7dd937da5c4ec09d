"""The table and the targets of ``bench.pusher``: rows, CPU columns, MET / NOT MET."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ._common import log_dir
from ._cpu import CpuUse

RAW = "raw aiobotocore put_object"
PUSHER = "pusher worker"
ECHO = "echo task, pusher's app and pool"
PLAIN_PREFORK = "plain Celery worker, boto3 (default prefork)"
PLAIN_THREADS = "plain Celery worker, boto3 (threads)"
MiB = 1024 * 1024
CPU_MARGIN = 1.25
"""The CPU target: pusher <= this x (raw aiobotocore + echo task), per upload."""


@dataclass
class Row:
    measurement: str
    broker: str
    width: int
    rate: float
    n: int
    landed: str = ""
    cpu: CpuUse | None = None
    pool: str = ""
    """The worker's pool, as its banner names it."""

    def cpu_ms(self, who: str) -> float | None:
        """CPU milliseconds per call of the caller or of the worker."""
        if self.cpu is None:
            return None
        seconds = self.cpu.caller_s if who == "caller" else self.cpu.worker_s
        return None if seconds is None else seconds * 1000 / self.n

    def cpu_columns(self) -> str:
        """Machine busy, caller and worker CPU ms per call, worker threads and RSS."""
        if self.cpu is None:
            return "- | - | - | - | -"
        worker = self.cpu_ms("worker")
        rss = self.cpu.worker_rss
        return " | ".join(
            (
                f"{self.cpu.machine_busy:.0%}",
                f"{self.cpu_ms('caller'):.2f}",
                f"{worker:.2f}" if worker is not None else "-",
                str(self.cpu.worker_threads) if self.cpu.worker_threads is not None else "-",
                f"{rss / MiB:.0f}" if rss is not None else "-",
            )
        )


def _verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def targets(rows: list[Row], latency: str) -> Iterator[str]:
    """One line per pusher row: each target, MET or NOT MET, with its numbers."""
    for r in rows:
        if not r.measurement.startswith(PUSHER):
            continue
        same = [x for x in rows if x.width == r.width]
        raw = next(x for x in same if x.measurement == RAW)
        share = r.rate / raw.rate
        line = (
            f"- {r.broker}, {r.width} in flight, {latency}: >= 90% of raw aiobotocore: "
            f"{_verdict(share >= 0.9)} ({r.rate:,.0f} vs {raw.rate:,.0f} uploads/s = {share:.0%})"
        )
        echo_row = next(
            (
                x
                for x in same
                if x.broker == r.broker and x.measurement.startswith(ECHO) and x.pool == r.pool
            ),
            None,
        )
        mine, raw_cpu = r.cpu_ms("worker"), raw.cpu_ms("caller")
        theirs = echo_row.cpu_ms("worker") if echo_row else None
        if mine is not None and raw_cpu is not None and theirs is not None:
            bound = CPU_MARGIN * (raw_cpu + theirs)
            line += (
                f"; worker CPU <= {CPU_MARGIN:g} x (raw + echo): {_verdict(mine <= bound)} "
                f"({mine:.2f} vs {CPU_MARGIN:g} x ({raw_cpu:.2f} + {theirs:.2f}) = {bound:.2f} "
                "ms/upload)"
            )
        prefork = next(
            (x for x in same if x.broker == r.broker and x.measurement == PLAIN_PREFORK), None
        )
        if prefork is not None:
            factor = r.rate / prefork.rate
            line += (
                f"; >= 2x plain prefork boto3 worker: {_verdict(factor >= 2)} "
                f"({r.rate:,.0f} vs {prefork.rate:,.0f} uploads/s = {factor:.2f}x)"
            )
        yield line


def report(rows: list[Row], n: int, size: int, latency_ms: int) -> None:
    latency = f"S3 +{latency_ms} ms"
    print()
    print(
        f"{n} uploads of {size} B per row, one moto server, "
        f"S3 latency +{latency_ms} ms per request"
        + (" (delay proxy)" if latency_ms else " (moto direct, no added latency)")
    )
    print()
    print(
        f"| measurement | broker | in flight | per s ({latency}) | vs raw aiobotocore "
        "| landed | machine CPU busy | caller CPU ms/call | worker CPU ms/call "
        "| worker threads (peak) | worker peak RSS MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        raw = next(x.rate for x in rows if x.measurement == RAW and x.width == r.width)
        vs_raw = "-" if r.measurement.startswith(ECHO) else f"{r.rate / raw:.0%}"
        print(
            f"| {r.measurement} | {r.broker} | {r.width} | {r.rate:,.0f} | {vs_raw} "
            f"| {r.landed} | {r.cpu_columns()} |"
        )
    print()
    for line in targets(rows, latency):
        print(line)
    print(
        "\nCPU columns: share of the machine's CPUs busy (any process: moto, the delay proxy, "
        "brokers included), and CPU time per call of the calling process and of the worker "
        "process tree (raw aiobotocore: the caller is the uploader). When the machine is near "
        "100%, rates measure CPU cost, not waiting. Threads: the most the worker process tree "
        "had at once while measured; RSS: its peak resident memory (VmHWM)."
    )
    print(f"\nworker and moto logs: {log_dir()}")
