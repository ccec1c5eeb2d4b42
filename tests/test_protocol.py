"""Wire protocol v1: round trips, every validation rule, and the generated C header."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from vmwipe.protocol import (
    HEADER_SIZE,
    MAGIC,
    PAGE_SIZE,
    SLOTS_OFFSET,
    WIPE_GENERATION_OFFSET,
    HeaderError,
    Region,
    SlotError,
    build_region,
    cheader,
    decode_header,
    decode_table,
    encode_header,
    encode_host_fields,
    encode_slot,
    parse_size,
    slot_count_for,
)
from vmwipe.protocol import layout as L

REGION = Region(0x1F00_0000, 1 << 20)
RAM = [(0, 0xA0000), (0x10_0000, 0x1F00_0000 - 0x10_0000), (0x1F10_0000, 0xE0_0000),
       (1 << 32, 1 << 30)]


def region_with(*slots: bytes, version: int = L.VERSION) -> bytearray:
    image = bytearray(build_region(REGION.size, [], version=version))
    for i, raw in enumerate(slots):
        image[SLOTS_OFFSET + 16 * i : SLOTS_OFFSET + 16 * (i + 1)] = raw
    return image


def test_header_round_trip() -> None:
    boot_id = bytes(range(16))
    page = encode_header(REGION.size, boot_id, wipe_generation=7, wipe_pages=9)
    assert len(page) == HEADER_SIZE and page[:8] == MAGIC
    hdr = decode_header(page, REGION)
    assert hdr is not None
    assert (hdr.boot_id, hdr.wipe_generation, hdr.wipe_pages) == (boot_id, 7, 9)
    assert hdr.slot_count == slot_count_for(REGION.size) == 65280
    assert hdr.header_crc32 == zlib.crc32(page[:0x38])


def test_host_fields_do_not_break_the_crc() -> None:
    page = bytearray(encode_header(REGION.size))
    page[WIPE_GENERATION_OFFSET : WIPE_GENERATION_OFFSET + 16] = encode_host_fields(3, 4096)
    hdr = decode_header(bytes(page), REGION)
    assert hdr is not None and (hdr.wipe_generation, hdr.wipe_pages) == (3, 4096)


def test_slots_round_trip_in_slot_order() -> None:
    slots = [(0x20_0000, 1), (1 << 32, 3), (0x30_0000, 2)]
    table = decode_table(build_region(REGION.size, slots), REGION, RAM)
    assert [(s.index, s.gpa, s.npages) for s in table.slots] == [
        (0, 0x20_0000, 1), (1, 1 << 32, 3), (2, 0x30_0000, 2)]
    assert table.pages == 6 and table.used == 3
    assert table.ranges() == [(0x20_0000, 4096), (1 << 32, 3 * 4096), (0x30_0000, 8192)]


def test_absent_magic_means_nothing_registered() -> None:
    table = decode_table(bytes(REGION.size), REGION, RAM)
    assert table.header is None and table.slots == [] and table.pages == 0


def test_slot_without_valid_is_ignored() -> None:
    # Publish writes npages first, then word: a half-published slot is legal.
    image = region_with(struct.pack("<QII", 0, 1, 0), encode_slot(0x20_0000, 1, valid=False))
    table = decode_table(image, REGION, RAM)
    assert table.slots == [] and table.used == 2


@pytest.mark.parametrize(
    ("field", "offset", "fmt", "value"),
    [
        ("version", 0x08, "<I", 1),  # a v2 magic with v1's version
        ("version", 0x08, "<I", 3),
        ("header_size", 0x0C, "<I", 8192),
        ("region_size", 0x10, "<Q", 2 << 20),
        ("slot_size", 0x18, "<I", 32),
        ("slot_count", 0x1C, "<I", 5),
        ("slots_offset", 0x20, "<Q", 8192),
        ("reserved0", 0x3C, "<I", 1),
    ],
)
def test_each_header_field_is_checked(field: str, offset: int, fmt: str, value: int) -> None:
    page = bytearray(encode_header(REGION.size))
    struct.pack_into(fmt, page, offset, value)
    # Re-seal the CRC so the field check itself is what fires (reserved0 lies after the CRC).
    struct.pack_into("<I", page, 0x38, zlib.crc32(page[:0x38]))
    with pytest.raises(HeaderError, match=field) as err:
        decode_header(bytes(page), REGION)
    assert err.value.field == field and err.value.value == value


def test_bad_crc_magic_and_reserved_tail() -> None:
    page = bytearray(encode_header(REGION.size))
    page[0x28] ^= 0xFF
    with pytest.raises(HeaderError, match="header_crc32"):
        decode_header(bytes(page), REGION)
    page = bytearray(encode_header(REGION.size))
    page[:8] = b"VMWIPEv9"
    with pytest.raises(HeaderError, match="magic"):
        decode_header(bytes(page), REGION)
    page = bytearray(encode_header(REGION.size))
    page[0x100] = 1
    with pytest.raises(HeaderError, match="reserved"):
        decode_header(bytes(page), REGION)


def test_region_must_match_configured_size() -> None:
    image = build_region(REGION.size, [])
    with pytest.raises(HeaderError, match="region_size"):
        decode_table(image + bytes(REGION.size), Region(REGION.base, 2 * REGION.size), RAM)


@pytest.mark.parametrize(
    ("slot", "field", "reason"),
    [
        (encode_slot(0x20_0000, 1, low_bits=0x2), "word", "bits 11..1"),
        (encode_slot(0x20_0000, 1, low_bits=0x800), "word", "bits 11..1"),
        (encode_slot(0x20_0000, 1, reserved=1), "reserved", "must be 0"),
        (encode_slot(0x20_0000, 0), "npages", ">= 1"),
        (encode_slot((1 << 64) - 4096, 2), "npages", "overflows"),
        (encode_slot(REGION.base, 1), "word", "vmwipe region"),
        (encode_slot(REGION.base - 4096, 2), "word", "vmwipe region"),
        (encode_slot(0xA0000, 1), "word", "not wholly in guest RAM"),
        (encode_slot(0x9F000, 2), "word", "not wholly in guest RAM"),
        (encode_slot(0xFEE0_0000, 1), "word", "not wholly in guest RAM"),
        (encode_slot(1 << 40, 1), "word", "not wholly in guest RAM"),
        (encode_slot(1 << 32, 0xFFFF_FFFF), "word", "not wholly in guest RAM"),
    ],
)
def test_each_slot_rule_rejects_and_names_the_slot(slot: bytes, field: str, reason: str) -> None:
    """The v1 rules, on a v1 table (bit 1 is reserved there; v2 makes it FILL)."""
    image = region_with(encode_slot(0x30_0000, 1), slot, version=L.VERSION_V1)
    with pytest.raises(SlotError, match=reason) as err:
        decode_table(image, REGION, RAM)
    assert err.value.index == 1 and err.value.field == field
    assert "slot 1" in str(err.value)
    lenient = decode_table(image, REGION, RAM, strict=False)
    assert [s.index for s in lenient.slots] == [0]
    assert [e.index for e in lenient.errors] == [1]


def test_duplicate_and_overlapping_slots_are_refused() -> None:
    image = region_with(encode_slot(0x20_0000, 1), encode_slot(0x20_0000, 1))
    with pytest.raises(SlotError, match="overlaps slot"):
        decode_table(image, REGION, RAM)
    image = region_with(encode_slot(0x20_0000, 4), encode_slot(0x30_0000, 1),
                        encode_slot(0x20_2000, 1))
    lenient = decode_table(image, REGION, RAM, strict=False)
    assert [s.index for s in lenient.slots] == [1]
    assert {e.index for e in lenient.errors} == {2}


def test_adjacent_slots_are_fine() -> None:
    image = region_with(encode_slot(0x20_1000, 1), encode_slot(0x20_0000, 1))
    assert decode_table(image, REGION, RAM).pages == 2


def test_short_buffer_is_an_error() -> None:
    with pytest.raises(HeaderError, match="length"):
        decode_table(bytes(100), REGION)


def test_fast_and_slow_paths_agree_on_random_tables() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        slots = []
        for _ in range(rng.randrange(1, 40)):
            gpa = rng.choice([0x20_0000, 0x9F000, 1 << 32, REGION.base - 4096, 0x3000_0000])
            gpa += rng.randrange(0, 64) * PAGE_SIZE
            slots.append(encode_slot(gpa, rng.choice([1, 1, 2, 5]),
                                     low_bits=rng.choice([0] * 20 + [2])))
        image = region_with(*slots)
        lenient = decode_table(image, REGION, RAM, strict=False)
        try:
            strict = decode_table(image, REGION, RAM)
        except SlotError:
            assert lenient.errors, "strict refused a table the lenient pass found clean"
        else:
            assert not lenient.errors and strict.slots == lenient.slots


def test_full_region_decodes() -> None:
    n = slot_count_for(REGION.size)
    order = list(range(n))
    random.Random(7).shuffle(order)
    table = decode_table(
        build_region(REGION.size, [((1 << 32) + i * 8192, 1) for i in order]), REGION, RAM)
    assert table.pages == n and len(table.slots) == n


def test_c_header_matches_generator() -> None:
    """The checked-in guest_kmod/vmwipe_abi.h must be what the generator writes today."""
    assert cheader.default_path().read_text() == cheader.render(), (
        "guest_kmod/vmwipe_abi.h drifted: run `make abi`")


def test_c_header_compiles_with_its_asserts(tmp_path: object) -> None:
    import shutil
    import subprocess
    from pathlib import Path

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    src = Path(str(tmp_path)) / "t.c"
    src.write_text('#include "vmwipe_abi.h"\nint main(void) { return 0; }\n')
    subprocess.run([cc, "-Wall", "-Werror", "-I", str(cheader.default_path().parent), "-c",
                    str(src), "-o", str(src.with_suffix(".o"))], check=True)


def test_layout_offsets_follow_the_spec() -> None:
    offsets = L.field_offsets(L.HeaderStruct)
    assert offsets["boot_id"] == (0x28, 16)
    assert offsets["header_crc32"] == (0x38, 4)
    assert offsets["wipe_pages"] == (0x48, 8)
    assert L.field_offsets(L.SlotV1Struct) == {"word": (0, 8), "npages": (8, 4),
                                               "reserved": (12, 4)}
    assert L.field_offsets(L.SlotStruct) == {"word": (0, 8), "count": (8, 4), "offset": (12, 4)}


@pytest.mark.parametrize(("text", "value"), [("4096", 4096), ("1M", 1 << 20), ("512M", 512 << 20),
                                             ("0x1f000000", 0x1F00_0000), ("2G", 2 << 30),
                                             ("1MiB", 1 << 20), ("1.5K", 1536)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1Q", "0xZZ", "-1M", "1.3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|bytes"):
        parse_size(text)


def test_slots_after_a_long_empty_run_are_seen() -> None:
    """Decoding stops where the non-zero bytes end; the last slot must still count."""
    n = slot_count_for(REGION.size)
    image = bytearray(build_region(REGION.size, []))
    for index, gpa in ((0, 0x20_0000), (n // 2, 0x30_0000), (n - 1, 1 << 32)):
        image[SLOTS_OFFSET + 16 * index : SLOTS_OFFSET + 16 * (index + 1)] = encode_slot(gpa, 1)
    table = decode_table(bytes(image), REGION, RAM)
    assert [(s.index, s.gpa) for s in table.slots] == [(0, 0x20_0000), (n // 2, 0x30_0000),
                                                       (n - 1, 1 << 32)]
    # A non-VALID slot with only its reserved field set is still "used" and must not hide.
    image[SLOTS_OFFSET + 16 * (n - 1) : SLOTS_OFFSET + 16 * n] = struct.pack("<QII", 0, 0, 1)
    table = decode_table(bytes(image), REGION, RAM)
    assert table.used == 3 and len(table.slots) == 2


@pytest.mark.parametrize("last", [None, 0, 1, 16383, 16384, 16385, 65535, (1 << 20) - 1])
def test_used_length_scan_matches_rstrip(last: int | None) -> None:
    """The chunked trailing-zero scan finds the last non-zero byte wherever it falls."""
    from vmwipe.protocol.table import _nonzero_length

    data = bytearray(1 << 20)
    if last is not None:
        data[last // 3] = 7  # an earlier non-zero byte must not end the scan early
        data[last] = 1
    assert _nonzero_length(bytes(data)) == len(bytes(data).rstrip(b"\0"))
