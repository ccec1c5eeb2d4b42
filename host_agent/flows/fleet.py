"""Start N clone QEMUs together and prepare them one by one, all or none.

`vmwipe clone` and `clone --template` differ only in how each clone is
prepared; both must leave no half-prepared clone behind.  So the fleet is
started here (every QEMU comes up in parallel, `-S -incoming defer`, its own
QMP socket and log, `{i}` in an argument replaced by the clone's index), the
clones are prepared by a few threads (`--jobs`), and if preparing any clone
fails, every QEMU this fleet started is killed by PID.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from ..errors import AgentError, QMPFailure
from ..qemu.launcher import QemuProcess, start_qemu
from ..qemu.qmp import QMPSession
from .report import FlowReport
from .runstate import resume


def stderr_progress(msg: str) -> None:
    """The default progress sink: one line per step on stderr, as the CLI prints it."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class CloneResult:
    index: int
    pid: int
    qmp: str
    log: str
    report: FlowReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.pid,
            "qmp": self.qmp,
            "log": self.log,
            "report": self.report.to_dict(),
        }


@dataclass
class CloneSet:
    directory: str
    clones: list[CloneResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "clones": [c.to_dict() for c in self.clones]}


def default_jobs(count: int) -> int:
    """Clones prepared at once by default: one per CPU, at most `count`.

    Preparing a clone is mostly waiting for its QEMU (the load, each monitor
    command), so another clone's checks and wipe fit into that wait.
    """
    return max(1, min(count, os.cpu_count() or 1))


def run_fleet(
    result: CloneSet,
    argv: Sequence[str],
    count: int,
    prepare: Callable[[int, QMPSession], FlowReport],
    progress: Callable[[str], None],
    qmp_timeout: float,
    jobs: int = 1,
    do_resume: bool = False,
) -> None:
    """Start `count` QEMUs from `argv`, `prepare` each (`jobs` at a time), and only when
    every clone is prepared, `cont` them all with `do_resume`; `result` gets the clones
    in index order.

    `prepare` gets the clone's index and an open session, leaves the clone paused,
    and returns its report.  Any exception from it, from a start or from a `cont`
    kills every QEMU started here and propagates: the QEMUs first, so that clones
    still being prepared in other threads fail at once instead of finishing their
    loads.  So a refused clone means no clone ever ran, and no clone's guest
    competes for the CPU while the others are checked and wiped.
    """
    started: list[QemuProcess] = []
    sessions: list[QMPSession] = []

    def one(i: int) -> FlowReport:
        qp = started[i]
        try:
            qp.wait_for_qmp()
            try:
                session = sessions[i].connect()
            except QMPFailure:
                # QEMU 10 opens its monitor before it gives up on a bad option: one that
                # dies while the session is set up failed to start, not the monitor
                if (err := qp.exit_error(1.0)) is not None:
                    raise err from None
                raise
            return prepare(i, session)
        except AgentError as e:  # with several at work, say which clone it was
            progress(f"clone {i + 1}/{count} (pid {qp.pid}) failed: {e}")
            raise

    pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="vmwipe-clone")
    try:
        for i in range(count):
            started.append(start_qemu(
                [a.replace("{i}", str(i)) for a in argv],
                os.path.join(result.directory, f"clone-{i}.qmp"),
                log_path=os.path.join(result.directory, f"clone-{i}.log"),
                paused=True, incoming_defer=True, detach=True, wait=None))
            sessions.append(QMPSession(started[i].qmp_path, timeout=qmp_timeout))
        futures = [pool.submit(one, i) for i in range(count)]
        wait(futures, return_when=FIRST_EXCEPTION)
        # the failure first: result() on an earlier clone still loading would wait for it
        for fut in futures:
            if fut.done() and fut.exception() is not None:
                fut.result()
        reports = [fut.result() for fut in futures]
        if do_resume:
            for rep, session in zip(reports, sessions, strict=True):
                resume(session)
                rep.resumed, rep.state_after = True, "running"
            progress(f"resumed {count} clone(s)")
        for i, (qp, rep) in enumerate(zip(started, reports, strict=True)):
            result.clones.append(CloneResult(i, qp.pid, qp.qmp_path, qp.log_path or "", rep))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for qp in started:
            progress(f"cleanup: killing clone QEMU pid {qp.pid}")
            qp.kill()
        raise
    finally:
        pool.shutdown(wait=True)
        for session in sessions:
            session.close()
