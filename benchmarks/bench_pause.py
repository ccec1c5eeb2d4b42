"""Benchmark 1: what vmwipe adds to a restore, and to the time the VM sits paused.

For each table size one snapshot is built (a 1 GiB pc guest, memfd RAM with
share=on, 512 MiB of it random data, N one-page slots spread every other page
over that data) and restored again and again into fresh `-S -incoming defer`
QEMUs, three ways in rotating order:

- (a) plain: migrate-incoming, completed, cont (`vmlib.plain_restore`);
- (b) `restore_flow` with the default process_vm backend: the same plus the wipe;
- (b') `restore_flow --populate`: the shared mapping is mapped and populated
  while QEMU loads, so the wipe itself is a memset.

Both figures are measured from the first QMP command to `cont` returned
("time to running").  The paused window (migration completed to cont
returned) comes from the same runs: the flow's own phase marks for (b),
our marks for (a).  The 5 ms target is on the window difference, which is
what vmwipe adds while the guest is paused and is not drowned by the
restore's own noise; the 1.1x target is on the time-to-running ratio.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

from vmwipe.host_agent.flows.live import restore_flow
from vmwipe.host_agent.flows.target import AgentOptions
from vmwipe.host_agent.qemu.qmp import QMPSession

from .harness import Row, interleaved, timing, verdict
from .vmlib import DATA_BASE, Lab, plain_restore, scattered

MEM_MIB = 1024
FILL = [(DATA_BASE, 512 << 20)]
CASES = [0, 64, 1024, 16_384, 65_280]
QUICK_CASES = [1024, 65_280]
VARIANTS = {"process_vm": AgentOptions(backend="process_vm"),
            "shared, populated during load": AgentOptions(backend="auto", populate=True)}


def _case(lab: Lab, npages: int, repeat: int) -> list[Row]:
    snap = lab.dir / f"pause-{npages}.mig"
    argv = lab.machine(MEM_MIB, shared=True)
    lab.make_snapshot(snap, MEM_MIB, True, FILL, scattered(npages))
    windows: dict[str, list[float]] = {}
    phases: dict[str, list[dict[str, float]]] = {}
    backends: dict[str, set[str]] = {}

    def plain() -> float:
        qp = lab.start(argv, incoming=True)
        try:
            with QMPSession(qp.qmp_path, timeout=60) as s:
                m = plain_restore(s, str(snap))
        finally:
            lab.kill(qp)
        windows.setdefault("plain", []).append(m["resume"] - m["load"])
        return m["resume"] / 1000

    def wiped(name: str, opts: AgentOptions) -> Callable[[], float]:
        def run() -> float:
            qp = lab.start(argv, incoming=True)
            try:
                with QMPSession(qp.qmp_path, timeout=60) as s:
                    rep = restore_flow(s, opts, str(snap), do_resume=True)
            finally:
                lab.kill(qp)
            ms = rep.timings_ms
            assert rep.wipe is not None and rep.wipe.pages == npages, rep.wipe
            backends.setdefault(name, set()).add(rep.wipe.backend)
            phases.setdefault(name, []).append(ms)
            windows.setdefault(name, []).append(
                sum(v for k, v in ms.items() if k not in ("start", "load")))
            return sum(ms.values()) / 1000
        return run

    runs = {"plain": plain, **{n: wiped(n, o) for n, o in VARIANTS.items()}}
    samples = interleaved(runs, repeat)
    snap.unlink()
    a = timing(samples["plain"])
    wa = statistics.median(windows["plain"])
    rows = []
    for name in VARIANTS:
        b = timing(samples[name])
        wb = statistics.median(windows[name])
        extra_total = b.median_ms - a.median_ms
        target, ok = "", None
        if npages == 1024:
            target, ok = "< 5 ms extra paused", wb - wa < 5.0
        elif npages == 65_280:
            target, ok = "< 1.1x restore", b.median_ms / a.median_ms < 1.1
        split = ", ".join(
            f"{k} {statistics.median(p.get(k, 0.0) for p in phases[name]):.1f}"
            for k in ("map", "read", "validate", "plan", "zero", "verify", "commit", "resume"))
        # rounds ran back to back, so per-round ratios and differences cancel the drift
        paired = statistics.median(x / y for x, y in zip(samples[name], samples["plain"],
                                                         strict=True))
        paired_extra = statistics.median(
            x - y for x, y in zip(windows[name], windows["plain"], strict=True))
        note = (f"backend {'/'.join(sorted(backends[name]))}; paused window {wb:.1f} ms vs "
                f"{wa:.1f} ms (+{wb - wa:.1f}; per-round difference median "
                f"{paired_extra:+.1f}); time to running {extra_total:+.1f} ms "
                f"(per-round ratio median {paired:.2f}x); "
                f"window phases ms: {split}")
        rows.append(Row("pause: restore+wipe+cont", f"{npages:,} pages, {name}", b, a,
                        "restore+cont", target, note, verdict(ok)))
    return rows


def run(quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    with Lab("vmwipe-bench-pause-") as lab:
        for n in QUICK_CASES if quick else CASES:
            t = time.perf_counter()
            rows += _case(lab, n, 2 if quick else 7)
            print(f"  pause {n} pages: {time.perf_counter() - t:.1f} s", flush=True,
                  file=sys.stderr)
    return rows
