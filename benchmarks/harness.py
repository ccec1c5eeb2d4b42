"""Shared measurement helpers: repeat, take median and min, and compare side by side.

Machines here are noisy, so every figure is a ratio of two things measured in
the same run, interleaved, with the absolute numbers kept beside it.  Whether a
target is met is decided on the medians and written into the row as a verdict,
so the table says it plainly; nothing here asserts a timing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    runs: int


@dataclass(frozen=True)
class Row:
    """One line of a benchmark table: `subject` measured against `baseline`.

    `extra` carries the absolute figures a ratio hides (extra milliseconds, the
    paused window, MiB/s); `verdict` is "met", "MISSED" or "" (no target).
    """

    bench: str
    case: str
    subject: Timing
    baseline: Timing
    baseline_name: str
    target: str
    extra: str = ""
    verdict: str = ""

    @property
    def ratio(self) -> float:
        return self.subject.median_ms / self.baseline.median_ms if self.baseline.median_ms else 0.0

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["ratio"] = round(self.ratio, 3)
        return d


def timing(samples_s: Sequence[float]) -> Timing:
    """Median and min of samples given in seconds, reported in milliseconds."""
    ms = [s * 1000 for s in samples_s]
    return Timing(round(statistics.median(ms), 3), round(min(ms), 3), len(ms))


def verdict(ok: bool | None) -> str:
    """Table wording for a target check (None: the row has no target)."""
    if ok is None:
        return ""
    return "met" if ok else "MISSED"


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


def interleaved(
    runs: dict[str, Callable[[], float]], repeat: int
) -> dict[str, list[float]]:
    """Run each named measurement `repeat` times, rotating the order every round.

    Each callable does its own setup and returns the seconds it measured (for
    the QEMU benchmarks only part of the work is timed: starting QEMU is
    setup, the restore is the measurement).  Rotating the order keeps a
    systematic first-or-last effect (page cache, CPU frequency) off the ratio.
    """
    names = list(runs)
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeat):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(runs[n]())
    return out


def render(rows: list[Row]) -> str:
    head = ("benchmark", "case", "vmwipe median / min ms", "baseline", "baseline median / min ms",
            "ratio", "target", "verdict", "notes")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r.bench} | {r.case} | {r.subject.median_ms:.1f} / {r.subject.min_ms:.1f} | "
            f"{r.baseline_name} | {r.baseline.median_ms:.1f} / {r.baseline.min_ms:.1f} | "
            f"{r.ratio:.2f}x | {r.target} | {r.verdict} | {r.extra} |"
        )
    return "\n".join(lines)
