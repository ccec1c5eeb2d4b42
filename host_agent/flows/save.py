"""`vmwipe save`: stop, migrate to a file at full bandwidth, write the scrub sidecar.

The sidecar holds what the stream lacks (the region and the guest-physical RAM
map), so `vmwipe scrub` can later find the listed pages in the file offline.
"""

from __future__ import annotations

import logging
import os
import shlex

from ..errors import MigrationError, QMPCommandError, QMPFailure, RegionError, VMStateError
from ..private import private_output
from ..progress import task
from ..qemu.qmp import QMPSession
from ..snapshot.sidecar import sidecar_path, write_sidecar
from ..timing import Phases
from ..wipe.memmap import load_memory_map
from .incoming import mapped_ram_offered, set_capability
from .migration import error_desc, full_bandwidth, ram_progress, wait_migration
from .report import FlowReport, new_report, state_after
from .target import AgentOptions, locate_region, shared_blocks

log = logging.getLogger(__name__)


def write_save_sidecar(
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


def save_uri(session: QMPSession, path: str, mapped_ram: bool,
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
                set_capability(session, "mapped-ram", mapped_ram)
                restore_cap, use_mapped = use_mapped, mapped_ram
            except QMPCommandError as e:  # e.g. it clashes with xbzrle or postcopy-ram
                warnings.append(f"mapped-ram not {'en' if mapped_ram else 'dis'}abled: {e}")
        if use_mapped:
            uri = f"file:{path}"
    return uri, use_mapped, restore_cap


def migrate_to_file(session: QMPSession, path: str, uri: str, timeout: float) -> None:
    """Run the migration to `uri` at full bandwidth until it completed; MigrationError else."""
    session.cmd("migrate", {"uri": uri})
    with task("save") as t:
        status, timed_out = wait_migration(
            session, timeout, lambda: session.wait_event("MIGRATION", 0.1),
            on_info=ram_progress(t))
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
    rep = new_report("save", session)
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
        set_capability(session, "events", True)
        session.clear_events()
        uri, use_mapped, restore_cap = save_uri(session, path, mapped_ram, rep.warnings)
        try:
            private_output(path, session.pid)  # QEMU's umask would make it 0644
            migrate_to_file(session, path, uri, opts.timeout)
        finally:
            if restore_cap is not None:
                try:
                    set_capability(session, "mapped-ram", restore_cap)
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
    rep.extra["sidecar"] = write_save_sidecar(session, opts, path, rep.warnings, use_mapped)
    phases.mark("sidecar")
    if do_resume and rep.state_before == "running":
        session.cmd("cont")
        rep.resumed = True
        phases.mark("resume")
    elif do_resume:
        rep.warnings.append(f"not resumed: the VM was {rep.state_before} before the save, "
                            "and --resume only puts a running VM back")
    rep.state_after = state_after(session, rep)
    rep.timings_ms = dict(phases.ms)
    return rep
