"""The libvirt qemu hook: wipe a protected domain after a restore, before its vCPUs run.

libvirtd runs `/etc/libvirt/hooks/qemu NAME OP SUBOP EXTRA` with the domain XML
on stdin.  For a restore (also a managed-save start and a `-loadvm` snapshot
revert) the order is `restore begin`, `prepare begin`, `start begin`,
`started begin`; at `started` guest RAM is loaded, the vCPUs have not run, and
libvirt sends `cont` only after the hook exits.  So the wipe happens there, and
a non-zero exit makes libvirt fail the operation and kill QEMU: the guest never
runs with unwiped secrets.

Rules this module keeps:

- it never calls libvirt: the domain is locked while the hook runs, and a call
  for it would block until the hook exits.  It talks to the domain's second
  QMP monitor (from `vmwipe libvirt protect`) and gets the PID by SO_PEERCRED;
- it prints nothing of its own: at `restore begin` (and `migrate begin`)
  whatever a hook prints replaces the domain XML;
- it leaves alone only the two cases it can prove harmless, and wipes
  every other one (fail closed):
  * fresh boot: QEMU `running` at `started`.  libvirt lets the vCPUs run
    before `started` only on a fresh boot; for every load it sends `cont`
    after the hook;
  * incoming live migration: `started` runs before RAM arrives, QEMU is
    `inmigrate` (query-migrate setup/active).  A migration is not a clone;
  * everything else has stopped vCPUs and is wiped: a restore (query-migrate
    `completed`: libvirt loaded the save image through an incoming
    migration), a `-loadvm` revert (libvirt 9 starts QEMU with it), and
    `prelaunch` without either.  The last is what libvirt 11 does to revert a
    shut-off domain (it starts QEMU with -S, loads the snapshot over QMP with
    the `snapshot-load` job, then runs `started`), and also what a fresh
    `--paused` boot looks like.  The hook need not tell them apart: the
    reset-time zero page and untouched RAM make a fresh boot's region read
    as "nothing registered", while a loaded state brings its table along.
    A revert that libvirt performs inside the running QEMU fires no hook at
    all: use `vmwipe libvirt revert`, which asks for REVERT_PAUSED and wipes
    itself;
- any failure exits 1 with a one-line reason on stderr (libvirt puts it into
  its error message) and logs to syslog and /var/log/vmwipe/hook.log.

Installing and removing the hook (and chaining to a hook that was there before)
is `install`'s job; the paths are in `paths`.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .paths import LOG_DIR, META_URN, RUN_DIR

if TYPE_CHECKING:
    from vmwipe.protocol import Region

log = logging.getLogger("vmwipe.hook")

QMP_TIMEOUT = 15.0


# --- logging ------------------------------------------------------------------------


def _setup_logging(log_dir: Path) -> None:
    """Log to /var/log/vmwipe/hook.log and syslog; libvirtd shows only our one stderr line."""
    root = logging.getLogger("vmwipe")
    if getattr(root, "_vmwipe_hook_logging", False):
        return
    logging.raiseExceptions = False  # a dead syslog must not spill tracebacks into libvirt
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s vmwipe-hook[%(process)d]: %(levelname)s: %(message)s")
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_dir / "hook.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    except OSError:
        pass
    if os.path.exists("/dev/log"):
        try:
            sh = logging.handlers.SysLogHandler("/dev/log")
            sh.setFormatter(logging.Formatter("vmwipe-hook[%(process)d]: %(message)s"))
            root.addHandler(sh)
        except OSError:
            pass
    root._vmwipe_hook_logging = True  # type: ignore[attr-defined]


# --- classification and wipe --------------------------------------------------------


@dataclass(frozen=True)
class Situation:
    """Why QEMU is where it is at `started begin`, and whether to wipe."""

    state: str
    migration: str
    loadvm: bool

    @property
    def wipe(self) -> bool:
        return self.kind not in ("fresh-boot", "migration")

    @property
    def kind(self) -> str:
        if self.state == "running":
            return "fresh-boot"
        if self.state == "inmigrate" or self.migration in ("setup", "active", "device",
                                                            "postcopy-active", "pre-switchover",
                                                            "wait-unplug", "colo"):
            return "migration"
        if self.migration == "completed":
            return "restore"
        if self.loadvm:
            return "revert"
        if self.state == "prelaunch":
            return "prelaunch"
        return "paused"

    def reason(self, registered: bool | None = None) -> str:
        """Why; for `prelaunch`, what the region held tells a QMP-loaded state from a boot."""
        kind = self.kind
        if kind == "prelaunch" and registered is not None:
            kind = "qmp-load" if registered else "paused-boot"
        return {
            "fresh-boot": "fresh boot (the guest never ran with a restored memory image)",
            "migration": "incoming live migration (RAM not yet here; a migration is not a clone)",
            "restore": "restored from a saved state",
            "revert": "reverted to an internal snapshot (-loadvm)",
            "prelaunch": "vCPUs never ran: a state loaded over QMP or a --paused boot",
            "qmp-load": "reverted to an internal snapshot or another state loaded over QMP "
                        "(snapshot-load) before the vCPUs ran",
            "paused-boot": "fresh --paused boot (the region holds no table)",
            "paused": "paused with restored or unknown memory contents",
        }[kind] + f" [state {self.state}, migration {self.migration}]"


def classify(state: str, migration: str, argv: Sequence[str]) -> Situation:
    from ..qemu.region import option_values

    return Situation(state, migration, bool(option_values(argv, "loadvm")))


def started(name: str, xml: str) -> int:
    """`NAME started begin`: wipe a protected, restored domain; 0 or 1 with one stderr line."""
    from ..errors import ProtectError
    from .domain_xml import read_protection

    try:
        prot = read_protection(xml)
    except ProtectError as e:
        return _fail(name, f"cannot read the vmwipe metadata: {e}")
    if prot is None:
        return 0
    _setup_logging(LOG_DIR)
    try:
        result = hook_wipe(name, prot.monitor, prot.region, prot.require_crng)
    except Exception as e:  # fail closed: any error keeps the guest from running
        from .flows import one_line

        log.debug("hook failure", exc_info=True)
        return _fail(name, one_line(e))
    log.info("%s", result)
    return 0


def hook_wipe(name: str, monitor: str, expect: Region | None = None,
              require_crng: bool = False) -> str:
    """Connect the second monitor, classify, wipe when it is a restore; the log line.

    `require_crng` (the domain's `protect --require-crng`) refuses a guest whose table
    does not register its kernel CRNG, like any refused wipe: libvirt kills it."""
    from ..flows.target import AgentOptions
    from ..qemu.qmp import QMPSession
    from ..qemu.region import read_cmdline
    from ..timing import Phases
    from .flows import DomainWipe, wipe_paused

    phases = Phases()
    with QMPSession(monitor, timeout=QMP_TIMEOUT) as s:
        pid = s.pid
        _check_pidfile(name, pid)
        state = s.status()
        migration = str(s.cmd("query-migrate").get("status", "none"))
        sit = classify(state, migration, read_cmdline(pid))
        phases.mark("classify")
        if not sit.wipe:
            return DomainWipe(name, pid, "skipped", sit.reason(), state, migration).summary()
        report, source, warnings = wipe_paused(
            s, pid, AgentOptions(require_crng=require_crng), expect, phases)
    for w in warnings:
        log.warning("%s: %s", name, w)
    reason = sit.reason(registered=report.status != "nothing-registered")
    res = DomainWipe(name, pid, "wiped", reason, state, migration, report.region, source,
                     warnings, report, timings_ms=dict(phases.ms))
    return res.summary()


def _check_pidfile(name: str, pid: int) -> None:
    """If libvirt's PID file exists it must name the process behind our monitor."""
    path = RUN_DIR / f"{name}.pid"
    try:
        text = path.read_text().strip()
    except OSError:
        return  # not written yet on some versions; SO_PEERCRED is authoritative
    if text and text.isdigit() and int(text) != pid:
        from ..errors import RegionError

        raise RegionError(f"monitor belongs to pid {pid} but {path} says {text}")


def _fail(name: str, reason: str) -> int:
    msg = f"vmwipe: {name}: {reason}; the guest is not allowed to run"
    log.error("%s", msg)
    print(msg, file=sys.stderr)
    return 1


def main(argv: Sequence[str], chained: str | None = None, stdin: bytes | None = None) -> int:
    """Entry point of the installed hook: chained hook first, then ours at `started begin`."""
    data = sys.stdin.buffer.read() if stdin is None else stdin
    if chained and os.access(chained, os.X_OK):
        proc = subprocess.run([chained, *argv], input=data, stdout=subprocess.PIPE, check=False)
        sys.stdout.buffer.write(proc.stdout)
        sys.stdout.flush()
        if proc.returncode != 0:
            return proc.returncode
    if len(argv) >= 3 and argv[1] == "started" and argv[2] == "begin" and META_URN in data:
        return started(argv[0], data.decode("utf-8", "replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
