"""The bench's plot (``docs/img/bench.png``): one figure, drawn from one run's rows."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from ._common import WIDTH, Row
from ._distance import BurstRow
from ._publish import SIZES, SizeRow, path_label
from ._roundtrip import DRAIN, GET, GET_THREADS


def bars(ax: Axes, labels: list[str], series: dict[str, list[float | None]], unit: str) -> None:
    """Horizontal bars: one group per label, one bar per series; missing values are "n/a"."""
    height = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ys = [y + i * height for y in range(len(labels))]
        widths = [v or 0.0 for v in values]
        drawn = ax.barh(ys, widths, height=height, label=name)
        texts = ["n/a" if v is None else f"{v:,.0f}" if v >= 10 else f"{v:.2f}" for v in values]
        ax.bar_label(drawn, texts, padding=2, fontsize=7)
    ax.set_yticks([y + height * (len(series) - 1) / 2 for y in range(len(labels))], labels)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.margins(x=0.18)
    ax.legend(fontsize=7, loc="best")
    ax.tick_params(labelsize=7)


def value(rows: list[Row], broker: str, client: str) -> float | None:
    return next((r.value for r in rows if r.broker == broker and r.client == client), None)


def publish_panel(ax: Axes, rows: list[Row], broker: str) -> None:
    clients = list(
        dict.fromkeys(
            r.client.rsplit(", ", 1)[0]
            for r in rows
            if r.section == "publish" and r.broker == broker
        )
    )
    series = {
        kind: [value(rows, broker, f"{c}, {kind}") for c in clients]
        for kind in ("sequential", f"{WIDTH} concurrent")
    }
    bars(ax, clients, series, "messages/s")
    ax.set_title(f"{broker}: fire-and-forget publish, 1 KiB", fontsize=9)


def round_trip_panels(rate_ax: Axes, latency_ax: Axes, rows: list[Row], brokers: list[str]) -> None:
    label = {b: path_label(b) for b in brokers}
    rate_labels = [DRAIN, f"celerybridge, {WIDTH} in flight", GET_THREADS]
    rates = {
        b: [
            value(rows, b, DRAIN),
            value(rows, b, f"{label[b]}, {WIDTH} in flight"),
            value(rows, b, GET_THREADS),
        ]
        for b in brokers
    }
    bars(rate_ax, rate_labels, rates, "round trips/s")
    rate_ax.set_title("round trips against one Celery worker, 1 KiB", fontsize=9)
    latency_labels = [
        "celerybridge p50",
        "celerybridge p99",
        f"{GET} p50",
        f"{GET} p99",
        "celerybridge loop lag p99, 1,000 in flight",
    ]
    latencies = {
        b: [
            value(rows, b, f"{label[b]}, p50"),
            value(rows, b, f"{label[b]}, p99"),
            value(rows, b, f"{GET}, p50"),
            value(rows, b, f"{GET}, p99"),
            value(rows, b, f"{label[b]}, 1,000 in flight"),
        ]
        for b in brokers
    }
    bars(latency_ax, latency_labels, latencies, "ms")
    latency_ax.set_title("round-trip latency (one at a time) and event-loop lag", fontsize=9)


def size_panels(rate_ax: Axes, memory_ax: Axes, sizes: list[SizeRow]) -> None:
    for key in dict.fromkeys((s.broker, s.client) for s in sizes):
        mine = [s for s in sizes if (s.broker, s.client) == key]
        xs = [s.size / 1024 for s in mine]
        name = f"{key[0]}: {key[1]}"
        rate_ax.plot(xs, [s.rate for s in mine], marker="o", label=name)
        memory_ax.plot(xs, [s.peak_mib for s in mine], marker="o", label=name)
    for ax, what in ((rate_ax, "messages/s"), (memory_ax, "peak traced memory, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([s / 1024 for s in SIZES.values()], list(SIZES))
        ax.set_xlabel("payload")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    rate_ax.set_title("publish rate by payload size (one at a time)", fontsize=9)
    memory_ax.set_title("peak memory while publishing, by payload size", fontsize=9)


def plot(rows: list[Row], sizes: list[SizeRow], brokers: list[str], path: Path) -> None:
    """Draw publish rates per broker, round trips, and payload-size costs into ``path``."""
    fig, axes = plt.subplots(3, 2, figsize=(13, 13))
    for ax, broker in zip(axes[0], brokers, strict=False):
        publish_panel(ax, rows, broker)
    round_trip_panels(axes[1][0], axes[1][1], rows, brokers)
    size_panels(axes[2][0], axes[2][1], sizes)
    fig.suptitle("celerybridge vs Celery's client vs HTTP (one run; higher rates are better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_distance(bursts: list[BurstRow], path: Path) -> None:
    """Draw accepted publishes per second, and how many of a burst were accepted within the
    publish timeout, against the broker's added latency, per broker and path."""
    fig, (rate_ax, count_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for key in dict.fromkeys((b.broker, b.path) for b in bursts):
        mine = sorted((b for b in bursts if (b.broker, b.path) == key), key=lambda b: b.latency_ms)
        xs = [b.latency_ms for b in mine]
        style = {"marker": "o", "linestyle": "-" if key[1] == "fast path" else "--"}
        rate_ax.plot(xs, [b.rate for b in mine], label=f"{key[0]}, {key[1]}", **style)
        count_ax.plot(xs, [b.accepted for b in mine], label=f"{key[0]}, {key[1]}", **style)
    calls = bursts[0].calls
    timeout = bursts[0].publish_timeout
    for ax in (rate_ax, count_ax):
        ax.set_xscale("symlog", linthresh=1)
        ticks = sorted({b.latency_ms for b in bursts})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("latency added to the broker (ms per round trip, delay proxy)")
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    rate_ax.set_yscale("log")
    rate_ax.set_ylabel("accepted publishes/s")
    rate_ax.set_title(f"burst of {calls:,} delegations: rate against latency", fontsize=9)
    count_ax.set_ylim(0, calls * 1.05)
    count_ax.set_ylabel(f"accepted within the publish timeout ({timeout:g} s)")
    count_ax.set_title(f"of {calls:,} started at once, accepted in time", fontsize=9)
    fig.suptitle("celerybridge publishing to a distant broker (one run)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
