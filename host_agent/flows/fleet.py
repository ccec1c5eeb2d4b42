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

from ..errors import AgentError
from ..qemu.launcher import QemuProcess, start_qemu
from ..qemu.qmp import QMPSession
from .report import FlowReport


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
) -> None:
    """Start `count` QEMUs from `argv`, then `prepare` each (appending to `result` in
    index order), `jobs` clones at a time.

    `prepare` gets the clone's index and an open session and returns its report.
    Any exception from it (or from a start) kills every QEMU started here and
    propagates: the QEMUs first, so that clones still being prepared in other
    threads fail at once instead of finishing their loads.
    """
    started: list[QemuProcess] = []

    def one(i: int) -> FlowReport:
        qp = started[i]
        try:
            qp.wait_for_qmp()
            with QMPSession(qp.qmp_path, timeout=qmp_timeout) as session:
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
        futures = [pool.submit(one, i) for i in range(count)]
        wait(futures, return_when=FIRST_EXCEPTION)
        for i, (qp, fut) in enumerate(zip(started, futures, strict=True)):
            result.clones.append(CloneResult(i, qp.pid, qp.qmp_path, qp.log_path or "",
                                             fut.result()))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for qp in started:
            progress(f"cleanup: killing clone QEMU pid {qp.pid}")
            qp.kill()
        raise
    finally:
        pool.shutdown(wait=True)
