"""Wipe libvirt domains: the shared wipe core and the API-driven flows.

Two callers reach QEMU in two different ways, and both end in `wipe_paused`:

- the hook (`hook`) runs while libvirtd holds the domain's lock, so it
  must never call libvirt for that domain; it talks to the domain's second QMP
  monitor (added by `vmwipe libvirt protect`) with `QMPSession`;
- the API flows (`vmwipe libvirt restore|revert|start`) ask libvirt to leave
  the domain paused (VIR_DOMAIN_SAVE_PAUSED, SNAPSHOT_REVERT_PAUSED,
  START_PAUSED), wipe through libvirt's own monitor with
  `libvirt_qemu.qemuMonitorCommand` (flag 1 = HMP for `info mtree -f` and
  `gpa2hva`), and call `resume()` only after a verified wipe.  On any failure
  the domain stays paused and the error says so.

In both cases the QEMU PID is needed for the direct memory backend (no QMP or
HMP command writes guest RAM): SO_PEERCRED on the second monitor, or libvirt's
PID file `/var/run/libvirt/qemu/NAME.pid` checked against /proc/PID/cmdline.
Both monitors satisfy `qemu.monitor.Monitor`, so `wipe_paused` reaches the
target through the same `flows.target.open_target` as the CLI flows.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmwipe.protocol import Region

from ..errors import (
    AgentError,
    LibvirtFailure,
    ProtectError,
    QMPFailure,
    RegionError,
    VMStateError,
)
from ..flows.target import PAUSED_STATES, AgentOptions, open_target
from ..qemu.monitor import Monitor
from ..qemu.region import option_values, read_cmdline
from ..timing import Phases
from ..wipe.engine import WipeReport, run_wipe
from .paths import RUN_DIR

log = logging.getLogger(__name__)

@dataclass
class DomainWipe:
    """Result of one wipe of a libvirt domain (what the hook logs, what the CLI prints)."""

    domain: str
    pid: int
    action: str  # wiped | nothing-registered | skipped
    reason: str
    state: str
    migration: str = "none"
    region: tuple[int, int] | None = None
    region_source: str = ""
    warnings: list[str] = field(default_factory=list)
    wipe: WipeReport | None = None
    resumed: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # the nested WipeReport too

    def summary(self) -> str:
        if self.wipe is None:
            return f"{self.domain}: {self.action}: {self.reason} (state {self.state})"
        w = self.wipe
        if w.status == "nothing-registered":
            what = "no vmwipe table in the region: nothing registered, nothing wiped"
        else:
            what = (f"{w.pages} pages in {w.spans} spans wiped and verified, generation "
                    f"{w.generation_before} -> {w.generation_after}")
        if w.crng is not None:
            what += f"; {w.crng.line()}"
        if w.ksecrets is not None:
            what += f"; {w.ksecrets.line()}"
        t = ", ".join(f"{k} {v:.1f}" for k, v in self.timings_ms.items())
        return (f"{self.domain}: {self.reason}: QEMU pid {self.pid}, region "
                f"{w.region[0]:#x}+{w.region[1]:#x}, backend {w.backend}: {what} "
                f"(ms: {t})")


# --- the wipe core ---------------------------------------------------------------------


def wipe_paused(
    mon: Monitor,
    pid: int,
    opts: AgentOptions,
    expect: Region | None = None,
    phases: Phases | None = None,
    expect_from: str = "domain metadata",
) -> tuple[WipeReport, str, list[str]]:
    """Wipe a paused QEMU through `mon`; returns (report, region source, warnings).

    The target comes from `flows.target.open_target`, the same path as the CLI's:
    the region from QEMU's own -acpitable (what the guest saw; when the domain
    metadata says otherwise, `expect`, it refuses: fail closed), the reset guard
    enforced unless opts say not.
    """
    phases = phases or Phases()
    state = mon.status()
    if state not in PAUSED_STATES:
        raise VMStateError(f"QEMU pid {pid} is {state!r}, not paused; refusing to wipe")
    target = open_target(mon, pid, opts, expect=expect, expect_from=expect_from)
    phases.mark("map")
    try:
        report = run_wipe(target.backend, target.region, opts.on_invalid, phases,
                          require_crng_refresh=opts.require_crng)
    finally:
        target.close()
    if mon.status() not in PAUSED_STATES:
        raise VMStateError("the VM left the paused state during the wipe")
    return report, target.region_source, target.warnings


# --- libvirt's own monitor ---------------------------------------------------------------


class LibvirtMonitor:
    """QMP and HMP over libvirt's monitor connection (`libvirt_qemu.qemuMonitorCommand`)."""

    def __init__(self, dom: Any) -> None:
        self.dom = dom

    def _send(self, text: str, flags: int) -> str:
        import libvirt
        import libvirt_qemu

        try:
            return str(libvirt_qemu.qemuMonitorCommand(self.dom, text, flags))
        except libvirt.libvirtError as e:
            raise QMPFailure(f"monitor command via libvirt failed: {one_line(e)}") from None

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        req: dict[str, Any] = {"execute": name}
        if args:
            req["arguments"] = args
        raw = self._send(json.dumps(req), 0)
        try:
            reply = json.loads(raw)
        except ValueError:
            raise QMPFailure(f"QMP {name}: unparsable reply {raw[:80]!r}") from None
        if "error" in reply:
            raise QMPFailure(f"QMP {name} failed: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def hmp(self, line: str) -> str:
        return self._send(line, 1)  # VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def qemu_pid_of(name: str, run_dir: Path = RUN_DIR) -> int:
    """The domain's QEMU PID from libvirt's PID file, checked against the process argv."""
    path = run_dir / f"{name}.pid"
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError) as e:
        raise RegionError(f"cannot read QEMU pid file {path}: "
                          f"{e.strerror if isinstance(e, OSError) else 'not a PID'}") from None
    argv = read_cmdline(pid)
    names = option_values(argv, "name")
    if not any(f"guest={name}," in v + "," or v == name for v in names):
        raise RegionError(f"pid {pid} from {path} is not the QEMU of domain {name!r}")
    return pid


# --- API-driven flows --------------------------------------------------------------------


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt's error callback: print nothing (the libvirtError we raise says it once)."""


def connect(uri: str | None) -> Any:
    import libvirt

    # libvirt's default handler prints every error to stderr ("libvirt: ... error : ...")
    # before the call raises: our one-line error would be its second or third line
    libvirt.registerErrorHandler(_quiet, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise LibvirtFailure(f"cannot connect to libvirt {uri or '(default)'}: "
                             f"{one_line(e)}") from None


def lookup(conn: Any, name: str) -> Any:
    import libvirt

    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        err = e  # the reason to report, unless NAME is a UUID (virsh's order too)
    try:
        uuid.UUID(name)
    except ValueError:
        raise LibvirtFailure(f"domain {name}: {one_line(err)}") from None
    try:
        return conn.lookupByUUIDString(name)
    except libvirt.libvirtError as e:
        raise LibvirtFailure(f"domain {name}: {one_line(e)}") from None


def recorded_region(records: Sequence[tuple[str, str]]) -> tuple[Region, str] | None:
    """(region, which records say so) from the vmwipe metadata of domain XMLs; None when
    no record is protected.  Records that name different regions are refused: the
    loaded guest's table is at one of them, and reading the other finds "nothing
    registered", which would resume it unwiped."""
    from .domain_xml import read_protection

    found: list[tuple[Region, str]] = []
    for what, xml in records:
        try:
            prot = read_protection(xml)
        except ProtectError as e:
            raise RegionError(f"{what}: cannot read the vmwipe metadata: {e}") from None
        if prot is not None:
            found.append((prot.region, what))
    if not found:
        return None
    region, first = found[0]
    for other, what in found[1:]:
        if other != region:
            raise RegionError(f"{first} says region {region.base:#x}+{region.size:#x}, "
                              f"{what} says {other.base:#x}+{other.size:#x}; refusing to "
                              "guess which table the guest uses")
    return region, " and ".join(w for _r, w in found)


def wipe_domain(dom: Any, opts: AgentOptions, reason: str, do_resume: bool,
                records: Sequence[tuple[str, str]] = ()) -> DomainWipe:
    """Wipe a paused, running-never-again domain via libvirt; `resume()` only after success.

    The region QEMU's SSDT names is checked against the vmwipe metadata of the
    domain's live XML and of every other record of the loaded state (`records`:
    (what, XML) of the save image, managed save or snapshot), as the hook checks it.
    """
    import libvirt

    name = dom.name()
    phases = Phases()
    mon = LibvirtMonitor(dom)
    try:
        state = mon.status()
        pid = qemu_pid_of(name)
        try:
            live = dom.XMLDesc(0)
        except libvirt.libvirtError as e:
            raise LibvirtFailure(f"cannot read the domain XML: {one_line(e)}") from None
        rec = recorded_region([("the domain XML", live), *records])
        expect, expect_from = rec if rec is not None else (None, "")
        report, source, warnings = wipe_paused(mon, pid, opts, expect, phases, expect_from)
    except AgentError as e:
        e.args = (f"{e}; domain {name} left paused",)
        raise
    res = DomainWipe(name, pid, "wiped" if report.status != "nothing-registered" else
                     "nothing-registered", reason, state, region=report.region,
                     region_source=source, warnings=warnings, wipe=report)
    if do_resume:
        try:
            dom.resume()
        except libvirt.libvirtError as e:
            raise LibvirtFailure(f"wiped, but resume failed: {one_line(e)}") from None
        res.resumed = True
        phases.mark("resume")
    res.timings_ms = dict(phases.ms)
    return res


def _paused_or_fail(dom: Any, what: str) -> None:
    import libvirt

    st, _reason = dom.state()
    if st != libvirt.VIR_DOMAIN_PAUSED:
        raise VMStateError(f"{what}: domain {dom.name()} is in libvirt state {st}, not paused; "
                           "not wiping")


def restore_file(conn: Any, path: str, opts: AgentOptions, do_resume: bool = True,
                 xml: str | None = None) -> DomainWipe:
    """restoreFlags(PAUSED), wipe through libvirt's monitor, then resume()."""
    import libvirt

    from .domain_xml import domain_uuid, parse_domain

    if not os.path.isfile(path):
        raise LibvirtFailure(f"save image {path} does not exist")
    try:
        saved = conn.saveImageGetXMLDesc(path, 0)
        uuid = domain_uuid(parse_domain(saved))
        conn.restoreFlags(path, xml, libvirt.VIR_DOMAIN_SAVE_PAUSED)
        dom = conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as e:
        raise LibvirtFailure(f"restore of {path} failed: {one_line(e)}") from None
    _paused_or_fail(dom, "restore")
    records = [(f"the XML in {path}", saved), *([("the --xml given", xml)] if xml else [])]
    return wipe_domain(dom, opts, f"restored from {path}", do_resume, records)


def revert_snapshot(conn: Any, name: str, snapshot: str, opts: AgentOptions,
                    do_resume: bool = True) -> DomainWipe:
    """revertToSnapshot(REVERT_PAUSED), wipe, then resume()."""
    import libvirt

    dom = lookup(conn, name)
    try:
        snap = dom.snapshotLookupByName(snapshot, 0)
        records = _snapshot_records(snapshot, snap.getXMLDesc(0))
        dom.revertToSnapshot(snap, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED)
    except libvirt.libvirtError as e:
        raise LibvirtFailure(f"revert of {name} to {snapshot} failed: {one_line(e)}") from None
    if not dom.isActive():
        return DomainWipe(dom.name(), 0, "skipped", f"snapshot {snapshot} has no memory state; "
                          "the domain is shut off, nothing ran, nothing to wipe", "shutoff")
    _paused_or_fail(dom, "revert")
    return wipe_domain(dom, opts, f"reverted to snapshot {snapshot}", do_resume, records)


def _snapshot_records(snapshot: str, snap_xml: str) -> list[tuple[str, str]]:
    """The snapshot's own copy of the domain XML, as a record of its region."""
    import xml.etree.ElementTree as ET

    try:
        dom_el = ET.fromstring(snap_xml).find("domain")
    except ET.ParseError as e:
        raise LibvirtFailure(f"snapshot {snapshot}: XML does not parse: {e}") from None
    if dom_el is None:
        return []
    return [(f"the domain XML of snapshot {snapshot}", ET.tostring(dom_el, encoding="unicode"))]


def start_domain(conn: Any, name: str, opts: AgentOptions, do_resume: bool = True) -> DomainWipe:
    """Start from the managed save image paused, wipe, resume; a fresh boot needs no wipe."""
    import libvirt

    dom = lookup(conn, name)
    try:
        if dom.isActive():
            raise VMStateError(f"domain {name} is already running")
        if not dom.hasManagedSaveImage(0):
            dom.createWithFlags(0 if do_resume else libvirt.VIR_DOMAIN_START_PAUSED)
            return DomainWipe(dom.name(), 0, "skipped", "no managed save image: fresh boot, "
                              "nothing to wipe", "running" if do_resume else "paused",
                              resumed=do_resume)
        records = [("the managed save image's XML", dom.managedSaveGetXMLDesc(0))]
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as e:
        raise LibvirtFailure(f"start of {name} failed: {one_line(e)}") from None
    _paused_or_fail(dom, "start")
    return wipe_domain(dom, opts, "started from its managed save image", do_resume, records)
