"""Start N clone QEMUs together and prepare them one by one, all or none.

`vmwipe clone` and `clone --template` differ only in how each clone is
prepared; both must leave no half-prepared clone behind.  So the fleet is
started here (every QEMU comes up in parallel, `-S -incoming defer`, its own
QMP socket and log, `{i}` in an argument replaced by the clone's index), and if
preparing any clone fails, every QEMU this fleet started is killed by PID.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


def run_fleet(
    result: CloneSet,
    argv: Sequence[str],
    count: int,
    prepare: Callable[[int, QMPSession], FlowReport],
    progress: Callable[[str], None],
    qmp_timeout: float,
) -> None:
    """Start `count` QEMUs from `argv`, then `prepare` each in turn (appending to `result`).

    `prepare` gets the clone's index and an open session and returns its report;
    any exception from it (or from a start) kills every QEMU started here and
    propagates.
    """
    started: list[QemuProcess] = []
    try:
        for i in range(count):
            started.append(start_qemu(
                [a.replace("{i}", str(i)) for a in argv],
                os.path.join(result.directory, f"clone-{i}.qmp"),
                log_path=os.path.join(result.directory, f"clone-{i}.log"),
                paused=True, incoming_defer=True, detach=True, wait=None))
        for i, qp in enumerate(started):
            qp.wait_for_qmp()
            with QMPSession(qp.qmp_path, timeout=qmp_timeout) as session:
                rep = prepare(i, session)
            result.clones.append(CloneResult(i, qp.pid, qp.qmp_path, qp.log_path or "", rep))
    except BaseException:
        for qp in started:
            progress(f"cleanup: killing clone QEMU pid {qp.pid}")
            qp.kill()
        raise
