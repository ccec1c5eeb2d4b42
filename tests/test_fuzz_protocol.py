"""Property tests: untrusted bytes give a result or a typed error, never anything else.

The budget is fixed for `make test`; `make fuzz` sets HYPOTHESIS_PROFILE=long.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from array import array

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwipe.protocol import (
    CRNG_FIELDS_OFFSET,
    CRNG_FIELDS_SIZE,
    CRNG_STATUS_ACTIVE,
    CRNG_STATUS_NAMES,
    PAGE_SIZE,
    SLOTS_OFFSET,
    HeaderError,
    ProtocolError,
    Region,
    SlotError,
    SsdtError,
    build_region,
    decode_ssdt,
    decode_table,
    encode_crng_fields,
    encode_fill,
    encode_slot,
    encode_ssdt,
    merge_ranges,
)
from vmwipe.protocol import table as table_mod

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REGION = Region(0x1F00_0000, 16 * PAGE_SIZE)  # small region: 3,840 slots
RAM = [(0, 0xA0000), (0x10_0000, 0x1F00_0000 - 0x10_0000), (0x1F01_0000, 0x10_0000),
       (1 << 32, 1 << 28)]

addresses = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0, 0x9F000, 0xA0000, 0xFFFFF000, REGION.base, REGION.base - 4096,
                     REGION.end, 1 << 32, (1 << 32) + (1 << 28) - 4096, (1 << 64) - 4096]),
)
slots = st.builds(
    encode_slot,
    addresses.map(lambda a: a & ~0xFFF),
    st.one_of(st.integers(0, 0xFFFF_FFFF), st.sampled_from([0, 1, 2, 0xFFFF_FFFF])),
    valid=st.booleans(),
    low_bits=st.sampled_from([0, 0, 0, 2, 0x800]),
    reserved=st.sampled_from([0, 0, 0, 1]),
)


def _inside_ram(gpa: int, size: int) -> bool:
    return any(s <= gpa and gpa + size <= s + n for s, n in _merged(RAM))


def _merged(ram: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, n in sorted(ram):
        if out and s <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], s + n - out[-1][0])
        else:
            out.append([s, n])
    return [(s, n) for s, n in out]


@PROFILE
@given(st.lists(slots, max_size=40), st.booleans())
def test_wipe_set_always_inside_ram_outside_region(raw_slots: list[bytes], strict: bool) -> None:
    image = bytearray(build_region(REGION.size, []))
    for i, raw in enumerate(raw_slots):
        image[SLOTS_OFFSET + 16 * i : SLOTS_OFFSET + 16 * (i + 1)] = raw
    try:
        table = decode_table(bytes(image), REGION, RAM, strict=strict)
    except ProtocolError:
        return
    spans = sorted(table.ranges())
    for gpa, size in spans:
        assert size > 0 and gpa % PAGE_SIZE == 0
        assert _inside_ram(gpa, size)
        assert gpa + size <= REGION.base or gpa >= REGION.end
    for (a, asize), (b, _) in itertools.pairwise(spans):
        assert a + asize <= b, "overlapping ranges reached the wipe set"


#: Slots that are mostly valid, with every kind of defect now and then, at addresses
#: that make neighbours, duplicates and region or RAM edges likely.
near_slots = st.builds(
    encode_slot,
    st.sampled_from([0x9E000, 0x100000, REGION.base - 8192, REGION.end, 1 << 32])
    .flatmap(lambda a: st.integers(0, 12).map(lambda k: a + k * PAGE_SIZE)),
    st.sampled_from([1] * 12 + [2, 3, 0, 1 << 31]),
    valid=st.sampled_from([True] * 9 + [False]),
    low_bits=st.sampled_from([0] * 30 + [2, 0x800]),
    reserved=st.sampled_from([0] * 30 + [1]),
)


#: Runs of adjacent one- or two-page slots (the runs the host merges), in slot order or not.
adjacent = st.tuples(
    st.integers(1, 12), st.sampled_from([1, 2]), st.sampled_from([0x100000, 1 << 32, 0x800000]),
    st.booleans(),
).map(lambda t: [encode_slot(t[2] + i * t[1] * PAGE_SIZE, t[1]) for i in range(t[0])][
    :: -1 if t[3] else 1])
table_parts = st.lists(
    st.one_of(near_slots.map(lambda s: [s]), slots.map(lambda s: [s]),
              st.just([bytes(16)]), adjacent), max_size=12,
).map(lambda parts: [s for part in parts for s in part])


@PROFILE
@given(table_parts)
def test_fast_path_accepts_exactly_what_the_slow_path_accepts(raw_slots: list[bytes]) -> None:
    """The bulk validator and the slot-by-slot one agree on every table, and the sorted
    runs the fast path hands the engine are the merged valid ranges."""
    image = bytearray(build_region(REGION.size, []))
    for i, raw in enumerate(raw_slots):
        image[SLOTS_OFFSET + 16 * i : SLOTS_OFFSET + 16 * (i + 1)] = raw
    used = bytes(image[SLOTS_OFFSET : SLOTS_OFFSET + 16 * len(raw_slots)])
    words = array("Q", used)
    valid = used[0::16].translate(table_mod._VALID_MASK)
    rams = table_mod._RamIndex(RAM)
    fast = table_mod._validate_fast(used, words[0::2], words[1::2], valid, REGION, rams)
    errors: list[SlotError] = []
    slow = table_mod._validate_slow(words[0::2].tolist(), words[1::2].tolist(), REGION, rams,
                                    errors, strict=False)
    if fast is None:
        assert errors, "the fast path refused a table the slow path finds clean"
        return
    columns, runs = fast
    assert not errors and [list(c) for c in columns] == [list(c) for c in slow]
    ranges = [(g, n * PAGE_SIZE) for g, n in zip(slow[1], slow[2], strict=True)]
    assert list(zip(*runs, strict=True)) == merge_ranges(ranges)
    assert decode_table(bytes(image), REGION, RAM).runs() == runs


@PROFILE
@given(st.binary(min_size=0, max_size=REGION.size + 64))
def test_arbitrary_region_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_table(data, REGION, RAM)


@PROFILE
@given(st.binary(max_size=300))
def test_arbitrary_ssdt_bytes(data: bytes) -> None:
    with contextlib.suppress(SsdtError):
        decode_ssdt(data)


@PROFILE
@given(st.data())
def test_mutated_ssdt(data: st.DataObject) -> None:
    table = bytearray(encode_ssdt(0x1F00_0000, 1 << 20))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(36, len(table) - 1))
        table[pos] = data.draw(st.integers(0, 255))
    table[9] = 0
    table[9] = (-sum(table)) & 0xFF
    try:
        region = decode_ssdt(bytes(table))
    except SsdtError:
        return
    assert region.base % PAGE_SIZE == 0 and region.size >= 2 * PAGE_SIZE


#: v2 fill ranges: byte-granular, near page ends, the region, RAM edges and each other.
fill_slots = st.builds(
    encode_fill,
    st.sampled_from([0x9F000, 0x100000, REGION.base - 4096, REGION.end, 1 << 32, 0x101000])
    .flatmap(lambda a: st.integers(-64, PAGE_SIZE + 64).map(lambda k: a + k)),
    st.sampled_from([8, 32, 1, 0, 4095, 4096, 4097, 1 << 31]),
    valid=st.sampled_from([True] * 9 + [False]),
    low_bits=st.sampled_from([0] * 30 + [4, 0x800]),
    offset=st.sampled_from([None] * 12 + [4096, 0xFFFF_FFFF]),
)
v2_parts = st.lists(st.one_of(fill_slots, near_slots, slots), max_size=16)


@PROFILE
@given(v2_parts, st.booleans())
def test_v2_written_set_is_disjoint_in_ram_outside_region(raw: list[bytes], strict: bool) -> None:
    """Whatever a v2 table holds, the bytes the host writes (zero runs and fill ranges)
    lie in RAM, outside the region, never overlap, and a fill range stays in its page."""
    image = bytearray(build_region(REGION.size, []))
    for i, slot in enumerate(raw):
        image[SLOTS_OFFSET + 16 * i : SLOTS_OFFSET + 16 * (i + 1)] = slot
    try:
        table = decode_table(bytes(image), REGION, RAM, strict=strict)
    except ProtocolError:
        assert strict
        return
    spans = [(g, n) for g, n in zip(*table.runs(), strict=True)]
    for f in table.fills:
        assert f.length > 0 and f.gpa // PAGE_SIZE == (f.gpa + f.length - 1) // PAGE_SIZE
        spans.append((f.gpa, f.length))
    spans.sort()
    for gpa, size in spans:
        assert _inside_ram(gpa, size)
        assert gpa + size <= REGION.base or gpa >= REGION.end
    for (a, asize), (b, _) in itertools.pairwise(spans):
        assert a + asize <= b, "overlapping entries reached the write set"
    if strict:
        assert not table.errors


#: The guest-written CRNG fields (SPEC.md 4.1): mostly legal, sometimes anything.
crng_fields = st.one_of(
    st.builds(encode_crng_fields, st.sampled_from([0, 1, 2, 3, 4, 0xFFFF_FFFF]),
              st.sampled_from([0, 1, 2, 3, 0xFFFF_FFFF]),
              st.one_of(st.sampled_from([b"", b"crng_refresh=0", b"x" * 64]),
                        st.binary(max_size=64))),
    st.binary(min_size=CRNG_FIELDS_SIZE, max_size=CRNG_FIELDS_SIZE),
)


@PROFILE
@given(crng_fields, st.lists(st.one_of(fill_slots, near_slots), max_size=6), st.booleans())
def test_crng_fields_decode_to_a_consistent_report_or_a_header_error(
    crng: bytes, raw: list[bytes], strict: bool
) -> None:
    """Whatever the guest writes at 0x50..0x97, a decoded header holds a known status,
    a printable reason and no more CRNG ranges than VALID fill slots; else the
    error is a header error (never skipped, whatever `strict` says)."""
    image = bytearray(build_region(REGION.size, []))
    image[CRNG_FIELDS_OFFSET : CRNG_FIELDS_OFFSET + CRNG_FIELDS_SIZE] = crng
    for i, slot in enumerate(raw):
        image[SLOTS_OFFSET + 16 * i : SLOTS_OFFSET + 16 * (i + 1)] = slot
    try:
        table = decode_table(bytes(image), REGION, RAM, strict=strict)
    except HeaderError as err:
        assert err.field.startswith("crng_")
        return
    except SlotError:
        assert strict
        return
    hdr = table.header
    assert hdr is not None and hdr.crng_status in CRNG_STATUS_NAMES
    assert hdr.crng_reason.isascii() and hdr.crng_reason.isprintable()
    valid_fills = sum(1 for s in raw if s[0] & 3 == 3)
    assert hdr.crng_ranges <= valid_fills
    assert hdr.crng_ranges == 0 or hdr.crng_status == CRNG_STATUS_ACTIVE
