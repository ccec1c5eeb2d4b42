"""Shared measurement helpers: repeat, take median and min, and compare side by side.

Machines here are noisy, so every figure is a ratio of two things measured in
the same run, interleaved, with the absolute numbers kept beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    runs: int


@dataclass(frozen=True)
class Row:
    """One line of a benchmark table: `subject` measured against `baseline`."""

    bench: str
    case: str
    subject: Timing
    baseline: Timing
    baseline_name: str
    target: str
    extra: str = ""

    @property
    def ratio(self) -> float:
        return self.subject.median_ms / self.baseline.median_ms if self.baseline.median_ms else 0.0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["ratio"] = round(self.ratio, 3)
        return d


def timing(samples_s: list[float]) -> Timing:
    ms = [s * 1000 for s in samples_s]
    return Timing(round(statistics.median(ms), 3), round(min(ms), 3), len(ms))


def side_by_side(
    subject: Callable[[], object], baseline: Callable[[], object], repeat: int = 7
) -> tuple[Timing, Timing]:
    """Alternate the two so that drift in machine load hits both equally."""
    a: list[float] = []
    b: list[float] = []
    subject()
    baseline()  # warm caches and page tables for both
    for _ in range(repeat):
        t = time.perf_counter()
        subject()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        baseline()
        b.append(time.perf_counter() - t)
    return timing(a), timing(b)


def render(rows: list[Row]) -> str:
    head = ("benchmark", "case", "vmwipe median/min ms", "baseline", "baseline median/min ms",
            "ratio", "target")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r.bench} | {r.case} | {r.subject.median_ms:.2f} / {r.subject.min_ms:.2f} | "
            f"{r.baseline_name} | {r.baseline.median_ms:.2f} / {r.baseline.min_ms:.2f} | "
            f"{r.ratio:.2f}x | {r.target} |"
        )
    return "\n".join(lines)
