"""Reader and in-flight rewriter of the QEMU migration stream (QEMU 7.2 to 10.x).

A saved VM (`migrate "exec:cat > FILE"`, `virsh save`, `vmwipe save`) is one
migration stream.  Scrubbing secrets out of it means finding every copy of a
page and zeroing its 4096 data bytes without changing any length, so the file
stays a stream QEMU loads.  That needs an exact walk of the framing:

- header: be32 ``QEVM``, be32 version 3;
- sections: CONFIGURATION (machine name, optional subsections), START and FULL
  (be32 section id, u8-prefixed idstr, be32 instance id, be32 version id),
  PART and END (be32 section id), each followed by a FOOTER (0x7e + be32 id),
  COMMAND (be16 command, be16 length, data), EOF, then the optional JSON VM
  description (0x06, be32 length, JSON);
- the `ram` section's records: be64 ``offset | flags``; MEM_SIZE lists the
  blocks, PAGE carries 4096 bytes, ZERO one fill byte, CONTINUE omits the
  block name, EOS ends the section, MULTIFD_FLUSH is a marker.

Device state (FULL sections of every non-RAM device) has no length prefix: its
length follows only from the device's VMState fields.  QEMU writes those
fields, with the size of each as actually written, into the VM description
after EOF, so a file reader first locates that description from the end of the
file (the byte before it must be EOF and its length must reach exactly the end)
and then walks every device section by its field sizes, checking every
subsection marker and every section footer.  That validates the whole file, so
truncation or corruption anywhere is caught before anything is written.

A pipe (`vmwipe save --scrub`) cannot look at its own end.  There QEMU's order
is what we rely on: every iterative RAM section (START, PART..., END) precedes
the non-iterable device state, so once the `ram` END section is through, the
rest of the stream holds no guest RAM pages and is copied verbatim.  A device
section that shows up before that (e.g. virtio-mem's early state) stops the
save with an error rather than guessing; the written file is then re-read in
file mode, which walks everything.

`mapped-ram` (QEMU >= 9.0, `file:` only) is walked too: each block's
MappedRamHeader gives a bitmap and a page area where page N sits at a fixed
offset, and the stream resumes after that area; there are no PAGE records.

Not supported, refused by name: XBZRLE, the `compress` capability, RDMA hooks,
postcopy packaging, and iterative non-RAM sections (block migration, dirty
bitmaps, VFIO).  A stream without its VM description (machine property
`suppress-vmdesc`) cannot be walked past the RAM and is refused as a file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import os
import re
import struct
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import rshift
from typing import Any, BinaryIO, Protocol

from ..errors import StreamError, UnsupportedStream
from . import _ramwalk
from .saveimage import HEADER_SIZE as SAVE_IMAGE_HEADER_SIZE
from .saveimage import MAGIC as SAVE_IMAGE_MAGIC
from .saveimage import parse_header

QEVM_MAGIC = b"QEVM"
QEVM_VERSION = 3

EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
FOOTER = 0x7E

SECTION_NAMES = {
    EOF: "EOF", SECTION_START: "START", SECTION_PART: "PART", SECTION_END: "END",
    SECTION_FULL: "FULL", SUBSECTION: "SUBSECTION", VMDESCRIPTION: "VMDESCRIPTION",
    CONFIGURATION: "CONFIGURATION", COMMAND: "COMMAND", FOOTER: "FOOTER",
}

# RAM record flags (migration/ram.c); they live in the low bits of the be64 offset.
RAM_FULL = 0x01  # obsolete since QEMU 1.x; never legal in a stream we accept
RAM_ZERO = 0x02
RAM_MEM_SIZE = 0x04
RAM_PAGE = 0x08
RAM_EOS = 0x10
RAM_CONTINUE = 0x20
RAM_XBZRLE = 0x40
RAM_HOOK = 0x80
RAM_COMPRESS_PAGE = 0x100
RAM_MULTIFD_FLUSH = 0x200
_RAM_KNOWN = (RAM_ZERO | RAM_MEM_SIZE | RAM_PAGE | RAM_EOS | RAM_CONTINUE | RAM_XBZRLE
              | RAM_HOOK | RAM_COMPRESS_PAGE | RAM_MULTIFD_FLUSH | RAM_FULL)

# COMMAND sub-types (migration/savevm.c) that carry a nested stream we cannot follow.
_MIG_CMD_PACKAGED = 7

RAM_SECTION = "ram"
RAM_SECTION_VERSION = 4
DEFAULT_PAGE_SIZE = 4096
#: How far from the end of a file the VM description is searched for.  QEMU's
#: description of a large pc/q35 VM is 50-200 KiB; 64 MiB is far beyond any.
VMDESC_SEARCH = 64 << 20

#: mapped-ram page areas start on 1 MiB boundaries (MAPPED_RAM_FILE_OFFSET_ALIGNMENT).
MAPPED_RAM_ALIGN = 1 << 20

#: A run of ZERO|CONTINUE records with fill byte 0: be64 word whose low 12 bits are 0x022,
#: then 0x00.  Most records of a large save are these; they are consumed in bulk.
_ZERO_RUN = re.compile(rb"(?:.{6}[\x00\x10\x20\x30\x40\x50\x60\x70\x80\x90\xa0\xb0\xc0\xd0"
                       rb"\xe0\xf0]\x22\x00)+", re.S)
_ZERO_RUN_MAX = 8192  # records per bulk step
_KEY_SHIFT = 52  # (block, page) as one int: page numbers of a 64-bit offset fit in 52 bits
_ZERO_REC = 9
#: A PAGE|CONTINUE record: be64 word whose low 12 bits are 0x028, then the page.  A guest
#: full of data saves as long runs of them, also consumed in bulk (file mode only).
_PAGE_REC = 8 + DEFAULT_PAGE_SIZE
_PAGE_RUN_MAX = 4096  # records per bulk step (16 MiB)
_NOT_PAGE_CONTINUE_LOW = bytes(int(b != RAM_PAGE | RAM_CONTINUE) for b in range(256))  # bits 7..0
_NOT_ZERO_NIBBLE = bytes(int(b & 0x0F != 0) for b in range(256))  # word bits 11..8

#: Bytes of records one call of the C hop may consume: bounds its transient arrays
#: (~17 bytes per record) and lets the walk report progress between calls.  A record
#: cut by the bound is read by the record-by-record code, then the hop goes on.
_HOP_CHUNK = 256 << 20

#: Bound on a described array's length, so a forged description cannot spin the walk.
MAX_ARRAY_LEN = 1 << 24

KIND_PAGE = 1
KIND_ZERO = 2


@dataclass(frozen=True)
class RamBlock:
    """One RAM block as listed by the MEM_SIZE record: QEMU's idstr and used length."""

    name: str
    length: int


@dataclass(frozen=True)
class SectionInfo:
    """Where one section sits in the file; `end` is after its footer."""

    kind: int
    section_id: int
    name: str
    instance_id: int
    version_id: int
    start: int
    end: int


@dataclass
class PageRecords:
    """Every PAGE and ZERO record, as parallel compact arrays (millions in a big save).

    `pos` is the file offset of the record's data: the 4096 page bytes of a
    PAGE record, the single fill byte of a ZERO record.
    """

    block: array[int] = field(default_factory=lambda: array("H"))
    page: array[int] = field(default_factory=lambda: array("Q"))
    pos: array[int] = field(default_factory=lambda: array("Q"))
    kind: array[int] = field(default_factory=lambda: array("B"))

    def __len__(self) -> int:
        return len(self.pos)

    def append(self, block: int, page: int, pos: int, kind: int) -> None:
        self.block.append(block)
        self.page.append(page)
        self.pos.append(pos)
        self.kind.append(kind)


@dataclass
class StreamIndex:
    """What a full walk learned: layout of the stream and every page copy."""

    start: int  # file offset of the QEVM magic (92 + data_len in a libvirt image)
    end: int = 0  # file offset just after the stream (after the VM description)
    machine: str = ""
    capabilities: list[str] = field(default_factory=list)
    page_size: int = DEFAULT_PAGE_SIZE
    blocks: list[RamBlock] = field(default_factory=list)
    records: PageRecords = field(default_factory=PageRecords)
    sections: list[SectionInfo] = field(default_factory=list)
    vmdesc: dict[str, Any] | None = None
    vmdesc_offset: int = 0
    ram_done: bool = False  # the `ram` END section has been read
    zeroed_pages: int = 0  # pipe mode: PAGE records sent as zeros
    patched_pages: int = 0  # pipe mode: PAGE records sent with a patch applied
    #: mapped-ram (QEMU >= 9.0): block index -> (bitmap offset, pages offset).  Every page
    #: then has one fixed place, ``pages_offset + offset``; no PAGE records exist.
    mapped_ram: bool = False
    mapped: dict[int, tuple[int, int]] = field(default_factory=dict)

    def mapped_pos(self, block: int, page: int) -> int | None:
        """File offset of a page's fixed slot in a mapped-ram stream (None: block skipped)."""
        got = self.mapped.get(block)
        if got is None or got[1] == 0:
            return None
        return got[1] + page * DEFAULT_PAGE_SIZE

    def mapped_present(self, mm: mmap.mmap | bytes, block: int, page: int) -> bool:
        """The block bitmap's bit: QEMU wrote this page (unset = zero page).

        The bitmap is an array of host-endian longs (x86: little-endian), so bit
        i is bit i % 8 of byte i // 8.
        """
        got = self.mapped.get(block)
        if got is None or got[0] == 0:
            return False
        return bool(mm[got[0] + page // 8] >> (page % 8) & 1)

    def block_index(self, name: str) -> int | None:
        for i, b in enumerate(self.blocks):
            if b.name == name:
                return i
        return None

    @property
    def page_count(self) -> int:
        return sum(1 for k in self.records.kind if k == KIND_PAGE)


# --------------------------------------------------------------------------------------
# sources: where the bytes come from (a mapped file, or a pipe copied to a sink)


class Source(Protocol):
    """What the walker reads from.  `pos` is an absolute offset in the file or pipe."""

    @property
    def pos(self) -> int: ...

    def read(self, n: int, what: str) -> bytes: ...

    def skip(self, n: int, what: str) -> None: ...

    def page(self, n: int, zero: bool) -> None: ...

    def page_patch(self, n: int, patch: list[tuple[int, bytes]]) -> None: ...

    def peek(self) -> int | None: ...

    def zero_run(self) -> tuple[int, bytes]: ...

    def page_run(self) -> tuple[int, ...]: ...


class FileSource:
    """Random access over a read-only mapping of a whole file.

    The mapping is why walking a many-GiB save costs no copies: page data is
    only ever skipped.
    """

    def __init__(self, mm: mmap.mmap | bytes, pos: int = 0, limit: int | None = None) -> None:
        self.mm = mm
        self.pos = pos
        self.limit = len(mm) if limit is None else limit

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.limit:
            raise StreamError(f"truncated stream: {what} at offset {self.pos:#x} needs {n} bytes, "
                              f"file ends at {self.limit:#x}")

    def read(self, n: int, what: str) -> bytes:
        self._need(n, what)
        b = bytes(self.mm[self.pos:self.pos + n])
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self.pos += n

    def page(self, n: int, zero: bool) -> None:
        self.skip(n, "page data")

    def page_patch(self, n: int, patch: list[tuple[int, bytes]]) -> None:
        self.skip(n, "page data")

    def peek(self) -> int | None:
        return self.mm[self.pos] if self.pos < self.limit else None

    def zero_run(self) -> tuple[int, bytes]:
        """Consume a run of ZERO|CONTINUE records here; (offset of the run, its bytes)."""
        start = self.pos
        m = _ZERO_RUN.match(self.mm, start, min(self.limit, start + _ZERO_REC * _ZERO_RUN_MAX))
        if m is None:
            return start, b""
        self.pos = m.end()
        return start, m.group()

    def page_run(self) -> tuple[int, ...]:
        """The words of the PAGE|CONTINUE records that start here (`_page_run_words`)."""
        return _page_run_words(self.mm, self.pos, self.limit)


def _page_run_words(buf: mmap.mmap | bytes | bytearray, start: int, limit: int
                    ) -> tuple[int, ...]:
    """The be64 words of the run of PAGE|CONTINUE records at `start` (nothing consumed).

    The flag bits of up to `_PAGE_RUN_MAX` records that would follow at a fixed
    stride are read as two strided byte slices; the run ends at the first record
    that is anything else, which the walker then reads alone.
    """
    n = min(_PAGE_RUN_MAX, (limit - start) // _PAGE_REC)
    if n <= 0:
        return ()
    end = start + n * _PAGE_REC
    k = n
    for off, table in ((7, _NOT_PAGE_CONTINUE_LOW), (6, _NOT_ZERO_NIBBLE)):
        bad = buf[start + off : end : _PAGE_REC].translate(table).find(1)
        if 0 <= bad < k:
            k = bad
    if k == 0:
        return ()
    return struct.unpack_from(">" + "Q4096x" * k, buf, start)


class PipeSource:
    """Sequential reader of a pipe or socket that copies every byte it consumes to `sink`.

    Page data marked `zero` is replaced by zeros on its way to the sink, which is
    how `save --scrub` keeps secrets off the disk: they only pass through this
    process's buffer.  Consumed bytes are forwarded lazily, in the large spans
    between zeroed pages, because one write per record would make the filter
    several times slower than QEMU.  `passthrough()` copies the remainder.
    """

    CHUNK = 1 << 20

    def __init__(self, fd: int, sink: BinaryIO, progress: Callable[[int], None] | None = None
                 ) -> None:
        self.fd = fd
        self.sink = sink
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._off = 0  # consumed prefix of _buf
        self._sent = 0  # prefix of _buf already forwarded to the sink
        self._eof = False
        self.progress = progress
        self._next_report = 64 << 20
        self._zero = bytes(DEFAULT_PAGE_SIZE)

    @property
    def pos(self) -> int:
        return self._base + self._off

    def _flush(self) -> None:
        if self._off > self._sent:
            self.sink.write(memoryview(self._buf)[self._sent:self._off])
            self._sent = self._off

    def _refill(self, n: int, what: str) -> None:
        """Make n bytes available at _off, forwarding and dropping the consumed prefix."""
        self._flush()
        del self._buf[:self._off]
        self._base += self._off
        self._off = self._sent = 0
        while len(self._buf) < n and not self._eof:
            chunk = os.read(self.fd, max(self.CHUNK, n - len(self._buf)))
            if not chunk:
                self._eof = True
                break
            self._buf += chunk
        if len(self._buf) < n:
            raise StreamError(f"stream ended early: {what} at offset {self.pos:#x} needs {n} "
                              "bytes")
        if self.progress is not None and self._base >= self._next_report:
            self._next_report = self._base + (64 << 20)
            self.progress(self._base)

    def read(self, n: int, what: str) -> bytes:
        off = self._off
        if len(self._buf) - off < n:
            self._refill(n, what)
            off = self._off
        self._off = off + n
        return bytes(self._buf[off:off + n])

    def skip(self, n: int, what: str) -> None:
        while n > 0:  # big skips (device state) in bounded pieces
            avail = len(self._buf) - self._off
            if avail <= 0:
                self._refill(1, what)
                avail = len(self._buf) - self._off
            step = min(n, avail)
            self._off += step
            n -= step

    def page(self, n: int, zero: bool) -> None:
        if len(self._buf) - self._off < n:
            self._refill(n, "page data")
        if zero:
            self._flush()
            self.sink.write(self._zero if n == len(self._zero) else bytes(n))
            self._off += n
            self._sent = self._off
        else:
            self._off += n

    def page_patch(self, n: int, patch: list[tuple[int, bytes]]) -> None:
        """Forward a page with each `data` of `patch` written over its bytes at `at`."""
        if len(self._buf) - self._off < n:
            self._refill(n, "page data")
        self._flush()
        page = bytearray(self._buf[self._off:self._off + n])
        for at, data in patch:
            page[at:at + len(data)] = data
        self.sink.write(page)
        self._off += n
        self._sent = self._off

    def page_run(self) -> tuple[int, ...]:
        """`FileSource.page_run` over what the buffer holds (nothing is read)."""
        return _page_run_words(self._buf, self._off, len(self._buf))

    def zero_run(self) -> tuple[int, bytes]:
        """Consume a run of ZERO|CONTINUE records from the buffer (see FileSource)."""
        if len(self._buf) - self._off < _ZERO_REC:
            try:
                self._refill(_ZERO_REC, "RAM record")
            except StreamError:
                return self.pos, b""
        off = self._off
        m = _ZERO_RUN.match(self._buf, off, min(len(self._buf), off + _ZERO_REC * _ZERO_RUN_MAX))
        if m is None:
            return self.pos, b""
        self._off = m.end()
        return self._base + off, m.group()

    def peek(self) -> int | None:
        if len(self._buf) - self._off < 1:
            try:
                self._refill(1, "peek")
            except StreamError:
                return None
        return self._buf[self._off]

    def passthrough(self) -> int:
        """Copy everything left to the sink; returns the number of bytes copied."""
        start = self.pos
        self._off = len(self._buf)
        self._flush()
        self._base += len(self._buf)
        self._buf.clear()
        self._off = self._sent = 0
        while not self._eof:
            chunk = os.read(self.fd, self.CHUNK)
            if not chunk:
                self._eof = True
                break
            self.sink.write(chunk)
            self._base += len(chunk)
        return self.pos - start


# --------------------------------------------------------------------------------------
# the VM description


#: First window `find_vmdesc` searches; it grows 8-fold up to VMDESC_SEARCH.
_VMDESC_WINDOW = 1 << 20


def find_vmdesc(mm: mmap.mmap | bytes, start: int, end: int) -> tuple[int, dict[str, Any]] | None:
    """Locate ``EOF, 0x06, be32 len, JSON`` ending exactly at `end`; (offset of 0x06, JSON).

    A stream with no description (machine property `suppress-vmdesc`) gives None.
    The search starts in the last MiB and widens only while no candidate decided it:
    copying the whole 64 MiB bound every time cost more than the rest of a
    mapped-ram walk.  Candidates are tried from the end in every window, so the
    answer is the one a single search of the whole bound gives.
    """
    floor = max(start + 8, end - VMDESC_SEARCH)
    window = _VMDESC_WINDOW
    while True:
        lo = max(floor, end - window)
        decided, got = _vmdesc_in(mm, lo, end)
        if decided:
            return got
        if lo == floor:
            return None
        window *= 8


def _vmdesc_in(mm: mmap.mmap | bytes, lo: int, end: int
               ) -> tuple[bool, tuple[int, dict[str, Any]] | None]:
    """`find_vmdesc` over mm[lo:end]: (True, its answer), or (False, None) when no
    candidate there reached `end` (a wider window may hold the marker)."""
    tail = bytes(mm[lo:end])
    # The JSON is QEMU's compact output and holds no 0x06 byte; scan candidates from the
    # end so the first hit whose length reaches exactly `end` is the real marker.
    i = len(tail)
    while True:
        i = tail.rfind(b"\x06", 0, i)
        if i < 1:
            return False, None
        if i + 5 <= len(tail) and tail[i - 1] == EOF:
            (n,) = struct.unpack_from(">I", tail, i + 1)
            if i + 5 + n == len(tail) and n > 0 and tail[i + 5:i + 6] == b"{":
                try:
                    desc = json.loads(tail[i + 5:].decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    return True, None
                if isinstance(desc, dict) and isinstance(desc.get("devices"), list):
                    return True, (lo + i, desc)
                return True, None


def _device_desc(vmdesc: dict[str, Any] | None, name: str, instance: int) -> dict[str, Any] | None:
    if vmdesc is None:
        return None
    for d in vmdesc.get("devices", []):
        if isinstance(d, dict) and d.get("name") == name and d.get("instance_id") == instance:
            return d
    return None


def _fixed_size(desc: dict[str, Any], depth: int = 0) -> int | None:
    """Bytes of one instance of a struct that holds no subsection or capability, else None.

    Such a struct is skipped in one step however its arrays nest: walked element by
    element, a crafted description of nested arrays of empty fields would cost
    MAX_ARRAY_LEN ** depth steps without consuming a byte.  Every struct that is
    still walked consumes at least one byte per instance (a subsection marker or a
    capability length), so the work is bounded by the stream's length.
    """
    if depth > 32:
        raise StreamError("VM description nests too deep")
    fields = desc.get("fields")
    if not isinstance(fields, list) or desc.get("subsections"):
        return None
    total = 0
    for f in fields:
        count = f.get("array_len", 1) if isinstance(f, dict) else None
        if not isinstance(count, int) or not 0 <= count <= MAX_ARRAY_LEN:
            return None  # the walker names the problem
        if f.get("type") == "struct" and isinstance(f.get("struct"), dict):
            one = _fixed_size(f["struct"], depth + 1)
        elif f.get("type") == "capability":
            one = None
        else:
            size = f.get("size")
            one = size if isinstance(size, int) and size >= 0 else None
        if one is None:
            return None
        total += one * count
    return total


def _walk_struct(src: Source, desc: dict[str, Any], where: str, depth: int = 0) -> None:
    """Skip one VMState struct by the field sizes QEMU recorded in the description.

    Every field's "size" is what QEMU wrote for it (for a compressed array, the
    size of one element, repeated `array_len` times).  Subsections are checked
    by marker and name, which is what catches a description that does not
    match the bytes.
    """
    if depth > 32:
        raise StreamError(f"VM description nests too deep at {where}")
    fields = desc.get("fields")
    if not isinstance(fields, list):
        raise StreamError(f"VM description of {where} has no fields (old-style device state)")
    for f in fields:
        if not isinstance(f, dict):
            raise StreamError(f"VM description of {where} has a malformed field")
        count = f.get("array_len", 1)
        fname = f"{where}.{f.get('name')}"
        if not isinstance(count, int) or not 0 <= count <= MAX_ARRAY_LEN:
            raise StreamError(f"VM description of {fname} has array length {count!r}")
        if f.get("type") == "struct" and isinstance(f.get("struct"), dict):
            size = _fixed_size(f["struct"], depth + 1)
            if size is not None:
                src.skip(size * count, fname)
                continue
            for _ in range(count):
                _walk_struct(src, f["struct"], fname, depth + 1)
        elif f.get("type") == "capability":
            for _ in range(count):
                (n,) = src.read(1, f"{fname} length")
                src.skip(n, fname)
        else:
            size = f.get("size")
            if not isinstance(size, int) or size < 0:
                raise StreamError(f"VM description of {fname} has no size")
            src.skip(size * count, fname)
    for sub in desc.get("subsections", []) or []:
        if not isinstance(sub, dict):
            raise StreamError(f"VM description of {where} has a malformed subsection")
        name = str(sub.get("vmsd_name", ""))
        marker = src.read(1, f"subsection {name} marker")[0]
        if marker != SUBSECTION:
            raise StreamError(f"corrupt stream: subsection {name} of {where} expected at offset "
                              f"{src.pos - 1:#x}, found byte {marker:#04x}")
        got = _read_idstr(src, "subsection name")
        if got != name:
            raise StreamError(f"corrupt stream: subsection {got!r} where the VM description has "
                              f"{name!r} (in {where})")
        src.skip(4, f"subsection {name} version")
        _walk_struct(src, sub, name, depth + 1)


def _read_idstr(src: Source, what: str) -> str:
    (n,) = src.read(1, f"{what} length")
    raw = src.read(n, what)
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise StreamError(f"corrupt stream: {what} at offset {src.pos - n:#x} is not ASCII: "
                          f"bytes {raw[:32].hex(' ')}") from None


# --------------------------------------------------------------------------------------
# the walker


@functools.lru_cache(maxsize=64)
def _zero_struct(n: int) -> struct.Struct:
    return struct.Struct(">" + "Qx" * n)


#: Decides, for a stream being copied, whether a page's data goes out as zeros.
ZeroPredicate = Callable[[str, int], bool]


class StreamWalker:
    """Walks one stream from its QEVM header to its end, filling a `StreamIndex`.

    With a `FileSource` and a VM description every byte is accounted for.
    With a `PipeSource` (no description yet) the walk stops after the `ram`
    END section (`stop_after_ram`), and the caller copies the rest.
    """

    def __init__(self, src: Source, index: StreamIndex, *,
                 zero_page: ZeroPredicate | None = None, stop_after_ram: bool = False,
                 progress: Callable[[int], None] | None = None, record: bool = True,
                 patches: dict[tuple[str, int], list[tuple[int, bytes]]] | None = None,
                 native: bool = True) -> None:
        self.src = src
        # The C hop (`_hop`) only indexes: a pipe, or pages to zero or patch, need the
        # record-by-record path that rewrites them.  `native=False` keeps the Python bulk
        # path everywhere (tests compare the two).
        self._native = (native and isinstance(src, FileSource) and record
                        and zero_page is None and not patches)
        self.patches = patches or {}  # (block, offset) -> [(offset in page, bytes)] (pipe)
        self.record = record  # keep every page record in the index (file mode)
        self.idx = index
        self.zero_page = zero_page
        self.stop_after_ram = stop_after_ram
        self.progress = progress
        self._ram_ids: set[int] = set()
        self._block = -1  # the block a CONTINUE record refers to (persists across sections)
        self._ignore_shared = False
        self._page_mask = DEFAULT_PAGE_SIZE - 1

    # -- top level ---------------------------------------------------------------------
    def walk_header(self) -> None:
        src = self.src
        magic = src.read(4, "QEVM magic")
        if magic != QEVM_MAGIC:
            raise StreamError(f"not a QEMU migration stream: magic {magic.hex(' ')} at offset "
                              f"{src.pos - 4:#x} (expected QEVM)")
        (version,) = struct.unpack(">I", src.read(4, "stream version"))
        if version != QEVM_VERSION:
            raise StreamError(f"unsupported migration stream version {version} (expected 3)")
        if self.idx.vmdesc is not None:
            ps = self.idx.vmdesc.get("page_size", DEFAULT_PAGE_SIZE)
            if ps not in (4096,):
                raise UnsupportedStream(f"target page size {ps}: only 4096 (x86) is supported")

    def walk(self) -> bool:
        """Walk sections; True when EOF was reached, False when stopped after RAM."""
        src = self.src
        while True:
            start = src.pos
            kind = src.read(1, "section type")[0]
            if kind == EOF:
                return True
            if kind == CONFIGURATION:
                self.configuration()
            elif kind in (SECTION_START, SECTION_FULL):
                sid, name, inst, ver = self._full_header()
                if self.stop_after_ram and self.idx.ram_done and name != RAM_SECTION:
                    # pipe mode: the rest is device state, already past the header;
                    # the caller copies it verbatim.
                    return False
                if name == RAM_SECTION and inst == 0:
                    if kind != SECTION_START:
                        raise UnsupportedStream("the `ram` section is a FULL section "
                                                "(snapshot of a non-iterative kind?)")
                    if ver != RAM_SECTION_VERSION:
                        raise UnsupportedStream(f"`ram` section version {ver} (expected 4)")
                    self._ram_ids.add(sid)
                    self._ram(setup=True)
                else:
                    self._device(kind, name, inst, sid)
                self._footer(sid)
                self.idx.sections.append(SectionInfo(kind, sid, name, inst, ver, start, src.pos))
            elif kind in (SECTION_PART, SECTION_END):
                (sid,) = struct.unpack(">I", src.read(4, "section id"))
                if sid not in self._ram_ids:
                    raise UnsupportedStream(
                        f"iterative section {sid} at offset {start:#x} is not `ram` "
                        "(block migration, dirty bitmaps or VFIO are not supported)")
                self._ram(setup=False)
                if kind == SECTION_END:
                    self.idx.ram_done = True
                self._footer(sid)
                self.idx.sections.append(SectionInfo(kind, sid, RAM_SECTION, 0, 0, start, src.pos))
            elif kind == COMMAND:
                cmd, n = struct.unpack(">HH", src.read(4, "command header"))
                if cmd == _MIG_CMD_PACKAGED:
                    raise UnsupportedStream("postcopy package in the stream (postcopy-ram)")
                src.skip(n, f"command {cmd} data")
            elif kind == FOOTER:
                raise StreamError(f"corrupt stream: section footer without a section at "
                                  f"offset {start:#x}")
            else:
                raise StreamError(f"corrupt stream: unknown section type {kind:#04x} at offset "
                                  f"{start:#x}")

    # -- sections ------------------------------------------------------------------------
    def _full_header(self) -> tuple[int, str, int, int]:
        (sid,) = struct.unpack(">I", self.src.read(4, "section id"))
        name = _read_idstr(self.src, "section name")
        inst, ver = struct.unpack(">II", self.src.read(8, "section instance/version"))
        return sid, name, inst, ver

    def _footer(self, sid: int) -> None:
        pos = self.src.pos
        marker = self.src.read(1, "section footer")[0]
        if marker != FOOTER:
            raise StreamError(f"corrupt stream: section {sid} footer expected at offset {pos:#x}, "
                              f"found byte {marker:#04x}")
        (got,) = struct.unpack(">I", self.src.read(4, "section footer id"))
        if got != sid:
            raise StreamError(f"corrupt stream: footer of section {got} at offset {pos:#x} "
                              f"closes section {sid}")

    def configuration(self) -> None:
        """The CONFIGURATION section (its type byte already read): machine type and, where
        present, the capabilities the stream was saved with (`stream_capabilities` reads
        only this)."""
        src = self.src
        (n,) = struct.unpack(">I", src.read(4, "machine name length"))
        if n > 256:
            raise StreamError(f"corrupt stream: machine name length {n}")
        self.idx.machine = src.read(n, "machine name").decode("ascii", "replace")
        desc = (self.idx.vmdesc or {}).get("configuration")
        # QEMU 7.2 has no description of this section; its optional subsections are
        # few and fixed, so read them by name.
        while src.peek() == SUBSECTION:
            src.read(1, "subsection marker")
            name = _read_idstr(src, "configuration subsection name")
            src.skip(4, "subsection version")
            if name == "configuration/target-page-bits":
                (bits,) = struct.unpack(">I", src.read(4, "target page bits"))
                if bits != 12:
                    raise UnsupportedStream(f"target page bits {bits}: only 4 KiB pages")
            elif name == "configuration/capabilities":
                (count,) = struct.unpack(">I", src.read(4, "capability count"))
                for _ in range(count):
                    self.idx.capabilities.append(_read_idstr(src, "capability"))
            elif name == "configuration/uuid":
                src.skip(16, "VM uuid")
            elif isinstance(desc, dict):
                subs = [s for s in desc.get("subsections", []) or []
                        if isinstance(s, dict) and s.get("vmsd_name") == name]
                if not subs:
                    raise StreamError(f"unknown configuration subsection {name!r}")
                _walk_struct(src, subs[0], name)
            else:
                raise UnsupportedStream(f"unknown configuration subsection {name!r}")
        caps = set(self.idx.capabilities)
        if "mapped-ram" in caps:
            if not isinstance(self.src, FileSource):
                raise UnsupportedStream("mapped-ram stream through a pipe: it needs a "
                                        "seekable file")
            self.idx.mapped_ram = True
        self._ignore_shared = "x-ignore-shared" in caps

    def _device(self, kind: int, name: str, inst: int, sid: int) -> None:
        desc = _device_desc(self.idx.vmdesc, name, inst)
        if desc is None:
            if self.idx.vmdesc is None:
                raise StreamError(f"cannot walk device section {name!r} (id {sid}) at offset "
                                  f"{self.src.pos:#x}: the stream has no VM description")
            raise StreamError(f"device section {name!r} instance {inst} is missing from the "
                              "VM description")
        if kind == SECTION_START:
            raise UnsupportedStream(f"iterative device section {name!r} is not supported")
        _walk_struct(self.src, desc, name)

    def _ram(self, setup: bool) -> None:
        """Records up to EOS; the first START record is the MEM_SIZE block list."""
        src = self.src
        idx = self.idx
        recs = idx.records
        mask = self._page_mask
        zero_page = self.zero_page
        record = self.record
        progress = self.progress
        last_report = src.pos
        while True:
            if self._block >= 0:
                if self._native and not idx.mapped_ram:
                    self._hop()
                else:
                    self._zero_run()
                    if not idx.mapped_ram:  # (there, any page record is an error: see below)
                        self._page_run()
            rec_pos = src.pos
            (word,) = struct.unpack(">Q", src.read(8, "RAM record"))
            flags = word & mask
            offset = word & ~mask
            if flags & ~_RAM_KNOWN:
                raise StreamError(f"corrupt stream: unknown RAM flags {flags:#x} at offset "
                                  f"{rec_pos:#x}")
            if flags & RAM_XBZRLE:
                raise UnsupportedStream("XBZRLE-compressed pages (capability xbzrle) at offset "
                                        f"{rec_pos:#x}: pages are deltas and cannot be scrubbed")
            if flags & RAM_COMPRESS_PAGE:
                raise UnsupportedStream("zlib-compressed pages (capability compress) at offset "
                                        f"{rec_pos:#x}")
            if flags & RAM_HOOK:
                raise UnsupportedStream(f"RDMA hook record at offset {rec_pos:#x}")
            if flags & RAM_FULL:
                raise StreamError(f"corrupt stream: obsolete RAM flag FULL at offset {rec_pos:#x}")
            if flags & RAM_MEM_SIZE:
                if not setup or idx.blocks:
                    raise StreamError(f"corrupt stream: second RAM block list at {rec_pos:#x}")
                self._block_list(offset)
                flags &= ~RAM_MEM_SIZE
            if flags & (RAM_PAGE | RAM_ZERO):
                if idx.mapped_ram:
                    raise StreamError(f"corrupt stream: page record in a mapped-ram stream at "
                                      f"offset {rec_pos:#x}")
                if (flags & RAM_PAGE) and (flags & RAM_ZERO):
                    raise StreamError(f"corrupt stream: PAGE and ZERO at offset {rec_pos:#x}")
                if flags & RAM_CONTINUE:
                    if self._block < 0:
                        raise StreamError(f"corrupt stream: CONTINUE before any block name at "
                                          f"offset {rec_pos:#x}")
                else:
                    bname = _read_idstr(src, "RAM block name")
                    bi = idx.block_index(bname)
                    if bi is None:
                        raise StreamError(f"corrupt stream: page of unknown RAM block {bname!r} "
                                          f"at offset {rec_pos:#x}")
                    self._block = bi
                block = idx.blocks[self._block]
                if offset >= block.length:
                    raise StreamError(f"corrupt stream: page {offset:#x} beyond the end of "
                                      f"{block.name} ({block.length:#x}) at offset {rec_pos:#x}")
                page = offset // DEFAULT_PAGE_SIZE
                if flags & RAM_PAGE:
                    if record:
                        recs.append(self._block, page, src.pos, KIND_PAGE)
                    zero = zero_page is not None and zero_page(block.name, offset)
                    if zero:
                        idx.zeroed_pages += 1
                    patch = self.patches.get((block.name, offset)) if self.patches else None
                    if patch is not None and not zero:
                        src.page_patch(DEFAULT_PAGE_SIZE, patch)
                        idx.patched_pages += 1
                    else:
                        src.page(DEFAULT_PAGE_SIZE, zero)
                else:
                    if record:
                        recs.append(self._block, page, src.pos, KIND_ZERO)
                    pos = src.pos
                    fill = src.read(1, "zero-page fill byte")[0]
                    if fill and zero_page is not None and zero_page(block.name, offset):
                        raise StreamError(f"zero-page record with fill byte {fill:#04x} for a "
                                          f"listed page at offset {pos:#x}")
            elif flags & RAM_CONTINUE:
                raise StreamError(f"corrupt stream: CONTINUE without a page at {rec_pos:#x}")
            if flags & RAM_EOS:
                if flags & ~(RAM_EOS | RAM_MULTIFD_FLUSH):
                    raise StreamError(f"corrupt stream: EOS with flags {flags:#x} at {rec_pos:#x}")
                return
            if progress is not None and src.pos - last_report >= (64 << 20):
                last_report = src.pos
                progress(src.pos)

    def _hop(self) -> None:
        """The C bulk path (file mode, indexing only): hop over the PAGE|CONTINUE and
        zero-fill ZERO|CONTINUE records of the current block, reading only their 8-byte
        headers.  It stops at the first record it does not accept (another kind, another
        block, out of range, truncated), which the record-by-record code below then reads
        and, if it is wrong, names."""
        src = self.src
        assert isinstance(src, FileSource)
        end, pages, positions, kinds = _ramwalk.ram_run(
            src.mm, src.pos, min(src.limit, src.pos + _HOP_CHUNK),
            self.idx.blocks[self._block].length)
        if not kinds:
            return
        recs = self.idx.records
        recs.block.extend(array("H", [self._block]) * len(kinds))
        recs.page.frombytes(pages)
        recs.pos.frombytes(positions)
        recs.kind.frombytes(kinds)
        src.pos = end

    def _zero_run(self) -> None:
        """The bulk path for runs of ZERO|CONTINUE records of the current block.

        One `struct.unpack` decodes a whole run; checks and bookkeeping are the
        same as record by record (a zero fill needs no scrubbing).
        """
        start, run = self.src.zero_run()
        if not run:
            return
        n = len(run) // _ZERO_REC
        words = _zero_struct(n).unpack(run)
        self._run_records(start, words, _ZERO_REC, KIND_ZERO)

    def _run_records(self, start: int, words: Sequence[int], stride: int, kind: int) -> None:
        """Check and index a run of same-kind records of the current block at `start`."""
        block = self.idx.blocks[self._block]
        pages = list(map(rshift, words, repeat(12)))
        if max(pages) * DEFAULT_PAGE_SIZE >= block.length:
            bad = next(p for p in pages if p * DEFAULT_PAGE_SIZE >= block.length)
            raise StreamError(f"corrupt stream: page {bad * DEFAULT_PAGE_SIZE:#x} beyond the end "
                              f"of {block.name} ({block.length:#x}) near offset {start:#x}")
        if self.record:
            n = len(pages)
            recs = self.idx.records
            recs.block.extend([self._block] * n)
            recs.page.extend(pages)
            recs.pos.extend(range(start + 8, start + 8 + n * stride, stride))
            recs.kind.extend([kind] * n)

    def _page_run(self) -> None:
        """The bulk path for runs of PAGE|CONTINUE records of the current block, with
        the same checks and bookkeeping as one by one.  A page to zero or patch (pipe
        mode) ends the run: the record-by-record path rewrites it."""
        src = self.src
        start = src.pos
        words = src.page_run()
        if not words:
            return
        mask = self._page_mask
        zero_page, patches = self.zero_page, self.patches
        if zero_page is not None or patches:
            name = self.idx.blocks[self._block].name
            for i, w in enumerate(words):
                off = w & ~mask
                if (zero_page is not None and zero_page(name, off)) or (name, off) in patches:
                    words = words[:i]
                    break
            if not words:
                return
        self._run_records(start, words, _PAGE_REC, KIND_PAGE)
        src.skip(len(words) * _PAGE_REC, "page records")

    def _mapped_block(self, bi: int, name: str, length: int) -> None:
        """MappedRamHeader (be32 version 1, be64 page size, bitmap and pages offsets).

        QEMU then continues the stream after the block's page area, so the walk
        jumps there; the offsets must be exactly where QEMU's rule puts them.
        """
        src = self.src
        assert isinstance(src, FileSource)
        at = src.pos
        version, psize, bitmap, pages = struct.unpack(
            ">IQQQ", src.read(28, f"mapped-ram header of {name}"))
        if version != 1 or psize != DEFAULT_PAGE_SIZE:
            raise UnsupportedStream(f"mapped-ram header of {name}: version {version}, "
                                    f"page size {psize}")
        if bitmap == 0 and pages == 0:  # a shared block skipped by x-ignore-shared
            self.idx.mapped[bi] = (0, 0)
            return
        npages = length // DEFAULT_PAGE_SIZE
        bitmap_size = (npages + 63) // 64 * 8
        expect_pages = -(-(bitmap + bitmap_size) // MAPPED_RAM_ALIGN) * MAPPED_RAM_ALIGN
        if bitmap != at + 28 or pages != expect_pages:
            raise StreamError(f"corrupt stream: mapped-ram offsets of {name} at {at:#x}: "
                              f"bitmap {bitmap:#x}, pages {pages:#x}")
        self.idx.mapped[bi] = (bitmap, pages)
        src.pos = pages
        src.skip(length, f"mapped-ram pages of {name}")

    def _block_list(self, total: int) -> None:
        src = self.src
        seen = 0
        while seen < total:
            name = _read_idstr(src, "RAM block name")
            (length,) = struct.unpack(">Q", src.read(8, f"length of {name}"))
            if length == 0 or length % DEFAULT_PAGE_SIZE:
                raise StreamError(f"corrupt stream: RAM block {name!r} length {length:#x}")
            if self._ignore_shared:
                src.skip(8, f"address of {name}")
            if self.idx.block_index(name) is not None:
                raise StreamError(f"corrupt stream: RAM block {name!r} listed twice")
            self.idx.blocks.append(RamBlock(name, length))
            if self.idx.mapped_ram:
                self._mapped_block(len(self.idx.blocks) - 1, name, length)
            seen += length
            if len(self.idx.blocks) > 4096:
                raise StreamError("corrupt stream: more than 4096 RAM blocks")
        if seen != total:
            raise StreamError(f"corrupt stream: RAM block lengths sum to {seen:#x}, "
                              f"the header says {total:#x}")


# --------------------------------------------------------------------------------------
# entry points


def index_stream(mm: mmap.mmap | bytes, start: int = 0, end: int | None = None, *,
                 trailing_zeros_ok: bool = False,
                 progress: Callable[[int], None] | None = None,
                 native: bool = True) -> StreamIndex:
    """Walk the whole stream in `mm[start:end]`; every byte must be accounted for.

    `trailing_zeros_ok` accepts zero padding after the stream (libvirt pads
    images written with O_DIRECT).  Raises `StreamError` naming the offset of
    the first thing that is wrong.  `native=False` walks the RAM records in
    Python only (tests check the C hop against it).
    """
    end = len(mm) if end is None else end
    if end - start < 8:
        raise StreamError(f"not a QEMU migration stream: only {end - start} bytes")
    if bytes(mm[start:start + 4]) != QEVM_MAGIC:
        raise StreamError(f"not a QEMU migration stream: magic "
                          f"{bytes(mm[start:start + 4]).hex(' ')} at offset {start:#x} "
                          "(expected QEVM)")
    try:
        return _index_stream(mm, start, end, trailing_zeros_ok, progress, native)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError,
            struct.error) as e:
        # A description or record that parses but makes no sense (a forged or damaged
        # file): still one clear line, never a traceback.
        raise StreamError(f"corrupt stream: {type(e).__name__}: {e}") from None


def _last_nonzero_end(mm: mmap.mmap | bytes, start: int, end: int) -> int:
    """Offset just after the last non-zero byte of mm[start:end] (start if all zero)."""
    pos = end
    step = 1 << 20
    while pos > start:
        lo = max(start, pos - step)
        chunk = bytes(mm[lo:pos]).rstrip(b"\0")
        if chunk:
            return lo + len(chunk)
        pos = lo
    return start


def _index_stream(mm: mmap.mmap | bytes, start: int, end: int, trailing_zeros_ok: bool,
                  progress: Callable[[int], None] | None, native: bool = True) -> StreamIndex:
    idx = StreamIndex(start=start)
    stream_end = end
    found = find_vmdesc(mm, start, end)
    if found is None and trailing_zeros_ok:
        # zero padding after the stream (libvirt, O_DIRECT): the JSON ends in '}', so
        # the stream ends right after the last non-zero byte
        stripped = _last_nonzero_end(mm, start, end)
        found = find_vmdesc(mm, start, stripped)
        if found is not None:
            stream_end = stripped
    if found is None:
        # Without the description device state cannot be walked, and the end of the
        # file is not a stream's end: truncated, or written with suppress-vmdesc.
        raise StreamError("truncated or foreign stream: no VM description at its end "
                          "(a complete QEMU save ends with EOF and the JSON VM description)")
    idx.vmdesc_offset, idx.vmdesc = found
    # the EOF byte is the last thing before the description
    src = FileSource(mm, start, found[0])
    walker = StreamWalker(src, idx, progress=progress, native=native)
    walker.walk_header()
    if not walker.walk():
        raise StreamError("internal: walk stopped early")  # pragma: no cover
    if src.pos != found[0]:
        raise StreamError(f"corrupt stream: EOF at offset {src.pos - 1:#x} but the VM "
                          f"description starts at {found[0]:#x}")
    if not idx.ram_done:
        raise StreamError("incomplete stream: the `ram` section never ended")
    idx.end = stream_end
    return idx


def open_mapped(path: str) -> tuple[int, mmap.mmap | bytes]:
    """Open and map a file read-only.  An empty file maps as b''."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return fd, b""
        return fd, mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise


def copies(idx: StreamIndex, wanted: set[tuple[int, int]]) -> Iterator[tuple[int, int, int, int]]:
    """(block index, page number, data offset, kind) of every record of a wanted page.

    A large save has millions of records and a table thousands of pages: each
    record's (block, page) becomes one integer key, looked up in C against the
    sorted wanted keys (`_ramwalk.select`), so Python only runs for the hits.
    """
    r = idx.records
    if not wanted or not len(r):
        return
    keys = array("Q", sorted({b << _KEY_SHIFT | p for b, p in wanted}))
    hits = array("Q")
    hits.frombytes(_ramwalk.select(r.block, r.page, keys))
    for i in hits:
        yield r.block[i], r.page[i], r.pos[i], r.kind[i]


def filter_stream(fd: int, sink: BinaryIO, zero_page: ZeroPredicate,
                  progress: Callable[[int], None] | None = None,
                  patches: dict[tuple[str, int], list[tuple[int, bytes]]] | None = None
                  ) -> StreamIndex:
    """Copy a stream from `fd` to `sink`, writing listed pages as zeros.

    RAM records are parsed and rewritten; after the `ram` END section the
    remaining device state is copied verbatim (see the module docstring).
    `patches` maps (block, page offset) to [(offset in the page, bytes)] written
    over every copy of that page (the vmwipe header's host fields, fill ranges).
    """
    src = PipeSource(fd, sink, progress)
    idx = StreamIndex(start=0)
    walker = StreamWalker(src, idx, zero_page=zero_page, stop_after_ram=True, progress=progress,
                          record=False, patches=patches)
    try:
        walker.walk_header()
        walker.walk()
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error) as e:
        raise StreamError(f"corrupt stream: {type(e).__name__}: {e}") from None
    if not idx.ram_done:
        raise StreamError("stream ended before the `ram` section did")
    src.passthrough()  # device state and/or the VM description
    idx.end = src.pos
    return idx


def stream_capabilities(path: str) -> tuple[str, list[str]]:
    """(machine type, capabilities) from the CONFIGURATION section at the start of a save.

    A restore must enable the same `mapped-ram` capability as the save before
    `migrate-incoming file:`; this reads only the first few hundred bytes (a
    libvirt image's header is skipped).
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    start = 0
    if head[:len(SAVE_IMAGE_MAGIC)] == SAVE_IMAGE_MAGIC:
        start = parse_header(head[:SAVE_IMAGE_HEADER_SIZE]).stream_offset
        with open(path, "rb") as f:
            f.seek(start)
            head = f.read(1 << 16)
    src = FileSource(head)
    idx = StreamIndex(start=start)
    walker = StreamWalker(src, idx)
    walker.walk_header()
    if src.peek() == CONFIGURATION:
        src.read(1, "section type")
        with contextlib.suppress(UnsupportedStream):
            walker.configuration()
    return idx.machine, idx.capabilities
