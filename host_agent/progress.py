"""Progress of the long steps (save, restore, template hashing, scrub) on stderr.

A flow opens a `task` and reports bytes done (and the total, once known); how that
shows is decided once per run by the CLI with `configure()`:

- "bar": a tqdm bar on a terminal (redrawn in place, gone when the step ends);
- "lines": a plain line at each quarter and at the end, for logs and pipes, and only
  for steps of at least `LINES_MIN` bytes (small ones end before anyone reads them);
- "off": nothing (`-q`, and every caller that never configures it: the library API,
  the libvirt hook, in-process tests).

Global like logging's configuration, so the flows need no extra parameter.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, Literal

Mode = Literal["off", "bar", "lines"]

#: "lines" mode is silent for steps smaller than this.
LINES_MIN = 256 << 20

_mode: Mode = "off"


def configure(mode: Mode) -> None:
    """Choose how every later task shows (the CLI calls this once per run)."""
    global _mode
    _mode = mode


def mode_for(quiet: bool, stream: Any = None) -> Mode:
    """The CLI's choice: off with -q, a bar on a terminal, plain lines otherwise."""
    if quiet:
        return "off"
    isatty = getattr(stream if stream is not None else sys.stderr, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


class Task:
    """One step's progress; `update(done, total)` with byte counts, any number of times."""

    def __init__(self, label: str, total: int | None, mode: Mode) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.mode = mode
        self.t0 = time.monotonic()
        self._quarter = 0
        self._bar: Any = None

    def update(self, done: int, total: int | None = None) -> None:
        if total:
            self.total = total
        self.done = max(self.done, done)
        if self.mode == "bar":
            self._draw()
        elif self.mode == "lines" and self.total and self.total >= LINES_MIN:
            quarter = min(4, self.done * 4 // self.total)
            if 0 < quarter < 4 and quarter > self._quarter:
                self._quarter = quarter
                self._line(f"{quarter * 25}% ({self.done >> 20} of {self.total >> 20} MiB)")

    def _draw(self) -> None:
        from tqdm import tqdm  # only on a terminal: nothing else pays for the import

        if self._bar is None:
            self._bar = tqdm(total=self.total, desc=self.label, unit="B", unit_scale=True,
                             unit_divisor=1024, file=sys.stderr, leave=False,
                             dynamic_ncols=True)
        if self.total and self._bar.total != self.total:
            self._bar.total = self.total
        self._bar.update(self.done - self._bar.n)

    def _line(self, text: str) -> None:
        print(f"vmwipe: {self.label}: {text}", file=sys.stderr, flush=True)

    def close(self, ok: bool) -> None:
        if self._bar is not None:
            if ok:
                self._bar.refresh()  # its last state, which tqdm's rate limit may have skipped
            self._bar.close()
        if (ok and self.mode == "lines" and self.total and self.total >= LINES_MIN):
            self._line(f"{self.total >> 20} MiB in {time.monotonic() - self.t0:.1f} s")


@contextlib.contextmanager
def task(label: str, total: int | None = None, *, enabled: bool = True) -> Iterator[Task]:
    """A step with progress, shown as `configure()` chose (not at all unless `enabled`);
    closed (the bar removed) on exit."""
    t = Task(label, total, _mode if enabled else "off")
    ok = False
    try:
        yield t
        ok = True
    finally:
        t.close(ok)
