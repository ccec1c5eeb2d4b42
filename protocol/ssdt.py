"""Encode and decode the SSDT that describes the vmwipe region to the guest.

The guest finds its region through an ACPI device, so the host must hand QEMU
an SSDT (`-acpitable file=...`).  Generating it here means no `iasl` at run time,
and decoding it back lets the host agent learn base and size from the very
table the guest saw, instead of trusting a second copy of the configuration.

Table (byte-identical in structure to what `iasl` emits for):

    Scope (\\_SB) { Device (VMWP) {
        Name (_HID, "VMWP0001")  Name (_UID, 0)
        Method (_STA) { Return (0x0F) }
        Name (_CRS, ResourceTemplate () { QWordMemory (ResourceConsumer, PosDecode,
            MinFixed, MaxFixed, Cacheable, ReadWrite, 0, BASE, BASE+SIZE-1, 0, SIZE) })
    } }
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import SsdtError
from .layout import ACPI_HID
from .table import Region, validate_region

# AML opcodes (ACPI 6.5, section 20).
ZERO_OP, ONE_OP, NAME_OP, BYTE_PREFIX, WORD_PREFIX = 0x00, 0x01, 0x08, 0x0A, 0x0B
DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0C, 0x0D, 0x0E
SCOPE_OP, BUFFER_OP, METHOD_OP, RETURN_OP = 0x10, 0x11, 0x14, 0xA4
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, PARENT_PREFIX, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x5C, 0x5E, 0x2E, 0x2F

# Resource descriptors (ACPI 6.5, section 6.4).
QWORD_ADDRESS_TAG, END_TAG = 0x8A, 0x79
QWORD_BODY = struct.Struct("<BBBQQQQQ")  # type, general flags, type flags, gran, min, max, tra, len
RES_TYPE_MEMORY = 0
GEN_FLAGS_CONSUMER_MIF_MAF = 0x0D
MEM_FLAGS_CACHEABLE_RW = 0x03

ACPI_HEADER = struct.Struct("<4sIBB6s8sI4sI")
OEM_ID, OEM_TABLE_ID, CREATOR_ID = b"VMWIPE", b"VMWIPEv1", b"VMWP"


def _pkg_length(content_len: int) -> bytes:
    """PkgLength counts its own bytes (ACPI 20.2.4)."""
    if content_len + 1 < 0x40:
        return bytes([content_len + 1])
    for extra in (1, 2, 3):
        total = content_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0x0F)]
            out += [(total >> (4 + 8 * k)) & 0xFF for k in range(extra)]
            return bytes(out)
    raise SsdtError(f"AML package of {content_len} bytes is too large")


def _pkg(op: bytes, body: bytes) -> bytes:
    return op + _pkg_length(len(body)) + body


def _integer(value: int) -> bytes:
    if value in (0, 1):
        return bytes([value])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32), (QWORD_PREFIX, "<Q", 1 << 64)):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise SsdtError(f"integer {value:#x} does not fit in 64 bits")


def _buffer(data: bytes) -> bytes:
    return _pkg(bytes([BUFFER_OP]), _integer(len(data)) + data)


def _name(seg: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + seg.encode() + value


def _crs(region: Region) -> bytes:
    body = QWORD_BODY.pack(RES_TYPE_MEMORY, GEN_FLAGS_CONSUMER_MIF_MAF, MEM_FLAGS_CACHEABLE_RW,
                           0, region.base, region.end - 1, 0, region.size)
    return bytes([QWORD_ADDRESS_TAG]) + struct.pack("<H", len(body)) + body + bytes([END_TAG, 0])


def encode_ssdt(base: int, size: int) -> bytes:
    """The whole SSDT, header and checksum included, ready for `-acpitable file=`."""
    region = Region(base, size)
    validate_region(region)
    sta = _pkg(bytes([METHOD_OP]), b"_STA" + bytes([0, RETURN_OP]) + _integer(0x0F))
    device = _pkg(
        bytes([EXT_OP_PREFIX, DEVICE_OP]),
        b"VMWP"
        + _name("_HID", bytes([STRING_PREFIX]) + ACPI_HID.encode() + b"\0")
        + _name("_UID", _integer(0))
        + sta
        + _name("_CRS", _buffer(_crs(region))),
    )
    aml = _pkg(bytes([SCOPE_OP]), b"\\_SB_" + device)
    length = ACPI_HEADER.size + len(aml)
    header = ACPI_HEADER.pack(b"SSDT", length, 2, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)
    table = bytearray(header + aml)
    table[9] = (-sum(table)) & 0xFF
    return bytes(table)


# --- decoder ---------------------------------------------------------------------------


@dataclass
class _Device:
    hid: str | None = None
    crs: bytes | None = None


class _Reader:
    """A bounds-checked cursor: running off the end is an SsdtError, never an IndexError."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise SsdtError("AML ends in the middle of an object")
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise SsdtError("AML ends in the middle of an object")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def pkg_end(self) -> int:
        start = self.pos
        lead = self.byte()
        extra = lead >> 6
        if extra == 0:
            length = lead & 0x3F
        else:
            length = lead & 0x0F
            for k in range(extra):
                length |= self.byte() << (4 + 8 * k)
        end = start + length
        if length < 1 + extra or end > self.end:
            raise SsdtError(f"AML package length {length} at offset {start} is out of bounds")
        return end

    def name_string(self) -> str:
        prefix = ""
        while self.pos < self.end and self.data[self.pos] in (ROOT_CHAR, PARENT_PREFIX):
            prefix += chr(self.byte())
        lead = self.byte()
        if lead == 0:
            return prefix
        if lead == DUAL_NAME_PREFIX:
            count = 2
        elif lead == MULTI_NAME_PREFIX:
            count = self.byte()
        else:
            self.pos -= 1
            count = 1
        segs = [self.take(4).decode("ascii", "replace") for _ in range(count)]
        return prefix + ".".join(segs)

    def data_object(self) -> int | str | bytes:
        op = self.byte()
        if op in (ZERO_OP, ONE_OP):
            return op
        if op == 0xFF:
            return (1 << 64) - 1
        sizes = {BYTE_PREFIX: "<B", WORD_PREFIX: "<H", DWORD_PREFIX: "<I", QWORD_PREFIX: "<Q"}
        if op in sizes:
            fmt = sizes[op]
            return int(struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0])
        if op == STRING_PREFIX:
            end = self.data.find(b"\0", self.pos, self.end)
            if end < 0:
                raise SsdtError("unterminated AML string")
            text = self.take(end - self.pos).decode("ascii", "replace")
            self.pos += 1
            return text
        if op == BUFFER_OP:
            end = self.pkg_end()
            size = _Reader(self.data, self.pos, end).data_object()
            if not isinstance(size, int):
                raise SsdtError("AML buffer size is not an integer")
            inner = _Reader(self.data, self.pos, end)
            inner.data_object()
            payload = self.data[inner.pos : end]
            self.pos = end
            return payload[:size]
        raise SsdtError(f"unsupported AML data object opcode {op:#04x} at offset {self.pos - 1}")


#: vmwipe's own SSDT nests two levels (Scope, Device). Each level costs a Python frame, so a
#: crafted table of a few kilobytes could otherwise end in RecursionError, not SsdtError.
MAX_AML_DEPTH = 16


def _walk(r: _Reader, devices: list[_Device], current: _Device | None, depth: int = 0) -> None:
    if depth > MAX_AML_DEPTH:
        raise SsdtError(f"AML nests deeper than {MAX_AML_DEPTH} levels at offset {r.pos}")
    while r.pos < r.end:
        op = r.byte()
        if op == SCOPE_OP:
            end = r.pkg_end()
            r.name_string()
            _walk(_Reader(r.data, r.pos, end), devices, current, depth + 1)
            r.pos = end
        elif op == EXT_OP_PREFIX and r.byte() == DEVICE_OP:
            end = r.pkg_end()
            r.name_string()
            dev = _Device()
            devices.append(dev)
            _walk(_Reader(r.data, r.pos, end), devices, dev, depth + 1)
            r.pos = end
        elif op == METHOD_OP:
            r.pos = r.pkg_end()  # methods are not evaluated; _STA is informational
        elif op == NAME_OP:
            name = r.name_string()
            value = r.data_object()
            if current is not None and name == "_HID" and isinstance(value, str):
                current.hid = value
            elif current is not None and name == "_CRS" and isinstance(value, bytes):
                current.crs = value
        else:
            raise SsdtError(f"unsupported AML opcode {op:#04x} at offset {r.pos - 1}")


def _memory_range(crs: bytes) -> Region:
    ranges: list[Region] = []
    r = _Reader(crs)
    while r.pos < r.end:
        tag = r.byte()
        if tag == END_TAG:
            break
        if not tag & 0x80:
            r.take(tag & 0x07)  # small descriptors carry their length in the tag
            continue
        (length,) = struct.unpack("<H", r.take(2))
        body = r.take(length)
        if tag != QWORD_ADDRESS_TAG:
            raise SsdtError(f"_CRS holds resource descriptor {tag:#04x}; only QWordMemory is used")
        if length < QWORD_BODY.size:
            raise SsdtError(f"QWordMemory descriptor of {length} bytes is too short")
        rtype, _gen, _flags, _gran, lo, hi, tra, size = QWORD_BODY.unpack_from(body)
        if rtype != RES_TYPE_MEMORY:
            raise SsdtError(f"QWord descriptor has resource type {rtype}, not memory")
        if tra:
            raise SsdtError(f"QWordMemory has a translation offset {tra:#x}; expected 0")
        if size == 0 or hi != lo + size - 1:
            raise SsdtError(f"QWordMemory range {lo:#x}-{hi:#x} disagrees with length {size:#x}")
        ranges.append(Region(lo, size))
    if len(ranges) != 1:
        raise SsdtError(f"_CRS describes {len(ranges)} memory ranges; expected exactly 1")
    return ranges[0]


def decode_ssdt(data: bytes) -> Region:
    """Read base and size of the VMWP0001 device's `_CRS` back out of an SSDT."""
    data = bytes(data)
    if len(data) < ACPI_HEADER.size:
        raise SsdtError(f"{len(data)} bytes is too short for an ACPI table")
    sig, length, *_ = ACPI_HEADER.unpack_from(data)
    if sig != b"SSDT":
        raise SsdtError(f"table signature is {sig!r}, not b'SSDT'")
    if length != len(data):
        raise SsdtError(f"table length field {length} disagrees with its {len(data)} bytes")
    if sum(data) & 0xFF:
        raise SsdtError("table checksum is wrong")
    devices: list[_Device] = []
    _walk(_Reader(data, ACPI_HEADER.size), devices, None)
    ours = [d for d in devices if d.hid == ACPI_HID]
    if len(ours) != 1:
        raise SsdtError(f"table has {len(ours)} {ACPI_HID} devices; expected exactly 1")
    if ours[0].crs is None:
        raise SsdtError(f"{ACPI_HID} device has no _CRS buffer")
    region = _memory_range(ours[0].crs)
    try:
        validate_region(region)
    except ValueError as e:
        raise SsdtError(f"_CRS range is not a usable vmwipe region: {e}") from None
    return region
