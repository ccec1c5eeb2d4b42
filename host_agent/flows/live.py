"""`vmwipe inspect`, `wipe`, `restore` and `loadvm`, on an open `QMPSession`.

Fail closed: a flow sends `cont` only as its very last step, after the wipe
engine returned a verified result.  Any exception leaves the VM exactly as
paused as it was.  `cont` is never sent while QEMU is `inmigrate`: QEMU would
remember it and autostart the guest the moment loading ends, before any wipe.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from vmwipe.protocol import HeaderError, Region, SlotError, decode_table

from ..errors import MigrationError, VMStateError
from ..progress import task
from ..qemu.qmp import QMPSession
from ..snapshot.sidecar import read_sidecar, sidecar_path
from ..timing import Phases
from ..wipe.crng import crng_report
from ..wipe.engine import read_region, run_wipe
from ..wipe.ksecrets import ksecrets_report
from .incoming import finish_incoming, load_incoming, load_position, prepare_incoming
from .migration import migration_status
from .report import FlowReport, new_report, state_after
from .runstate import require_paused, resume
from .target import PAUSED_STATES, AgentOptions, PreparedTarget, open_target

log = logging.getLogger(__name__)


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
        rep.wipe = run_wipe(target.backend, target.region, opts.on_invalid, phases, early=early,
                            require_crng_refresh=opts.require_crng)
        # Someone else resumed it meanwhile: the wipe proves nothing.  `resume` makes
        # the same check before `cont`; one query-status less inside the paused window.
        if do_resume:
            resume(session)
            rep.resumed = True
            phases.mark("resume")
        elif (state := session.status()) not in PAUSED_STATES:
            raise VMStateError(f"the VM left the paused state during the wipe (now {state})")
    finally:
        # after cont: unmapping a large populated mapping is slow; keep it off the pause
        target.close()
    rep.state_after = state_after(session, rep)
    rep.timings_ms = dict(phases.ms)
    return rep


def inspect_flow(session: QMPSession, opts: AgentOptions) -> FlowReport:
    """Read-only: header, slots in use, pages, validity problems, generation."""
    phases = Phases()
    rep = new_report("inspect", session)
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
            info["crng"] = crng_report(table).to_dict()
            info["ksecrets"] = ksecrets_report(table).to_dict()
            if table.header is not None:
                h = table.header
                info["header"] = {
                    "version": h.version,
                    "region_size": h.region_size,
                    "slot_count": h.slot_count,
                    "boot_id": h.boot_id.hex(),
                    "wipe_generation": h.wipe_generation,
                    "wipe_pages": h.wipe_pages,
                    "crng_status": h.crng_status,
                    "crng_ranges": h.crng_ranges,
                    "crng_reason": h.crng_reason,
                    "ksecrets": h.ksecrets,
                    "ksecrets_ranges": h.ksecrets_ranges,
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
    rep = new_report("wipe", session)
    rep.state_before = require_paused(session, opts.timeout)
    phases.mark("state")
    return _wipe_and_maybe_resume(session, opts, rep, phases, do_resume)


def _load_then_wipe(
    session: QMPSession,
    opts: AgentOptions,
    rep: FlowReport,
    phases: Phases,
    do_resume: bool,
    load: Callable[[], None],
    expect: Region | None = None,
    expect_from: str = "",
) -> FlowReport:
    """Check the target (region, reset guard, RAM blocks, memory access) before `load`
    runs, so a refusal costs no load; then wipe, and resume with `do_resume`.

    `expect` is the region a record of the state to be loaded names (`expect_from`);
    a region that disagrees is refused before the load."""
    prepared = PreparedTarget(session, session.pid, opts, expect=expect, expect_from=expect_from)
    try:
        load()
        phases.mark("load")
        return _wipe_and_maybe_resume(session, opts, rep, phases, do_resume, prepared)
    finally:
        prepared.close()


def restore_flow(
    session: QMPSession, opts: AgentOptions, path: str, do_resume: bool = True,
    show_progress: bool = False,
) -> FlowReport:
    """migrate-incoming from FILE into a `-S -incoming defer` QEMU, wipe, then cont.

    `show_progress`: the load's progress as `progress.configure` chose (the restore
    command; not the clones of a fleet, which report one line per clone).

    FILE's sidecar (`vmwipe save`), if it has one, records the region of the VM that
    was saved; a QEMU whose region differs would read the table at the wrong address
    and find "nothing registered", so it is refused before the load.
    """
    phases = Phases()
    rep = new_report("restore", session)
    rep.state_before = session.status()
    if not os.path.isfile(path):
        raise MigrationError(f"saved state {path} does not exist")
    if rep.state_before != "inmigrate" or migration_status(session) not in ("none", ""):
        raise VMStateError(
            f"QEMU must be started with -S -incoming defer and not be loading yet "
            f"(state {rep.state_before})"
        )

    def load() -> None:
        uri = prepare_incoming(session, path)
        size = os.path.getsize(path)
        with task("restore", size, enabled=show_progress) as t:
            load_incoming(session, uri, opts.timeout, phases,
                          tick=(lambda: t.update(load_position(session.pid, path) or 0))
                          if show_progress else None)
            t.update(size)
        rep.extra["uri"] = uri
        rep.extra["bytes"] = size
        rep.extra["mapped_ram"] = finish_incoming(session, uri, path, rep.warnings)

    side = sidecar_path(path)
    expect = read_sidecar(side).region if side.exists() else None
    return _load_then_wipe(session, opts, rep, phases, do_resume, load, expect,
                           f"the save's sidecar {side}")


def loadvm_flow(
    session: QMPSession, opts: AgentOptions, tag: str, do_resume: bool = True
) -> FlowReport:
    """stop, loadvm TAG (internal snapshot), wipe, cont."""
    phases = Phases()
    rep = new_report("loadvm", session)
    rep.state_before = session.status()
    if rep.state_before == "inmigrate":
        raise VMStateError("QEMU is inmigrate; loadvm is not possible now")

    def load() -> None:
        # loadvm resumes a VM that was live before it, and QEMU >= 9 counts `suspended`
        # (S3) as live: stop anything that is not plainly paused, so the load ends paused.
        if rep.state_before not in PAUSED_STATES:
            session.cmd("stop")
        phases.mark("stop")
        out = session.hmp(f"loadvm {tag}", timeout=opts.timeout).strip()
        if out:
            raise MigrationError(f"loadvm {tag}: {out.splitlines()[-1]}")
        if session.status() == "running":
            raise VMStateError("the VM is running after loadvm; not wiping a running guest")
        rep.extra["tag"] = tag

    return _load_then_wipe(session, opts, rep, phases, do_resume, load)
