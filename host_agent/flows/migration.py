"""The outgoing migration both savers run: full bandwidth, then a wait for its end.

`vmwipe save` (into a file) and `vmwipe save --scrub` (into a pipe) migrate the
same way: QEMU's default max-bandwidth throttles a local save to a crawl, so it
is raised for the save and set back afterwards, and the run state of the
migration is polled until QEMU reports its end.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..progress import Task
from ..qemu.monitor import Monitor

log = logging.getLogger(__name__)

#: bytes/s: effectively unlimited for a local save
MAX_BANDWIDTH = 1 << 40
#: How long to wait for QEMU to report the end of a migration it was told to cancel.
CANCEL_GRACE = 30.0
FINAL_STATES = ("completed", "failed", "cancelled")


def migration_status(mon: Monitor) -> str:
    """The outgoing or incoming migration's status from `query-migrate` ("none" if none)."""
    return str(mon.cmd("query-migrate").get("status", "none"))


@contextlib.contextmanager
def full_bandwidth(mon: Monitor) -> Iterator[None]:
    """max-bandwidth raised to `MAX_BANDWIDTH` for the body, set back afterwards.

    Failing to set it back is only a warning: the save itself is done by then.
    """
    old = mon.cmd("query-migrate-parameters").get("max-bandwidth")
    try:
        mon.cmd("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
        yield
    finally:
        if old is not None:
            try:
                mon.cmd("migrate-set-parameters", {"max-bandwidth": old})
            except Exception as e:  # best effort, in a finally: never mask the real error
                log.warning("could not restore max-bandwidth: %s", e)


def wait_migration(mon: Monitor, timeout: float, pause: Callable[[], object],
                   abort: Callable[[], bool] | None = None,
                   on_info: Callable[[dict[str, Any]], object] | None = None
                   ) -> tuple[str, bool]:
    """Poll until the migration is completed, failed or cancelled; (status, timed out).

    On the deadline, or once `abort()` says so, `migrate_cancel` is sent (once) and
    the wait goes on until QEMU reports the end, for at most `CANCEL_GRACE` more
    seconds.  `pause()` waits between polls (an event wait, or a short sleep);
    `on_info` sees each `query-migrate` answer (progress: its `ram` counters).
    """
    deadline = time.monotonic() + timeout
    cancelled_at: float | None = None
    timed_out = False
    while True:
        info = mon.cmd("query-migrate")
        status = str(info.get("status", "none"))
        if on_info is not None:
            on_info(info)
        if status in FINAL_STATES:
            return status, timed_out
        now = time.monotonic()
        if cancelled_at is None:
            timed_out = now > deadline
            if timed_out or (abort is not None and abort()):
                mon.cmd("migrate_cancel")
                cancelled_at = now
        elif now - cancelled_at > CANCEL_GRACE:
            return status, timed_out
        pause()


def ram_progress(t: Task) -> Callable[[dict[str, Any]], None]:
    """An `on_info` for `wait_migration` that moves `t` by the RAM bytes sent so far."""
    def on_info(info: dict[str, Any]) -> None:
        ram = info.get("ram") or {}
        t.update(int(ram.get("transferred", 0)), int(ram.get("total", 0)) or None)
    return on_info


def error_desc(mon: Monitor) -> str:
    """QEMU's description of why the last migration failed ("" if it gives none)."""
    return str(mon.cmd("query-migrate").get("error-desc", ""))
