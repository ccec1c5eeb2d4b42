"""Read and zero guest RAM from outside QEMU, behind one small interface.

No QMP or HMP command writes guest memory, so the agent writes it directly:

- `ProcessVMBackend` (default): `process_vm_readv`/`process_vm_writev` on the
  QEMU PID, up to IOV_MAX (1024) iovecs per call, all pointing at one shared
  zero buffer.  Works for any RAM backing; needs ptrace rights over QEMU (root,
  or the same uid without Yama restrictions).
- `SharedFileBackend`: for RAM blocks backed by `memory-backend-memfd`/`-file`
  with `share=on`, maps the same file MAP_SHARED (optionally MAP_POPULATE) and
  writes through the mapping.  Needs only access to QEMU's fds, and is the
  fastest path once the mapping is populated.

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
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import MemoryAccessError
from .memmap import GuestMemoryMap

log = logging.getLogger(__name__)

IOV_MAX = 1024
ZERO_CHUNK = 1 << 20  # size of the shared zero buffer and of each zeroing iovec
READ_CHUNK = 8 << 20  # verification reads this much at a time

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


class MemoryBackend(ABC):
    """Guest RAM access by guest-physical address.  `name` says which backend it is."""

    name = "abstract"

    def __init__(self, memmap: GuestMemoryMap) -> None:
        self.memmap = memmap

    # subclasses implement raw host access on pieces that lie inside one RAM range
    @abstractmethod
    def _read_into(self, gpa: int, out: memoryview) -> None: ...

    @abstractmethod
    def _write_from(self, pieces: Sequence[tuple[int, memoryview]]) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release mappings; the backend is unusable afterwards."""

    def __enter__(self) -> MemoryBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pieces(self, spans: Sequence[Span]) -> Iterator[tuple[int, int]]:
        for gpa, size in spans:
            for pgpa, n, _r in self.memmap.split(gpa, size):
                yield pgpa, n

    def read(self, gpa: int, size: int) -> bytes:
        """Read `size` bytes of guest RAM at `gpa` (may cross RAM-range boundaries)."""
        buf = bytearray(size)
        view = memoryview(buf)
        pos = 0
        for pgpa, n in self._pieces([(gpa, size)]):
            self._read_into(pgpa, view[pos : pos + n])
            pos += n
        return bytes(buf)

    def write(self, gpa: int, data: bytes) -> None:
        """Write `data` at `gpa`; used for the 16 host-field bytes and by tests to plant tables."""
        view = memoryview(data)
        pieces: list[tuple[int, memoryview]] = []
        pos = 0
        for pgpa, n in self._pieces([(gpa, len(data))]):
            pieces.append((pgpa, view[pos : pos + n]))
            pos += n
        self._write_from(pieces)

    def zero(self, spans: Sequence[Span]) -> None:
        """Zero every byte of `spans` (guest-physical), in as few calls as the backend allows."""
        zero = memoryview(_ZERO)
        pieces: list[tuple[int, memoryview]] = []
        for pgpa, n in self._pieces(spans):
            off = 0
            while off < n:
                k = min(ZERO_CHUNK, n - off)
                pieces.append((pgpa + off, zero[:k]))
                off += k
        self._write_from(pieces)

    def first_nonzero(self, spans: Sequence[Span]) -> int | None:
        """Guest address of the first non-zero byte in `spans`, or None if all zero."""
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        for pgpa, n in self._pieces(spans):
            off = 0
            while off < n:
                k = min(READ_CHUNK, n - off)
                chunk = view[:k]
                self._read_into(pgpa + off, chunk)
                if chunk != _ZERO_VIEW_READ[:k]:
                    i = next(j for j, b in enumerate(bytes(chunk)) if b)
                    return pgpa + off + i
                off += k
        return None


_ZERO = bytes(ZERO_CHUNK)
_ZERO_VIEW_READ = memoryview(bytes(READ_CHUNK))


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


class ProcessVMBackend(MemoryBackend):
    """process_vm_readv/writev on the QEMU process (the default backend)."""

    name = "process_vm"

    def __init__(self, memmap: GuestMemoryMap, pid: int) -> None:
        super().__init__(memmap)
        self.pid = pid
        self.calls = 0  # syscalls issued, for reports and tests

    def probe(self) -> None:
        """Raise MemoryAccessError if this process cannot read QEMU's RAM."""
        first = self.memmap.ranges[0]
        self._read_into(first.gpa, memoryview(bytearray(1)))

    def _transfer(self, write: bool, items: Sequence[tuple[int, int, int, int]]) -> None:
        """Move bytes for (local_addr, remote_addr, length, gpa) items, resuming partial moves."""
        fn = _process_vm_writev if write else _process_vm_readv
        op = "process_vm_writev" if write else "process_vm_readv"
        local, remote = _IOV_ARRAY(), _IOV_ARRAY()
        i = 0
        skip = 0  # bytes of items[i] already moved by a partial transfer
        while i < len(items):
            batch = items[i : i + IOV_MAX]
            total = 0
            for k, (la, ra, n, _g) in enumerate(batch):
                d = skip if k == 0 else 0
                local[k].iov_base = la + d
                local[k].iov_len = n - d
                remote[k].iov_base = ra + d
                remote[k].iov_len = n - d
                total += n - d
            got = fn(self.pid, local, len(batch), remote, len(batch), 0)
            self.calls += 1
            if got < 0:
                err = ctypes.get_errno()
                raise _os_error(op, err, self.pid, batch[0][3] + skip)
            if got == 0:
                raise _os_error(op, errno.EFAULT, self.pid, batch[0][3] + skip)
            if got == total:
                i += len(batch)
                skip = 0
                continue
            # partial transfer: advance exactly `got` bytes and retry from there
            log.debug("%s: partial transfer %d of %d bytes", op, got, total)
            left = got
            while left:
                n = items[i][2] - skip
                if left >= n:
                    left -= n
                    i += 1
                    skip = 0
                else:
                    skip += left
                    left = 0

    def _read_into(self, gpa: int, out: memoryview) -> None:
        if len(out):
            self._transfer(False, [(buffer_address(out), self.memmap.hva(gpa), len(out), gpa)])

    def _write_from(self, pieces: Sequence[tuple[int, memoryview]]) -> None:
        items = [
            (buffer_address(data), self.memmap.hva(gpa), len(data), gpa)
            for gpa, data in pieces
            if len(data)
        ]
        self._transfer(True, items)


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


def read_proc_maps(pid: int) -> list[ProcMapping]:
    """Parse /proc/PID/maps; MemoryAccessError if it cannot be read."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            text = f.read()
    except OSError as e:
        raise MemoryAccessError(f"cannot read /proc/{pid}/maps: {e.strerror}") from None
    out = []
    for line in text.splitlines():
        m = _MAPS_RE.match(line)
        if m:
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
        self._maps: list[tuple[int, int, mmap.mmap]] = []  # (host start, host end, mapping)
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
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if self.populate else 0)
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
        self._maps.sort(key=lambda t: t[0])

    def _locate(self, gpa: int, n: int) -> tuple[mmap.mmap, int]:
        hva = self.memmap.hva(gpa)
        for start, end, mm in self._maps:
            if start <= hva and hva + n <= end:
                return mm, hva - start
        raise MemoryAccessError(f"guest address {gpa:#x} is outside the shared mappings")

    def _read_into(self, gpa: int, out: memoryview) -> None:
        mm, off = self._locate(gpa, len(out))
        out[:] = mm[off : off + len(out)]

    def _write_from(self, pieces: Sequence[tuple[int, memoryview]]) -> None:
        for gpa, data in pieces:
            mm, off = self._locate(gpa, len(data))
            mm[off : off + len(data)] = data

    def close(self) -> None:
        for _s, _e, mm in self._maps:
            mm.close()
        self._maps = []


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
    if kind in ("auto", "process_vm"):
        pv = ProcessVMBackend(memmap, pid)
        try:
            pv.probe()
            return pv
        except MemoryAccessError as e:
            reasons.append(f"process_vm: {e}")
    if kind in ("auto", "shared"):
        try:
            return SharedFileBackend(memmap, pid, shared_blocks, populate)
        except MemoryAccessError as e:
            reasons.append(f"shared: {e}")
    if kind not in BACKENDS:
        reasons.append(f"unknown backend {kind!r}")
    raise MemoryAccessError("no usable memory backend: " + "; ".join(reasons))
