"""Loading a saved state into a waiting QEMU: the URI, the capabilities, the load.

Shared by `vmwipe restore`, `clone` and `clone --template`, so each load ends
paused in the same way whatever stream it reads.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Callable, Sequence

from ..errors import MigrationError, QMPCommandError, QMPFailure, StreamError, VMStateError
from ..qemu.qmp import QMPSession
from ..snapshot.migstream import stream_capabilities
from ..timing import Phases
from .migration import migration_status
from .runstate import wait_incoming_done


def incoming_uri(session: QMPSession, path: str) -> str:
    """`file:` where QEMU has it (8.2+), else `exec:cat FILE` (QEMU 7.2 rejects file:)."""
    path = os.path.abspath(path)
    if session.at_least(8, 2):
        return f"file:{path}"
    return f"exec:cat {shlex.quote(path)}"


def mapped_ram_offered(session: QMPSession) -> bool:
    """Whether this QEMU has the `mapped-ram` migration capability (9.0+)."""
    if not session.at_least(9, 0):
        return False
    caps = session.cmd("query-migrate-capabilities")
    return any(c.get("capability") == "mapped-ram" for c in caps)


def set_capability(session: QMPSession, name: str, state: bool) -> None:
    session.cmd(
        "migrate-set-capabilities", {"capabilities": [{"capability": name, "state": state}]}
    )


def stream_uses_mapped_ram(path: str) -> bool:
    """Whether a saved stream was written with `mapped-ram` (its CONFIGURATION says so).

    A file that is not a readable stream gives False: QEMU's own load then says why.
    """
    try:
        return "mapped-ram" in stream_capabilities(path)[1]
    except (StreamError, OSError, ValueError):
        return False


def prepare_incoming(session: QMPSession, path: str) -> str:
    """The migrate-incoming URI for FILE, after enabling what the stream needs.

    A `mapped-ram` stream loads only with the capability on and through `file:`;
    every other stream loads as before (`file:` on 8.2+, else `exec:cat`).
    """
    if stream_uses_mapped_ram(path):
        if not mapped_ram_offered(session):
            v = ".".join(map(str, session.version))
            raise MigrationError(
                f"{path} was saved with mapped-ram; QEMU {v} cannot load it (needs >= 9.0)"
            )
        set_capability(session, "mapped-ram", True)
        return f"file:{os.path.abspath(path)}"
    return incoming_uri(session, path)


def finish_incoming(session: QMPSession, uri: str, path: str, warnings: list[str]) -> bool:
    """After a completed load: switch mapped-ram off again if `prepare_incoming` set it.

    Otherwise a later `vmwipe save --scrub` of the restored VM (a pipe) would be
    refused.  Returns whether the stream was a mapped-ram one.
    """
    if not (uri.startswith("file:") and stream_uses_mapped_ram(path)):
        return False
    try:
        set_capability(session, "mapped-ram", False)
    except QMPFailure as e:
        warnings.append(f"mapped-ram left enabled after the load: {e}")
    return True


def load_position(pid: int, path: str) -> int | None:
    """How far QEMU (or its `exec:cat` child) has read `path`, from /proc's fdinfo.

    None when no open file of theirs is `path` or its offset says nothing (mapped-ram
    loads with pread): progress then shows the time only.
    """
    target = os.path.realpath(path)
    pids = [pid]
    with contextlib.suppress(OSError, ValueError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                pids += [int(c) for c in f.read().split()]
    for p in pids:
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError, ValueError):
                if os.readlink(f"/proc/{p}/fd/{fd}") == target:
                    with open(f"/proc/{p}/fdinfo/{fd}") as f:
                        pos = int(f.readline().split()[1])  # "pos:\t<offset>"
                    if pos:
                        return pos
    return None


def load_incoming(session: QMPSession, uri: str, timeout: float, phases: Phases | None = None,
                  capabilities: Sequence[str] = ("events",),
                  tick: Callable[[], object] | None = None) -> None:
    """`migrate-incoming` from `uri` into an `-S -incoming defer` QEMU; returns once the
    load completed and QEMU is paused, raises otherwise.

    `capabilities` are switched on first (the caller sets any that depend on the
    stream, such as mapped-ram).  Without -S, QEMU starts the vCPUs as soon as a
    stream saved from a running VM is loaded, before any wipe; `stop` in the
    inmigrate state clears that autostart (qmp_stop), so the load always ends
    paused.  Capabilities and `stop` share one round trip; `migrate-incoming` waits
    for both to have succeeded, so a refused `stop` never leads to a load.  `tick`
    runs between polls while the load goes on (progress).
    """
    session.clear_events()
    caps = [{"capability": c, "state": True} for c in capabilities]
    for answer in session.batch([("migrate-set-capabilities", {"capabilities": caps}),
                                 ("stop", None)]):
        if isinstance(answer, QMPCommandError):
            raise answer
    session.cmd("migrate-incoming", {"uri": uri})
    if phases is not None:
        phases.mark("start")
    state = wait_incoming_done(session, timeout, tick)
    # QEMU sets the run state and then "completed" in one bottom half; poll in case
    # a version ever lets a client see the gap.
    mig = session.wait_until(
        lambda: s if (s := migration_status(session)) not in ("active", "device") else None,
        10.0,
        "the incoming migration to report its end",
    )
    if mig != "completed":
        raise MigrationError(f"incoming migration ended as {mig}")
    if state == "running":
        raise VMStateError("the VM autostarted after loading (QEMU lacks -S); not wiped")
