"""Benchmark 6: clone fleets from a scrubbed template, against full loads and unwiped templates.

One 512 MiB pc guest (no guest OS: a `-S` VM clones like a booted one) with
all of its RAM random and 1,024 registered pages, made twice: as a template
(`make_template`: RAM in a share=on file on /dev/shm, scrubbed, device state
saved) and as an ordinary saved state (`vmwipe save`).  For N = 1, 4, 8, 32:

- templated+wiped: `clone_template_flow(..., do_resume=True)`, i.e.
  `vmwipe clone --template DIR -n N` (resumes) (pre-load checks, canary, wipe);
  the template's SHA-256 is checked once per command before the first start and
  is timed separately (`digest` in the notes), not in the fleet time;
- full-load+wiped: `clone_flow(..., do_resume=True)` (`vmwipe clone SNAPSHOT`);
- templated without vmwipe: start N QEMUs with the same private file mapping,
  x-ignore-shared, load the device state, cont.

All three go through the same fleet runner: start every QEMU, prepare
`default_jobs(N)` clones at a time (one per CPU), and `cont` them all once every
clone is ready; they differ only in what each clone's preparation does.

The clock runs from the first QEMU started to the last `cont` returned; PSS is
read from /proc/PID/smaps_rollup of every clone right after the last `cont`.
Three rounds of each, interleaved.  Full loads at N=32 take ~1 s and ~530 MiB
per clone: one round after the others, and only when MemAvailable covers N
full-load clones with room to spare (otherwise the row says what was missing).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from vmwipe.host_agent.flows.clone import clone_flow
from vmwipe.host_agent.flows.target import AgentOptions, open_target
from vmwipe.host_agent.flows.template import make_template
from vmwipe.host_agent.flows.template_clone import (
    backend_args,
    clone_template_flow,
    qemu_version_of,
)
from vmwipe.host_agent.flows.template_manifest import DEVSTATE, Manifest
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.protocol import build_region

from .harness import Row, interleaved, timing, verdict
from .vmlib import REGION, Lab, bare_fleet, plain_restore, scattered

MEM_MIB = 512
PAGES = 1024
SLOTS_BASE = REGION.base - (64 << 20)
#: All guest RAM except the legacy hole and the region: random.
FILL = [(0x10_0000, REGION.base - 0x10_0000), (REGION.end, (MEM_MIB << 20) - REGION.end)]
#: Private memory of one full-load clone of the 512 MiB guest (measured 529-537 MiB PSS),
#: and what must stay free besides the clones (the template, the snapshot in page cache).
FULL_LOAD_CLONE_MIB = 560
FULL_LOAD_SPARE_MIB = 3072


def mem_available_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def full_load_fits(n: int) -> tuple[bool, str]:
    """Whether N full-load clones fit in memory now; and a note saying so if not."""
    need, have = n * FULL_LOAD_CLONE_MIB + FULL_LOAD_SPARE_MIB, mem_available_mib()
    return need <= have, f"full load not run: needs ~{need:,} MiB, {have:,} MiB available"


def pss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _fleet(lab: Lab, start: Callable[[Path], list[int]], pss: list[float]) -> float:
    """Run one fleet start; return its seconds and append the mean PSS per clone."""
    d = lab.dir / f"fleet-{time.monotonic_ns()}"
    pids: list[int] = []
    try:
        t = time.perf_counter()
        pids = start(d)
        elapsed = time.perf_counter() - t
        pss.append(statistics.mean(pss_mib(p) for p in pids))
        return elapsed
    finally:
        for pid in pids:
            lab.kill_pid(pid)


WIPE_PHASES = ("read", "validate", "plan", "zero", "verify", "commit")


def _templated(tpl: Path, argv: list[str], n: int, wipe: bool,
               phases: list[dict[str, float]]) -> Callable[[Path], list[int]]:
    """`vmwipe clone --template` as a fleet start; each clone's phase times go to `phases`."""
    def start(d: Path) -> list[int]:
        cs = clone_template_flow(str(tpl), n, argv, AgentOptions(), directory=str(d),
                                 do_resume=True, check_digest=False, wipe=wipe,
                                 progress=lambda _m: None)
        assert all(c.report.wipe and c.report.wipe.pages == PAGES for c in cs.clones) or not wipe
        phases.extend(c.report.timings_ms for c in cs.clones)
        return [c.pid for c in cs.clones]
    return start


def _phase_note(phases: list[dict[str, float]]) -> str:
    """Median ms per clone of the template checks, the canary (with the RAM map) and the wipe."""
    def med(keys: tuple[str, ...]) -> float:
        return statistics.median(sum(p.get(k, 0.0) for k in keys) for p in phases)
    return (f"per clone: checks {med(('checks',)):.1f} ms, map+canary {med(('canary',)):.1f}, "
            f"wipe {med(WIPE_PHASES):.1f}, load {med(('load',)):.1f}")


def _plain_templated(tpl: Path, argv: list[str], n: int) -> Callable[[Path], list[int]]:
    """The stock QEMU templating recipe, no checks and no wipe."""
    full = [*argv, *backend_args(Manifest.load(tpl), qemu_version_of(argv[0]))]

    def load(s: QMPSession) -> None:
        s.cmd("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        plain_restore(s, str(tpl / DEVSTATE), do_resume=False)

    return partial(bare_fleet, argv=full, n=n, load=load)


def _full(snap: Path, argv: list[str], n: int) -> Callable[[Path], list[int]]:
    def start(d: Path) -> list[int]:
        cs = clone_flow(str(snap), n, argv, AgentOptions(), directory=str(d), do_resume=True,
                        progress=lambda _m: None)
        return [c.pid for c in cs.clones]
    return start


def _make_template(lab: Lab, shm: Path) -> Path:
    """A -S VM with its RAM in a share=on file, filled and planted as `Lab.make_snapshot`
    does, turned into a template by `make_template` (which quits it)."""
    ram = shm / "ram"
    fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # make_template wants it private
    os.ftruncate(fd, MEM_MIB << 20)
    os.close(fd)
    qp = lab.start([*lab.machine(MEM_MIB, shared=False), "-object",
                    f"memory-backend-file,id=ram0,size={MEM_MIB}M,mem-path={ram},share=on",
                    "-machine", "memory-backend=ram0"])
    try:
        with QMPSession(qp.qmp_path, timeout=60) as s:
            opts = AgentOptions(region=REGION, reset_guard=False, backend="process_vm")
            t = open_target(s, s.pid, opts, guard=False)
            try:
                noise = os.urandom(64 << 20)
                for gpa, size in FILL:
                    for off in range(0, size, len(noise)):
                        t.backend.write(gpa + off, noise[:min(len(noise), size - off)])
                t.backend.write(REGION.base, build_region(REGION.size, scattered(
                    PAGES, base=SLOTS_BASE)))
            finally:
                t.close()
            make_template(s, AgentOptions(timeout=300), str(shm / "tpl"))
    finally:
        lab.kill(qp)
    return shm / "tpl"


def run(quick: bool = False) -> list[Row]:
    rows: list[Row] = []
    shm = Path(tempfile.mkdtemp(prefix="vmwipe-bench-tpl-", dir="/dev/shm"))
    try:
        with Lab("vmwipe-bench-template-") as lab:
            tpl = _make_template(lab, shm)
            t = time.perf_counter()
            Manifest.load(tpl).check_digest(tpl)
            digest_ms = (time.perf_counter() - t) * 1000
            snap = lab.dir / "full.mig"
            lab.make_snapshot(snap, MEM_MIB, False, FILL, scattered(PAGES, base=SLOTS_BASE))
            argv = lab.machine(MEM_MIB, shared=False)
            for n in (1, 4) if quick else (1, 4, 8, 32):
                pss: dict[str, list[float]] = {"tw": [], "full": [], "tp": []}
                phases: list[dict[str, float]] = []
                runs: dict[str, Callable[[], float]] = {
                    "tw": partial(_fleet, lab, _templated(tpl, argv, n, True, phases), pss["tw"]),
                    "tp": partial(_fleet, lab, _plain_templated(tpl, argv, n), pss["tp"]),
                }
                rounds = 1 if quick else 3
                fits, skipped = full_load_fits(n)
                full_run = partial(_fleet, lab, _full(snap, argv, n), pss["full"])
                if fits and n <= 8:
                    runs["full"] = full_run
                samples = interleaved(runs, rounds)
                if fits and n > 8:  # ~1 s per full-load clone: one round, after the others
                    samples |= interleaved({"full": full_run}, 1)
                tw, tp = timing(samples["tw"]), timing(samples["tp"])
                pss_tw = statistics.mean(pss["tw"])
                per_wipe = (tw.median_ms - tp.median_ms) / n
                note = (f"PSS/clone {pss_tw:.0f} MiB templated+wiped, "
                        f"{statistics.mean(pss['tp']):.0f} unwiped")
                if not fits:
                    note += f"; {skipped}"
                if "full" in samples:
                    full = timing(samples["full"])
                    rows.append(Row(
                        "template fleet", f"N={n}, 512 MiB random, {PAGES:,} pages", tw, full,
                        "full-load+wiped", "<= 0.10x",
                        f"{note}, {statistics.mean(pss['full']):.0f} full-load; "
                        f"digest once per command {digest_ms:.0f} ms (not in the time)",
                        verdict(tw.median_ms <= 0.10 * full.median_ms)))
                rows.append(Row(
                    "template wipe cost", f"N={n}, {PAGES:,} pages", tw, tp,
                    "templated, no vmwipe", "<= +5 ms/clone, PSS <= 64 MiB",
                    f"{per_wipe:+.1f} ms per clone ({_phase_note(phases)}); {note}",
                    verdict(per_wipe <= 5.0 and pss_tw <= 64)))
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return rows
