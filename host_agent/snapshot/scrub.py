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

Step 4 never touches the file itself: it works on a copy, so a kill at any
moment leaves FILE either untouched or fully scrubbed, header bump included.
After the checks of steps 1-3, and only when there is something to zero, the
scrub checks that the directory has room for a second copy (statvfs), copies
FILE to `.FILE.vmwipe-scrub.XXXXXXXX` in the same directory (copy_file_range,
holes kept), checks FILE did not change meanwhile (inode, size, mtime), zeroes
and bumps the copy, fsyncs it, reads it back, gives it FILE's owner, group,
mode and extended attributes (SELinux label, ACLs; not the mtime: the content
changed), renames it over FILE and fsyncs the directory.  Then it zeroes the
listed pages of the replaced inode too, so that a filesystem that overwrites
in place does not keep the secrets in freed blocks (best effort).  Any error
or SIGINT/SIGTERM removes the copy.  A SIGKILL can leave it behind (it holds
unscrubbed data); the next run of `scrub FILE` removes such copies (those whose
flock no live scrub holds).  A file with several hard links is refused: the
other names would keep the secrets.

A second run finds every listed copy already zero and writes and creates nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import re
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
    ReplaceError,
    StreamError,
    UsageError,
)
from ..wipe.memmap import GuestMemoryMap, RamRange
from .migstream import (
    KIND_PAGE,
    KIND_ZERO,
    StreamIndex,
    copies,
    index_stream,
    open_mapped,
)
from .saveimage import HEADER_SIZE as LIBVIRT_HEADER_SIZE
from .saveimage import is_save_image, parse_header

GiB = 1 << 30
FOUR_GIB = 4 * GiB
SIDECAR_SUFFIX = ".vmwipe.json"
SIDECAR_FORMAT = "vmwipe-sidecar"
SIDECAR_VERSION = 1
#: Legacy VGA window and BIOS area: in the pc.ram block but never guest RAM.
LEGACY_HOLE = (0xA0000, 0x100000)
PROGRESS_MIN_FILE = 256 << 20

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


# --------------------------------------------------------------------------------------
# guest-physical layout


def below_4g(machine: str, mem: int) -> int:
    """RAM below 4 GiB for a pc or q35 machine with `mem` bytes (QEMU 2.x to 10.x rules).

    hw/i386/pc_piix.c: low RAM ends at 0xe0000000 (3.5 GiB) unless the guest
    has at least that much, then at 3 GiB (gigabyte alignment).
    hw/i386/pc_q35.c: low RAM ends at 0xb0000000 (2.75 GiB) unless the guest has
    at least that much, then at 2 GiB.  Neither applies `max-ram-below-4g`,
    which vmwipe does not support.
    """
    kind = machine_kind(machine)
    if kind == "pc":
        lowmem = 0xC000_0000 if mem >= 0xE000_0000 else 0xE000_0000
    else:
        lowmem = 0x8000_0000 if mem >= 0xB000_0000 else 0xB000_0000
    return min(mem, lowmem)


def machine_kind(machine: str) -> str:
    """'pc' for i440fx machine types (pc, pc-i440fx-*), 'q35' for q35 (q35, pc-q35-*)."""
    m = machine.strip()
    if m == "q35" or m.startswith("pc-q35"):
        return "q35"
    if m == "pc" or m.startswith("pc-i440fx") or m == "pc-1.0" or re.fullmatch(r"pc-\d.*", m):
        return "pc"
    raise LayoutError(f"unknown machine type {machine!r}: only pc (i440fx) and q35 are known")


#: q35's TSEG is SMRAM at the top of the RAM below 4 GiB: 1, 2 or 8 MiB, or QEMU's extended
#: TSEG, 16 MiB by default since 2.10.  Whether the firmware enabled it lives in the saved MCH
#: state, which the scrubber does not interpret; the live agent sees it in the flat view.
Q35_TSEG_MAX = 16 << 20


def smram_candidates(machine: str, mem: int) -> list[tuple[int, int]]:
    """RAM that may be SMRAM once the firmware has run (beyond the legacy hole)."""
    if machine_kind(machine) != "q35":
        return []
    low = below_4g(machine, mem)
    return [(low - Q35_TSEG_MAX, Q35_TSEG_MAX)]


def _without(ranges: Sequence[tuple[int, int]], holes: Sequence[tuple[int, int]]
             ) -> list[tuple[int, int]]:
    """`ranges` with every byte of `holes` cut out."""
    out = list(ranges)
    for hs, hn in holes:
        cut: list[tuple[int, int]] = []
        for gpa, size in out:
            if gpa < hs:
                cut.append((gpa, min(size, hs - gpa)))
            if gpa + size > hs + hn:
                start = max(gpa, hs + hn)
                cut.append((start, gpa + size - start))
        out = cut
    return out


def machine_layout(machine: str, mem: int, block: str = "pc.ram") -> list[RamRange]:
    """Guest RAM ranges of a pc/q35 VM whose RAM is one block, as `info mtree -f` shows it.

    The legacy hole 0xa0000-0xfffff is left out: it is in the block but it is
    VGA and BIOS space, never RAM a table may list.
    """
    if mem < 2 << 20 or mem % PAGE_SIZE:
        raise LayoutError(f"guest RAM size {mem:#x} is not a usable -m value")
    low = below_4g(machine, mem)
    ranges = [RamRange(0, LEGACY_HOLE[0], block, 0),
              RamRange(LEGACY_HOLE[1], low - LEGACY_HOLE[1], block, LEGACY_HOLE[1])]
    if mem > low:
        ranges.append(RamRange(FOUR_GIB, mem - low, block, low))
    return ranges


# --------------------------------------------------------------------------------------
# sidecar


@dataclass
class Sidecar:
    """What `vmwipe save` knows that the stream does not say: the region and the GPA map."""

    region: Region
    ram: list[RamRange]
    qemu_version: str = ""
    machine: str = ""
    stream: str = ""
    mapped_ram: bool = False
    scrubbed: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    return Path(str(path) + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike[str], *, region: Region,
                  ram: Iterable[RamRange] | Iterable[tuple[int, int, str, int]],
                  qemu_version: str | tuple[int, ...] = "", machine: str = "",
                  stream: str | os.PathLike[str] = "", mapped_ram: bool = False,
                  scrubbed: dict[str, Any] | None = None) -> Path:
    """Write the sidecar atomically at `path` (conventionally `SAVEFILE.vmwipe.json`).

    Schema, version 1 (all integers are plain JSON numbers):

        {"format": "vmwipe-sidecar", "version": 1,
         "stream": "basename of the save file",
         "qemu_version": "7.2.22", "machine": "pc-i440fx-7.2",
         "region": {"base": 520093696, "size": 1048576},
         "ram": [{"gpa": 0, "size": 655360, "block": "pc.ram", "offset": 0}, ...],
         "mapped_ram": false,
         "scrubbed": null | {"pages": N, "copies": N, "bytes": N, "slots": N, "by": "..."}}

    `ram` is the guest RAM map as `memmap.load_memory_map` sees it: each range
    of guest-physical addresses and the RAM block and offset backing it.
    """
    rows = []
    for r in ram:
        rr = r if isinstance(r, RamRange) else RamRange(r[0], r[1], r[2], r[3])
        rows.append({"gpa": rr.gpa, "size": rr.size, "block": rr.block, "offset": rr.offset})
    if isinstance(qemu_version, tuple):
        qemu_version = ".".join(str(x) for x in qemu_version)
    doc = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "stream": os.path.basename(str(stream)),
        "qemu_version": qemu_version,
        "machine": machine,
        "region": {"base": region.base, "size": region.size},
        "ram": rows,
        "mapped_ram": mapped_ram,
        "scrubbed": scrubbed,
    }
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


def read_sidecar(path: str | os.PathLike[str]) -> Sidecar:
    """Parse and check a sidecar; LayoutError names what is wrong."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise LayoutError(f"cannot read sidecar {path}: {e}") from None
    try:
        if doc.get("format") != SIDECAR_FORMAT or doc.get("version") != SIDECAR_VERSION:
            raise LayoutError(f"{path} is not a vmwipe sidecar version {SIDECAR_VERSION}")
        reg = doc["region"]
        region = Region(int(reg["base"]), int(reg["size"]))
        ram = [RamRange(int(r["gpa"]), int(r["size"]), str(r["block"]), int(r["offset"]))
               for r in doc["ram"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LayoutError(f"malformed sidecar {path}: {e}") from None
    if not ram:
        raise LayoutError(f"sidecar {path} lists no guest RAM")
    return Sidecar(region=region, ram=ram, qemu_version=str(doc.get("qemu_version", "")),
                   machine=str(doc.get("machine", "")), stream=str(doc.get("stream", "")),
                   mapped_ram=bool(doc.get("mapped_ram", False)), scrubbed=doc.get("scrubbed"))


# --------------------------------------------------------------------------------------
# the scrub


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
    stale_temps_removed: int = 0  # copies left by killed scrubs of this file, removed

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


def plan_scrub(mm: mmap.mmap | bytes, *, path: str = "", machine: str | None = None,
               mem: int | None = None, sidecar: Sidecar | None = None,
               region: Region | None = None, strict: bool = True, bump: bool = True,
               progress: Progress | None = None) -> _Plan:
    """First pass: walk, validate, decode the table, list the writes.  Writes nothing."""
    t0 = time.monotonic()
    size = len(mm)
    head = bytes(mm[:LIBVIRT_HEADER_SIZE])
    if is_save_image(head):
        hdr = parse_header(head, size)
        start, container = hdr.stream_offset, "libvirt"
    elif head[:4] == b"QEVM":
        start, container = 0, "qemu"
    else:
        raise StreamError(f"not a QEMU migration stream or libvirt save image: starts with "
                          f"{head[:16]!r}")

    def walk_progress(pos: int) -> None:
        if progress is not None:
            progress(f"scrub: read {pos >> 20} of {size >> 20} MiB")

    idx = index_stream(mm, start, size, trailing_zeros_ok=container == "libvirt",
                       progress=walk_progress if size >= PROGRESS_MIN_FILE else None)

    # the GPA map
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

    # the region
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
        table = decode_table(data, region, ram=_without(layout.pairs(), smram), strict=strict)
    except ProtocolError as e:
        raise InvalidTableError(f"table in the saved region {region.base:#x}+{region.size:#x} "
                                f"is invalid, nothing written: {e}") from None
    writes: list[tuple[int, int]] = []
    zero = bytes(PAGE_SIZE)
    wanted_final: set[tuple[int, int]] = set()
    if table.header is not None:
        report.table = "valid"
        report.slots = len(table.slots)
        report.invalid_slots = [str(e) for e in table.errors]
        wanted: set[tuple[int, int]] = set()
        for slot in table.slots:
            wanted.update(_locate(idx, layout, slot.gpa, slot.npages * PAGE_SIZE))
        report.pages = len(wanted)
        wanted_final = wanted
        if idx.mapped_ram:
            # One fixed slot per page.  A clear bitmap bit means "load as zero", but the
            # slot may still hold an older copy (a live save rewrote the page as zero),
            # so every slot of a listed page is zeroed, present or not.
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
    stale: set[tuple[int, int]] = set()
    if not idx.mapped_ram:
        stale = _stale_listed(mm, idx, layout, region, region_found) - wanted_final
    listed_found: Copies = {} if idx.mapped_ram else _collect(idx, wanted_final | stale)
    if table.header is not None:
        for pos, rkind in (c for key in wanted_final for c in listed_found.get(key, [])):
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
    final_writes = len(writes)
    for key in stale:
        older = listed_found.get(key, [])[:-1]  # never the last copy: it is what loads
        for pos, rkind in older:
            if rkind == KIND_PAGE and mm[pos:pos + PAGE_SIZE] != zero:
                writes.append((pos, PAGE_SIZE))
                report.stale_copies += 1
    patches: list[tuple[int, bytes]] = []
    if final_writes and bump and table.header is not None:
        # A scrub is a wipe of the saved state: like the agent after a verified wipe
        # (SPEC.md section 6), store wipe_generation + 1 and wipe_pages in the copy of
        # the header page a restore loads, so the guest module notifies its users even
        # after a plain restore with no agent.  Only when this run zeroes something, so a
        # second run stays a no-op.
        key = _locate(idx, layout, region.base, PAGE_SIZE)[0]
        if idx.mapped_ram:
            hpos = idx.mapped_pos(*key)
        else:
            got = region_found.get(key)
            hpos = got[-1][0] if got and got[-1][1] == KIND_PAGE else None
        if hpos is not None:
            report.generation = table.header.wipe_generation + 1
            patches.append((hpos + WIPE_GENERATION_OFFSET,
                            encode_host_fields(report.generation, report.pages)))
    report.seconds = time.monotonic() - t0
    return _Plan(idx, container, layout, source, region, table, writes, report, patches)


#: `.FILE` + this + 8 random characters (tempfile.mkstemp): the scrubbed copy being made.
TEMP_TAG = ".vmwipe-scrub."
_TEMP_RANDOM = re.compile(r"[a-z0-9_]{8}")


def temp_prefix(path: str) -> str:
    """Path prefix of the temporary copies a scrub of `path` makes, in `path`'s directory."""
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}{TEMP_TAG}")


def remove_stale_temps(path: str) -> int:
    """Remove copies that killed scrubs of `path` left behind; returns how many.

    A running scrub holds an exclusive flock on its copy until the rename, and the
    kernel drops it when the process dies, SIGKILL included: a copy whose lock can be
    taken is stale.  Only regular files of the exact name pattern are touched.  Such a
    copy can hold the unscrubbed data, so it must not linger.
    """
    d, base = os.path.split(path)
    prefix = f".{base}{TEMP_TAG}"
    removed = 0
    try:
        names = os.listdir(d or ".")
    except OSError:
        return 0
    for name in names:
        if not name.startswith(prefix) or not _TEMP_RANDOM.fullmatch(name[len(prefix):]):
            continue
        full = os.path.join(d, name)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live scrub's copy
            now = os.stat(full, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(full)
                removed += 1
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _copy_range(src: int, dst: int, off: int, n: int) -> None:
    """Copy [off, off+n) from src to dst at the same offset, in the kernel."""
    end = off + n
    use_cfr = hasattr(os, "copy_file_range")
    while off < end:
        done = 0
        if use_cfr:
            try:
                done = os.copy_file_range(src, dst, min(end - off, 1 << 30), off, off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_cfr = False
                continue
        else:
            os.lseek(dst, off, os.SEEK_SET)
            done = os.sendfile(dst, src, off, min(end - off, 1 << 30))
        if done <= 0:
            raise StreamError("the file got shorter while it was copied; nothing replaced")
        off += done


def _copy_file(src: int, dst: int, size: int) -> None:
    """Copy `size` bytes, keeping holes (a mapped-ram save is sparse)."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
            hole = os.lseek(src, data, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # only a hole from pos to the end
            data, hole = pos, size  # no SEEK_DATA on this filesystem: copy everything
        hole = min(hole, size)
        if hole <= data:
            break
        _copy_range(src, dst, data, hole - data)
        pos = hole
    os.ftruncate(dst, size)


def _copy_metadata(src: int, dst: int, st: os.stat_result, path: str) -> None:
    """Owner, group, mode and extended attributes (SELinux label, ACLs) of the original.

    A libvirt save image belongs to root or to the QEMU user (libvirt-qemu, qemu) and
    may carry an svirt label; the replacement must keep them or a restore cannot read
    it.  The modification time is not kept: the content changed, and a backup tool that
    trusts size and mtime must see that.
    """
    mine = os.fstat(dst)
    if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
        try:
            os.fchown(dst, st.st_uid, st.st_gid)
        except PermissionError:
            raise ReplaceError(f"cannot give the scrubbed copy of {path} its owner "
                               f"{st.st_uid}:{st.st_gid} (run as root or as the owner); "
                               "nothing replaced") from None
    os.fchmod(dst, stat.S_IMODE(st.st_mode))  # after fchown, which may clear set-id bits
    try:
        names = os.listxattr(src)
    except OSError:
        return
    for name in names:
        try:
            os.setxattr(dst, name, os.getxattr(src, name))
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.ENODATA,
                               errno.EINVAL):
                raise
            log.warning("%s: extended attribute %s not copied to the scrubbed file: %s",
                        path, name, e.strerror)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size,
                                                              b.st_mtime_ns)


def _write_and_verify(fd: int, writes: Sequence[tuple[int, int]],
                      patches: Sequence[tuple[int, bytes]]) -> int:
    zero = bytes(PAGE_SIZE)
    total = 0
    for pos, n in sorted(writes):
        if os.pwrite(fd, zero[:n], pos) != n:
            raise OSError(errno.EIO, f"short write at {pos:#x}")
        total += n
    for pos, data in patches:
        if os.pwrite(fd, data, pos) != len(data):
            raise OSError(errno.EIO, f"short write at {pos:#x}")
        total += len(data)
    os.fsync(fd)
    for pos, n in writes:
        if os.pread(fd, n, pos) != zero[:n]:
            raise StreamError(f"read-back after scrub is not zero at offset {pos:#x}; "
                              "nothing replaced")
    for pos, data in patches:
        if os.pread(fd, len(data), pos) != data:
            raise StreamError(f"read-back of the header at offset {pos:#x} failed; "
                              "nothing replaced")
    return total


def _replace(path: str, src: int, before: os.stat_result, writes: Sequence[tuple[int, int]],
             patches: Sequence[tuple[int, bytes]]) -> tuple[int, bool]:
    """Scrub a copy of `path` (open as `src`) and rename it over `path`.

    Returns (bytes written into the copy, whether the replaced file's listed pages were
    zeroed too).  Raises with the original untouched and the copy removed.
    """
    d = os.path.dirname(path) or "."
    if before.st_nlink > 1:
        raise ReplaceError(f"{path} has {before.st_nlink} hard links: the other names would "
                           "keep the unscrubbed data; nothing written")
    need = before.st_blocks * 512  # what a copy that keeps the holes allocates
    try:
        vfs = os.statvfs(d)
    except OSError as e:
        raise ReplaceError(f"cannot check free space in {d}: {e.strerror}") from None
    free = vfs.f_bavail * vfs.f_frsize
    if free < need:
        raise ReplaceError(f"not enough free space in {d} for the scrubbed copy of {path}: "
                           f"needs {need >> 20} MiB, {free >> 20} MiB free; nothing written")
    # the original again, writable if we may, to zero its listed pages once it is replaced
    old: int | None = None
    try:
        old = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        old = None
    tmp = ""
    tfd = -1
    renamed = synced = False
    try:
        if old is not None and not _same(os.fstat(old), before):
            raise StreamError(f"{path} changed while it was being checked; nothing written")
        if not _same(os.stat(path), before):
            raise StreamError(f"{path} changed while it was being checked; nothing written")
        tfd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TEMP_TAG}", dir=d)
        fcntl.flock(tfd, fcntl.LOCK_EX)  # "in use" for remove_stale_temps of other runs
        _copy_file(src, tfd, before.st_size)
        if not _same(os.fstat(src), before):
            raise StreamError(f"{path} changed while it was being copied; nothing replaced")
        total = _write_and_verify(tfd, writes, patches)
        _copy_metadata(src, tfd, before, path)
        os.fsync(tfd)
        if not _same(os.stat(path), before):
            raise StreamError(f"{path} changed while it was being scrubbed; nothing replaced")
        os.replace(tmp, path)
        renamed = True
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        synced = True
    except OSError as e:
        why = e.strerror or str(e)
        if renamed:
            raise ReplaceError(f"{path} was replaced by its scrubbed copy, but syncing the "
                               f"directory failed: {why}") from None
        raise ReplaceError(f"cannot make the scrubbed copy of {path}: {why}; "
                           "nothing replaced") from None
    finally:
        if tfd >= 0:
            os.close(tfd)
        if tmp and not renamed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if not synced and old is not None:
            os.close(old)
    # The replaced inode has no name left but still holds the secrets in its blocks.
    # Zero its listed pages too, so that on a filesystem that overwrites in place the
    # freed blocks do not keep them (best effort: nothing depends on it any more).
    zeroed = False
    if old is not None:  # (closed already unless the rename and the sync succeeded)
        try:
            zero = bytes(PAGE_SIZE)
            for pos, n in sorted(writes):
                os.pwrite(old, zero[:n], pos)
            os.fdatasync(old)
            zeroed = True
        except OSError as e:
            log.warning("%s: could not zero the replaced file's old copy: %s", path,
                        e.strerror or e)
        finally:
            os.close(old)
    return total, zeroed


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
            rep.bytes, rep.old_copy_zeroed = _replace(target, fd, before, plan.writes,
                                                      plan.patches)
            rep.replaced = True
    finally:
        os.close(fd)
    rep.scrubbed_copies = sum(1 for _, n in plan.writes if n == PAGE_SIZE) - rep.stale_copies
    rep.seconds = time.monotonic() - t0
    return rep


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
