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
import tempfile
from collections.abc import Callable, Sequence

from ..errors import UsageError
from ..private import private_dir
from ..qemu.qmp import QMPSession
from .fleet import CloneSet, default_jobs, run_fleet, stderr_progress
from .live import restore_flow
from .report import FlowReport
from .target import AgentOptions


def clone_flow(
    snapshot: str,
    count: int,
    qemu_argv: Sequence[str],
    opts: AgentOptions,
    *,
    directory: str | None = None,
    do_resume: bool = False,
    progress: Callable[[str], None] = stderr_progress,
    qmp_timeout: float = 10.0,
    jobs: int | None = None,
) -> CloneSet:
    """Start `count` clones of `snapshot`, `jobs` restored at a time (default: one per
    CPU); on any failure kill all of them and re-raise."""
    snapshot = os.path.abspath(snapshot)
    argv = list(qemu_argv)
    if not argv or argv[0].startswith("-"):
        argv.insert(0, "qemu-system-x86_64")
    if count < 1:
        raise UsageError("-n must be at least 1")
    if not os.path.isfile(snapshot):
        raise UsageError(f"saved state {snapshot}: no such file")
    # only now: a refused command leaves no empty vmwipe-clone-* directory behind
    directory = (str(private_dir(directory, "clone directory")) if directory
                 else tempfile.mkdtemp(prefix="vmwipe-clone-"))
    result = CloneSet(directory)

    def prepare(i: int, session: QMPSession) -> FlowReport:
        progress(f"clone {i + 1}/{count}: pid {session.pid}, restoring and wiping")
        rep = restore_flow(session, opts, snapshot, do_resume=False)
        wiped = rep.wipe.pages if rep.wipe else 0
        crng = f"{rep.wipe.crng.line()}, " if rep.wipe and rep.wipe.crng else ""
        if rep.wipe and rep.wipe.ksecrets:
            crng += f"{rep.wipe.ksecrets.line()}, "
        progress(
            f"clone {i + 1}/{count}: {rep.wipe.status if rep.wipe else '?'}, "
            f"{wiped} pages wiped, {crng}paused"
        )
        return rep

    progress(f"starting {count} QEMU process{'es' if count > 1 else ''} in {directory}")
    run_fleet(result, argv, count, prepare, progress, qmp_timeout,
              default_jobs(count) if jobs is None else jobs, do_resume)
    return result
