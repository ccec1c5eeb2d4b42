"""The one timer for phase timings in reports (`timings_ms`).

A flow marks the end of each phase; the report then says how long each phase
took (`ms`) or, for reports that show progress over one long operation, when
each phase ended counted from the start (`at_ms`).  Both come from the same
marks, so every report measures time the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Phases:
    """Wall-clock time per phase, in milliseconds, in the order they ran."""

    ms: dict[str, float] = field(default_factory=dict)
    #: When each phase ended, in ms since the timer was created (rounded to 0.1 ms).
    at_ms: dict[str, float] = field(default_factory=dict)
    _start: float = field(default_factory=time.perf_counter, repr=False)
    _t: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._t = self._start

    def mark(self, name: str) -> None:
        """End the phase `name` now; a name marked twice adds up."""
        now = time.perf_counter()
        self.ms[name] = round(self.ms.get(name, 0.0) + (now - self._t) * 1000, 3)
        self.at_ms[name] = round((now - self._start) * 1000, 1)
        self._t = now
