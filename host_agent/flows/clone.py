"""`vmwipe clone`: start N QEMU processes from one saved state, each wiped before it runs.

Each clone gets its own QMP socket and log, starts with `-S -incoming defer`,
loads the snapshot, is wiped by the same restore flow as `vmwipe restore`, and
only then (with --resume) runs.  If any clone fails, every QEMU this command
started is killed by PID, so no half-prepared clone is left behind.

`{i}` in a QEMU argument is replaced by the clone's index (0-based), so each
clone can get its own serial socket, log file, disk overlay or MAC address.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import MigrationError, UsageError
from ..qemu.launcher import QemuProcess, start_qemu
from ..qemu.qmp import QMPSession
from .live import FlowReport, restore_flow
from .target import AgentOptions


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


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def clone_flow(
    snapshot: str,
    count: int,
    qemu_argv: Sequence[str],
    opts: AgentOptions,
    *,
    directory: str | None = None,
    do_resume: bool = False,
    progress: Callable[[str], None] = _stderr,
    qmp_timeout: float = 10.0,
) -> CloneSet:
    """Start `count` clones of `snapshot`; on any failure kill all of them and re-raise."""
    directory = directory or tempfile.mkdtemp(prefix="vmwipe-clone-")
    os.makedirs(directory, exist_ok=True)
    snapshot = os.path.abspath(snapshot)
    argv = list(qemu_argv)
    if not argv or argv[0].startswith("-"):
        argv.insert(0, "qemu-system-x86_64")
    if count < 1:
        raise UsageError("-n must be at least 1")
    if not os.path.isfile(snapshot):
        raise MigrationError(f"saved state {snapshot} does not exist")
    started: list[QemuProcess] = []
    result = CloneSet(directory)
    try:
        # Start every QEMU first (they come up in parallel), then restore one by one.
        progress(f"starting {count} QEMU process{'es' if count > 1 else ''} in {directory}")
        for i in range(count):
            started.append(
                start_qemu(
                    [a.replace("{i}", str(i)) for a in argv],
                    os.path.join(directory, f"clone-{i}.qmp"),
                    log_path=os.path.join(directory, f"clone-{i}.log"),
                    paused=True,
                    incoming_defer=True,
                    detach=True,
                    wait=None,
                )
            )
        for i, qp in enumerate(started):
            qmp_path, log_path = qp.qmp_path, qp.log_path or ""
            qp.wait_for_qmp()
            with QMPSession(qmp_path, timeout=qmp_timeout) as session:
                progress(f"clone {i + 1}/{count}: pid {qp.pid}, restoring and wiping")
                rep = restore_flow(session, opts, snapshot, do_resume=do_resume)
            wiped = rep.wipe.pages if rep.wipe else 0
            progress(
                f"clone {i + 1}/{count}: {rep.wipe.status if rep.wipe else '?'}, "
                f"{wiped} pages wiped{', running' if rep.resumed else ', paused'}"
            )
            result.clones.append(CloneResult(i, qp.pid, qmp_path, log_path, rep))
    except BaseException:
        for qp in started:
            progress(f"cleanup: killing clone QEMU pid {qp.pid}")
            qp.kill()
        raise
    return result
