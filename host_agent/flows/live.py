"""The operations behind each CLI command, on an open `QMPSession`.

Fail closed: a flow sends `cont` only as its very last step, after the wipe
engine returned a verified result.  Any exception leaves the VM exactly as
paused as it was.  `cont` is never sent while QEMU is `inmigrate`: QEMU would
remember it and autostart the guest the moment loading ends, before any wipe.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from vmwipe.protocol import HeaderError, SlotError, decode_table

from ..errors import (
    MigrationError,
    QMPCommandError,
    QMPFailure,
    RegionError,
    StreamError,
    VMStateError,
)
from ..qemu.qmp import QMPSession
from ..snapshot.migstream import stream_capabilities
from ..snapshot.sidecar import sidecar_path, write_sidecar
from ..timing import Phases
from ..wipe.engine import WipeReport, read_region, run_wipe
from ..wipe.memmap import load_memory_map
from .migration import error_desc, full_bandwidth, migration_status, wait_migration
from .target import (
    PAUSED_STATES,
    AgentOptions,
    PreparedTarget,
    locate_region,
    open_target,
    shared_blocks,
)

log = logging.getLogger(__name__)

def _write_save_sidecar(
    session: QMPSession, opts: AgentOptions, path: str, warnings: list[str],
    mapped_ram: bool = False,
) -> str | None:
    """Record the region and the GPA-to-RAM-block map beside a save, for `vmwipe scrub`.

    The stream names RAM blocks and offsets, not guest-physical addresses, so
    an offline scrub needs this map; a VM without a vmwipe region gets none.
    """
    try:
        region = locate_region(session.pid, opts, guard=False).region
    except RegionError as e:
        warnings.append(f"no sidecar written: {e}")
        return None
    memmap = load_memory_map(session.hmp, set(shared_blocks(session)))
    written = write_sidecar(
        sidecar_path(path), region=region, ram=memmap.ranges,
        qemu_version=session.version, stream=path, mapped_ram=mapped_ram,
    )
    return str(written)


# --- run state -----------------------------------------------------------------------


def wait_incoming_done(session: QMPSession, timeout: float) -> str:
    """Wait while QEMU is `inmigrate`; return the run state after loading ended."""
    deadline = time.monotonic() + timeout
    while True:
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
        raise VMStateError(f"the VM is in state {state!r}; expected one of {sorted(PAUSED_STATES)}")
    return state


def resume(session: QMPSession) -> None:
    """`cont`, but only from a plain paused state (never during inmigrate)."""
    state = session.status()
    if state not in PAUSED_STATES:
        raise VMStateError(f"not resuming: the VM is in state {state!r}")
    try:
        session.cmd("cont")
    except QMPCommandError:
        raise
    except QMPFailure as e:  # the connection, not QEMU, failed: cont may have arrived
        raise QMPFailure(f"{e}; the VM may be running (cont was sent after a verified "
                         "wipe)") from None


# --- flows ---------------------------------------------------------------------------


@dataclass
class FlowReport:
    """A command's report: the wipe report plus flow-level facts."""

    command: str
    qmp: str
    pid: int
    qemu_version: str
    state_before: str = ""
    state_after: str = ""
    resumed: bool = False
    region_source: str = ""
    warnings: list[str] = field(default_factory=list)
    wipe: WipeReport | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # the nested WipeReport too


def _new_report(command: str, session: QMPSession) -> FlowReport:
    return FlowReport(command, session.path, session.pid, ".".join(map(str, session.version)))


def _wipe_and_maybe_resume(
    session: QMPSession,
    opts: AgentOptions,
    rep: FlowReport,
    phases: Phases,
    do_resume: bool,
    prepared: PreparedTarget | None = None,
) -> FlowReport:
    pending = prepared.read_early() if prepared is not None else None
    target = open_target(session, session.pid, opts, guard=True, prepared=prepared)
    try:
        rep.region_source = target.region_source
        rep.warnings += target.warnings
        phases.mark("map")
        early = pending.result() if pending is not None else None
        rep.wipe = run_wipe(target.backend, target.region, opts.on_invalid, phases, early=early)
        # Someone else resumed it meanwhile: the wipe proves nothing.  `resume` makes
        # the same check before `cont`; one query-status less inside the paused window.
        if do_resume:
            resume(session)
            rep.resumed = True
            phases.mark("resume")
        elif (state := session.status()) not in PAUSED_STATES:
            raise VMStateError(f"the VM left the paused state during the wipe (now {state!r})")
    finally:
        # after cont: unmapping a large populated mapping is slow; keep it off the pause
        target.close()
    rep.state_after = _state_after(session, rep)
    rep.timings_ms = dict(phases.ms)
    return rep


def _state_after(session: QMPSession, rep: FlowReport) -> str:
    """The final run state.  Once `cont` went through, losing the monitor is no failure:
    an error exit must mean "the VM was left paused" (errors.py)."""
    try:
        return session.status()
    except QMPFailure as e:
        if not rep.resumed:
            raise
        rep.warnings.append(f"resumed after a verified wipe; run state unreadable: {e}")
        return "unknown"


def inspect_flow(session: QMPSession, opts: AgentOptions) -> FlowReport:
    """Read-only: header, slots in use, pages, validity problems, generation."""
    phases = Phases()
    rep = _new_report("inspect", session)
    rep.state_before = rep.state_after = session.status()
    if rep.state_before == "running":
        rep.warnings.append("VM is running: the table may change while it is read")
    target = open_target(session, session.pid, opts, guard=False)
    try:
        rep.region_source = target.region_source
        rep.warnings += target.warnings
        phases.mark("map")
        data = read_region(target.backend, target.region)
        info: dict[str, Any] = {
            "region": {"base": target.region.base, "size": target.region.size},
            "backend": target.backend.name,
            "ram_ranges": [
                {"gpa": r.gpa, "size": r.size, "block": r.block, "offset": r.offset}
                for r in target.memmap.ranges
            ],
        }
        try:
            table = decode_table(data, target.region, target.memmap.pairs(), strict=False)
        except HeaderError as e:
            info["registered"] = True
            info["header_error"] = str(e)
        except SlotError as e:  # pragma: no cover - strict=False collects slot errors
            info["errors"] = [str(e)]
        else:
            info["registered"] = table.header is not None
            if table.header is not None:
                h = table.header
                info["header"] = {
                    "version": h.version,
                    "region_size": h.region_size,
                    "slot_count": h.slot_count,
                    "boot_id": h.boot_id.hex(),
                    "wipe_generation": h.wipe_generation,
                    "wipe_pages": h.wipe_pages,
                }
                info["slots_used"] = table.used
                info["slots_valid"] = len(table.slots)
                info["pages"] = table.pages
                info["slots"] = [
                    {"index": s.index, "gpa": s.gpa, "npages": s.npages} for s in table.slots[:1000]
                ]
                info["fill_ranges"] = [
                    {"index": f.index, "gpa": f.gpa, "length": f.length} for f in table.fills[:1000]
                ]
                info["errors"] = [str(e) for e in table.errors]
        rep.extra = info
    finally:
        target.close()
    phases.mark("read")
    rep.timings_ms = dict(phases.ms)
    return rep


def wipe_flow(session: QMPSession, opts: AgentOptions, do_resume: bool) -> FlowReport:
    """Wipe a VM that is already paused (waiting out an incoming migration first)."""
    phases = Phases()
    rep = _new_report("wipe", session)
    rep.state_before = require_paused(session, opts.timeout)
    phases.mark("state")
    return _wipe_and_maybe_resume(session, opts, rep, phases, do_resume)


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


def _set_capability(session: QMPSession, name: str, state: bool) -> None:
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
        _set_capability(session, "mapped-ram", True)
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
        _set_capability(session, "mapped-ram", False)
    except QMPFailure as e:
        warnings.append(f"mapped-ram left enabled after the load: {e}")
    return True


def restore_flow(
    session: QMPSession, opts: AgentOptions, path: str, do_resume: bool = True
) -> FlowReport:
    """migrate-incoming from FILE into a `-S -incoming defer` QEMU, wipe, then cont."""
    phases = Phases()
    rep = _new_report("restore", session)
    rep.state_before = session.status()
    if not os.path.isfile(path):
        raise MigrationError(f"saved state {path} does not exist")
    if rep.state_before != "inmigrate" or migration_status(session) not in ("none", ""):
        raise VMStateError(
            f"QEMU must be started with -S -incoming defer and not be loading yet "
            f"(state {rep.state_before!r})"
        )
    # Region, reset guard, RAM blocks and memory access: all checked before loading.
    prepared = PreparedTarget(session, session.pid, opts)
    try:
        _set_capability(session, "events", True)
        session.clear_events()
        uri = prepare_incoming(session, path)
        # Without -S, QEMU starts the vCPUs as soon as a stream saved from a running VM
        # is loaded, before any wipe.  `stop` in the inmigrate state clears that
        # autostart (qmp_stop), so the load always ends paused.
        session.cmd("stop")
        session.cmd("migrate-incoming", {"uri": uri})
        phases.mark("start")
        state = wait_incoming_done(session, opts.timeout)
        # QEMU sets the run state and then "completed" in one bottom half; poll in case
        # a version ever lets a client see the gap.
        mig = session.wait_until(
            lambda: s if (s := migration_status(session)) not in ("active", "device") else None,
            10.0,
            "the incoming migration to report its end",
        )
        if mig != "completed":
            raise MigrationError(f"incoming migration ended as {mig!r}")
        if state == "running":
            raise VMStateError("the VM autostarted after loading (QEMU lacks -S); not wiped")
        phases.mark("load")
        rep.extra["uri"] = uri
        rep.extra["bytes"] = os.path.getsize(path)
        rep.extra["mapped_ram"] = finish_incoming(session, uri, path, rep.warnings)
        return _wipe_and_maybe_resume(session, opts, rep, phases, do_resume, prepared)
    finally:
        prepared.close()


def loadvm_flow(
    session: QMPSession, opts: AgentOptions, tag: str, do_resume: bool = True
) -> FlowReport:
    """stop, loadvm TAG (internal snapshot), wipe, cont."""
    phases = Phases()
    rep = _new_report("loadvm", session)
    rep.state_before = session.status()
    if rep.state_before == "inmigrate":
        raise VMStateError("QEMU is inmigrate; loadvm is not possible now")
    prepared = PreparedTarget(session, session.pid, opts)
    try:
        # loadvm resumes a VM that was live before it, and QEMU >= 9 counts `suspended`
        # (S3) as live: stop anything that is not plainly paused, so the load ends paused.
        if rep.state_before not in PAUSED_STATES:
            session.cmd("stop")
        phases.mark("stop")
        out = session.hmp(f"loadvm {tag}", timeout=opts.timeout).strip()
        if out:
            raise MigrationError(f"loadvm {tag}: {out.splitlines()[-1]}")
        state = session.status()
        if state == "running":
            raise VMStateError("the VM is running after loadvm; not wiping a running guest")
        phases.mark("load")
        rep.extra["tag"] = tag
        return _wipe_and_maybe_resume(session, opts, rep, phases, do_resume, prepared)
    finally:
        prepared.close()


def _save_uri(session: QMPSession, path: str, mapped_ram: bool,
              warnings: list[str]) -> tuple[str, bool, bool | None]:
    """(URI, whether the save uses mapped-ram, the mapped-ram state to set back or None).

    `file:` where QEMU has it (8.2+), else `exec:cat > FILE`; with mapped-ram
    (9.0+, `file:` only) switched to what `mapped_ram` asks for.
    """
    uri = f"file:{path}" if session.at_least(8, 2) else f"exec:cat > {shlex.quote(path)}"
    use_mapped, restore_cap = False, None
    if mapped_ram_offered(session):
        use_mapped = any(c.get("capability") == "mapped-ram" and c.get("state")
                         for c in session.cmd("query-migrate-capabilities"))
        if use_mapped != mapped_ram:
            try:
                _set_capability(session, "mapped-ram", mapped_ram)
                restore_cap, use_mapped = use_mapped, mapped_ram
            except QMPCommandError as e:  # e.g. it clashes with xbzrle or postcopy-ram
                warnings.append(f"mapped-ram not {'en' if mapped_ram else 'dis'}abled: {e}")
        if use_mapped:
            uri = f"file:{path}"
    return uri, use_mapped, restore_cap


def _migrate_to_file(session: QMPSession, path: str, uri: str, timeout: float) -> None:
    """Run the migration to `uri` at full bandwidth until it completed; MigrationError else."""
    session.cmd("migrate", {"uri": uri})
    status, timed_out = wait_migration(
        session, timeout, lambda: session.wait_event("MIGRATION", 0.1))
    if timed_out:
        raise MigrationError(f"save to {path} did not finish in {timeout:g} s")
    if status != "completed":
        raise MigrationError(f"save to {path} {status}: {error_desc(session)}".rstrip(": "))


def save_flow(
    session: QMPSession, opts: AgentOptions, path: str, do_resume: bool = False,
    mapped_ram: bool = True,
) -> FlowReport:
    """stop, raise max-bandwidth, migrate to FILE, report; optionally resume the source.

    Where QEMU offers `mapped-ram` (9.0+) and `mapped_ram` is true, the save uses it
    with `file:`: every page gets one fixed slot in the file, and `vmwipe scrub`
    zeroes the slots.  The capability is switched off again afterwards, so a later
    `save --scrub` (a pipe, which mapped-ram cannot use) still works.
    """
    phases = Phases()
    rep = _new_report("save", session)
    rep.state_before = session.status()
    if rep.state_before == "inmigrate":
        raise VMStateError("QEMU is inmigrate; nothing to save yet")
    if rep.state_before == "postmigrate":
        raise VMStateError(
            "the VM is postmigrate (already saved); QEMU refuses to migrate it again until cont"
        )
    path = os.path.abspath(path)
    if rep.state_before == "running":
        session.cmd("stop")
    phases.mark("stop")
    with full_bandwidth(session):
        _set_capability(session, "events", True)
        session.clear_events()
        uri, use_mapped, restore_cap = _save_uri(session, path, mapped_ram, rep.warnings)
        try:
            _migrate_to_file(session, path, uri, opts.timeout)
        finally:
            if restore_cap is not None:
                try:
                    _set_capability(session, "mapped-ram", restore_cap)
                except QMPFailure as e:
                    log.warning("could not set mapped-ram back to %s: %s", restore_cap, e)
    # "completed" can be reported while the run state is still finish-migrate
    session.wait_until(
        lambda: True if session.status() != "finish-migrate" else None,
        opts.timeout,
        "the source to leave finish-migrate",
    )
    phases.mark("save")
    rep.extra.update({"path": path, "uri": uri, "bytes": os.path.getsize(path),
                      "mapped_ram": use_mapped})
    rep.extra["sidecar"] = _write_save_sidecar(session, opts, path, rep.warnings, use_mapped)
    phases.mark("sidecar")
    if do_resume and rep.state_before == "running":
        session.cmd("cont")
        rep.resumed = True
        phases.mark("resume")
    elif do_resume:
        rep.warnings.append(f"not resumed: the VM was {rep.state_before} before the save, "
                            "and --resume only puts a running VM back")
    rep.state_after = _state_after(session, rep)
    rep.timings_ms = dict(phases.ms)
    return rep
