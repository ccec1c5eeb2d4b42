"""Protocol v2: fill ranges beside zero ranges, and v1 tables still read (SPEC.md)."""

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
    encode_fill,
    encode_header,
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
