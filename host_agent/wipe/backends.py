"""Read and zero guest RAM from outside QEMU, behind one small interface.

No QMP or HMP command writes guest memory, so the agent writes it directly:

- `ProcessVMBackend` (default): `process_vm_readv`/`process_vm_writev` on the
  QEMU PID, up to IOV_MAX (1024) iovecs per call, all pointing at one shared
  zero buffer.  Works for any RAM backing; needs ptrace rights over QEMU (root,
  or the same uid without Yama restrictions).
- `SharedFileBackend`: for RAM blocks backed by `memory-backend-memfd`/`-file`
  with `share=on`, maps the same file MAP_SHARED (optionally pre-populated) and
  memsets/memcmps through the mapping (one call into `_pages.c` for all
  pieces).  Needs only access to QEMU's fds, and is the fastest path once the
  mapping is populated.

Both take guest-physical spans and split them at RAM-range boundaries with the
`GuestMemoryMap`; neither ever touches an address the map does not list.
Partial transfers are resumed at the exact byte; a call that makes no progress
is an error naming the guest address.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import re
import signal
from abc import ABC, abstractmethod
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import add
from typing import Any, overload

from ..errors import MemoryAccessError
from . import _pages
from .memmap import GuestMemoryMap

log = logging.getLogger(__name__)

IOV_MAX = 1024
ZERO_CHUNK = 1 << 20  # size of the shared zero buffer and of each zeroing iovec
READ_CHUNK = 1 << 20  # verification reads this much at a time (stays in cache for the memcmp)

Span = tuple[int, int]  # (guest-physical address, size in bytes)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_IOV_ARRAY = _IOVec * IOV_MAX
_SYSCALL_ARGS: list[Any] = [
    ctypes.c_int,
    ctypes.POINTER(_IOVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IOVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]
_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = _SYSCALL_ARGS
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_writev = _libc.process_vm_writev
_process_vm_writev.argtypes = _SYSCALL_ARGS
_process_vm_writev.restype = ctypes.c_ssize_t


Piece = tuple[int, int, int]  # (guest-physical address, size, host virtual address in QEMU)


class Pieces:
    """Resolved pieces as three parallel `array('Q')` columns: gpa, size, QEMU host address.

    A full table is 65,280 pieces; columns let the backends build iovecs and
    check batches with C-speed array operations instead of a tuple per page.
    Iterating yields `Piece` tuples, for code that wants them one by one.
    """

    __slots__ = ("gpas", "hvas", "local", "sizes")

    def __init__(self) -> None:
        self.gpas: array[int] = array("Q")
        self.sizes: array[int] = array("Q")
        self.hvas: array[int] = array("Q")
        #: (backend, its addresses for these pieces): the shared backend's zero and
        #: verify passes translate a full table once, not once per pass
        self.local: tuple[object, array[int]] | None = None

    def append(self, gpa: int, size: int, hva: int) -> None:
        self.local = None
        self.gpas.append(gpa)
        self.sizes.append(size)
        self.hvas.append(hva)

    def extend(self, other: Pieces) -> None:
        self.local = None
        self.gpas.extend(other.gpas)
        self.sizes.extend(other.sizes)
        self.hvas.extend(other.hvas)

    def __len__(self) -> int:
        return len(self.gpas)

    def __iter__(self) -> Iterator[Piece]:
        return zip(self.gpas, self.sizes, self.hvas, strict=True)

    @overload
    def __getitem__(self, i: int) -> Piece: ...
    @overload
    def __getitem__(self, i: slice) -> Pieces: ...
    def __getitem__(self, i: int | slice) -> Piece | Pieces:
        if isinstance(i, slice):
            out = Pieces()
            out.gpas, out.sizes, out.hvas = self.gpas[i], self.sizes[i], self.hvas[i]
            return out  # (no `local`: it belongs to the whole)
        return self.gpas[i], self.sizes[i], self.hvas[i]


class MemoryBackend(ABC):
    """Guest RAM access by guest-physical address.  `name` says which backend it is.

    Public calls take guest-physical spans; they are cut at RAM-range
    boundaries (and into chunks of at most `max_piece` bytes) into pieces
    that each lie inside one RAM range, with the QEMU host address resolved.
    Subclasses move bytes for pieces, many per call where they can.
    """

    name = "abstract"
    #: Largest piece `zero_pieces` takes (process_vm: the size of its zero buffer).
    max_piece = ZERO_CHUNK

    def __init__(self, memmap: GuestMemoryMap) -> None:
        self.memmap = memmap

    def follow(self, memmap: GuestMemoryMap) -> bool:
        """Use `memmap` (the flat view after a load) from now on, if this backend covers it.

        What a backend holds on the host side is per RAM block: process_vm needs only
        the PID, the shared backend mirrors QEMU's mappings of whole blocks, and a load
        moves neither.  So a new view over the same blocks is all that changes; a view
        naming a block this backend was not opened for gives False and changes nothing.
        """
        if not set(memmap.blocks()) <= set(self.memmap.blocks()):
            return False
        self.memmap = memmap
        return True

    @abstractmethod
    def _read_pieces(self, pieces: Pieces, dst: int) -> None:
        """Copy the pieces, back to back, to local address `dst`."""

    @abstractmethod
    def _write_pieces(self, pieces: Pieces, src: int) -> None:
        """Copy back-to-back bytes at local address `src` into the pieces."""

    @abstractmethod
    def _zero_pieces(self, pieces: Pieces) -> None:
        """Zero the pieces (each at most `max_piece` bytes)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release mappings; the backend is unusable afterwards."""

    def __enter__(self) -> MemoryBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pieces(self, spans: Iterable[Span], max_piece: int | None = None) -> Pieces:
        """Resolve spans into pieces; MemoryAccessError if any byte is not guest RAM."""
        out = Pieces()
        append = out.append
        split = self.memmap.split
        for gpa, size in spans:
            for pgpa, n, r in split(gpa, size):
                if r.hva is None:
                    raise MemoryAccessError(f"no host address for guest address {pgpa:#x}")
                hva = r.hva + (pgpa - r.gpa)
                if max_piece is None or n <= max_piece:
                    append(pgpa, n, hva)
                    continue
                for off in range(0, n, max_piece):
                    append(pgpa + off, min(max_piece, n - off), hva + off)
        return out

    def pieces_of_sorted(
        self, starts: Sequence[int], sizes: Sequence[int], max_piece: int
    ) -> Pieces:
        """`pieces` for sorted, disjoint spans given as columns, in bulk per RAM range.

        The spans that lie wholly inside one RAM range and fit in `max_piece`
        (all of them, for a table of single pages) are resolved with one slice
        and one `map(add)` per RAM range; any other span (crossing a range
        boundary, larger than a chunk, or not RAM at all) goes through `pieces`.
        """
        out = Pieces()
        done = 0
        for r in self.memmap.ranges:
            lo = max(done, bisect_left(starts, r.gpa, done))
            hi = bisect_left(starts, r.end, lo)
            if hi > lo and starts[hi - 1] + sizes[hi - 1] > r.end:
                hi -= 1  # disjoint and sorted: only the last one can run past the range
            if lo > done:
                rest = zip(starts[done:lo], sizes[done:lo], strict=True)
                out.extend(self.pieces(rest, max_piece))
            if hi > lo:
                part_starts, part_sizes = starts[lo:hi], sizes[lo:hi]
                if r.hva is None or (r.size > max_piece and max(part_sizes) > max_piece):
                    out.extend(self.pieces(zip(part_starts, part_sizes, strict=True), max_piece))
                else:
                    out.gpas.extend(part_starts)
                    out.sizes.extend(part_sizes)
                    out.hvas.extend(map(add, part_starts, repeat(r.hva - r.gpa)))
            done = max(done, hi)
        if done < len(starts):
            out.extend(self.pieces(zip(starts[done:], sizes[done:], strict=True), max_piece))
        return out

    def read(self, gpa: int, size: int) -> bytes:
        """Read `size` bytes of guest RAM at `gpa` (may cross RAM-range boundaries)."""
        buf = bytearray(size)
        self.read_into(gpa, buf)
        return bytes(buf)

    def read_into(self, gpa: int, buf: bytearray) -> None:
        """`read` into a caller's buffer: the engine reads the whole region this way,
        without a second 1 MiB copy inside the paused window."""
        if buf:
            self._read_pieces(self.pieces([(gpa, len(buf))]), buffer_address(memoryview(buf)))

    def write(self, gpa: int, data: bytes) -> None:
        """Write `data` at `gpa`; used for the 16 host-field bytes and by tests to plant tables."""
        if data:
            view = memoryview(data)
            self._write_pieces(self.pieces([(gpa, len(data))]), buffer_address(view))

    def write_spans(self, spans: Sequence[Span], data: bytes) -> None:
        """Write `data` back to back into `spans` in one batch: the fill ranges, a few
        dozen bytes each, cost one call, not one per range."""
        if len(data) != sum(n for _g, n in spans):
            raise ValueError("data does not match the spans' total size")
        if data:
            self._write_pieces(self.pieces(spans), buffer_address(memoryview(data)))

    def read_spans(self, spans: Sequence[Span]) -> bytes:
        """The bytes of `spans`, back to back, in one batch (verifies `write_spans`)."""
        buf = bytearray(sum(n for _g, n in spans))
        if buf:
            self._read_pieces(self.pieces(spans), buffer_address(memoryview(buf)))
        return bytes(buf)

    def zero(self, spans: Sequence[Span]) -> None:
        """Zero every byte of `spans` (guest-physical), in as few calls as the backend allows.

        The span-level API: the engine resolves pieces once for both passes
        (`zero_pieces`), while tests and benchmarks drive a backend through this.
        """
        self._zero_pieces(self.pieces(spans, self.max_piece))

    def zero_pieces(self, pieces: Pieces) -> None:
        """Zero pieces made with `max_piece` (the engine resolves once for both passes)."""
        self._zero_pieces(pieces)

    def first_nonzero(self, spans: Sequence[Span]) -> int | None:
        """Guest address of the first non-zero byte in `spans`, or None if all zero.

        Reads in batches of up to READ_CHUNK bytes / IOV_MAX pieces and
        compares with memcmp against a zero buffer.  Span-level, like `zero`:
        the fault tests check a wipe's result through it.
        """
        return self.first_nonzero_pieces(self.pieces(spans, READ_CHUNK))

    def first_nonzero_pieces(self, pieces: Pieces) -> int | None:
        """`first_nonzero` on resolved pieces (each at most READ_CHUNK bytes).

        Batch boundaries come from the running total of the sizes, so the
        Python work is per batch (up to IOV_MAX pieces), not per piece.
        """
        if not len(pieces):
            return None
        if max(pieces.sizes) > READ_CHUNK:
            raise ValueError(f"pieces to verify must be at most {READ_CHUNK} bytes")
        ends = list(accumulate(pieces.sizes))
        buf = bytearray(min(READ_CHUNK, ends[-1]))
        addr = buffer_address(memoryview(buf))
        i, done = 0, 0
        while i < len(ends):
            j = min(i + IOV_MAX, max(i + 1, bisect_right(ends, done + len(buf), i)))
            bad = self._check_batch(pieces[i:j], ends[j - 1] - done, buf, addr)
            if bad is not None:
                return bad
            i, done = j, ends[j - 1]
        return None

    def _check_batch(self, batch: Pieces, total: int, buf: bytearray, addr: int) -> int | None:
        self._read_pieces(batch, addr)
        if _memcmp(addr, _ZERO_READ_ADDR, total) == 0:
            return None
        off = 0
        for gpa, n, _hva in batch:
            chunk = buf[off : off + n]
            if chunk.count(0) != n:
                return gpa + next(i for i, b in enumerate(chunk) if b)
            off += n
        raise AssertionError("unreachable: memcmp saw a non-zero byte")  # pragma: no cover


_ZERO = bytes(ZERO_CHUNK)
_ZERO_READ = bytes(READ_CHUNK)
_memcmp = _libc.memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int


def _os_error(op: str, err: int, pid: int, gpa: int) -> MemoryAccessError:
    if err == errno.EPERM:
        why = f"not permitted to access QEMU pid {pid} (need root or QEMU's uid, no Yama)"
    elif err == errno.ESRCH:
        why = f"QEMU pid {pid} is gone"
    elif err == errno.EFAULT:
        why = f"guest address {gpa:#x} is not mapped in QEMU pid {pid}"
    else:
        why = f"{os.strerror(err)} at guest address {gpa:#x}"
    return MemoryAccessError(f"{op}: {why}")


class HeldProcess:
    """A pidfd on QEMU, so that a PID is only ever used while it still names that process.

    process_vm_writev takes a PID, and a PID is reused once its process has exited and
    been reaped: root would then write zeros into whatever process got it.  A pidfd
    stays bound to the process it was opened for.  While that process is alive its PID
    cannot be reused, so a check before each syscall and one after the last prove that
    every write went to QEMU; a death in between is reported, never passed over.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.fd: int | None = os.pidfd_open(pid)
        except OSError as e:
            raise _os_error("pidfd_open", e.errno or errno.ESRCH, pid, 0) from None

    def check(self) -> None:
        """Raise MemoryAccessError unless the process this handle was opened for is alive."""
        if self.fd is None:
            raise MemoryAccessError(f"QEMU pid {self.pid}: the process handle is closed")
        try:
            signal.pidfd_send_signal(self.fd, 0)
        except ProcessLookupError:
            raise MemoryAccessError(f"QEMU pid {self.pid} exited; its PID may name another "
                                    "process now, so nothing more is written") from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ProcessVMBackend(MemoryBackend):
    """process_vm_readv/writev on the QEMU process (the default backend)."""

    name = "process_vm"

    def __init__(self, memmap: GuestMemoryMap, pid: int) -> None:
        super().__init__(memmap)
        self.pid = pid
        self.process = HeldProcess(pid)
        self.calls = 0  # syscalls issued, for reports and tests

    def close(self) -> None:
        self.process.close()

    def probe(self) -> None:
        """Raise MemoryAccessError if this process cannot read QEMU's RAM."""
        first = self.memmap.ranges[0]
        self.read(first.gpa, 1)

    def _transfer(self, write: bool, local: array[int], pieces: Pieces) -> None:
        """Move pieces[k] to/from local address local[k], resuming partial transfers exactly.

        One syscall carries up to IOV_MAX iovec pairs.  A short return (the
        kernel stops at the first fault, even mid-iovec) restarts at the exact
        byte; a call that moves nothing is an error naming the guest address.
        The iovec arrays are built once, in bulk, for every piece.
        """
        fn = _process_vm_writev if write else _process_vm_readv
        op = "process_vm_writev" if write else "process_vm_readv"
        count = len(pieces)
        sizes = pieces.sizes
        lflat = array("Q", bytes(16 * count))
        rflat = array("Q", bytes(16 * count))
        lflat[0::2] = local
        lflat[1::2] = sizes
        rflat[0::2] = pieces.hvas
        rflat[1::2] = sizes
        iov_max = IOV_MAX
        i = 0
        skip = 0  # bytes of pieces[i] already moved by a partial transfer
        while i < count:
            n_iov = min(iov_max, count - i)
            lv = lflat[2 * i : 2 * (i + n_iov)]
            rv = rflat[2 * i : 2 * (i + n_iov)]
            if skip:
                lv[0] += skip
                lv[1] -= skip
                rv[0] += skip
                rv[1] -= skip
            total = sum(rv[1::2])
            liov = (_IOVec * n_iov).from_buffer(lv)
            riov = (_IOVec * n_iov).from_buffer(rv)
            self.process.check()  # also the check after the previous call
            got = fn(self.pid, liov, n_iov, riov, n_iov, 0)
            self.calls += 1
            if got <= 0:
                err = ctypes.get_errno() if got < 0 else errno.EFAULT
                raise _os_error(op, err, self.pid, pieces.gpas[i] + skip)
            if got == total:
                i += n_iov
                skip = 0
                continue
            log.debug("%s: partial transfer %d of %d bytes", op, got, total)
            left = got
            while left:
                n = sizes[i] - skip
                if left >= n:
                    left -= n
                    i += 1
                    skip = 0
                else:
                    skip += left
                    left = 0
        self.process.check()  # the last call, too, reached QEMU

    def _read_pieces(self, pieces: Pieces, dst: int) -> None:
        self._transfer(False, _offsets(dst, pieces), pieces)

    def _write_pieces(self, pieces: Pieces, src: int) -> None:
        self._transfer(True, _offsets(src, pieces), pieces)

    def _zero_pieces(self, pieces: Pieces) -> None:
        self._transfer(True, array("Q", [_ZERO_ADDR]) * len(pieces), pieces)


def _offsets(base: int, pieces: Pieces) -> array[int]:
    """Back-to-back local addresses for the pieces, starting at `base`."""
    return array("Q", accumulate(pieces.sizes[:-1], initial=base))


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def buffer_address(view: memoryview) -> int:
    """Address of the first byte of a C-contiguous buffer (read-only ones too).

    The caller keeps `view` (and so its object) alive while the address is used.
    """
    if not view.c_contiguous:
        raise ValueError("buffer must be contiguous")
    buf = _PyBuffer()
    if _get_buffer(view, ctypes.byref(buf), 0) != 0:  # PyBUF_SIMPLE
        raise MemoryAccessError("cannot take the address of a Python buffer")
    try:
        return int(buf.buf or 0)
    finally:
        _release_buffer(ctypes.byref(buf))


_ZERO_ADDR = buffer_address(memoryview(_ZERO))
_ZERO_READ_ADDR = buffer_address(memoryview(_ZERO_READ))


# --- shared file / memfd backend -----------------------------------------------------

_MAPS_RE = re.compile(
    r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) (?P<perms>\S+) (?P<off>[0-9a-f]+) "
    r"(?P<dev>[0-9a-f]+:[0-9a-f]+) (?P<inode>\d+)\s*(?P<path>.*)$"
)


@dataclass(frozen=True)
class ProcMapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: tuple[int, int]
    inode: int
    path: str


def read_proc_maps(pid: int, inode: int | None = None) -> list[ProcMapping]:
    """Parse /proc/PID/maps; MemoryAccessError if it cannot be read.

    With `inode`, only the mappings of files with that inode number: QEMU has
    hundreds of mappings, and a clone's start-up needs the one file's.
    """
    try:
        with open(f"/proc/{pid}/maps") as f:
            text = f.read()
    except OSError as e:
        raise MemoryAccessError(f"cannot read /proc/{pid}/maps: {e.strerror}") from None
    out = []
    needle = f" {inode} " if inode is not None else ""
    for line in text.splitlines():
        if needle not in line:
            continue
        m = _MAPS_RE.match(line)
        if m and (inode is None or int(m["inode"]) == inode):
            major, minor = (int(x, 16) for x in m["dev"].split(":"))
            out.append(
                ProcMapping(
                    int(m["start"], 16),
                    int(m["end"], 16),
                    m["perms"],
                    int(m["off"], 16),
                    (major, minor),
                    int(m["inode"]),
                    m["path"],
                )
            )
    return out


def _open_mapping_file(pid: int, mp: ProcMapping) -> int:
    """Open the file behind a QEMU mapping: its fd in /proc/PID/fd, else map_files."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError as e:
        names = []
        log.debug("cannot list %s: %s", fd_dir, e)
    for name in names:
        path = f"{fd_dir}/{name}"
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_ino == mp.inode and (os.major(st.st_dev), os.minor(st.st_dev)) == mp.dev:
            try:
                return os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                log.debug("cannot reopen %s: %s", path, e)
    mf = f"/proc/{pid}/map_files/{mp.start:x}-{mp.end:x}"
    try:
        return os.open(mf, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MemoryAccessError(
            f"cannot open the file behind QEMU's RAM mapping {mp.path!r} "
            f"(via {fd_dir} or {mf}: {e.strerror}; need root or QEMU's uid)"
        ) from None


class SharedFileBackend(MemoryBackend):
    """Writes through our own MAP_SHARED mapping of QEMU's memfd/file RAM blocks."""

    name = "shared"
    #: One memset per contiguous range: for large ones the C library then streams
    #: past the cache, faster than 1 MiB pieces (benchmarks/bench_backends.py).
    max_piece = 1 << 62

    def __init__(
        self,
        memmap: GuestMemoryMap,
        pid: int,
        shared_blocks: Mapping[str, bool],
        populate: bool = False,
    ) -> None:
        super().__init__(memmap)
        self.pid = pid
        self.populate = populate
        self._maps: list[tuple[int, int, mmap.mmap]] = []  # (QEMU start, QEMU end, mapping)
        self._addrs: list[tuple[int, int, int]] = []  # (QEMU start, QEMU end, our address)
        self._exports: list[object] = []
        try:
            self._setup(shared_blocks)
        except BaseException:
            self.close()
            raise

    def _setup(self, shared_blocks: Mapping[str, bool]) -> None:
        for block in self.memmap.blocks():
            if not shared_blocks.get(block, False):
                raise MemoryAccessError(
                    f"RAM block {block!r} is not shared (needs memory-backend-memfd/file share=on)"
                )
        procmaps = read_proc_maps(self.pid)
        needed: dict[int, ProcMapping] = {}
        for r in self.memmap.ranges:
            assert r.hva is not None
            mp = next((m for m in procmaps if m.start <= r.hva and r.hva + r.size <= m.end), None)
            if mp is None or mp.inode == 0:
                raise MemoryAccessError(
                    f"RAM block {r.block!r} at host {r.hva:#x} is not a file mapping in QEMU"
                )
            if "s" not in mp.perms:
                raise MemoryAccessError(f"QEMU maps RAM block {r.block!r} private, not shared")
            needed[mp.start] = mp
        flags = mmap.MAP_SHARED
        for mp in needed.values():
            fd = _open_mapping_file(self.pid, mp)
            try:
                mm = mmap.mmap(
                    fd,
                    mp.end - mp.start,
                    flags=flags,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=mp.offset,
                )
            except OSError as e:
                raise MemoryAccessError(f"cannot mmap {mp.path!r}: {e.strerror}") from None
            finally:
                os.close(fd)
            self._maps.append((mp.start, mp.end, mm))
            export = ctypes.c_char.from_buffer(mm)
            self._exports.append(export)
            self._addrs.append((mp.start, mp.end, ctypes.addressof(export)))
            if self.populate:
                _populate(ctypes.addressof(export), mp.end - mp.start, mp.path)

    def _local(self, piece: Piece) -> int:
        """Our address for a piece (it lies inside one QEMU mapping we mirrored)."""
        gpa, n, hva = piece
        for start, end, base in self._addrs:
            if start <= hva and hva + n <= end:
                return base + (hva - start)
        raise MemoryAccessError(f"guest address {gpa:#x} is outside the shared mappings")

    def _locals(self, pieces: Pieces) -> array[int]:
        """Our addresses for the pieces: one `map(add)` when one mapping holds them all."""
        if pieces.local is not None and pieces.local[0] is self:
            return pieces.local[1]
        local: array[int] | None = None
        if len(pieces):
            lo, hi = min(pieces.hvas), max(map(add, pieces.hvas, pieces.sizes))
            for start, end, base in self._addrs:
                if start <= lo and hi <= end:
                    local = array("Q", map(add, pieces.hvas, repeat(base - start)))
                    break
        if local is None:
            local = array("Q", map(self._local, pieces))
        pieces.local = (self, local)
        return local

    def _read_pieces(self, pieces: Pieces, dst: int) -> None:
        for addr, n in zip(self._locals(pieces), pieces.sizes, strict=True):
            ctypes.memmove(dst, addr, n)
            dst += n

    def _write_pieces(self, pieces: Pieces, src: int) -> None:
        for addr, n in zip(self._locals(pieces), pieces.sizes, strict=True):
            ctypes.memmove(addr, src, n)
            src += n

    def _zero_pieces(self, pieces: Pieces) -> None:
        _pages.zero(self._locals(pieces), pieces.sizes)

    def first_nonzero_pieces(self, pieces: Pieces) -> int | None:
        """memcmp straight against the shared mapping: no copy, one C call for all pieces."""
        local = self._locals(pieces)
        k = _pages.first_nonzero(local, pieces.sizes)
        if k < 0:
            return None
        chunk = ctypes.string_at(local[k], pieces.sizes[k])
        return pieces.gpas[k] + next(i for i, b in enumerate(chunk) if b)

    def close(self) -> None:
        self._addrs = []
        self._exports = []  # release the buffer exports before closing the mappings
        for _s, _e, mm in self._maps:
            mm.close()
        self._maps = []


MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int


def _populate(addr: int, length: int, what: str) -> None:
    """Fault the whole mapping in now, as MAP_POPULATE would.

    madvise(MADV_POPULATE_WRITE) (Linux 5.14+) through ctypes runs without
    the GIL, so a prefetch thread can populate while the main thread keeps
    talking to QEMU.  On older kernels the mapping just stays lazy.
    """
    for advice in (MADV_POPULATE_WRITE, MADV_POPULATE_READ):
        if _madvise(addr, length, advice) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            raise MemoryAccessError(f"cannot populate the mapping of {what!r}: {os.strerror(err)}")
    log.info("kernel lacks MADV_POPULATE_*; mapping of %r stays lazy", what)


# --- choosing a backend --------------------------------------------------------------

BACKENDS = ("auto", "process_vm", "shared")


def open_backend(
    kind: str,
    memmap: GuestMemoryMap,
    pid: int,
    shared_blocks: Mapping[str, bool],
    populate: bool = False,
) -> MemoryBackend:
    """Open the requested backend; `auto` tries process_vm, then shared.

    When nothing works the error lists why each backend was refused, so the
    operator learns what is missing ("not root and RAM is not shared").
    """
    reasons: list[str] = []
    if kind == "auto" and populate:  # populating only means something for shared RAM
        try:
            return SharedFileBackend(memmap, pid, shared_blocks, populate)
        except MemoryAccessError as e:
            reasons.append(f"shared: {e}")
    if kind in ("auto", "process_vm"):
        try:
            pv = ProcessVMBackend(memmap, pid)
        except MemoryAccessError as e:
            reasons.append(f"process_vm: {e}")
        else:
            try:
                pv.probe()
                return pv
            except MemoryAccessError as e:
                pv.close()
                reasons.append(f"process_vm: {e}")
    if kind == "shared" or (kind == "auto" and not populate):
        try:
            return SharedFileBackend(memmap, pid, shared_blocks, populate)
        except MemoryAccessError as e:
            reasons.append(f"shared: {e}")
    if kind not in BACKENDS:
        reasons.append(f"unknown backend {kind!r}")
    raise MemoryAccessError("no usable memory backend: " + "; ".join(reasons))
