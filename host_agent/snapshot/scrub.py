"""Scrub a saved VM: zero every copy of every page the guest's vmwipe table lists.

Wiping at resume protects the restored VM, but the secrets still sit in the
save file, where backups, copies and forensic tools can read them.  The scrub
closes that gap:

1. Walk the whole file (libvirt header if any, then the migration stream,
   device state included; see `migstream`) and index every RAM page record.
   Nothing is written unless the walk accounts for every byte.
2. Map guest-physical addresses to (RAM block, offset).  The map comes from a
   sidecar `FILE.vmwipe.json` (written by `vmwipe save`), from
   `--machine/--mem`, or from the stream itself (machine type from the
   CONFIGURATION section, `pc.ram` length from the block list), using QEMU's
   own low/high RAM split rules of pc (i440fx) and q35.
3. Rebuild the region from the stream's last copy of each of its pages (the
   last copy is what a restore loads), and decode and validate the table
   exactly as at resume (`vmwipe.protocol.decode_table` with the RAM ranges).
4. Zero the 4096 data bytes of every PAGE record of every listed page; a ZERO
   record is already zero.  Record lengths never change, so the file remains
   a stream QEMU loads.  As the agent does after a verified wipe, store
   wipe_generation + 1 and wipe_pages in the header copy a restore loads
   (`--no-bump` leaves the header alone).

Step 4 never touches the file itself: after the checks of steps 1-3, and
only when there is something to zero, `replace.replace_scrubbed` scrubs a copy
and renames it over FILE, so a kill at any moment leaves FILE either untouched
or fully scrubbed, header bump included (see `replace` for how).  The layout
rules are in `machine`, the sidecar in `sidecar`.

A second run finds every listed copy already zero and writes and creates nothing.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vmwipe.protocol import (
    MAGIC,
    PAGE_SIZE,
    SLOT_VALID,
    WIPE_GENERATION_OFFSET,
    ProtocolError,
    Region,
    Table,
    decode_ssdt,
    decode_table,
    encode_host_fields,
)

from ..errors import (
    InvalidTableError,
    LayoutError,
    MemoryAccessError,
    StreamError,
    UsageError,
)
from ..progress import task
from ..wipe.crng import CrngReport, crng_report
from ..wipe.ksecrets import KsecretsReport, ksecrets_report
from ..wipe.memmap import GuestMemoryMap
from .machine import machine_kind, machine_layout, smram_candidates, without_holes
from .migstream import (
    KIND_PAGE,
    KIND_ZERO,
    StreamIndex,
    copies,
    index_stream,
    open_mapped,
)
from .replace import remove_stale_temps, replace_scrubbed
from .saveimage import HEADER_SIZE as LIBVIRT_HEADER_SIZE
from .saveimage import is_save_image, parse_header
from .sidecar import Sidecar, read_sidecar, sidecar_path

PROGRESS_MIN_FILE = 256 << 20

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class ScrubReport:
    """What a scrub found and did.  `copies` counts PAGE records of listed pages."""

    file: str
    container: str  # "qemu", "qemu-mapped-ram" or "libvirt"
    machine: str
    layout_source: str
    region: dict[str, int]
    table: str  # "absent" (no magic), "valid"
    slots: int
    pages: int  # listed 4 KiB pages
    copies: int  # PAGE records of listed pages in the stream
    zero_records: int  # ZERO records of listed pages (nothing to do)
    scrubbed_copies: int  # PAGE records rewritten by this run
    already_zero: int  # PAGE records of listed pages that were zero already
    bytes: int  # bytes written by this run
    stream_bytes: int
    records: int
    seconds: float
    dry_run: bool = False
    invalid_slots: list[str] = field(default_factory=list)
    generation: int | None = None  # wipe_generation stored in the saved header, if bumped
    stale_copies: int = 0  # older copies of pages listed only by older copies of the table
    replaced: bool = False  # a scrubbed copy was renamed over the file
    old_copy_zeroed: bool = False  # the replaced inode's listed pages were zeroed as well
    reflinked: bool = False  # the copy shared the file's blocks (FICLONE): cost ~ listed pages
    stale_temps_removed: int = 0  # copies left by killed scrubs of this file, removed
    fill_ranges: int = 0  # v2 fill ranges given fresh random bytes (never zeros) by this run
    #: Whether the saved table registers the guest's kernel CRNG (`wipe.crng`): a restore
    #: through vmwipe refreshes it only then.
    crng: CrngReport | None = None
    #: Which of the kernel's other per-boot secrets the saved table registers (`wipe.ksecrets`).
    ksecrets: KsecretsReport | None = None

    @property
    def noop(self) -> bool:
        return self.bytes == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["noop"] = self.noop
        return d


@dataclass
class _Plan:
    index: StreamIndex
    container: str
    layout: GuestMemoryMap
    layout_source: str
    region: Region
    table: Table | None
    writes: list[tuple[int, int]]  # (file offset, length) to zero
    report: ScrubReport
    patches: list[tuple[int, bytes]] = field(default_factory=list)  # (file offset, bytes)


def _locate(idx: StreamIndex, layout: GuestMemoryMap, gpa: int, size: int
            ) -> list[tuple[int, int]]:
    """(block index, page number) of every page of [gpa, gpa+size) in the stream's blocks."""
    out = []
    try:
        pieces = layout.split(gpa, size)
    except MemoryAccessError as e:
        ram = ", ".join(f"{r.gpa:#x}+{r.size:#x}" for r in layout.ranges)
        raise LayoutError(f"{e} (layout: {ram})") from None
    for pos, n, r in pieces:
        bi = idx.block_index(r.block)
        if bi is None:
            raise LayoutError(f"RAM block {r.block!r} of guest address {pos:#x} is not in the "
                              "stream")
        off = r.offset + (pos - r.gpa)
        for p in range(off // PAGE_SIZE, (off + n + PAGE_SIZE - 1) // PAGE_SIZE):
            out.append((bi, p))
    return out


def _check_layout(idx: StreamIndex, layout: GuestMemoryMap, source: str) -> None:
    for r in layout.ranges:
        bi = idx.block_index(r.block)
        if bi is None:
            raise LayoutError(f"layout from {source} names RAM block {r.block!r}, which the "
                              f"stream does not have (blocks: "
                              f"{', '.join(b.name for b in idx.blocks)})")
        blen = idx.blocks[bi].length
        if r.offset + r.size > blen:
            raise LayoutError(f"layout from {source} puts {r.block} offset "
                              f"{r.offset + r.size:#x} past the block's end {blen:#x} in the "
                              "stream: wrong --mem or --machine?")


def _region_from_stream(mm: mmap.mmap | bytes, idx: StreamIndex) -> Region | None:
    """Find the VMWP0001 SSDT in QEMU's ACPI tables blob (a RAM block in the stream).

    QEMU builds the ACPI tables, `-acpitable` ones included, into the
    `/rom@etc/acpi/tables` block and migrates it, so the stream carries the
    very SSDT the guest read: its `_CRS` is the region.
    """
    bi = idx.block_index("/rom@etc/acpi/tables")
    if bi is None:
        return None
    blen = idx.blocks[bi].length
    blob = bytearray(_pages_as_loaded(mm, idx, [(bi, p) for p in range(blen // PAGE_SIZE)]))
    found: list[Region] = []
    for m in re.finditer(rb"SSDT", bytes(blob)):
        start = m.start()
        if start + 8 > blen:
            continue
        length = int.from_bytes(blob[start + 4:start + 8], "little")
        if length < 36 or start + length > blen or b"VMWP0001" not in blob[start:start + length]:
            continue
        try:
            found.append(decode_ssdt(bytes(blob[start:start + length])))
        except ProtocolError:
            continue
    if len(set(found)) > 1:
        raise LayoutError(f"the stream's ACPI tables hold {len(set(found))} different vmwipe "
                          "regions; pass --region")
    return found[0] if found else None


def _stale_listed(mm: mmap.mmap | bytes, idx: StreamIndex, layout: GuestMemoryMap,
                  region: Region, found: Copies) -> set[tuple[int, int]]:
    """Pages that some older copy of the table listed (a live save sends the region again
    whenever the guest changes it).

    A page the guest unpublished during a live save is zero in its last copy, but
    its earlier copies still hold the secret.  Zeroing a copy that is not the
    last one cannot change what a restore loads (the last copy wins), so these
    are scrubbed without trusting the old slots beyond "inside guest RAM".
    Only looked at when some copy of the header page carries the vmwipe magic.
    """
    hkey = _locate(idx, layout, region.base, PAGE_SIZE)
    if not any(k == KIND_PAGE and bytes(mm[pos:pos + len(MAGIC)]) == MAGIC
               for pos, k in found.get(hkey[0], [])):
        return set()
    slot_keys = _locate(idx, layout, region.base + PAGE_SIZE, region.size - PAGE_SIZE)
    region_keys = set(hkey) | set(slot_keys)
    limit = sum(r.size for r in layout.ranges) // PAGE_SIZE
    out: set[tuple[int, int]] = set()
    seen: set[tuple[int, int]] = set()
    slot_copies = [c for key in slot_keys for c in found.get(key, [])]
    for pos, k in slot_copies:
        if k != KIND_PAGE:
            continue
        for word, npages, reserved in struct.iter_unpack("<QII", mm[pos:pos + PAGE_SIZE]):
            if not word & SLOT_VALID or word & 0xFFE or reserved or not 0 < npages <= limit:
                continue
            if (word, npages) in seen:
                continue
            seen.add((word, npages))
            gpa = word & ~0xFFF
            try:
                keys = _locate(idx, layout, gpa, npages * PAGE_SIZE)
            except LayoutError:
                continue
            if region_keys.isdisjoint(keys):
                out.update(keys)
    return out


def _read_region(mm: mmap.mmap | bytes, idx: StreamIndex, layout: GuestMemoryMap,
                 region: Region, found: Copies | None = None) -> bytes:
    """The region as a restore would load it: the last copy of each page."""
    return _pages_as_loaded(mm, idx, _locate(idx, layout, region.base, region.size), found)


Copies = dict[tuple[int, int], list[tuple[int, int]]]


def _collect(idx: StreamIndex, keys: Iterable[tuple[int, int]]) -> Copies:
    """Every (data offset, kind) record of each key, in stream order: one pass over the
    index, which for a large save is millions of records, so callers batch their keys."""
    out: Copies = {k: [] for k in keys}
    for b, p, pos, k in copies(idx, set(out)):
        out[(b, p)].append((pos, k))
    return out


def _pages_as_loaded(mm: mmap.mmap | bytes, idx: StreamIndex, keys: Sequence[tuple[int, int]],
                     found: Copies | None = None) -> bytes:
    """The bytes a restore puts in these pages: the last copy, or the mapped-ram slot."""
    data = bytearray(len(keys) * PAGE_SIZE)
    if idx.mapped_ram:
        for i, (b, p) in enumerate(keys):
            pos = idx.mapped_pos(b, p)
            if pos is not None and idx.mapped_present(mm, b, p):
                data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = mm[pos:pos + PAGE_SIZE]
        return bytes(data)
    if found is None:
        found = _collect(idx, keys)
    for i, key in enumerate(keys):
        got = found.get(key)
        if not got:
            continue  # never sent: the destination's fresh RAM, which is zero
        pos, kind = got[-1]
        if kind == KIND_PAGE:
            data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = mm[pos:pos + PAGE_SIZE]
        elif mm[pos]:
            data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = bytes([mm[pos]]) * PAGE_SIZE
    return bytes(data)


def _open_stream(mm: mmap.mmap | bytes, progress: Progress | None
                 ) -> tuple[StreamIndex, str]:
    """Walk the whole file (libvirt header, stream, device state): (index, container)."""
    size = len(mm)
    head = bytes(mm[:LIBVIRT_HEADER_SIZE])
    if is_save_image(head):
        hdr = parse_header(head, size)
        start, container = hdr.stream_offset, "libvirt"
    elif head[:4] == b"QEVM":
        start, container = 0, "qemu"
    else:
        raise StreamError("not a QEMU migration stream or libvirt save image (no QEVM or "
                          "libvirt magic at its start)")

    with task("scrub: reading", size) as t:
        def walk_progress(pos: int) -> None:
            t.update(pos)
            if progress is not None:
                progress(f"scrub: read {pos >> 20} of {size >> 20} MiB")

        idx = index_stream(mm, start, size, trailing_zeros_ok=container == "libvirt",
                           progress=walk_progress if size >= PROGRESS_MIN_FILE else None)
        t.update(size)
    return idx, container


def _guest_layout(idx: StreamIndex, machine: str | None, mem: int | None,
                  sidecar: Sidecar | None) -> tuple[GuestMemoryMap, str, list[tuple[int, int]]]:
    """The GPA map from the sidecar, --machine/--mem, or the stream: (map, where from,
    RAM that may be SMRAM and so must not be listed)."""
    smram: list[tuple[int, int]] = []
    if sidecar is not None:
        ranges, source = sidecar.ram, "sidecar"
        if machine is not None or mem is not None:
            raise UsageError("give either a sidecar or --machine/--mem, not both")
    else:
        kind = machine_kind(machine if machine else idx.machine)
        if machine and idx.machine and machine_kind(idx.machine) != kind:
            raise LayoutError(f"--machine {machine} but the stream was saved by machine type "
                              f"{idx.machine}")
        if mem is None:
            bi = idx.block_index("pc.ram")
            if bi is None:
                raise LayoutError("the stream has no pc.ram block (memory backends or NUMA): "
                                  "give the sidecar written by `vmwipe save`")
            mem = idx.blocks[bi].length
            source = f"stream ({idx.machine}, pc.ram {mem >> 20} MiB)"
        else:
            source = f"--machine {kind} --mem {mem >> 20}M"
        ranges = machine_layout(kind, mem)
        # Without the live flat view, refuse what it might hide: a forged table must not
        # get SMRAM zeroed in the image (the live agent never sees TSEG as RAM).
        smram = smram_candidates(kind, mem)
    layout = GuestMemoryMap(ranges)
    _check_layout(idx, layout, source)
    return layout, source, smram


def _mapped_ram_writes(mm: mmap.mmap | bytes, idx: StreamIndex, wanted: set[tuple[int, int]],
                       report: ScrubReport, writes: list[tuple[int, int]]) -> None:
    """One fixed slot per page.  A clear bitmap bit means "load as zero", but the slot
    may still hold an older copy (a live save rewrote the page as zero), so every slot
    of a listed page is zeroed, present or not."""
    zero = bytes(PAGE_SIZE)
    for b, p in sorted(wanted):
        pos = idx.mapped_pos(b, p)
        if pos is None:
            continue
        present = idx.mapped_present(mm, b, p)
        if mm[pos:pos + PAGE_SIZE] != zero:
            report.copies += 1
            writes.append((pos, PAGE_SIZE))
        elif present:
            report.copies += 1
            report.already_zero += 1
        else:
            report.zero_records += 1


def _record_writes(mm: mmap.mmap | bytes, found: Copies, wanted: set[tuple[int, int]],
                   report: ScrubReport, writes: list[tuple[int, int]]) -> None:
    """Every PAGE record of a listed page that is not zero, and every non-zero fill byte."""
    zero = bytes(PAGE_SIZE)
    for pos, rkind in (c for key in wanted for c in found.get(key, [])):
        if rkind == KIND_PAGE:
            report.copies += 1
            if mm[pos:pos + PAGE_SIZE] == zero:
                report.already_zero += 1
            else:
                writes.append((pos, PAGE_SIZE))
        elif rkind == KIND_ZERO:
            report.zero_records += 1
            if mm[pos]:
                writes.append((pos, 1))  # a fill byte: the page loads as that byte


def _stale_writes(mm: mmap.mmap | bytes, found: Copies, stale: set[tuple[int, int]],
                  report: ScrubReport, writes: list[tuple[int, int]]) -> None:
    """The older copies of pages only older copies of the table listed."""
    zero = bytes(PAGE_SIZE)
    for key in stale:
        older = found.get(key, [])[:-1]  # never the last copy: it is what loads
        for pos, rkind in older:
            if rkind == KIND_PAGE and mm[pos:pos + PAGE_SIZE] != zero:
                writes.append((pos, PAGE_SIZE))
                report.stale_copies += 1


def _header_patch(idx: StreamIndex, layout: GuestMemoryMap, region: Region, table: Table,
                  region_found: Copies, report: ScrubReport) -> list[tuple[int, bytes]]:
    """wipe_generation + 1 and wipe_pages, written over the header copy a restore loads.

    A scrub is a wipe of the saved state: like the agent after a verified wipe
    (SPEC.md section 6), so the guest module notifies its users even after a plain
    restore with no agent.
    """
    assert table.header is not None
    key = _locate(idx, layout, region.base, PAGE_SIZE)[0]
    if idx.mapped_ram:
        hpos = idx.mapped_pos(*key)
    else:
        got = region_found.get(key)
        hpos = got[-1][0] if got and got[-1][1] == KIND_PAGE else None
    if hpos is None:
        return []
    report.generation = table.header.wipe_generation + 1
    return [(hpos + WIPE_GENERATION_OFFSET,
             encode_host_fields(report.generation, report.pages))]


def _fill_patches(idx: StreamIndex, layout: GuestMemoryMap,
                  table: Table) -> list[tuple[int, bytes]]:
    """Fresh random bytes for every copy of every fill range (SPEC.md, "Scrub"): never
    zeros, which for the kernel CRNG key would be a key everyone knows.  Only in runs
    that zero something, like the header bump, so that a second run stays a no-op.  A
    page sent as a ZERO record has no bytes to patch; it loads as its fill byte."""
    keys = {f.index: _locate(idx, layout, f.gpa - f.gpa % PAGE_SIZE, PAGE_SIZE)[0]
            for f in table.fills}
    found = {} if idx.mapped_ram else _collect(idx, set(keys.values()))
    out: list[tuple[int, bytes]] = []
    for f in table.fills:
        if idx.mapped_ram:
            pos = idx.mapped_pos(*keys[f.index])
            positions = [] if pos is None else [pos]
        else:
            positions = [pos for pos, kind in found.get(keys[f.index], []) if kind == KIND_PAGE]
        out += [(pos + f.gpa % PAGE_SIZE, os.urandom(f.length)) for pos in positions]
    return out


def plan_scrub(mm: mmap.mmap | bytes, *, path: str = "", machine: str | None = None,
               mem: int | None = None, sidecar: Sidecar | None = None,
               region: Region | None = None, strict: bool = True, bump: bool = True,
               progress: Progress | None = None) -> _Plan:
    """First pass: walk, validate, decode the table, list the writes.  Writes nothing."""
    t0 = time.monotonic()
    idx, container = _open_stream(mm, progress)
    layout, source, smram = _guest_layout(idx, machine, mem, sidecar)
    if region is None and sidecar is not None:
        region = sidecar.region
    if region is None:
        region = _region_from_stream(mm, idx)
        if region is None:
            raise LayoutError("no vmwipe SSDT (VMWP0001) in the stream's ACPI tables: "
                              "pass --region BASE:SIZE or the sidecar")

    report = ScrubReport(
        file=path, container="qemu-mapped-ram" if idx.mapped_ram else container,
        machine=idx.machine, layout_source=source,
        region={"base": region.base, "size": region.size}, table="absent", slots=0, pages=0,
        copies=0, zero_records=0, scrubbed_copies=0, already_zero=0, bytes=0,
        stream_bytes=idx.end - idx.start, records=len(idx.records), seconds=0.0,
    )
    region_found: Copies = {} if idx.mapped_ram else _collect(
        idx, _locate(idx, layout, region.base, region.size))
    data = _read_region(mm, idx, layout, region, region_found)
    try:
        table = decode_table(data, region, ram=without_holes(layout.pairs(), smram), strict=strict)
    except ProtocolError as e:
        raise InvalidTableError(f"table in the saved region {region.base:#x}+{region.size:#x} "
                                f"is invalid, nothing written: {e}") from None
    writes: list[tuple[int, int]] = []
    wanted: set[tuple[int, int]] = set()
    report.crng = crng_report(table)
    report.ksecrets = ksecrets_report(table)
    if table.header is not None:
        report.table = "valid"
        report.slots = len(table.slots)
        report.invalid_slots = [str(e) for e in table.errors]
        for slot in table.slots:
            wanted.update(_locate(idx, layout, slot.gpa, slot.npages * PAGE_SIZE))
        report.pages = len(wanted)
        if idx.mapped_ram:
            _mapped_ram_writes(mm, idx, wanted, report, writes)
    stale: set[tuple[int, int]] = set()
    if not idx.mapped_ram:
        stale = _stale_listed(mm, idx, layout, region, region_found) - wanted
    listed_found: Copies = {} if idx.mapped_ram else _collect(idx, wanted | stale)
    if table.header is not None:
        _record_writes(mm, listed_found, wanted, report, writes)
    final_writes = len(writes)
    _stale_writes(mm, listed_found, stale, report, writes)
    patches: list[tuple[int, bytes]] = []
    # Only when this run zeroes something, so a second run stays a no-op.
    if final_writes and table.header is not None and table.fills:
        patches += _fill_patches(idx, layout, table)
        report.fill_ranges = len(table.fills)
    if final_writes and bump and table.header is not None:
        patches += _header_patch(idx, layout, region, table, region_found, report)
    report.seconds = time.monotonic() - t0
    return _Plan(idx, container, layout, source, region, table, writes, report, patches)


def scrub_file(path: str, *, machine: str | None = None, mem: int | None = None,
               sidecar: Sidecar | str | None = None, region: Region | None = None,
               strict: bool = True, dry_run: bool = False, bump: bool = True,
               progress: Progress | None = None) -> ScrubReport:
    """Scrub `path`: a scrubbed copy replaces it (see the module docstring).

    Raises before writing anything when the file or the table is bad, and removes its
    copy on any error: `path` is then untouched.  `sidecar` may be a Sidecar, a path,
    or None; None uses `path + ".vmwipe.json"` when it exists and neither --machine nor
    --mem is given.
    """
    t0 = time.monotonic()
    if sidecar is None and machine is None and mem is None and sidecar_path(path).exists():
        sidecar = str(sidecar_path(path))
    sc = read_sidecar(sidecar) if isinstance(sidecar, str) else sidecar
    # a symlink's target is scrubbed and replaced, not the link
    target = os.path.realpath(path)
    stale = 0 if dry_run else remove_stale_temps(target)
    try:
        fd, mm = open_mapped(target)
    except OSError as e:
        raise StreamError(f"cannot open {path}: {e.strerror or e}") from None
    try:
        try:
            before = os.fstat(fd)
            plan = plan_scrub(mm, path=path, machine=machine, mem=mem, sidecar=sc,
                              region=region, strict=strict, bump=bump, progress=progress)
        finally:
            if isinstance(mm, mmap.mmap):
                mm.close()
        rep = plan.report
        rep.dry_run = dry_run
        rep.stale_temps_removed = stale
        if plan.writes and not dry_run:
            rep.bytes, rep.old_copy_zeroed, rep.reflinked = replace_scrubbed(
                target, fd, before, plan.writes, plan.patches)
            rep.replaced = True
    finally:
        os.close(fd)
    rep.scrubbed_copies = sum(1 for _, n in plan.writes if n == PAGE_SIZE) - rep.stale_copies
    rep.seconds = time.monotonic() - t0
    return rep


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
