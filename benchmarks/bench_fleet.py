"""Benchmark 5: starting a fleet of wiped clones from one snapshot, against plain restores.

One snapshot: a paused 512 MiB pc guest, 64 MiB of random data, 1,024
registered pages, saved with `vmwipe save` (no guest OS: a `-S` VM restores
exactly like a booted one).  For N = 1, 4 and 8:

- subject: `clone_flow(..., do_resume=True)`, i.e. `vmwipe clone -n N`:
  start N QEMUs, restore and wipe each (one per CPU at a time), then cont all;
- baseline: the same fleet runner without vmwipe: start N QEMUs, restore each
  (`vmlib.plain_restore`), then cont all (`vmlib.bare_fleet`).

The clock runs from the first QEMU started to the last `cont` returned.  The
clones then run SeaBIOS; both sides kill them by PID straight after timing.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from vmwipe.host_agent.flows.clone import clone_flow
from vmwipe.host_agent.flows.target import AgentOptions

from .harness import Row, interleaved, timing, verdict
from .vmlib import DATA_BASE, Lab, bare_fleet, plain_restore, scattered

MEM_MIB = 512
FILL = [(DATA_BASE - (64 << 20), 64 << 20)]  # below the region: 0x1b000000..0x1f000000
PAGES = 1024
SLOTS_BASE = DATA_BASE - (64 << 20)


def _plain_fleet(lab: Lab, argv: list[str], snap: Path, n: int) -> float:
    pids: list[int] = []
    try:
        t = time.perf_counter()
        pids = bare_fleet(lab.dir / f"plain-{time.monotonic_ns()}", argv, n,
                          lambda s: plain_restore(s, str(snap), do_resume=False))
        return time.perf_counter() - t
    finally:
        for pid in pids:
            lab.kill_pid(pid)


def _clone_fleet(lab: Lab, argv: list[str], snap: Path, n: int) -> float:
    d = lab.dir / f"clone-{time.monotonic_ns()}"
    pids: list[int] = []
    try:
        t = time.perf_counter()
        cs = clone_flow(str(snap), n, argv, AgentOptions(), directory=str(d), do_resume=True,
                        progress=lambda _m: None)
        elapsed = time.perf_counter() - t
        pids = [c.pid for c in cs.clones]
        lab.extra_pids += pids
        assert all(c.report.wipe and c.report.wipe.pages == PAGES for c in cs.clones)
        return elapsed
    finally:
        for pid in pids:
            lab.kill_pid(pid)


def run(quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    with Lab("vmwipe-bench-fleet-") as lab:
        snap = lab.dir / "fleet.mig"
        argv = lab.machine(MEM_MIB, shared=False)
        lab.make_snapshot(snap, MEM_MIB, False, FILL, scattered(PAGES, base=SLOTS_BASE))
        for n in (1, 4) if quick else (1, 4, 8):
            samples = interleaved({
                "plain": partial(_plain_fleet, lab, argv, snap, n),
                "clone": partial(_clone_fleet, lab, argv, snap, n),
            }, 1 if quick else 5)
            a, b = timing(samples["clone"]), timing(samples["plain"])
            rows.append(Row(
                "clone fleet", f"N={n}, 512 MiB guest, {PAGES:,} pages", a, b,
                f"{n} plain restore{'s' if n > 1 else ''}", "",
                f"{(a.median_ms - b.median_ms) / n:+.1f} ms per clone; "
                f"{a.median_ms / n:.0f} ms per wiped clone", verdict(None)))
        snap.unlink()
    return rows
