"""Wire protocol v2: the construct definitions are the single source of truth.

Everything else -- the Python decoder, the generated C header
(`guest_kmod/vmwipe_abi.h`) and the spec's tables -- is derived from the
structures below, so a field can only move in one place.
"""

from __future__ import annotations

from typing import Final

from construct import Bytes, Int32ul, Int64ul, Struct

PAGE_SIZE: Final = 4096
#: What the guest module writes.  A v1 reader refuses it at the magic.
VERSION: Final = 2
MAGIC: Final = b"VMWIPEv2"
#: Still read by the host: a v1 table has zero ranges only (SPEC.md, "Versioning").
VERSION_V1: Final = 1
MAGIC_V1: Final = b"VMWIPEv1"
HEADER_SIZE: Final = 4096
SLOT_SIZE: Final = 16
SLOTS_OFFSET: Final = 4096
MIN_REGION_SIZE: Final = 8192
SLOT_VALID: Final = 0x1
#: v2: the slot is a fill range (host writes fresh random bytes), not a zero range.
SLOT_FILL: Final = 0x2
SLOT_RESERVED_BITS_V1: Final = 0xFFE  # bits 11..1 of `word` in a v1 table
SLOT_RESERVED_BITS: Final = 0xFFC  # bits 11..2 of `word` in a v2 table
SLOT_ADDR_MASK: Final = ~0xFFF & 0xFFFF_FFFF_FFFF_FFFF
ACPI_HID: Final = "VMWP0001"

#: `crng_status` (guest-written, outside the CRC): what the module decided about the
#: kernel CRNG.  0 also reads a v2 table from before the field existed.
CRNG_STATUS_NOT_REPORTED: Final = 0
#: The module registered the kernel CRNG's state as `crng_ranges` fill slots.
CRNG_STATUS_ACTIVE: Final = 1
#: The guest turned the refresh off (module parameter crng_refresh=0).
CRNG_STATUS_DISABLED: Final = 2
#: The module looked and refused (layout or symbols not found); `crng_reason` says why.
CRNG_STATUS_REFUSED: Final = 3
CRNG_STATUS_NAMES: Final = {
    CRNG_STATUS_NOT_REPORTED: "not_reported",
    CRNG_STATUS_ACTIVE: "active",
    CRNG_STATUS_DISABLED: "disabled",
    CRNG_STATUS_REFUSED: "refused",
}
CRNG_REASON_LEN: Final = 64

#: `ksecrets` (guest-written, outside the CRC): which of the kernel's other per-boot
#: secrets the module registered as fill ranges (SPEC.md 4.1).  0 also reads a table
#: from before the field: "not reported".
KSECRETS_REPORTED: Final = 1 << 31
KSECRET_NAMES: Final = {
    1 << 0: "net_secret",  # net/core/secure_seq.c: TCP ISNs, ephemeral ports
    1 << 1: "ts_secret",  # net/core/secure_seq.c: TCP timestamp offsets
    1 << 2: "syncookie",  # net/ipv4/syncookies.c: syncookie_secret[2]
    1 << 3: "syncookie6",  # net/ipv6/syncookies.c: syncookie6_secret[2]
    1 << 4: "ptr_key",  # lib/vsprintf.c: %p hashing
}
KSECRETS_KNOWN: Final = KSECRETS_REPORTED | sum(KSECRET_NAMES)

#: Page 0 of the region.  Only these 0xA0 bytes carry meaning; the rest is reserved (0).
HeaderStruct = Struct(
    "magic" / Bytes(8),
    "version" / Int32ul,
    "header_size" / Int32ul,
    "region_size" / Int64ul,
    "slot_size" / Int32ul,
    "slot_count" / Int32ul,
    "slots_offset" / Int64ul,
    "boot_id" / Bytes(16),
    "header_crc32" / Int32ul,
    "reserved0" / Int32ul,
    "wipe_generation" / Int64ul,
    "wipe_pages" / Int64ul,
    "crng_status" / Int32ul,
    "crng_ranges" / Int32ul,
    "crng_reason" / Bytes(CRNG_REASON_LEN),
    "ksecrets" / Int32ul,
    "ksecrets_ranges" / Int32ul,
)

#: Guest-written after init, outside the CRC (SPEC.md 4.1): the kernel's other
#: per-boot secrets.  A table from before them holds zeros: "not reported".
KsecretsFieldsStruct = Struct(
    "ksecrets" / Int32ul,
    "ksecrets_ranges" / Int32ul,
)

#: The fields the guest writes after init, outside the CRC (SPEC.md 4.1): the kernel
#: CRNG's registration.  A v2 table from before them holds zeros: "not reported".
CrngFieldsStruct = Struct(
    "crng_status" / Int32ul,
    "crng_ranges" / Int32ul,
    "crng_reason" / Bytes(CRNG_REASON_LEN),
)

#: One table entry (v2).  A zero range: `word` = first page | VALID, `count` =
#: pages, `offset` = 0 -- byte for byte a v1 slot.  A fill range: `word` = page |
#: FILL | VALID, `count` = bytes (1..4096), `offset` = first byte within that page;
#: offset + count <= 4096, so a fill range never leaves its page.
SlotStruct = Struct(
    "word" / Int64ul,
    "count" / Int32ul,
    "offset" / Int32ul,
)

#: The v1 names of the same 16 bytes (v1 has zero ranges only).
SlotV1Struct = Struct(
    "word" / Int64ul,
    "npages" / Int32ul,
    "reserved" / Int32ul,
)

#: The fields only the host writes, after a completed and verified wipe.
HostFieldsStruct = Struct(
    "wipe_generation" / Int64ul,
    "wipe_pages" / Int64ul,
)


def field_offsets(struct: Struct) -> dict[str, tuple[int, int]]:
    """Return {name: (offset, size)} for a flat construct Struct (used by the C generator)."""
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for sub in struct.subcons:
        size = sub.sizeof()
        offsets[sub.name] = (pos, size)
        pos += size
    return offsets


_HEADER_FIELDS: Final = field_offsets(HeaderStruct)
#: The CRC covers every guest-written byte before the CRC field itself.
HEADER_CRC_LEN: Final = _HEADER_FIELDS["header_crc32"][0]
HEADER_USED_SIZE: Final = HeaderStruct.sizeof()
WIPE_GENERATION_OFFSET: Final = _HEADER_FIELDS["wipe_generation"][0]
WIPE_PAGES_OFFSET: Final = _HEADER_FIELDS["wipe_pages"][0]
HOST_FIELDS_SIZE: Final = HostFieldsStruct.sizeof()
CRNG_FIELDS_OFFSET: Final = _HEADER_FIELDS["crng_status"][0]
CRNG_FIELDS_SIZE: Final = CrngFieldsStruct.sizeof()
#: Where v1 (and v2 before the CRNG fields) ended: bytes from here on were reserved (0).
HEADER_USED_SIZE_V1: Final = CRNG_FIELDS_OFFSET
KSECRETS_FIELDS_OFFSET: Final = _HEADER_FIELDS["ksecrets"][0]
KSECRETS_FIELDS_SIZE: Final = KsecretsFieldsStruct.sizeof()

assert HEADER_CRC_LEN == 0x38 and WIPE_GENERATION_OFFSET == 0x40 and HEADER_USED_SIZE == 0xA0
assert CRNG_FIELDS_OFFSET == 0x50 and _HEADER_FIELDS["crng_ranges"][0] == 0x54
assert _HEADER_FIELDS["crng_reason"] == (0x58, CRNG_REASON_LEN)
assert CRNG_FIELDS_OFFSET + CRNG_FIELDS_SIZE == KSECRETS_FIELDS_OFFSET == 0x98
assert KSECRETS_FIELDS_OFFSET + KSECRETS_FIELDS_SIZE == HEADER_USED_SIZE
assert SlotStruct.sizeof() == SlotV1Struct.sizeof() == SLOT_SIZE
