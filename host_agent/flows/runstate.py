"""QEMU's run state around a wipe: wait out a load, refuse a running VM, resume last.

`cont` is never sent while QEMU is `inmigrate`: QEMU would remember it and
autostart the guest the moment loading ends, before any wipe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..errors import MigrationError, QMPCommandError, QMPFailure, VMStateError
from ..qemu.qmp import QMPSession
from .migration import migration_status
from .target import PAUSED_STATES

log = logging.getLogger(__name__)


def wait_incoming_done(session: QMPSession, timeout: float,
                       tick: Callable[[], object] | None = None) -> str:
    """Wait while QEMU is `inmigrate`; return the run state after loading ended.

    `tick` runs once per poll (the restore's progress)."""
    deadline = time.monotonic() + timeout
    while True:
        if tick is not None:
            tick()
        state = session.status()
        if state != "inmigrate":
            return state
        mig = migration_status(session)
        if mig in ("failed", "cancelled"):
            raise MigrationError(f"incoming migration {mig}; the VM stays paused")
        left = deadline - time.monotonic()
        if left <= 0:
            if mig == "none":
                raise VMStateError(
                    "QEMU is waiting for an incoming migration that has not started "
                    "(-incoming defer: use `vmwipe restore`)"
                )
            raise MigrationError(f"incoming migration still {mig} after {timeout:g} s")
        session.wait_event("MIGRATION", min(0.2, left))


def require_paused(session: QMPSession, timeout: float) -> str:
    """The current run state, after waiting out an incoming migration; refuse running VMs."""
    state = session.status()
    if state == "inmigrate":
        log.info("QEMU is inmigrate; waiting for the incoming migration to finish")
        state = wait_incoming_done(session, timeout)
        if state == "running":
            raise VMStateError(
                "the VM started running when the incoming migration ended (QEMU lacks -S); "
                "it cannot be wiped before it runs"
            )
    if state == "running":
        raise VMStateError(
            "the VM is running; stop it first (a running guest cannot be wiped safely)"
        )
    if state not in PAUSED_STATES:
        raise VMStateError(f"the VM is in state {state}; expected one of "
                           f"{', '.join(sorted(PAUSED_STATES))}")
    return state


def resume(session: QMPSession) -> None:
    """`cont`, but only from a plain paused state (never during inmigrate)."""
    state = session.status()
    if state not in PAUSED_STATES:
        raise VMStateError(f"not resuming: the VM is in state {state}")
    try:
        session.cmd("cont")
    except QMPCommandError:
        raise
    except QMPFailure as e:  # the connection, not QEMU, failed: cont may have arrived
        raise QMPFailure(f"{e}; the VM may be running (cont was sent after a verified "
                         "wipe)") from None
