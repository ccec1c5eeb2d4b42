"""The libvirt save image (`virsh save`, managed save): a header, the domain XML, a stream.

libvirt (src/qemu/qemu_saveimage.h) writes a 92-byte header in host byte order

    char magic[16]  "LibvirtQemudSave" ("LibvirtQemudPart" while still being written)
    uint32 version  2 (1 in images from before the cookie)
    uint32 data_len domain XML (+ cookie, + padding) that follows the header
    uint32 was_running
    uint32 compressed  0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop, 5 zstd
    uint32 cookieOffset
    uint32 unused[14]

and QEMU's migration stream starts at ``92 + data_len``.  Only raw images can be
scrubbed in place: a compressed image would have to be recompressed, which
changes every length, so it is refused, naming the format.  The header is
parsed with construct because it is a fixed C struct.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import construct as cs

from ..errors import StreamError, UnsupportedStream

MAGIC = b"LibvirtQemudSave"
MAGIC_PARTIAL = b"LibvirtQemudPart"
HEADER_SIZE = 92
VERSIONS = (1, 2)
FORMATS = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd"}
#: libvirt caps the XML at 10 MiB (QEMU_SAVE_MAX_XML); anything larger is not a header.
MAX_DATA_LEN = 64 << 20


def _header(endian: str) -> cs.Struct:
    u32 = cs.Int32ul if endian == "little" else cs.Int32ub
    return cs.Struct(
        "magic" / cs.Bytes(16),
        "version" / u32,
        "data_len" / u32,
        "was_running" / u32,
        "format" / u32,
        "cookie_offset" / u32,
        "unused" / cs.Array(14, u32),
    )


_LE = _header("little")
_BE = _header("big")


@dataclass(frozen=True)
class SaveImageHeader:
    """The parsed header; `stream_offset` is where QEMU's stream begins."""

    version: int
    data_len: int
    was_running: bool
    format: int
    cookie_offset: int
    endian: str

    @property
    def stream_offset(self) -> int:
        return HEADER_SIZE + self.data_len

    @property
    def format_name(self) -> str:
        return FORMATS.get(self.format, f"unknown format {self.format}")


def is_save_image(head: bytes) -> bool:
    """True when the file starts like a libvirt save image (complete or partial)."""
    return head[:16] in (MAGIC, MAGIC_PARTIAL)


def parse_header(data: bytes, file_size: int | None = None) -> SaveImageHeader:
    """Parse and check the header; StreamError names what is wrong.

    The byte order is the writer's; an image moved between hosts of different
    endianness is still recognised by which reading gives a known version.
    """
    if len(data) < HEADER_SIZE:
        raise StreamError(f"truncated libvirt save image: {len(data)} bytes, header needs "
                          f"{HEADER_SIZE}")
    magic = data[:16]
    if magic == MAGIC_PARTIAL:
        raise StreamError("incomplete libvirt save image (magic LibvirtQemudPart): "
                          "the save never finished")
    if magic != MAGIC:
        raise StreamError(f"not a libvirt save image: magic {bytes(magic).hex(' ')}")
    native = sys.byteorder
    order = [native, "big" if native == "little" else "little"]
    for endian in order:
        h = (_LE if endian == "little" else _BE).parse(data[:HEADER_SIZE])
        if h.version in VERSIONS:
            break
    else:
        raise StreamError(f"unsupported libvirt save image version "
                          f"{_LE.parse(data[:HEADER_SIZE]).version}")
    hdr = SaveImageHeader(
        version=int(h.version), data_len=int(h.data_len), was_running=bool(h.was_running),
        format=int(h.format), cookie_offset=int(h.cookie_offset), endian=endian,
    )
    if hdr.data_len > MAX_DATA_LEN:
        raise StreamError(f"corrupt libvirt save image: data_len {hdr.data_len}")
    if file_size is not None and hdr.stream_offset + 8 > file_size:
        raise StreamError(f"truncated libvirt save image: stream would start at "
                          f"{hdr.stream_offset:#x}, file has {file_size:#x} bytes")
    if hdr.format != 0:
        raise UnsupportedStream(f"libvirt save image is compressed ({hdr.format_name}); "
                                "only raw images can be scrubbed in place (save with "
                                "save_image_format = \"raw\" in qemu.conf)")
    return hdr


def domain_xml(data: bytes, hdr: SaveImageHeader) -> str:
    """The domain XML (NUL-terminated inside data_len; the cookie, if any, follows it)."""
    body = data[HEADER_SIZE:HEADER_SIZE + hdr.data_len]
    end = hdr.cookie_offset if hdr.version >= 2 and 0 < hdr.cookie_offset <= len(body) else None
    xml = body[:end].split(b"\0", 1)[0]
    return xml.decode("utf-8", "replace")


def build_header(data_len: int, *, was_running: bool = False, fmt: int = 0,
                 cookie_offset: int = 0, version: int = 2) -> bytes:
    """A header in host byte order (tests build images with it)."""
    st = _LE if sys.byteorder == "little" else _BE
    return bytes(st.build(dict(
        magic=MAGIC, version=version, data_len=data_len, was_running=int(was_running),
        format=fmt, cookie_offset=cookie_offset, unused=[0] * 14,
    )))
