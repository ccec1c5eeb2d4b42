"""Protocol v2: fill ranges beside zero ranges, v1 tables still read, the CRNG fields."""

from __future__ import annotations

import struct
import zlib

import pytest

from vmwipe.protocol import (
    MAGIC_V1,
    PAGE_SIZE,
    SLOTS_OFFSET,
    Fill,
    HeaderError,
    Region,
    SlotError,
    build_region,
    decode_header,
    decode_table,
    encode_crng_fields,
    encode_fill,
    encode_header,
    encode_ksecrets_fields,
    encode_slot,
)
from vmwipe.protocol import layout as L

REGION = Region(0x1F00_0000, 1 << 20)
RAM = [(0, 0xA0000), (0x10_0000, 0x1F00_0000 - 0x10_0000), (0x1F10_0000, 0xE0_0000),
       (1 << 32, 1 << 30)]


def region_with(*slots: bytes, version: int = L.VERSION) -> bytes:
    image = bytearray(build_region(REGION.size, [], version=version))
    for i, raw in enumerate(slots):
        image[SLOTS_OFFSET + 16 * i : SLOTS_OFFSET + 16 * (i + 1)] = raw
    return bytes(image)


def test_v2_magic_and_version() -> None:
    page = encode_header(REGION.size)
    assert page[:8] == b"VMWIPEv2" and struct.unpack_from("<I", page, 8) == (2,)
    hdr = decode_header(page, REGION)
    assert hdr is not None and hdr.version == 2


def test_v1_reader_refuses_v2_at_the_magic() -> None:
    """A v1 host compares the magic with b"VMWIPEv1" first: v2 fails there."""
    assert encode_header(REGION.size)[:8] != MAGIC_V1


def test_v1_table_still_read_with_zero_ranges_only() -> None:
    image = build_region(REGION.size, [(0x20_0000, 2)], version=1)
    table = decode_table(image, REGION, RAM)
    assert table.header is not None and table.header.version == 1
    assert table.ranges() == [(0x20_0000, 2 * PAGE_SIZE)] and table.fills == []
    # bit 1 is reserved in v1: a fill slot in a v1 table is refused, not filled
    with pytest.raises(SlotError, match=r"bits 11\.\.1"):
        decode_table(region_with(encode_fill(0x20_0010, 8), version=1), REGION, RAM)


def test_v1_magic_with_v2_version_is_refused() -> None:
    page = bytearray(encode_header(REGION.size, version=1))
    struct.pack_into("<I", page, 8, 2)
    struct.pack_into("<I", page, 0x38, zlib.crc32(page[:0x38]))
    with pytest.raises(HeaderError, match="version"):
        decode_header(bytes(page), REGION)


def test_v2_header_with_v1_slots_is_v2() -> None:
    """A v1 zero slot is byte for byte a v2 zero range: it stays a zero range."""
    table = decode_table(region_with(encode_slot(0x20_0000, 1)), REGION, RAM)
    assert table.ranges() == [(0x20_0000, PAGE_SIZE)] and not table.fills


def test_fill_ranges_round_trip_byte_granular() -> None:
    image = build_region(REGION.size, [(0x20_0000, 1)],
                         fills=[(0x30_0008, 8), (0x30_0020, 32), (0x30_0FE0, 32), (1 << 32, 4096)])
    table = decode_table(image, REGION, RAM)
    assert table.fills == [Fill(1, 0x30_0008, 8), Fill(2, 0x30_0020, 32),
                           Fill(3, 0x30_0FE0, 32), Fill(4, 1 << 32, 4096)]
    assert table.fill_bytes == 8 + 32 + 32 + 4096 and table.pages == 1
    assert table.ranges() == [(0x20_0000, PAGE_SIZE)]


def test_half_published_fill_is_ignored() -> None:
    table = decode_table(region_with(encode_fill(0x30_0008, 8, valid=False)), REGION, RAM)
    assert table.fills == [] and table.used == 1


@pytest.mark.parametrize(
    ("slot", "field", "reason"),
    [
        (encode_fill(0x30_0000, 0), "count", ">= 1 byte"),
        (encode_fill(0x30_0FF8, 16), "offset", "crosses the end of its page"),
        (encode_fill(0x30_0000, 4097), "offset", "crosses the end of its page"),
        (encode_fill(0x30_0000, 8, offset=4096), "offset", "crosses"),
        (encode_fill(0x30_0000, 1, offset=0xFFFF_FFFF), "offset", "crosses"),
        (encode_fill(0x30_0000, 8, low_bits=0x4), "word", "bits 11..2"),
        (encode_fill(0x30_0000, 8, low_bits=0x800), "word", "bits 11..2"),
        (encode_fill(REGION.base + 8, 8), "word", "vmwipe region"),
        (encode_fill(REGION.end - 8, 8), "word", "vmwipe region"),
        (encode_fill(0x1FF0_0000, 8), "word", "not wholly in guest RAM"),
        (encode_fill(0xA0000, 8), "word", "not wholly in guest RAM"),
        (encode_fill(0xFEE0_0000, 8), "word", "not wholly in guest RAM"),
        (encode_fill((1 << 64) - 8, 8), "word", "not wholly in guest RAM"),
        (encode_fill(0x20_0FF8, 8), "word", "overlaps a zero range"),
        (encode_fill(0x20_0000, 4096), "word", "overlaps a zero range"),
        (encode_fill(0x40_0004, 8), "word", "overlaps slot 2"),
        (encode_slot(0x20_0000, 1, reserved=8), "offset", "must be 0"),
        (encode_slot(0x20_0000, 0), "count", ">= 1"),
        (encode_slot(0x20_0000, 1, low_bits=0x4), "word", "bits 11..2"),
    ],
)
def test_each_v2_rule_rejects_and_names_the_slot(slot: bytes, field: str, reason: str) -> None:
    image = region_with(encode_slot(0x20_0000, 1), encode_fill(0x50_0000, 8),
                        encode_fill(0x40_0000, 8), slot)
    if "zero range" in reason:  # the zero range is slot 0: put it out of the way
        image = region_with(encode_slot(0x20_0000, 1), encode_fill(0x50_0000, 8),
                            encode_fill(0x60_0000, 8), slot)
    with pytest.raises(SlotError, match=reason) as err:
        decode_table(image, REGION, RAM)
    assert err.value.field == field and err.value.index in (2, 3)
    lenient = decode_table(image, REGION, RAM, strict=False)
    assert lenient.errors and all(e.index in (2, 3) for e in lenient.errors)
    assert [s.index for s in lenient.slots] == [0]


def test_zero_range_overlapping_a_fill_is_refused_in_any_slot_order() -> None:
    for slots in ((encode_fill(0x20_1008, 8), encode_slot(0x20_0000, 2)),
                  (encode_slot(0x20_0000, 2), encode_fill(0x20_1008, 8))):
        with pytest.raises(SlotError, match="overlaps a zero range"):
            decode_table(region_with(*slots), REGION, RAM)


def test_adjacent_fills_and_zero_ranges_are_fine() -> None:
    table = decode_table(region_with(encode_slot(0x20_0000, 1), encode_fill(0x20_1000, 8),
                                     encode_fill(0x20_1008, 8), encode_fill(0x1F_FFF8, 8)),
                         REGION, RAM)
    assert len(table.fills) == 3 and not table.errors


def test_full_region_of_fills_decodes() -> None:
    n = (REGION.size - SLOTS_OFFSET) // 16
    fills = [(0x100_0000 + 32 * i, 32) for i in range(n)]
    table = decode_table(build_region(REGION.size, [], fills=fills), REGION, RAM)
    assert len(table.fills) == n and table.fill_bytes == 32 * n


# --- the kernel CRNG's registration: guest-written header fields outside the CRC ------

CRNG = slice(L.CRNG_FIELDS_OFFSET, L.CRNG_FIELDS_OFFSET + L.CRNG_FIELDS_SIZE)


def test_crng_fields_sit_at_their_spec_offsets() -> None:
    offsets = L.field_offsets(L.HeaderStruct)
    assert (offsets["crng_status"], offsets["crng_ranges"], offsets["crng_reason"]) == (
        (0x50, 4), (0x54, 4), (0x58, 64))
    assert (offsets["ksecrets"], offsets["ksecrets_ranges"]) == ((0x98, 4), (0x9C, 4))
    assert L.HEADER_USED_SIZE == 0xA0


def test_v2_table_without_crng_fields_decodes_as_not_reported() -> None:
    """A module from before the fields leaves them zero: the table still decodes."""
    image = build_region(REGION.size, [(0x20_0000, 1)], fills=[(0x30_0008, 8)])
    assert image[0x50:0x98] == bytes(0x48)
    hdr = decode_table(image, REGION, RAM).header
    assert hdr is not None
    assert (hdr.crng_status, hdr.crng_ranges, hdr.crng_reason) == (
        L.CRNG_STATUS_NOT_REPORTED, 0, "")


@pytest.mark.parametrize(
    ("crng", "fills", "want"),
    [
        ((L.CRNG_STATUS_ACTIVE, 2, b""), [(0x30_0008, 8), (0x30_0020, 32)], (1, 2, "")),
        ((L.CRNG_STATUS_ACTIVE, 1, b""), [(0x30_0008, 8), (0x30_0020, 32)], (1, 1, "")),
        ((L.CRNG_STATUS_DISABLED, 0, b"crng_refresh=0"), [], (2, 0, "crng_refresh=0")),
        ((L.CRNG_STATUS_REFUSED, 0, b"x" * 64), [], (3, 0, "x" * 64)),
        ((L.CRNG_STATUS_REFUSED, 0, b""), [], (3, 0, "")),
    ],
)
def test_crng_fields_round_trip(crng: tuple[int, int, bytes], fills: list[tuple[int, int]],
                                want: tuple[int, int, str]) -> None:
    image = build_region(REGION.size, [], fills=fills, crng=crng)
    hdr = decode_table(image, REGION, RAM).header
    assert hdr is not None and (hdr.crng_status, hdr.crng_ranges, hdr.crng_reason) == want


def test_crng_fields_lie_outside_the_crc() -> None:
    """The guest writes them after init: changing them must not break the CRC."""
    page = bytearray(encode_header(REGION.size))
    page[CRNG] = encode_crng_fields(
        L.CRNG_STATUS_REFUSED, 0, b"IBT is enabled")
    hdr = decode_header(bytes(page), REGION)
    assert hdr is not None and hdr.crng_reason == "IBT is enabled"
    assert hdr.header_crc32 == zlib.crc32(page[:0x38])


@pytest.mark.parametrize(
    ("crng", "fills", "field", "match"),
    [
        ((4, 0, b""), [], "crng_status", r"crng_status=0x4"),
        ((0xFFFF_FFFF, 0, b""), [], "crng_status", "crng_status"),
        ((L.CRNG_STATUS_REFUSED, 1, b"no"), [(0x30_0008, 8)], "crng_ranges", "0 unless"),
        ((L.CRNG_STATUS_NOT_REPORTED, 1, b""), [(0x30_0008, 8)], "crng_ranges", "0 unless"),
        ((L.CRNG_STATUS_ACTIVE, 3, b""), [(0x30_0008, 8), (0x30_0020, 8)], "crng_ranges",
         r"<= 2 \(the VALID fill slots"),
        ((L.CRNG_STATUS_ACTIVE, 1, b""), [], "crng_ranges", r"<= 0"),
        ((L.CRNG_STATUS_REFUSED, 0, b"bad\nline"), [], "crng_reason", "printable ASCII"),
        ((L.CRNG_STATUS_REFUSED, 0, b"caf\xc3\xa9"), [], "crng_reason", "printable ASCII"),
        ((L.CRNG_STATUS_REFUSED, 0, b"ab\0cd"), [], "crng_reason", "NUL-padded"),
        ((L.CRNG_STATUS_ACTIVE, 1, b"why"), [(0x30_0008, 8)], "crng_reason", "empty when"),
    ],
)
def test_each_crng_rule_rejects_and_names_the_field(
    crng: tuple[int, int, bytes], fills: list[tuple[int, int]], field: str, match: str
) -> None:
    image = build_region(REGION.size, [], fills=fills, crng=crng)
    for strict in (True, False):  # a header error is never skipped, not even leniently
        with pytest.raises(HeaderError, match=match) as err:
            decode_table(image, REGION, RAM, strict=strict)
        assert err.value.field == field


def test_crng_ranges_count_valid_fill_slots_only() -> None:
    """A fill slot without VALID (mid-publish) does not count, nor does a zero range."""
    image = bytearray(region_with(encode_slot(0x20_0000, 1), encode_fill(0x30_0008, 8),
                                  encode_fill(0x30_0020, 8, valid=False)))
    image[CRNG] = encode_crng_fields(L.CRNG_STATUS_ACTIVE, 2)
    with pytest.raises(HeaderError, match="crng_ranges"):
        decode_table(bytes(image), REGION, RAM)
    image[CRNG] = encode_crng_fields(L.CRNG_STATUS_ACTIVE, 1)
    hdr = decode_table(bytes(image), REGION, RAM).header
    assert hdr is not None and hdr.crng_ranges == 1


def test_v1_table_keeps_the_crng_bytes_reserved() -> None:
    """v1 never had the fields: non-zero bytes there are refused as reserved."""
    image = bytearray(build_region(REGION.size, [], version=1))
    image[CRNG] = encode_crng_fields(L.CRNG_STATUS_DISABLED)
    with pytest.raises(HeaderError, match="reserved"):
        decode_table(bytes(image), REGION, RAM)


def test_reserved_bytes_after_the_ksecrets_fields_are_still_checked() -> None:
    page = bytearray(encode_header(REGION.size))
    page[L.HEADER_USED_SIZE] = 1
    with pytest.raises(HeaderError, match=r"reserved=non-zero bytes after 0xa0"):
        decode_header(bytes(page), REGION)


# --- the kernel's other per-boot secrets: two more guest-written fields ---------------

NET, TS, PTR = 1 << 0, 1 << 1, 1 << 4


def test_table_without_ksecrets_fields_decodes_as_not_reported() -> None:
    image = build_region(REGION.size, [], fills=[(0x30_0008, 8)], crng=(L.CRNG_STATUS_ACTIVE,
                                                                         1, b""))
    assert image[0x98:0xA0] == bytes(8)
    hdr = decode_table(image, REGION, RAM).header
    assert hdr is not None and (hdr.ksecrets, hdr.ksecrets_ranges) == (0, 0)


@pytest.mark.parametrize("ksecrets", [(L.KSECRETS_REPORTED, 0),
                                      (L.KSECRETS_REPORTED | NET | TS | PTR, 3),
                                      (L.KSECRETS_REPORTED | NET, 2),  # one crossed a page
                                      (L.KSECRETS_REPORTED, 1)])  # mid-publish: ranges first
def test_ksecrets_fields_round_trip_outside_the_crc(ksecrets: tuple[int, int]) -> None:
    fills = [(0x30_0000 + 32 * i, 16) for i in range(4)]
    image = build_region(REGION.size, [], fills=fills, crng=(L.CRNG_STATUS_ACTIVE, 1, b""),
                         ksecrets=ksecrets)
    hdr = decode_table(image, REGION, RAM).header
    assert hdr is not None and (hdr.ksecrets, hdr.ksecrets_ranges) == ksecrets
    assert hdr.header_crc32 == zlib.crc32(image[:0x38])


@pytest.mark.parametrize(
    ("ksecrets", "field", "match"),
    [
        ((L.KSECRETS_REPORTED | 1 << 5, 1), "ksecrets", "only bits of 0x8000001f"),
        ((NET, 1), "ksecrets", "bit 31"),
        ((L.KSECRETS_REPORTED | NET | TS, 1), "ksecrets_ranges", ">= one per secret"),
        ((L.KSECRETS_REPORTED | NET, 2), "ksecrets_ranges", r"<= 1 \(the VALID fill slots not"),
    ],
)
def test_each_ksecrets_rule_rejects_and_names_the_field(ksecrets: tuple[int, int], field: str,
                                                        match: str) -> None:
    """Two fill slots, one of them the CRNG's: what the mask claims must fit the rest."""
    image = build_region(REGION.size, [], fills=[(0x30_0008, 8), (0x30_0020, 16)],
                         crng=(L.CRNG_STATUS_ACTIVE, 1, b""), ksecrets=ksecrets)
    for strict in (True, False):
        with pytest.raises(HeaderError, match=match) as err:
            decode_table(image, REGION, RAM, strict=strict)
        assert err.value.field == field


def test_v1_table_keeps_the_ksecrets_bytes_reserved() -> None:
    image = bytearray(build_region(REGION.size, [], version=1))
    image[L.KSECRETS_FIELDS_OFFSET : L.HEADER_USED_SIZE] = encode_ksecrets_fields(
        L.KSECRETS_REPORTED)
    with pytest.raises(HeaderError, match="reserved"):
        decode_table(bytes(image), REGION, RAM)
