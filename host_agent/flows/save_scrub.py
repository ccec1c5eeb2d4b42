"""`vmwipe save --scrub`: save a VM so that its secret pages never reach the disk.

Scrubbing after the fact (`vmwipe scrub`) still lets the secrets touch the
disk, and a filesystem with snapshots, a copy-on-write layer or a backup run
can keep them.  Here QEMU migrates into a pipe this process reads, and the
listed pages are replaced by zeros on their way to the file, and the bytes of
every fill range (protocol v2: the kernel CRNG) by fresh random bytes, never
zeros.  A fill range in a page the stream carries as a ZERO record stays zero.

The table must be known before its pages go by, but in a single-pass stream
the region may well come after the secret pages.  So the VM is stopped first
(a stopped VM's RAM cannot change; a VM suspended to RAM is stopped too, since
it can wake), the region is read out of guest RAM with
`pmemsave` and validated as at resume, and only then does the migration start;
every PAGE record of a listed page is written out as zeros.  QEMU gets the
pipe's write end through SCM_RIGHTS (`getfd` + `migrate fd:`), so it needs no
path it could open and this works whatever user QEMU runs as.

The saved header page carries wipe_generation + 1 and wipe_pages (written over
its copy as it passes), as after a verified wipe at resume, so the guest
module notifies its users after a plain restore too.

The file is written as `.NAME.XXXXXXXX.partial` beside it (a new name, mode 0600,
created exclusively) and renamed after it has been fsynced
and re-read completely (a full walk, device state included, and a check that
no copy of a listed page holds a non-zero byte).  The sidecar
`PATH.vmwipe.json` records the layout and what was scrubbed, for a later
`vmwipe scrub` or restore.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from vmwipe.protocol import (
    PAGE_SIZE,
    WIPE_GENERATION_OFFSET,
    Fill,
    ProtocolError,
    Region,
    Table,
    decode_table,
    encode_host_fields,
)

from ..atomic import fsync_dir
from ..errors import InvalidTableError, MigrationError, VMStateError
from ..private import temp_beside
from ..progress import task
from ..qemu.monitor import Monitor
from ..qemu.region import discover_region, read_cmdline
from ..snapshot.migstream import (
    KIND_PAGE,
    StreamIndex,
    copies,
    filter_stream,
    index_stream,
    open_mapped,
)
from ..snapshot.sidecar import sidecar_path, write_sidecar
from ..timing import Phases
from ..wipe.crng import CrngReport, crng_report
from ..wipe.ksecrets import KsecretsReport, ksecrets_report
from ..wipe.memmap import GuestMemoryMap, load_memory_map
from .migration import error_desc, full_bandwidth, ram_progress, wait_migration

log = logging.getLogger(__name__)

#: The pipe QEMU migrates into: 1 MiB, the usual fs.pipe-max-size (more is refused, harmlessly).
PIPE_SIZE = 1 << 20
#: Capabilities whose streams the filter cannot rewrite (or that spread pages over
#: several channels the pipe does not see).
REFUSED_CAPS = ("xbzrle", "compress", "multifd", "postcopy-ram", "mapped-ram",
                "x-ignore-shared", "rdma-pin-all")
FD_NAME = "vmwipe-scrub-save"
#: The save is written to `.NAME.XXXXXXXX.partial` beside NAME, then renamed over it.
PARTIAL_SUFFIX = ".partial"


class SaveMonitor(Monitor, Protocol):
    """`qemu.monitor.Monitor` plus what a save through a pipe needs.

    `QMPSession` is one; tests and other front ends adapt to it.  `send_fd`
    passes the pipe (SCM_RIGHTS, then `getfd`); `cmd` takes a timeout, since a
    `pmemsave` of a large region may take longer than the default.
    """

    pid: int
    version: tuple[int, int, int]

    def cmd(self, name: str, args: dict[str, Any] | None = None,
            timeout: float | None = None) -> Any: ...

    def send_fd(self, fd: int, name: str) -> None: ...


@dataclass
class SaveScrubReport:
    """What `save_scrubbed` did."""

    path: str
    sidecar: str
    bytes: int
    region: dict[str, int]
    table: str  # "absent" or "valid"
    slots: int
    pages: int  # listed pages
    zeroed_copies: int  # PAGE records written as zeros
    blocks: dict[str, str]  # flat-view name of each listed RAM block -> its name in the stream
    fill_ranges: int  # v2 fill ranges saved with fresh random bytes (never zeros)
    generation: int | None  # wipe_generation stored in the saved header (None: not bumped)
    state_before: str
    state_after: str
    qemu_version: str
    #: Whether the saved table registers the guest's kernel CRNG (`wipe.crng`).
    crng: CrngReport | None = None
    #: Which of the kernel's other per-boot secrets the saved table registers (`wipe.ksecrets`).
    ksecrets: KsecretsReport | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_guest(session: SaveMonitor, gpa: int, size: int) -> bytes:
    """Guest RAM via pmemsave into a private temp file (the region is table, not secrets)."""
    d = tempfile.mkdtemp(prefix="vmwipe-save-")
    path = os.path.join(d, "region.bin")
    try:
        # QEMU may run as another user (libvirt-qemu): give it the directory, mode 0700,
        # so that only it and root can create the file there.
        qemu_uid = os.stat(f"/proc/{session.pid}").st_uid if session.pid else os.getuid()
        if qemu_uid != os.getuid() and os.getuid() == 0:
            os.chown(d, qemu_uid, -1)
        session.cmd("pmemsave", {"val": gpa, "size": size, "filename": path}, timeout=60)
        with open(path, "rb") as f:
            data = f.read()
        if len(data) != size:
            raise MigrationError(f"pmemsave of the region returned {len(data)} of {size} bytes")
        return data
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rmdir(d)


def listed_pages(memmap: GuestMemoryMap, slots: Collection[tuple[int, int]]
                 ) -> set[tuple[str, int]]:
    """(RAM block, byte offset of the page) for every page of every (gpa, npages) slot."""
    out: set[tuple[str, int]] = set()
    for gpa, npages in slots:
        for pos, n, r in memmap.split(gpa, npages * PAGE_SIZE):
            off = r.offset + (pos - r.gpa)
            for p in range(off, off + n, PAGE_SIZE):
                out.add((r.block, p))
    return out


def stream_block_names(listed: Collection[str], ramblocks: Collection[str]) -> dict[str, str]:
    """Flat-view name -> RAM block name (what the stream calls it) for each listed block.

    `info mtree -f` shows a memory region's name; the stream uses its RAM block's idstr,
    which QEMU prefixes with the device path for RAM that belongs to a device on a bus:
    virtio-mem's `vmem0` is `0000:00:02.0/vmem0` there.  A listed block that matches no
    RAM block, or several, is refused: its pages would otherwise go out unscrubbed.
    """
    out: dict[str, str] = {}
    for name in listed:
        found = [name] if name in ramblocks else [b for b in ramblocks
                                                   if b.endswith("/" + name)]
        if len(found) != 1:
            raise MigrationError(f"listed RAM block {name!r} matches {len(found)} of QEMU's RAM "
                                 f"blocks ({', '.join(sorted(ramblocks))}); not saving")
        out[name] = found[0]
    return out


def ramblock_names(session: Monitor) -> list[str]:
    """RAM block names from HMP `info ramblock` (QEMU 2.x to 10.x: name first, one per line)."""
    lines = session.hmp("info ramblock").splitlines()
    return [ln.split()[0] for ln in lines[1:] if ln.strip()]


def fill_patches(memmap: GuestMemoryMap, fills: Iterable[Fill]
                 ) -> dict[tuple[str, int], list[tuple[int, bytes]]]:
    """Fresh random bytes over every fill range, as page patches of the saved stream
    (SPEC.md, "Scrub": never zeros -- a zeroed CRNG key is a key everyone knows)."""
    out: dict[tuple[str, int], list[tuple[int, bytes]]] = {}
    for f in fills:
        ((block, off),) = listed_pages(memmap, [(f.gpa - f.gpa % PAGE_SIZE, 1)])
        out.setdefault((block, off), []).append((f.gpa % PAGE_SIZE, os.urandom(f.length)))
    return out


def verify_scrubbed(path: str, pages: set[tuple[str, int]]) -> StreamIndex:
    """Walk the written file completely and check every copy of a listed page is zero."""
    fd, mm = open_mapped(path)
    try:
        idx = index_stream(mm)
        names = {b.name: i for i, b in enumerate(idx.blocks)}
        missing = sorted({b for b, _off in pages} - set(names))
        if missing:
            raise MigrationError(f"written file has no RAM block {', '.join(missing)}, which "
                                 "the table lists")
        wanted = {(names[b], off // PAGE_SIZE) for b, off in pages}
        zero = bytes(PAGE_SIZE)
        for _b, _p, pos, kind in copies(idx, wanted):
            if kind == KIND_PAGE and mm[pos:pos + PAGE_SIZE] != zero:
                raise MigrationError(f"written file still holds a listed page at {pos:#x}")
            if kind != KIND_PAGE and mm[pos] != 0:
                raise MigrationError(f"written file holds a filled listed page at {pos:#x}")
        return idx
    finally:
        if not isinstance(mm, bytes):
            mm.close()
        os.close(fd)


@dataclass
class _Plan:
    """What the filter needs, read while the VM is stopped: the table and its pages."""

    region: Region
    memmap: GuestMemoryMap
    table: Table
    pages: set[tuple[str, int]]  # (RAM block as the stream names it, byte offset)
    blocks: dict[str, str]  # flat-view name of each listed RAM block -> its name in the stream
    patches: dict[tuple[str, int], list[tuple[int, bytes]]]
    generation: int | None


def _stop_for_save(session: SaveMonitor) -> str:
    """Refuse what a filtered stream cannot carry, stop the VM; the state it was in."""
    state_before = session.status()
    if state_before in ("inmigrate", "postmigrate", "finish-migrate"):
        raise VMStateError(f"VM is {state_before}; cannot save it now")
    caps = {str(c["capability"]): bool(c["state"])
            for c in session.cmd("query-migrate-capabilities")}
    bad = [c for c in REFUSED_CAPS if caps.get(c)]
    if bad:
        raise VMStateError(f"migration capabilities {', '.join(bad)} are on; the scrubbing "
                           "save needs a plain single-channel stream")
    if state_before in ("running", "suspended"):
        # A suspended (S3) guest wakes on its RTC alarm or an input event: left as it
        # is, it could run after the table was read and list pages the save then
        # carries unscrubbed.  QEMU >= 9 stops it (and `cont` puts it back to sleep);
        # older QEMU ignores `stop` there.
        session.cmd("stop")
        if state_before == "suspended" and (now := session.status()) != "paused":
            raise VMStateError(f"the VM is suspended (S3) and QEMU {session.version[0]}."
                               f"{session.version[1]} does not stop it (still {now!r}): it "
                               "could wake and run during the save; not saving (QEMU >= 9 "
                               "can, or wake the guest first)")
    return state_before


def _plan(session: SaveMonitor, region: Region | None, strict: bool, bump: bool) -> _Plan:
    """Read and validate the table while the VM cannot change it; the pages to zero."""
    if region is None:
        region = discover_region(session.pid, read_cmdline(session.pid)).region
    memdevs = {str(m["id"]) for m in session.cmd("query-memdev")}
    memmap = load_memory_map(session.hmp, memdevs)
    data = _read_guest(session, region.base, region.size)
    try:
        table = decode_table(data, region, ram=memmap.pairs(), strict=strict)
    except ProtocolError as e:
        raise InvalidTableError(f"table in region {region.base:#x}+{region.size:#x} is "
                                f"invalid, nothing saved: {e}") from None
    for err in table.errors:
        log.warning("skipping invalid slot: %s", err)
    flat_pages = listed_pages(memmap, [(s.gpa, s.npages) for s in table.slots])
    header_page = listed_pages(memmap, [(region.base, 1)])
    flat_fills = fill_patches(memmap, table.fills)
    blocks = stream_block_names({b for b, _off in flat_pages | header_page | set(flat_fills)},
                                ramblock_names(session))
    pages = {(blocks[b], off) for b, off in flat_pages}
    # The saved state is wiped state: as after a verified wipe at resume, its header
    # carries wipe_generation + 1 and wipe_pages, so the guest module notifies its
    # users after a plain restore too.  QEMU sends the header page like any other.
    patches = {(blocks[b], off): patch for (b, off), patch in flat_fills.items()}
    generation: int | None = None
    if bump and table.header is not None and pages:
        generation = table.header.wipe_generation + 1
        ((hblock, hoff),) = header_page
        patches[(blocks[hblock], hoff)] = [(WIPE_GENERATION_OFFSET,
                                            encode_host_fields(generation, len(pages)))]
    return _Plan(region, memmap, table, pages, blocks, patches, generation)


def _filtered_migration(session: SaveMonitor, path: str, plan: _Plan, timeout: float,
                        progress: Callable[[int], None] | None, phases: Phases) -> StreamIndex:
    """Migrate into a pipe, write the filtered stream to a new `.NAME.XXXXXXXX.partial`
    beside `path` (mode 0600, O_EXCL), verify, rename."""
    try:
        out_fd, partial = temp_beside(path, PARTIAL_SUFFIX)
    except OSError as e:
        raise MigrationError(f"cannot create the save beside {path}: {e.strerror}") from None
    r, w = os.pipe()
    with contextlib.suppress(OSError):  # the default 64 KiB makes QEMU and us take turns
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    result: dict[str, Any] = {}
    pages = plan.pages

    def reader() -> None:
        try:
            with os.fdopen(out_fd, "wb", buffering=1 << 20) as sink:
                result["index"] = filter_stream(
                    r, sink, lambda block, off: (block, off) in pages, progress, plan.patches)
                sink.flush()
                os.fsync(sink.fileno())
        except BaseException as e:  # reported by the main thread
            result["error"] = e
        finally:
            os.close(r)

    thread = threading.Thread(target=reader, name="vmwipe-save-filter", daemon=True)
    ok = False
    try:
        with full_bandwidth(session):
            thread.start()
            try:
                session.send_fd(w, FD_NAME)
            finally:
                os.close(w)  # QEMU holds its own copy; the reader sees EOF when QEMU closes it
            session.cmd("migrate", {"uri": f"fd:{FD_NAME}"})
            with task("save --scrub") as t:
                status, _timed_out = wait_migration(session, timeout, lambda: time.sleep(0.02),
                                                    abort=lambda: "error" in result,
                                                    on_info=ram_progress(t))
            thread.join(timeout)
            if "error" in result:
                raise MigrationError(f"scrubbing save aborted: {result['error']}")
            if status != "completed":
                raise MigrationError(
                    f"save to {path} {status}: {error_desc(session)}".rstrip(": "))
            if thread.is_alive():
                raise MigrationError("the stream did not end after QEMU completed")
            phases.mark("migrate")
            idx: StreamIndex = result["index"]
            verify_scrubbed(partial, pages)
            phases.mark("verify")
            os.replace(partial, path)
            fsync_dir(os.path.dirname(path))
            ok = True
    finally:
        if not ok:
            if thread.ident is None:  # never started: the file is still ours to close
                os.close(out_fd)
            thread.join(5)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
    return idx


def save_scrubbed(session: SaveMonitor, path: str, *, region: Region | None = None,
                  strict: bool = True, resume: bool = False, timeout: float = 600.0,
                  bump: bool = True,
                  progress: Callable[[int], None] | None = None) -> SaveScrubReport:
    """Stop the VM, read and validate its table, save it to `path` with listed pages zeroed.

    `region` defaults to the VMWP0001 SSDT among QEMU's `-acpitable` files.
    `strict=False` skips invalid slots (like `--on-invalid skip`); `bump=False`
    leaves the header's wipe_generation as it was.  The VM is
    left paused unless `resume` and it was running before.  Raises
    MigrationError (and leaves no file at `path`) when anything fails.
    """
    phases = Phases()
    path = os.path.abspath(path)
    state_before = _stop_for_save(session)
    phases.mark("stop")
    plan = _plan(session, region, strict, bump)
    phases.mark("table")
    idx = _filtered_migration(session, path, plan, timeout, progress, phases)
    qemu_version = ".".join(str(x) for x in session.version)
    summary = {"pages": len(plan.pages), "copies": idx.zeroed_pages,
               "slots": len(plan.table.slots), "by": "vmwipe save --scrub"}
    side = write_sidecar(sidecar_path(path), region=plan.region, ram=plan.memmap.ranges,
                         qemu_version=qemu_version, machine=idx.machine, stream=path,
                         scrubbed=summary)
    if resume and state_before == "running":
        session.cmd("cont")
    phases.mark("done")
    return SaveScrubReport(
        path=path, sidecar=str(side), bytes=os.path.getsize(path),
        region={"base": plan.region.base, "size": plan.region.size},
        table="absent" if plan.table.header is None else "valid", slots=len(plan.table.slots),
        pages=len(plan.pages), zeroed_copies=idx.zeroed_pages, blocks=plan.blocks,
        fill_ranges=len(plan.table.fills),
        generation=plan.generation if idx.patched_pages else None, state_before=state_before,
        state_after=session.status(), qemu_version=qemu_version,
        crng=crng_report(plan.table), ksecrets=ksecrets_report(plan.table),
        timings_ms=phases.at_ms,
    )
