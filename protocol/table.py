"""Decode and validate a vmwipe table (v2, or v1) read out of untrusted guest RAM.

The host writes whatever this module returns, so it is deliberately strict:
a header must match the configured region exactly, every VALID zero range must
name whole pages of guest RAM outside the region, and every fill range bytes
of one page of guest RAM outside the region, without overflow or overlap
between any two entries of either kind.  Decoding a full 1 MiB region (65,280 slots) stays in the
low milliseconds because empty slots are skipped in bulk and the per-slot
layout comes from the construct definition in `layout`.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress, islice, repeat
from operator import add, le, lshift, ne, rshift, sub
from typing import NamedTuple

from . import layout as L
from .errors import HeaderError, SlotError

_U64 = 1 << 64


class Region(NamedTuple):
    """The guest-physical range the ACPI `_CRS` describes."""

    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class Header:
    """The decoded, validated header of a live table (`version` 1 or 2)."""

    version: int
    header_size: int
    region_size: int
    slot_size: int
    slot_count: int
    slots_offset: int
    boot_id: bytes
    header_crc32: int
    wipe_generation: int
    wipe_pages: int
    #: Guest-written after init, outside the CRC (SPEC.md 4.1): the kernel CRNG's
    #: registration.  All 0 / empty in a v1 table and in a v2 table from before them.
    crng_status: int = L.CRNG_STATUS_NOT_REPORTED
    crng_ranges: int = 0
    crng_reason: str = ""
    #: The kernel's other per-boot secrets (SPEC.md 4.1): KSECRETS_REPORTED and a bit per
    #: registered secret (KSECRET_NAMES), and the fill slots they take; 0 = not reported.
    ksecrets: int = 0
    ksecrets_ranges: int = 0


@dataclass(frozen=True, slots=True)
class Slot:
    """A VALID slot that passed every rule: `npages` pages starting at `gpa`."""

    index: int
    gpa: int
    npages: int

    @property
    def size(self) -> int:
        return self.npages * L.PAGE_SIZE


@dataclass(frozen=True, slots=True)
class Fill:
    """A VALID fill range (v2) that passed every rule: `length` bytes at `gpa`."""

    index: int
    gpa: int
    length: int


@dataclass
class Table:
    """A decoded region.  `header is None` means no module has published a table.

    Valid slots are kept as three parallel columns so that a full table (65,280
    slots) validates without building an object per slot; `slots` materialises
    typed `Slot` objects on demand.  The fast path gives `indices` as a range
    and `gpas` as an `array('Q')` where it can: sequences that hold no int
    objects cost nothing to build or free (freeing 65,280 ints takes
    milliseconds, inside the paused window).
    """

    header: Header | None
    errors: list[SlotError] = field(default_factory=list)
    used: int = 0
    indices: Sequence[int] = field(default_factory=list)
    gpas: Sequence[int] = field(default_factory=list)
    npages: list[int] = field(default_factory=list)
    #: Fill ranges (v2), in slot order; a table rarely holds more than a handful.
    fills: list[Fill] = field(default_factory=list)
    #: VALID fill slots, valid or not: more than `len(fills)` means some were refused
    #: (`strict=False`), perhaps some of the kernel CRNG's.
    fill_slots: int = 0

    @property
    def fill_bytes(self) -> int:
        return sum(f.length for f in self.fills)

    @property
    def slots(self) -> list[Slot]:
        return list(map(Slot, self.indices, self.gpas, self.npages))

    @property
    def pages(self) -> int:
        return sum(self.npages)

    #: `runs()` as the fast path found them; None means "compute from the columns".
    sorted_runs: tuple[Sequence[int], Sequence[int]] | None = field(default=None, repr=False)

    def ranges(self) -> list[tuple[int, int]]:
        """(gpa, bytes) of every valid slot, in slot order."""
        return [(g, n * L.PAGE_SIZE) for g, n in zip(self.gpas, self.npages, strict=True)]

    def runs(self) -> tuple[Sequence[int], Sequence[int]]:
        """What the host zeroes: the valid ranges sorted, with adjacent ones merged,
        as (gpa, bytes) columns.  Validation sorts them anyway, so a table that took
        the fast path hands them over instead of the host sorting 65,280 slots again."""
        if self.sorted_runs is None:
            merged = merge_ranges(self.ranges())
            self.sorted_runs = [g for g, _n in merged], [n for _g, n in merged]
        return self.sorted_runs


def merge_ranges(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort (addr, size) spans and merge overlapping or adjacent ones; empty ones vanish."""
    out: list[tuple[int, int]] = []
    cur_start = cur_end = -1
    for start, size in sorted(spans):
        if size <= 0:
            continue
        end = start + size
        if start <= cur_end:
            if end > cur_end:
                cur_end = end
        else:
            if cur_end >= 0:
                out.append((cur_start, cur_end - cur_start))
            cur_start, cur_end = start, end
    if cur_end >= 0:
        out.append((cur_start, cur_end - cur_start))
    return out


def validate_region(region: Region) -> None:
    """Refuse a region that cannot hold a v1 table (shared by host and encoder)."""
    if region.base % L.PAGE_SIZE:
        raise HeaderError("region_base", region.base, "a multiple of 4096")
    if region.size < L.MIN_REGION_SIZE or region.size % L.PAGE_SIZE:
        raise HeaderError("region_size", region.size, "a multiple of 4096 and >= 8192")
    if region.base + region.size > _U64:
        raise HeaderError("region_base", region.base, "a region below 2^64")


def slot_count_for(region_size: int) -> int:
    return (region_size - L.SLOTS_OFFSET) // L.SLOT_SIZE


def decode_header(page: bytes, region: Region) -> Header | None:
    """Decode page 0.  Returns None when the magic is absent (all zero: nothing registered)."""
    if len(page) < L.HEADER_USED_SIZE:
        raise HeaderError("length", len(page), f">= {L.HEADER_USED_SIZE} bytes")
    magic = bytes(page[:8])
    versions = {L.MAGIC: L.VERSION, L.MAGIC_V1: L.VERSION_V1}
    if magic not in versions:
        if magic == bytes(8):
            return None
        raise HeaderError("magic", magic, f"{L.MAGIC!r} or {L.MAGIC_V1!r}")
    raw = L.HeaderStruct.parse(bytes(page[: L.HEADER_USED_SIZE]))
    expected = {
        "version": versions[magic],
        "header_size": L.HEADER_SIZE,
        "region_size": region.size,
        "slot_size": L.SLOT_SIZE,
        "slot_count": slot_count_for(region.size),
        "slots_offset": L.SLOTS_OFFSET,
        "reserved0": 0,
    }
    for name, want in expected.items():
        if raw[name] != want:
            raise HeaderError(name, raw[name], want)
    crc = zlib.crc32(bytes(page[: L.HEADER_CRC_LEN]))
    if raw.header_crc32 != crc:
        raise HeaderError("header_crc32", raw.header_crc32, crc)
    # v1 never had the CRNG fields: for it they are reserved bytes like the rest
    used = L.HEADER_USED_SIZE if raw.version == L.VERSION else L.HEADER_USED_SIZE_V1
    tail = bytes(page[used : L.HEADER_SIZE])
    if tail.count(0) != len(tail):
        raise HeaderError("reserved", f"non-zero bytes after {used:#x}", "all zero")
    reason = _check_crng_fields(raw.crng_status, raw.crng_ranges, bytes(raw.crng_reason))
    _check_ksecrets_fields(raw.ksecrets, raw.ksecrets_ranges)
    return Header(
        version=raw.version,
        header_size=raw.header_size,
        region_size=raw.region_size,
        slot_size=raw.slot_size,
        slot_count=raw.slot_count,
        slots_offset=raw.slots_offset,
        boot_id=bytes(raw.boot_id),
        header_crc32=raw.header_crc32,
        wipe_generation=raw.wipe_generation,
        wipe_pages=raw.wipe_pages,
        crng_status=raw.crng_status,
        crng_ranges=raw.crng_ranges,
        crng_reason=reason,
        ksecrets=raw.ksecrets,
        ksecrets_ranges=raw.ksecrets_ranges,
    )


def _check_crng_fields(status: int, ranges: int, reason_raw: bytes) -> str:
    """The header's own rules for the guest's CRNG report (SPEC.md 6); returns the reason.

    The fields are outside the CRC and written by an untrusted guest, so anything
    this spec does not define is an error naming the field, like any header field:
    an unknown status is never read as "active" (nor silently as "refused").
    `crng_ranges` against the fill slots is `decode_table`'s check."""
    if status not in L.CRNG_STATUS_NAMES:
        raise HeaderError("crng_status", status, f"one of {sorted(L.CRNG_STATUS_NAMES)}")
    if ranges and status != L.CRNG_STATUS_ACTIVE:
        raise HeaderError("crng_ranges", ranges, "0 unless crng_status is 1 (active)")
    text, _nul, padding = reason_raw.partition(b"\0")
    if padding.count(0) != len(padding) or not all(0x20 <= b <= 0x7E for b in text):
        raise HeaderError("crng_reason", reason_raw.rstrip(b"\0"), "printable ASCII, NUL-padded")
    if text and status == L.CRNG_STATUS_ACTIVE:
        raise HeaderError("crng_reason", text, "empty when crng_status is 1 (active)")
    return text.decode("ascii")


def _check_ksecrets_fields(mask: int, ranges: int) -> None:
    """The header's own rules for the guest's report of its other kernel secrets
    (SPEC.md 6): no bit this spec does not define, no secret without REPORTED, and at
    least one fill slot per secret claimed.  Against the fill slots: `decode_table`."""
    if mask & ~L.KSECRETS_KNOWN:
        raise HeaderError("ksecrets", f"{mask:#x}", f"only bits of {L.KSECRETS_KNOWN:#x}")
    if mask and not mask & L.KSECRETS_REPORTED:
        raise HeaderError("ksecrets", f"{mask:#x}", "bit 31 (reported) set with any other bit")
    if ranges < (mask & ~L.KSECRETS_REPORTED).bit_count():
        raise HeaderError("ksecrets_ranges", ranges, ">= one per secret in ksecrets")


class _RamIndex:
    """Contiguous unions of guest RAM ranges, searchable by address."""

    def __init__(self, ram: Iterable[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for start, size in sorted((s, n) for s, n in ram if n > 0):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], start + size)
            else:
                merged.append([start, start + size])
        self.starts = [m[0] for m in merged]
        self.ends = [m[1] for m in merged]

    def contains(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and end <= self.ends[i]


def decode_table(
    data: bytes | bytearray | memoryview,
    region: Region,
    ram: Sequence[tuple[int, int]] | None = None,
    strict: bool = True,
) -> Table:
    """Decode the whole region and validate every VALID slot (see SPEC.md, "host rules").

    With `strict`, the first bad slot raises `SlotError`; otherwise bad slots are
    collected in `Table.errors` and left out of `Table.slots` and `Table.fills`.
    """
    validate_region(region)
    if len(data) < region.size:
        raise HeaderError("length", len(data), f"{region.size} bytes (the whole region)")
    view = memoryview(data)
    header = decode_header(bytes(view[: L.HEADER_SIZE]), region)
    if header is None:
        return Table(header=None)
    slot_bytes = bytes(view[L.SLOTS_OFFSET : L.SLOTS_OFFSET + header.slot_count * L.SLOT_SIZE])
    # The guest hands out low slots first, so the table usually ends in a long run of
    # empty slots: find where the non-zero bytes end and decode only that.
    in_use = -(-_nonzero_length(slot_bytes) // L.SLOT_SIZE)
    used_bytes = slot_bytes[: in_use * L.SLOT_SIZE]
    words = array("Q", used_bytes)
    if words.itemsize != 8:  # pragma: no cover - every supported platform has 8-byte Q
        raise RuntimeError("array('Q') is not 64-bit on this platform")
    rams = _RamIndex(ram) if ram is not None else None
    word_col, tail_col = words[0::2], words[1::2]
    v2 = header.version == L.VERSION
    first_bytes = used_bytes[0 :: L.SLOT_SIZE]
    fill_slots = first_bytes.translate(_FILL_KIND).count(0xFF) if v2 else 0
    if header.crng_ranges > fill_slots:
        raise HeaderError("crng_ranges", header.crng_ranges,
                          f"<= {fill_slots} (the VALID fill slots of the table)")
    if header.crng_ranges + header.ksecrets_ranges > fill_slots:
        raise HeaderError("ksecrets_ranges", header.ksecrets_ranges,
                          f"<= {fill_slots - header.crng_ranges} (the VALID fill slots "
                          "not counted in crng_ranges)")
    # one byte per slot, 0xFF where VALID: the column masks below are built from it
    table = Table(header=header, used=_count_used(used_bytes, first_bytes.translate(_VALID_MASK)),
                  fill_slots=fill_slots)
    if not table.used:
        return table
    # v2: the zero ranges take the fast path below, the (few) fill ranges their own
    valid = first_bytes.translate(_ZERO_KIND if v2 else _VALID_MASK)
    fast = _validate_fast(used_bytes, word_col, tail_col, valid, region, rams)
    if fast is None:
        # Something is wrong: take the slow path, which names the slot and the rule.
        columns = _validate_slow(
            word_col.tolist(), tail_col.tolist(), region, rams, table.errors, strict, v2
        )
    else:
        columns, table.sorted_runs = fast
    table.indices, table.gpas, table.npages = columns
    if v2:
        fill_kind = first_bytes.translate(_FILL_KIND)
        if fill_kind.count(0xFF):
            table.fills = _validate_fills(
                [(i, word_col[i], tail_col[i]) for i in compress(range(len(fill_kind)), fill_kind)],
                region, rams, table.runs(), table.errors, strict,
            )
    return table


_Columns = tuple[Sequence[int], Sequence[int], list[int]]
_Runs = tuple[Sequence[int], Sequence[int]]  # sorted, merged (gpa, bytes): `Table.runs`
_PAGE_SHIFT = 12
_ZERO_STEP = 16 << 10
_ZEROS = bytes(_ZERO_STEP)


def _nonzero_length(data: bytes) -> int:
    """Length of `data` without its trailing zero bytes.

    `bytes.rstrip` walks byte by byte (1.3 ms for an empty 1 MiB table); comparing
    16 KiB chunks from the end is a memcmp each, and only the last non-zero chunk
    is stripped.
    """
    end = len(data)
    while end > 0:
        start = max(0, end - _ZERO_STEP)
        chunk = data[start:end]
        if chunk != _ZEROS[: end - start]:
            return start + len(chunk.rstrip(b"\0"))
        end = start
    return 0


def _byte_table(fn: Callable[[int], int]) -> bytes:
    return bytes(fn(b) for b in range(256))


_VALID_MASK = _byte_table(lambda b: 0xFF if b & L.SLOT_VALID else 0)
_KIND_BITS = L.SLOT_VALID | L.SLOT_FILL
_ZERO_KIND = _byte_table(lambda b: 0xFF if b & _KIND_BITS == L.SLOT_VALID else 0)  # v2 zero range
_FILL_KIND = _byte_table(lambda b: 0xFF if b & _KIND_BITS == _KIND_BITS else 0)  # v2 fill range
_RESERVED_LOW = _byte_table(lambda b: b & L.SLOT_RESERVED_BITS_V1 & 0xFF)  # word bits 7..1
_RESERVED_HIGH = _byte_table(lambda b: b & L.SLOT_RESERVED_BITS_V1 >> 8)  # word bits 11..8
_NOT_ONE = _byte_table(lambda b: 0 if b == 1 else 0xFF)


def _column_or(used_bytes: bytes, offsets: Iterable[int], tables: Iterable[bytes | None]) -> int:
    """Per slot, the OR of its bytes at `offsets` (each mapped through its table):
    byte k of the result belongs to slot k.  Strided slices and big-int ORs run at
    C speed, so a rule over 65,280 slots costs microseconds, not a Python loop."""
    out = 0
    for off, tbl in zip(offsets, tables, strict=True):
        column = used_bytes[off :: L.SLOT_SIZE]
        out |= int.from_bytes(column.translate(tbl) if tbl else column, "little")
    return out


def _count_used(used_bytes: bytes, valid: bytes) -> int:
    """Slots that are not all zero; a full table of VALID slots skips the scan."""
    if valid.count(0) == 0:
        return len(valid)
    any_byte = _column_or(used_bytes, range(L.SLOT_SIZE), [None] * L.SLOT_SIZE)
    return len(valid) - any_byte.to_bytes(len(valid), "little").count(0)


def _validate_fast(
    used_bytes: bytes, word_col: array[int], tail_col: array[int], valid: bytes,
    region: Region, rams: _RamIndex | None,
) -> tuple[_Columns, _Runs] | None:
    """Check every rule over whole columns at C speed; None means "some slot is bad".

    Returns the slot-order columns and `Table.runs()`.  The per-slot field rules
    are checked on the raw bytes (`_column_or`); order and containment work in
    page frame numbers: they fit in one 30-bit digit of a Python int for guests
    below 4 TiB, which makes the sort several times cheaper.  It must accept
    exactly what `_validate_slow` accepts; the property tests compare the two on
    random tables.  `valid` has one byte per slot, 0xFF where VALID.
    """
    count = valid.count(0xFF)
    if count == 0:
        return ([], [], []), ([], [])
    vmask = int.from_bytes(valid, "little")
    # word bits 11..1 and the reserved u32 must be 0 in every VALID slot
    if _column_or(used_bytes, (0, 1, 12, 13, 14, 15),
                  (_RESERVED_LOW, _RESERVED_HIGH, None, None, None, None)) & vmask:
        return None
    # npages == 1 in every VALID slot: the common shape, where ends follow starts
    one_page = not _column_or(used_bytes, (8, 9, 10, 11), (_NOT_ONE, None, None, None)) & vmask
    indices: Sequence[int]
    if count == len(valid):
        indices, words = range(count), word_col.tolist()
        tails = [1] * count if one_page else tail_col.tolist()
    else:
        indices = array("I", compress(range(len(valid)), valid))
        words = list(compress(word_col, valid))
        tails = [1] * count if one_page else list(compress(tail_col, valid))
    if not one_page and min(tails) == 0:
        return None
    pfns = list(map(rshift, words, repeat(_PAGE_SHIFT)))
    if one_page:
        pfns.sort()  # in place: the slot-order gpas come from the bytes below
        runs = _sorted_single_pages(pfns, region, rams)
    else:
        runs = _sorted_ranges(pfns, tails, region, rams)
    if runs is None:
        return None
    # Every VALID slot now has a clean word (gpa | VALID): the gpas are the words with
    # their first byte cleared, which a byte-slice assignment does for all of them.
    cleared = bytearray(used_bytes)
    cleared[0 :: L.SLOT_SIZE] = bytes(len(valid))
    gpa_col = array("Q", cleared)[0::2]
    gpas = gpa_col if count == len(valid) else array("Q", compress(gpa_col, valid))
    return (indices, gpas, tails), runs


def _sorted_single_pages(pfns: list[int], region: Region, rams: _RamIndex | None) -> _Runs | None:
    """The rules past the per-slot fields for one page per slot, on sorted frame numbers.

    A page cannot reach past its own frame, so only duplicates, frames inside
    the region and frames outside RAM need checking, and the gaps between
    neighbours say both which slots repeat (gap 0) and which runs merge (gap 1).
    """
    gaps = list(map(sub, islice(pfns, 1, None), pfns))
    if not all(gaps):
        return None  # duplicated slots
    if pfns[-1] >= _U64 >> _PAGE_SHIFT:
        return None  # overflows 2^64
    first = bisect.bisect_left(pfns, region.base >> _PAGE_SHIFT)
    if first < len(pfns) and pfns[first] < region.end >> _PAGE_SHIFT:
        return None  # a slot lies in the region itself
    if rams is not None and _pages_outside_ram(pfns, rams):
        return None
    if gaps.count(1) == 0:  # nothing to merge: the common case of scattered pages
        return list(map(lshift, pfns, repeat(_PAGE_SHIFT))), [L.PAGE_SIZE] * len(pfns)
    ends = list(map(add, pfns, repeat(1)))
    return _merge_sorted(pfns, ends)


def _sorted_ranges(
    pfns: list[int], tails: list[int], region: Region, rams: _RamIndex | None
) -> _Runs | None:
    """The same rules for slots of any length: sort by start, then check the ends."""
    ends = list(map(add, pfns, tails))
    order = sorted(range(len(pfns)), key=pfns.__getitem__)
    sorted_pfns = [pfns[i] for i in order]
    sorted_ends = [ends[i] for i in order]
    if max(ends) > _U64 >> _PAGE_SHIFT:
        return None  # overflows 2^64
    if not all(map(le, sorted_ends, islice(sorted_pfns, 1, None))):
        return None  # duplicated or overlapping slots
    first = bisect.bisect_right(sorted_ends, region.base >> _PAGE_SHIFT)
    if first < len(sorted_pfns) and sorted_pfns[first] < region.end >> _PAGE_SHIFT:
        return None  # a slot reaches into the region itself
    if rams is not None and _pages_outside_ram(sorted_pfns, rams, sorted_ends):
        return None
    return _merge_sorted(sorted_pfns, sorted_ends)


def _pages_outside_ram(
    sorted_pfns: list[int], rams: _RamIndex, sorted_ends: list[int] | None = None
) -> bool:
    """Whether any range starts outside RAM or (given its end) runs out of it."""
    covered = 0
    for start, end in zip(rams.starts, rams.ends, strict=True):
        start_pfn = -(-start >> _PAGE_SHIFT)  # only whole pages of RAM count
        end_pfn = end >> _PAGE_SHIFT
        lo = bisect.bisect_left(sorted_pfns, start_pfn)
        hi = bisect.bisect_left(sorted_pfns, max(end_pfn, start_pfn))
        if hi > lo and sorted_ends is not None and sorted_ends[hi - 1] > end_pfn:
            return True
        covered += hi - lo
    return covered != len(sorted_pfns)


def _merge_sorted(sorted_pfns: list[int], sorted_ends: list[int]) -> _Runs:
    """Sorted, disjoint page ranges merged where one starts at the previous end, in bytes."""
    n = len(sorted_pfns)
    firsts = [0, *compress(range(1, n), map(ne, islice(sorted_pfns, 1, None), sorted_ends))]
    lasts = [*map(sub, islice(firsts, 1, None), repeat(1)), n - 1]
    starts = list(map(sorted_pfns.__getitem__, firsts))
    sizes = list(map(sub, map(sorted_ends.__getitem__, lasts), starts))
    return (list(map(lshift, starts, repeat(_PAGE_SHIFT))),
            list(map(lshift, sizes, repeat(_PAGE_SHIFT))))


def _validate_slow(
    word_col: list[int], tail_col: list[int], region: Region,
    rams: _RamIndex | None, errors: list[SlotError], strict: bool, v2: bool = False,
) -> _Columns:
    """Apply the zero-range rules slot by slot, naming each failure (SPEC.md, "host rules").

    Errors name the fields as the table's version calls them (v1: npages,
    reserved; v2: count, offset).  v2 fill ranges are `_validate_fills`'s."""
    good: list[Slot] = []
    page = L.PAGE_SIZE
    rbase, rend = region.base, region.end
    reserved_bits, bits = (
        (L.SLOT_RESERVED_BITS, "11..2") if v2 else (L.SLOT_RESERVED_BITS_V1, "11..1")
    )
    count_name, tail_name = ("count", "offset") if v2 else ("npages", "reserved")
    for i, (word, tail) in enumerate(zip(word_col, tail_col, strict=True)):
        if not word & L.SLOT_VALID or (v2 and word & L.SLOT_FILL):
            continue  # mid-publish or mid-unpublish, or a fill range
        npages = tail & 0xFFFF_FFFF
        gpa = word & L.SLOT_ADDR_MASK
        err: SlotError | None = None
        if word & reserved_bits:
            err = SlotError(i, "word", word, f"bits {bits} must be 0")
        elif tail >> 32:
            err = SlotError(i, tail_name, tail >> 32, "must be 0")
        elif npages == 0:
            err = SlotError(i, count_name, 0, "must be >= 1")
        else:
            end = gpa + npages * page
            if end > _U64:
                err = SlotError(i, count_name, npages, f"range at {gpa:#x} overflows 2^64")
            elif gpa < rend and rbase < end:
                err = SlotError(
                    i, "word", gpa, f"overlaps the vmwipe region {rbase:#x}+{region.size:#x}"
                )
            elif rams is not None and not rams.contains(gpa, end):
                err = SlotError(i, "word", gpa, f"{npages} pages are not wholly in guest RAM")
        if err is None:
            good.append(Slot(i, gpa, npages))
        elif strict:
            raise err
        else:
            errors.append(err)
    kept = _drop_overlaps(good, errors, strict)
    return [s.index for s in kept], [s.gpa for s in kept], [s.npages for s in kept]


def _drop_overlaps(slots: list[Slot], errors: list[SlotError], strict: bool) -> list[Slot]:
    """The guest publishes each page once: duplicated or overlapping slots mean a forged table."""
    ordered = sorted(slots, key=lambda s: s.gpa)
    bad: set[int] = set()
    prev_end = -1
    prev: Slot | None = None
    for s in ordered:
        if prev is not None and s.gpa < prev_end:
            err = SlotError(s.index, "word", s.gpa, f"overlaps slot {prev.index}")
            if strict:
                raise err
            errors.append(err)
            bad.add(s.index)
            bad.add(prev.index)
        end = s.gpa + s.npages * L.PAGE_SIZE
        if end > prev_end:
            prev_end, prev = end, s
    if not bad:
        return slots
    return [s for s in slots if s.index not in bad]


def _validate_fills(
    candidates: list[tuple[int, int, int]], region: Region, rams: _RamIndex | None,
    runs: _Runs, errors: list[SlotError], strict: bool,
) -> list[Fill]:
    """The fill-range rules (SPEC.md, "host rules") for (index, word, tail) of each
    VALID|FILL slot of a v2 table, checked against each other and against `runs`,
    the validated zero ranges.  A fill range stays inside one page, so it cannot
    overflow 2^64."""
    good: list[Fill] = []
    starts, sizes = runs
    rbase, rend = region.base, region.end
    for i, word, tail in candidates:
        length, offset = tail & 0xFFFF_FFFF, tail >> 32
        gpa = (word & L.SLOT_ADDR_MASK) + offset
        end = gpa + length
        err: SlotError | None = None
        if word & L.SLOT_RESERVED_BITS:
            err = SlotError(i, "word", word, "bits 11..2 must be 0")
        elif length == 0:
            err = SlotError(i, "count", 0, "a fill range must be >= 1 byte")
        elif offset + length > L.PAGE_SIZE:
            err = SlotError(i, "offset", offset,
                            f"+ count {length} crosses the end of its page")
        elif gpa < rend and rbase < end:
            err = SlotError(
                i, "word", gpa, f"overlaps the vmwipe region {rbase:#x}+{region.size:#x}"
            )
        elif rams is not None and not rams.contains(gpa, end):
            err = SlotError(i, "word", gpa, f"{length} bytes are not wholly in guest RAM")
        else:
            j = bisect.bisect_right(starts, gpa) - 1
            if (j >= 0 and starts[j] + sizes[j] > gpa) or (
                j + 1 < len(starts) and starts[j + 1] < end
            ):
                err = SlotError(i, "word", gpa, "overlaps a zero range")
        if err is None:
            good.append(Fill(i, gpa, length))
        elif strict:
            raise err
        else:
            errors.append(err)
    bad: set[int] = set()
    prev: Fill | None = None
    for f in sorted(good, key=lambda f: f.gpa):
        if prev is not None and f.gpa < prev.gpa + prev.length:
            err = SlotError(f.index, "word", f.gpa, f"overlaps slot {prev.index}")
            if strict:
                raise err
            errors.append(err)
            bad.update((f.index, prev.index))
        if prev is None or f.gpa + f.length > prev.gpa + prev.length:
            prev = f
    return [f for f in good if f.index not in bad]


# --- encoders: used by tests, benchmarks and hosts that plant tables ------------------


def encode_header(
    region_size: int,
    boot_id: bytes = bytes(16),
    wipe_generation: int = 0,
    wipe_pages: int = 0,
    version: int = L.VERSION,
    crng_status: int = L.CRNG_STATUS_NOT_REPORTED,
    crng_ranges: int = 0,
    crng_reason: bytes = b"",
    ksecrets: int = 0,
    ksecrets_ranges: int = 0,
) -> bytes:
    """Build page 0 exactly as the guest module does, CRC included (`version` 1 or 2);
    the CRNG and kernel-secret fields as the module leaves them once it has decided
    (not checked here, so tests can forge them)."""
    fields = {
        "magic": L.MAGIC if version == L.VERSION else L.MAGIC_V1,
        "version": version,
        "header_size": L.HEADER_SIZE,
        "region_size": region_size,
        "slot_size": L.SLOT_SIZE,
        "slot_count": slot_count_for(region_size),
        "slots_offset": L.SLOTS_OFFSET,
        "boot_id": boot_id,
        "header_crc32": 0,
        "reserved0": 0,
        "wipe_generation": wipe_generation,
        "wipe_pages": wipe_pages,
        "crng_status": crng_status,
        "crng_ranges": crng_ranges,
        "crng_reason": crng_reason.ljust(L.CRNG_REASON_LEN, b"\0"),
        "ksecrets": ksecrets,
        "ksecrets_ranges": ksecrets_ranges,
    }
    raw = bytearray(L.HeaderStruct.build(fields))
    crc = zlib.crc32(raw[: L.HEADER_CRC_LEN])
    struct.pack_into("<I", raw, L.HEADER_CRC_LEN, crc)
    return bytes(raw) + bytes(L.HEADER_SIZE - len(raw))


def encode_slot(
    gpa: int, npages: int, *, valid: bool = True, low_bits: int = 0, reserved: int = 0
) -> bytes:
    """Build one zero-range slot (v1 and v2 alike); the keyword arguments exist to forge
    invalid slots in tests (`low_bits` may set FILL, `reserved` is v2's `offset`)."""
    word = (gpa & L.SLOT_ADDR_MASK) | (low_bits & L.SLOT_RESERVED_BITS_V1)
    if valid:
        word |= L.SLOT_VALID
    return bytes(L.SlotStruct.build({"word": word, "count": npages, "offset": reserved}))


def encode_fill(
    gpa: int, length: int, *, valid: bool = True, low_bits: int = 0, offset: int | None = None
) -> bytes:
    """Build one v2 fill-range slot for `length` bytes at byte address `gpa`; `offset`
    overrides the in-page offset (to forge invalid slots in tests)."""
    word = (gpa & L.SLOT_ADDR_MASK) | L.SLOT_FILL | (low_bits & L.SLOT_RESERVED_BITS)
    if valid:
        word |= L.SLOT_VALID
    off = gpa % L.PAGE_SIZE if offset is None else offset
    return bytes(L.SlotStruct.build({"word": word, "count": length, "offset": off}))


def encode_host_fields(wipe_generation: int, wipe_pages: int) -> bytes:
    """The 16 bytes the host stores at WIPE_GENERATION_OFFSET after a verified wipe."""
    return bytes(
        L.HostFieldsStruct.build({"wipe_generation": wipe_generation, "wipe_pages": wipe_pages})
    )


def encode_crng_fields(status: int, ranges: int = 0, reason: bytes = b"") -> bytes:
    """The 72 bytes a guest module stores at CRNG_FIELDS_OFFSET once it has decided
    about the kernel CRNG (not checked here, so tests can forge them)."""
    return bytes(L.CrngFieldsStruct.build({
        "crng_status": status, "crng_ranges": ranges,
        "crng_reason": reason.ljust(L.CRNG_REASON_LEN, b"\0"),
    }))


def encode_ksecrets_fields(mask: int, ranges: int = 0) -> bytes:
    """The 8 bytes a guest module stores at KSECRETS_FIELDS_OFFSET (not checked here)."""
    return bytes(L.KsecretsFieldsStruct.build({"ksecrets": mask, "ksecrets_ranges": ranges}))


def build_region(
    region_size: int, slots: Iterable[tuple[int, int]], boot_id: bytes = bytes(16),
    fills: Iterable[tuple[int, int]] = (), version: int = L.VERSION,
    crng: tuple[int, int, bytes] | None = None, ksecrets: tuple[int, int] | None = None,
) -> bytes:
    """A whole region image holding the zero ranges `slots` (gpa, npages), then the
    fill ranges `fills` (gpa, bytes), as a live guest would leave it; `crng` is
    (status, ranges, reason) for the CRNG fields and `ksecrets` (mask, ranges) for the
    kernel-secret fields (default: not reported)."""
    image = bytearray(region_size)
    image[: L.HEADER_SIZE] = encode_header(region_size, boot_id, version=version)
    if crng is not None:
        start = L.CRNG_FIELDS_OFFSET
        image[start : start + L.CRNG_FIELDS_SIZE] = encode_crng_fields(*crng)
    if ksecrets is not None:
        start = L.KSECRETS_FIELDS_OFFSET
        image[start : start + L.KSECRETS_FIELDS_SIZE] = encode_ksecrets_fields(*ksecrets)
    entries = [encode_slot(g, n) for g, n in slots] + [encode_fill(g, n) for g, n in fills]
    if L.SLOTS_OFFSET + len(entries) * L.SLOT_SIZE > region_size:
        raise ValueError(f"region of {region_size} bytes has no room for {len(entries)} slots")
    pos = L.SLOTS_OFFSET
    for raw in entries:
        image[pos : pos + L.SLOT_SIZE] = raw
        pos += L.SLOT_SIZE
    return bytes(image)
