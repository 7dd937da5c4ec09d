"""The fuzz suite's figures: per mutation family and per run, as JSON lines and markdown."""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

COLUMNS = (
    "sent",
    "unsendable",
    "expect refuse",
    "dead-lettered",
    "ran",
    "forbidden run",
    "lost",
    "extra dead letters",
    "no single fate",
    "valid call did not run",
    "crash",
    "wedge",
)


@dataclass(frozen=True)
class Violation:
    """One broken invariant: which, what happened, the case and where to replay it."""

    invariant: int
    what: str
    case: str
    detail: str
    repro: str = ""

    def describe(self) -> str:
        text = f"invariant {self.invariant} ({self.what}): {self.case}\n    {self.detail}"
        return text + (
            f"\n    replay: python -m tests.fuzz.repro {self.repro}" if self.repro else ""
        )


@dataclass
class Figures:
    """What one target's run sent and what became of it."""

    label: str
    run: str
    batches: int = 0
    seconds: float = 0.0
    families: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    kinds: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    totals: Counter[str] = field(default_factory=Counter)
    good_latency: list[float] = field(default_factory=list)
    good_failures: list[str] = field(default_factory=list)
    settle_seconds: list[float] = field(default_factory=list)
    """Per batch: from the first message sent until each had its fate (or the limit)."""

    def family(self, name: str) -> Counter[str]:
        return self.families[name]

    def count(self, what: str) -> None:
        self.totals[what] += 1

    def summed(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self.families.values():
            total.update(counts)
        return total

    def latency(self) -> dict[str, float | None]:
        return _spread(self.good_latency)

    def row(self) -> dict[str, Any]:
        """One JSON line: the run's totals, latency, and every family's counts."""
        return {
            "target": self.label,
            "run": self.run,
            "batches": self.batches,
            "seconds": round(self.seconds, 1),
            "totals": {**self.summed(), **self.totals},
            "good_calls": len(self.good_latency) + len(self.good_failures),
            "good_call_failures": self.good_failures,
            "good_call_latency_s": self.latency(),
            "batch_settle_s": _spread(self.settle_seconds),
            "families": {name: dict(counts) for name, counts in sorted(self.families.items())},
            "dead_letter_kinds": {name: dict(c) for name, c in sorted(self.kinds.items())},
        }

    def markdown(self) -> str:
        total = self.summed()
        latency = self.latency()
        lines = [
            f"### {self.label} (run {self.run})",
            "",
            f"{total['sent']:,} messages in {self.batches} batches, {self.seconds:.0f} s; "
            f"crashes {self.totals['crash']}, wedges {self.totals['wedge']}; good calls "
            f"{len(self.good_latency)} landed, {len(self.good_failures)} late or lost; "
            f"latency p50 {latency['p50']} s, p95 {latency['p95']} s, max {latency['max']} s; "
            f"a batch settled in {_spread(self.settle_seconds)['p50']} s (median).",
            "",
            "| family | " + " | ".join(COLUMNS) + " |",
            "|---" * (len(COLUMNS) + 1) + "|",
        ]
        for name, counts in sorted(self.families.items()):
            lines.append(f"| {name} | " + " | ".join(str(counts[c]) for c in COLUMNS) + " |")
        lines.append("| **all** | " + " | ".join(str(total[c]) for c in COLUMNS) + " |")
        others = {k: v for k, v in self.totals.items() if k not in ("crash", "wedge")}
        if others:
            lines += ["", "Other counts: " + json.dumps(others)]
        return "\n".join(lines) + "\n"


def _spread(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p95": None, "max": None}
    return {
        "p50": round(statistics.median(ordered), 3),
        "p95": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 3),
        "max": round(ordered[-1], 3),
    }
