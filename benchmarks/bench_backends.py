"""Benchmark 2: how fast each backend zeroes guest RAM, against a plain memset.

One paused 1 GiB pc guest with memfd RAM (share=on), so that every backend
can reach the same pages.  Two workloads, as a wipe meets them:

- 65,536 scattered pages (every other page of the upper 512 MiB);
- one 256 MiB range.

Backends: process_vm_writev (the default), the shared mapping populated in
advance (what `--populate` prepares during the restore), and pwrite on
/proc/PID/mem as a reference (an adapter here, the agent does not ship it).
The physical limit is the same zeroing done in this process by a C loop
(memset per span, one call for all spans: `vmwipe.host_agent.wipe._pages`) on an
anonymous 1 GiB mmap, already touched, same offsets.  Only the zeroing is
timed: the pieces (host addresses) are resolved once beforehand, as the
engine's `plan` phase does.  A last row shows why the shared backend uses that
C loop: the same two passes driven from Python, one ctypes call per page.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from array import array
from collections.abc import Callable, Sequence

from vmwipe.host_agent.flows.target import AgentOptions, open_target
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.host_agent.wipe import _pages
from vmwipe.host_agent.wipe.backends import (
    ZERO_CHUNK,
    MemoryBackend,
    Pieces,
    SharedFileBackend,
)
from vmwipe.host_agent.wipe.memmap import GuestMemoryMap

from .harness import Row, side_by_side, verdict
from .vmlib import DATA_BASE, REGION, Lab, scattered

MEM_MIB = 1024
SCATTERED = 65_536
RANGE = 256 << 20
PAGE = 4096
LABELS = {"shared": "shared mapping, pre-populated", "process_vm": "process_vm_writev",
          "proc_mem": "/proc/PID/mem pwrite"}
READ_LABELS = {"shared": "shared mapping (memcmp in place)",
               "process_vm": "process_vm_readv + memcmp", "proc_mem": "/proc/PID/mem pread"}
TARGETS = {"shared": ("< 1.5x memset", 1.5), "process_vm": ("< 4x memset", 4.0)}


class ProcMemBackend(MemoryBackend):
    """pwrite/pread on /proc/PID/mem: the reference path (needs the same ptrace rights)."""

    name = "proc_mem"

    def __init__(self, memmap: GuestMemoryMap, pid: int) -> None:
        super().__init__(memmap)
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        self._zero = bytes(ZERO_CHUNK)

    def _read_pieces(self, pieces: Pieces, dst: int) -> None:
        for _gpa, n, hva in pieces:
            data = os.pread(self.fd, n, hva)
            ctypes.memmove(dst, data, n)
            dst += n

    def _write_pieces(self, pieces: Pieces, src: int) -> None:
        for _gpa, n, hva in pieces:
            os.pwrite(self.fd, ctypes.string_at(src, n), hva)
            src += n

    def _zero_pieces(self, pieces: Pieces) -> None:
        zero = memoryview(self._zero)
        pwrite = os.pwrite
        fd = self.fd
        for _gpa, n, hva in pieces:
            if pwrite(fd, zero[:n], hva) != n:
                raise OSError(f"short write to /proc/mem at {hva:#x}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _columns(base: int, spans: Sequence[tuple[int, int]]) -> tuple[array[int], array[int]]:
    return array("Q", [base + off for off, _n in spans]), array("Q", [n for _o, n in spans])


def _memset_baseline(base: int, spans: Sequence[tuple[int, int]]) -> Callable[[], None]:
    """The limit: memset every span of an already-touched local buffer, in one C loop."""
    addrs, lens = _columns(base, spans)

    def run() -> None:
        _pages.zero(addrs, lens)
    return run


def _memcmp_baseline(base: int, spans: Sequence[tuple[int, int]]) -> Callable[[], None]:
    """The verify limit: memcmp every span of the local buffer against zeros, in one C loop."""
    addrs, lens = _columns(base, spans)

    def run() -> None:
        if _pages.first_nonzero(addrs, lens) != -1:
            raise AssertionError("baseline buffer not zero")
    return run


def _c_vs_python(be: MemoryBackend, spans: Sequence[tuple[int, int]], repeat: int) -> list[Row]:
    """Both passes of the wipe over the shared mapping: the agent's C loop against the
    same passes from Python, one ctypes memset/memcmp per page (what Python alone can do).

    Same mapping, same pages, host addresses resolved beforehand for both.
    """
    if not isinstance(be, SharedFileBackend):
        return []
    pieces = be.pieces(spans, be.max_piece)
    local = be._locals(pieces)
    memcmp = ctypes.CDLL(None).memcmp
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    memcmp.restype = ctypes.c_int
    zero = bytes(max(pieces.sizes))
    zaddr = ctypes.cast(ctypes.c_char_p(zero), ctypes.c_void_p).value or 0

    def agent() -> None:
        be.zero_pieces(pieces)
        if be.first_nonzero_pieces(pieces) is not None:
            raise AssertionError("not zero")

    def per_page() -> None:
        for addr, n in zip(local, pieces.sizes, strict=True):
            ctypes.memset(addr, 0, n)
        for addr, n in zip(local, pieces.sizes, strict=True):
            if memcmp(addr, zaddr, n) != 0:
                raise AssertionError("not zero")

    a, b = side_by_side(agent, per_page, repeat)
    return [Row("zero+verify", f"{len(spans):,} scattered pages, shared mapping",
                a, b, "same passes from Python, a ctypes call per page", "",
                f"the C loop saves {(b.median_ms - a.median_ms) / len(spans) * 1000:.2f} us "
                "per page for both passes", verdict(None))]


def run(quick: bool = False) -> list[Row]:
    repeat = 3 if quick else 15
    rows: list[Row] = []
    buf = mmap.mmap(-1, MEM_MIB << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(buf)
    base = ctypes.addressof(anchor)
    ctypes.memset(base, 1, MEM_MIB << 20)  # touch every page once, as guest RAM is
    workloads = {
        f"{SCATTERED:,} scattered pages": [(g, n * PAGE) for g, n in scattered(SCATTERED)],
        "one 256 MiB range": [(DATA_BASE, RANGE)],
    }
    try:
        with Lab("vmwipe-bench-backends-") as lab:
            qp = lab.start(lab.machine(MEM_MIB, shared=True))
            with QMPSession(qp.qmp_path, timeout=60) as s:
                backends: list[MemoryBackend] = []
                try:
                    for kind, populate in (("shared", True), ("process_vm", False)):
                        opts = AgentOptions(region=REGION, reset_guard=False, backend=kind,
                                            populate=populate)
                        backends.append(open_target(s, s.pid, opts, guard=False).backend)
                    backends.append(ProcMemBackend(backends[0].memmap, qp.pid))
                    for wl, spans in workloads.items():
                        # pc RAM below 4 GiB sits at block offset = GPA: same offsets here
                        ref = _memset_baseline(base, spans)
                        for be in backends:
                            pieces = be.pieces(spans, be.max_piece)

                            def subject(be: MemoryBackend = be,
                                        pieces: Pieces = pieces) -> None:
                                be.zero_pieces(pieces)

                            a, b = side_by_side(subject, ref, repeat)
                            mib = sum(p[1] for p in pieces) / (1 << 20)
                            tgt, limit = TARGETS.get(be.name, ("reference", 0.0))
                            ok = a.median_ms / b.median_ms < limit if limit else None
                            label = LABELS[be.name]
                            rows.append(Row(
                                "wipe throughput", f"{wl}, {label}", a, b, "in-process memset",
                                tgt, f"{mib / a.median_ms * 1000 / 1024:.1f} GiB/s vs "
                                f"{mib / b.median_ms * 1000 / 1024:.1f} GiB/s", verdict(ok)))
                    # the engine's second pass: read back and check for zeros (scattered case)
                    spans = workloads[f"{SCATTERED:,} scattered pages"]
                    check = _memcmp_baseline(base, spans)
                    for be in backends:
                        pieces = be.pieces(spans, be.max_piece)  # as the engine verifies

                        def verify(be: MemoryBackend = be, pieces: Pieces = pieces) -> None:
                            if be.first_nonzero_pieces(pieces) is not None:
                                raise AssertionError("guest pages not zero after the wipe")

                        a, b = side_by_side(verify, check, repeat)
                        rows.append(Row(
                            "verify (read back)",
                            f"{SCATTERED:,} scattered pages, {READ_LABELS[be.name]}",
                            a, b, "in-process memcmp", "", "the engine's pass after the zeroing",
                            verdict(None)))
                    rows += _c_vs_python(backends[0], spans, repeat)
                finally:
                    for be in backends:
                        be.close()
    finally:
        del anchor
        buf.close()
    return rows

