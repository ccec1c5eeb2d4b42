"""Benchmark 4: scrubbing a ~1 GiB saved VM, against copying the same file.

The stream is a real QEMU save: a paused 1 GiB pc guest whose RAM (all of it
but the first MiB and the region) was filled with random bytes through
process_vm_writev, with 4,096 scattered pages registered, saved by
`vmwipe save`.  Random data keeps QEMU from sending zero pages, so the file
is as large as the guest.

- `vmwipe scrub FILE` (the CLI, a fresh process, as an operator runs it)
  against `cp` of the same file.  Every round copies the pristine stream
  (that copy is the `cp` measurement), flushes it to disk untimed (so the
  scrub's own fsync does not pay for the copy's writeback), then scrubs it.
- `save_scrubbed` (`vmwipe save --scrub`) against `save_flow` (plain
  `vmwipe save`) from two QEMUs restored from that stream, in alternating
  order; the ratio against `cp` is given beside it.

Files are deleted as soon as they are measured; at most four ~1 GiB files
exist at once.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vmwipe.host_agent.flows.save import save_flow
from vmwipe.host_agent.flows.save_scrub import save_scrubbed
from vmwipe.host_agent.flows.target import AgentOptions
from vmwipe.host_agent.qemu.qmp import QMPSession

from .harness import Row, timing, verdict
from .vmlib import REGION, Lab, free_disk_gib, scattered

MEM_MIB = 1024
FILL = [(1 << 20, REGION.base - (1 << 20)), (REGION.end, (MEM_MIB << 20) - REGION.end)]
PAGES = 4096
NEED_GIB = 6.0


def _cp(src: Path, dst: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    return time.perf_counter() - t


def _flush(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _scrub_cli(path: Path) -> tuple[float, dict[str, object]]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "vmwipe.host_agent.cli", "scrub", str(path),
                          "--json"], check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t, json.loads(out)


def _unlink(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def run(quick: bool = False) -> list[Row]:
    repeat = 1 if quick else 3
    with Lab("vmwipe-bench-scrub-", root=os.environ.get("VMWIPE_BENCH_TMP")) as lab:
        if free_disk_gib(lab.dir) < NEED_GIB:
            raise RuntimeError(f"bench_scrub needs {NEED_GIB:g} GiB free in {lab.dir}")
        base = lab.dir / "base.mig"
        argv = lab.machine(MEM_MIB, shared=False)
        lab.make_snapshot(base, MEM_MIB, False, FILL, scattered(PAGES))
        size_mib = base.stat().st_size / (1 << 20)
        _flush(base)
        work, plain, scrubbed = lab.dir / "work.mig", lab.dir / "plain.mig", lab.dir / "scr.mig"
        cp_s: list[float] = []
        scrub_s: list[float] = []
        inproc_s: list[float] = []
        save_s: list[float] = []
        save_scrub_s: list[float] = []
        copies = 0
        marks: list[dict[str, float]] = []  # save_scrubbed's cumulative phase marks
        for i in range(repeat):
            cp_s.append(_cp(base, work))
            _flush(work)
            t, rep = _scrub_cli(work)
            scrub_s.append(t)
            inproc_s.append(float(rep["seconds"]))  # type: ignore[arg-type]
            copies = int(rep["scrubbed_copies"])  # type: ignore[call-overload]
            _unlink(work)
            q1, q2 = lab.restored(argv, base), lab.restored(argv, base)
            try:
                with QMPSession(q1.qmp_path, timeout=60) as s1, \
                        QMPSession(q2.qmp_path, timeout=60) as s2:
                    def plain_save(s: QMPSession = s1) -> None:
                        save_flow(s, AgentOptions(timeout=300), str(plain))

                    def scrub_save(s: QMPSession = s2) -> None:
                        r = save_scrubbed(s, str(scrubbed), timeout=300)
                        assert r.zeroed_copies >= PAGES, r
                        marks.append(r.timings_ms)

                    order = [(plain_save, save_s), (scrub_save, save_scrub_s)]
                    for fn, acc in order[:: 1 - 2 * (i % 2)]:
                        t0 = time.perf_counter()
                        fn()
                        acc.append(time.perf_counter() - t0)
            finally:
                lab.kill(q1)
                lab.kill(q2)
                _unlink(plain, scrubbed, Path(str(scrubbed) + ".vmwipe.json"))
        _unlink(base)
    cp_t = timing(cp_s)
    scrub_t = timing(scrub_s)
    inproc = statistics.median(inproc_s) * 1000
    rows = [
        Row("scrub", f"vmwipe scrub CLI, {size_mib:,.0f} MiB stream, {PAGES:,} pages",
            scrub_t, cp_t, "cp", "< 1.5x cp",
            f"{copies:,} copies zeroed; in-process scrub {inproc:.0f} ms "
            f"({inproc / cp_t.median_ms:.2f}x cp); {size_mib / scrub_t.median_ms * 1000:.0f} MiB/s",
            verdict(scrub_t.median_ms / cp_t.median_ms < 1.5)),
    ]
    ss, sp = timing(save_scrub_s), timing(save_s)
    phases = {k: statistics.median(m.get(k, 0.0) for m in marks) for k in ("table", "migrate",
                                                                          "verify", "done")}
    split = (f"phases: table read {phases['table']:.0f} ms, filtered migration "
             f"{phases['migrate'] - phases['table']:.0f} ms, re-read/verify "
             f"{phases['verify'] - phases['migrate']:.0f} ms, sidecar "
             f"{phases['done'] - phases['verify']:.0f} ms")
    rows.append(Row("scrub", f"save --scrub vs plain save, 1 GiB guest, {PAGES:,} pages",
                    ss, sp, "vmwipe save (plain)", "< 1.5x plain save",
                    f"vs cp {ss.median_ms / cp_t.median_ms:.2f}x; plain save vs cp "
                    f"{sp.median_ms / cp_t.median_ms:.2f}x; {split}",
                    verdict(ss.median_ms / sp.median_ms < 1.5)))
    return rows
