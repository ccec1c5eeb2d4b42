"""The wipe engine: validate the untrusted table, zero, verify, and only then commit.

Order matters and is the whole point:

1. Read the region (header + slots) and validate it with `vmwipe.protocol`
   against the guest RAM ranges.  The table comes from the guest, so anything
   off is an error that names the field or slot; nothing is written.  With
   `require_crng_refresh`, a table that does not register the kernel CRNG is refused
   here too, before any write (`crng.require_crng`).
2. Take the slot ranges sorted and merged (`Table.runs`), then split them at
   RAM-range boundaries (so each piece lies in one RAM block with one host
   address).
3. Zero the pieces, then read them back and check every byte is zero.
   Write fresh os.urandom bytes over every fill range (protocol v2), then
   read them back and compare with what was written.
4. Only then store `wipe_generation + 1` and `wipe_pages` in the header: the
   guest (and the operator) can trust the generation bump to mean "verified".

The engine never writes outside the listed ranges and those 16 header bytes.
It does not resume the VM; the callers do that after it returns normally.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import reduce
from operator import or_
from typing import Any

from vmwipe.protocol import (
    HEADER_SIZE,
    HOST_FIELDS_SIZE,
    PAGE_SIZE,
    WIPE_GENERATION_OFFSET,
    HeaderError,
    Region,
    SlotError,
    Table,
    decode_table,
    encode_host_fields,
)

from ..errors import (
    AgentError,
    InvalidTableError,
    MemoryAccessError,
    RegionError,
    UsageError,
    VerifyError,
)
from ..timing import Phases
from .backends import MemoryBackend, Pieces
from .crng import CrngReport, crng_report, require_crng
from .ksecrets import KsecretsReport, ksecrets_report
from .memmap import GuestMemoryMap, RamRange

log = logging.getLogger(__name__)

ON_INVALID = ("fail", "skip")
#: Fill bytes written and verified per batch: a wipe holds at most three times this much
#: of them (random bytes, read-back, its copy), whatever the table lists.
FILL_CHUNK = 4 << 20
_U64 = 1 << 64


@dataclass
class WipeReport:
    """What the engine did; `status` is wiped, nothing-registered or wiped-skipping-invalid."""

    status: str
    region: tuple[int, int]
    backend: str
    slots_used: int = 0
    slots_valid: int = 0
    invalid: list[str] = field(default_factory=list)
    spans: int = 0
    pages: int = 0
    bytes: int = 0
    fill_ranges: int = 0
    fill_bytes: int = 0
    generation_before: int | None = None
    generation_after: int | None = None
    boot_id: str | None = None
    #: The listed pages read zero before anything was written (`expect_zero`), so the
    #: wipe wrote none of them: a template clone's pages, zeroed in the template file.
    already_zero: bool = False
    #: Whether the table registers the guest's kernel CRNG (`crng.crng_report`).
    crng: CrngReport | None = None
    #: Which of the kernel's other per-boot secrets the table registers (`ksecrets`).
    ksecrets: KsecretsReport | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_region(backend: MemoryBackend, region: Region) -> bytearray:
    """The whole region, as the guest left it."""
    buf = bytearray(region.size)
    try:
        backend.read_into(region.base, buf)
        return buf
    except MemoryAccessError as e:
        raise RegionError(
            f"region {region.base:#x}+{region.size:#x} is not readable guest RAM: {e}"
        ) from None


def decode(data: bytes | bytearray, region: Region, memmap: GuestMemoryMap, strict: bool) -> Table:
    """Validate the table; protocol errors become InvalidTableError (one line, names the field)."""
    try:
        return decode_table(data, region, memmap.pairs(), strict=strict)
    except (HeaderError, SlotError) as e:
        raise InvalidTableError(str(e)) from None


@dataclass(frozen=True)
class EarlyRegion:
    """The region read through `ranges`, a RAM map from before the load, while the flow
    was still fetching the map after it.  `run_wipe` uses it only if the two maps are
    identical: then it is exactly what it would have read itself."""

    ranges: tuple[RamRange, ...]
    data: bytearray


def read_region_early(backend: MemoryBackend, region: Region) -> EarlyRegion | None:
    """`EarlyRegion` from `backend` (on the earlier map); None if the read failed, and
    then `run_wipe` reads again and reports the error itself.

    Only the read runs early: it is a syscall that releases the GIL, whereas
    decoding a full table in a second thread would hold it against the thread
    that talks to QEMU.
    """
    try:
        return EarlyRegion(tuple(backend.memmap.ranges), read_region(backend, region))
    except AgentError as e:
        log.debug("early region read not used: %s", e)
        return None


def _pieces_to_zero(backend: MemoryBackend, region: Region, starts: Sequence[int],
                    sizes: Sequence[int]) -> Pieces:
    """The sorted, merged runs cut at RAM-range boundaries (and into zeroing chunks),
    host addresses resolved once; refuses what no valid table and map can give."""
    # belt and braces: decode_table already refuses both of these.  The runs are sorted
    # and disjoint, so only the last one starting below the region's end can reach it.
    last = bisect.bisect_left(starts, region.end) - 1
    if last >= 0 and starts[last] + sizes[last] > region.base:
        raise InvalidTableError(f"range {starts[last]:#x}+{sizes[last]:#x} overlaps the region")
    if (reduce(or_, starts, 0) | reduce(or_, sizes, 0)) % PAGE_SIZE:
        raise InvalidTableError("a range is not page aligned")
    pieces = backend.pieces_of_sorted(starts, sizes, backend.max_piece)
    if any(r.gpa % PAGE_SIZE or r.size % PAGE_SIZE for r in backend.memmap.ranges):
        # QEMU maps RAM in whole pages; a sub-page RAM range means a misparsed map
        for gpa, n, _hva in pieces:
            if gpa % PAGE_SIZE or n % PAGE_SIZE:
                raise MemoryAccessError(
                    f"guest RAM map splits page {gpa & ~(PAGE_SIZE - 1):#x}; refusing to wipe"
                )
    return pieces


def fill_ranges(backend: MemoryBackend, region: Region, table: Table, report: WipeReport) -> None:
    """Write fresh CSPRNG bytes over every fill range and read them back (SPEC.md, "Wipe").

    The bytes come from os.urandom for this wipe alone, so two clones of one image
    never share them.  They are never zeros: a fill range holds state such as the
    guest kernel's CRNG key, where zero is a known key, not an erased one."""
    spans = [(f.gpa, f.length) for f in table.fills]
    for gpa, n in spans:  # belt and braces: decode_table already refuses these
        if gpa < region.end and region.base < gpa + n:
            raise InvalidTableError(f"fill range {gpa:#x}+{n:#x} overlaps the region")
    total = sum(n for _g, n in spans)
    log.info("filling %d ranges (%d bytes) with fresh random bytes", len(spans), total)
    for batch in fill_batches(spans):
        data = os.urandom(sum(n for _g, n in batch))
        backend.write_spans(batch, data)
        if backend.read_spans(batch) != data:
            raise VerifyError("a fill range did not read back as written; header not updated")
    report.fill_ranges, report.fill_bytes = len(spans), total


def fill_batches(spans: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """`spans` in batches of at most FILL_CHUNK bytes (a range is at most one page).

    A table may list a whole region of page-long fill ranges (255 MiB from a 1 MiB
    region, twice that from a 2 MiB one, and `clone -j` wipes several at once): in
    batches the random bytes, their read-back and its copy take at most 3 x FILL_CHUNK
    (12 MiB) per wipe instead of three copies of all of it.  Every batch is verified
    before the next is written, and all of them before the header is committed.
    """
    batch: list[tuple[int, int]] = []
    size = 0
    for gpa, n in spans:
        if batch and size + n > FILL_CHUNK:
            yield batch
            batch, size = [], 0
        batch.append((gpa, n))
        size += n
    if batch:
        yield batch


def run_wipe(
    backend: MemoryBackend,
    region: Region,
    on_invalid: str = "fail",
    phases: Phases | None = None,
    before_commit: Callable[[], None] | None = None,
    early: EarlyRegion | None = None,
    expect_zero: bool = False,
    require_crng_refresh: bool = False,
) -> WipeReport:
    """Validate, zero, verify, fill and verify (v2), commit.  Raises on any problem;
    nothing is resumed here.

    `before_commit` runs after verification and before the header write (the
    tests use it to kill the agent at the worst moment; flows could use it to
    re-check the run state).  `early` is the region already read (see `EarlyRegion`).

    `expect_zero` is for a template clone, whose listed pages were zeroed in the
    template file: they are read first, and written only if one is not zero.  The
    proof is the same read-back either way, and a clone that reads them keeps
    sharing the file's pages instead of copying 4 KiB per listed page.

    `require_crng_refresh` (`--require-crng`) refuses, after validation and before
    anything is written, a table that does not register the guest's kernel CRNG:
    the VM stays exactly as loaded, and a rerun without it wipes as usual.
    """
    if on_invalid not in ON_INVALID:
        raise UsageError(f"--on-invalid must be one of {ON_INVALID}")
    phases = phases or Phases()
    memmap = backend.memmap
    report = WipeReport("nothing-registered", (region.base, region.size), backend.name)

    if early is not None and early.ranges == tuple(memmap.ranges):
        data = early.data
    else:
        data = read_region(backend, region)
    phases.mark("read")
    table = decode(data, region, memmap, strict=(on_invalid == "fail"))
    phases.mark("validate")
    report.crng = crng_report(table)
    report.ksecrets = ksecrets_report(table)
    log.info("%s; %s", report.crng.line(), report.ksecrets.line())
    if require_crng_refresh:
        require_crng(report.crng)
    if table.header is None:
        log.info("no vmwipe magic in region %#x: nothing registered", region.base)
        report.timings_ms = dict(phases.ms)
        return report
    hdr = table.header
    report.slots_used = table.used
    report.slots_valid = len(table.npages)
    report.invalid = [str(e) for e in table.errors]
    report.generation_before = hdr.wipe_generation
    report.boot_id = hdr.boot_id.hex()

    starts, sizes = table.runs()
    pieces = _pieces_to_zero(backend, region, starts, sizes)
    total = sum(sizes)  # the pieces partition the runs exactly
    report.spans, report.bytes, report.pages = len(starts), total, total // PAGE_SIZE
    phases.mark("plan")

    if expect_zero and backend.first_nonzero_pieces(pieces) is None:
        report.already_zero = True
        log.info("the %d listed pages in %d spans already read zero", report.pages, report.spans)
    else:
        if expect_zero:
            log.warning("a listed page of a template clone is not zero; zeroing them all")
        log.info("zeroing %d pages in %d spans", report.pages, report.spans)
        backend.zero_pieces(pieces)
        phases.mark("zero")
        bad = backend.first_nonzero_pieces(pieces)
        if bad is not None:
            raise VerifyError(
                f"guest address {bad:#x} is not zero after the wipe; header not updated")
    phases.mark("verify")
    if table.fills:
        fill_ranges(backend, region, table, report)
        phases.mark("fill")

    if before_commit is not None:
        before_commit()
    again = backend.read(region.base, HEADER_SIZE)
    if again != data[:HEADER_SIZE]:
        raise VerifyError("the region header changed during the wipe (is the VM really paused?)")
    gen = (hdr.wipe_generation + 1) % _U64
    host_fields = encode_host_fields(gen, report.pages % _U64)
    assert len(host_fields) == HOST_FIELDS_SIZE
    backend.write(region.base + WIPE_GENERATION_OFFSET, host_fields)
    if backend.read(region.base + WIPE_GENERATION_OFFSET, HOST_FIELDS_SIZE) != host_fields:
        raise VerifyError("header host fields did not read back as written")
    report.generation_after = gen
    report.status = "wiped-skipping-invalid" if report.invalid else "wiped"
    phases.mark("commit")
    report.timings_ms = dict(phases.ms)
    log.info("wiped %d pages in %d spans (backend %s)", report.pages, report.spans, backend.name)
    return report
