"""Real QEMU for the benchmarks: paused VMs, planted tables, saved snapshots, restores.

The benchmarks need no guest OS.  A `-S` VM never runs guest code, so its RAM
can be filled and a v1 table planted through the agent's own write path, then
saved with `vmwipe save`; restoring that file is exactly what a clone does.

This is the benchmarks' adapter to the agent: it only calls public pieces of
`vmwipe.host_agent` (launcher, QMP session, flows, backends).  The one thing
the agent lacks, a restore *without* the wipe, is `plain_restore` here, built
from the same wait helpers `restore_flow` uses so that the two differ only by
vmwipe's own work.

Every QEMU started here is recorded and killed by its PID in `Lab.close()`
(use `with Lab() as lab:`); temporary files live in one directory removed there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType

from vmwipe.host_agent.flows.fleet import CloneSet, default_jobs, run_fleet
from vmwipe.host_agent.flows.incoming import finish_incoming, prepare_incoming
from vmwipe.host_agent.flows.migration import migration_status
from vmwipe.host_agent.flows.report import FlowReport, new_report
from vmwipe.host_agent.flows.runstate import resume, wait_incoming_done
from vmwipe.host_agent.flows.save import save_flow
from vmwipe.host_agent.flows.target import AgentOptions, open_target
from vmwipe.host_agent.qemu.launcher import QemuProcess, start_qemu
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.protocol import PAGE_SIZE, Region, build_region, encode_ssdt

QEMU = os.environ.get("VMWIPE_BENCH_QEMU", "qemu-system-x86_64")
REGION = Region(0x1F00_0000, 1 << 20)
MiB = 1 << 20
#: First guest-physical byte of the area the benchmarks fill and register (above the region).
DATA_BASE = 0x2000_0000
FILL_CHUNK = 64 * MiB


def scattered(
    npages: int, base: int = DATA_BASE, stride: int = 2 * PAGE_SIZE
) -> list[tuple[int, int]]:
    """`npages` one-page slots, every other page: nothing coalesces, as in a real table."""
    return [(base + i * stride, 1) for i in range(npages)]


class Lab:
    """A temp directory plus every QEMU started for one benchmark; `close()` kills them by PID."""

    def __init__(self, prefix: str = "vmwipe-bench-", root: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        self.started: list[QemuProcess] = []
        self.extra_pids: list[int] = []  # QEMUs started by agent code (clone_flow) we must reap
        self._n = 0
        self.ssdt = self.dir / "vmwipe.aml"
        self.zero = self.dir / "zero.bin"
        self.ssdt.write_bytes(encode_ssdt(REGION.base, REGION.size))
        self.zero.write_bytes(bytes(PAGE_SIZE))

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def machine(self, mem_mib: int, shared: bool) -> list[str]:
        """QEMU argv (without QMP, -S, -incoming) for a pc guest carrying the vmwipe region."""
        argv = [QEMU, "-nodefaults", "-display", "none", "-accel", "tcg", "-M", "pc",
                "-m", f"{mem_mib}M"]
        if shared:
            argv += ["-object", f"memory-backend-memfd,id=ram0,size={mem_mib}M,share=on",
                     "-machine", "memory-backend=ram0"]
        argv += ["-acpitable", f"file={self.ssdt}",
                 "-device", f"loader,file={self.zero},addr={REGION.base:#x},force-raw=on"]
        return argv

    def start(self, argv: Sequence[str], incoming: bool = False) -> QemuProcess:
        """Start a paused QEMU (and -incoming defer if asked); it is killed in close()."""
        self._n += 1
        name = f"q{self._n}"
        qp = start_qemu(list(argv), str(self.dir / f"{name}.qmp"),
                        log_path=str(self.dir / f"{name}.log"), paused=True,
                        incoming_defer=incoming)
        self.started.append(qp)
        return qp

    def kill(self, qp: QemuProcess) -> None:
        qp.kill()
        if qp in self.started:
            self.started.remove(qp)

    def kill_pid(self, pid: int) -> None:
        """SIGKILL and reap a QEMU that agent code started as our child."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        if pid in self.extra_pids:
            self.extra_pids.remove(pid)

    def close(self) -> None:
        for qp in list(self.started):
            qp.kill()
        self.started.clear()
        for pid in list(self.extra_pids):
            self.kill_pid(pid)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- building snapshots -----------------------------------------------------------

    def make_snapshot(
        self,
        path: Path,
        mem_mib: int,
        shared: bool,
        fill: Iterable[tuple[int, int]],
        slots: Sequence[tuple[int, int]],
    ) -> None:
        """Start a -S VM, fill `fill` spans with random bytes, plant `slots`, save it to `path`."""
        qp = self.start(self.machine(mem_mib, shared))
        try:
            with QMPSession(qp.qmp_path, timeout=60) as s:
                opts = AgentOptions(region=REGION, reset_guard=False, backend="process_vm")
                t = open_target(s, s.pid, opts, guard=False)
                try:
                    noise = os.urandom(FILL_CHUNK)
                    for gpa, size in fill:
                        for off in range(0, size, FILL_CHUNK):
                            n = min(FILL_CHUNK, size - off)
                            t.backend.write(gpa + off, noise[:n])
                    t.backend.write(REGION.base, build_region(REGION.size, list(slots)))
                finally:
                    t.close()
                save_flow(s, AgentOptions(timeout=300), str(path))
        finally:
            self.kill(qp)

    def restored(self, argv: Sequence[str], path: Path) -> QemuProcess:
        """A QEMU with `path` loaded and paused (not wiped, not resumed): a save source."""
        qp = self.start(argv, incoming=True)
        with QMPSession(qp.qmp_path, timeout=60) as s:
            plain_restore(s, str(path), do_resume=False)
        return qp


def plain_restore(session: QMPSession, path: str, do_resume: bool = True,
                  timeout: float = 300.0) -> dict[str, float]:
    """Restore without vmwipe: migrate-incoming, wait for completed, cont.

    The same steps and waits as `restore_flow`, minus locating the region and
    the wipe.  Returns cumulative milliseconds: `load` (completed seen) and
    `resume` (cont returned), measured from the first QMP command.
    """
    t0 = time.perf_counter()
    session.cmd("migrate-set-capabilities",
                {"capabilities": [{"capability": "events", "state": True}]})
    session.clear_events()
    uri = prepare_incoming(session, path)
    session.cmd("migrate-incoming", {"uri": uri})
    state = wait_incoming_done(session, timeout)
    mig = session.wait_until(
        lambda: s if (s := migration_status(session)) not in ("active", "device") else None,
        10.0, "the incoming migration to report its end")
    if mig != "completed" or state == "running":
        raise RuntimeError(f"plain restore of {path} ended as {mig!r}, state {state!r}")
    finish_incoming(session, uri, path, [])  # mapped-ram off again: the VM may be saved next
    marks = {"load": (time.perf_counter() - t0) * 1000}
    if do_resume:
        resume(session)
        marks["resume"] = (time.perf_counter() - t0) * 1000
    return marks


def free_disk_gib(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / (1 << 30)


def bare_fleet(directory: Path, argv: Sequence[str], n: int,
               load: Callable[[QMPSession], object]) -> list[int]:
    """N clones without vmwipe, through the same fleet runner as `vmwipe clone`: start all,
    `load` each (`default_jobs(n)` at a time, left paused), `cont` all; returns the PIDs.

    The baselines differ from the subjects only in what each clone's preparation does.
    """
    def prepare(_i: int, s: QMPSession) -> FlowReport:
        load(s)
        return new_report("bare", s)

    directory.mkdir()
    fleet = CloneSet(str(directory))
    run_fleet(fleet, argv, n, prepare, lambda _m: None, 60.0, default_jobs(n), do_resume=True)
    return [c.pid for c in fleet.clones]

