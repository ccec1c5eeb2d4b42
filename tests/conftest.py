"""Shared fixtures for the host-agent tests: real QEMU VMs started paused (-S).

A `-S` VM never runs guest code, so tests can plant synthetic v1 tables in its
RAM through the agent's own write path and check every byte afterwards with
`pmemsave`.  Each QEMU is started by `vmwipe.host_agent.qemu.launcher` and killed
by the PID it got, in fixture teardown; nothing here kills by name.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmwipe.host_agent.errors import LaunchError
from vmwipe.host_agent.flows.target import AgentOptions, Target, open_target
from vmwipe.host_agent.qemu.launcher import QemuProcess, start_qemu
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.lab import GuestImage, build_guest_image, default_kernel
from vmwipe.lab.shell import missing_prerequisite
from vmwipe.protocol import (
    HOST_FIELDS_SIZE,
    PAGE_SIZE,
    WIPE_GENERATION_OFFSET,
    Region,
    build_region,
    encode_ssdt,
    merge_ranges,
)

QEMU = os.environ.get("VMWIPE_TEST_QEMU", "qemu-system-x86_64")
REGION = Region(0x1F00_0000, 1 << 20)
HIGH = 1 << 32  # first guest-physical byte above 4 GiB

#: 512 MiB of pc.ram below 4 GiB plus a 64 MiB pc-dimm at 4 GiB: RAM on both
#: sides of 4 GiB and two RAM blocks, small enough to pmemsave in full.
SMALL_MACHINE = [
    "-M", "pc", "-m", "512M,slots=2,maxmem=2G",
    "-object", "memory-backend-ram,id=hi,size=64M",
    "-device", "pc-dimm,memdev=hi,addr=0x100000000",
]
#: The same layout with memfd RAM shared with the agent (for the shared backend).
SHARED_MACHINE = [
    "-M", "pc", "-m", "512M,slots=2,maxmem=2G",
    "-object", "memory-backend-memfd,id=lo,size=512M,share=on",
    "-machine", "memory-backend=lo",
    "-object", "memory-backend-memfd,id=hi,size=64M,share=on",
    "-device", "pc-dimm,memdev=hi,addr=0x100000000",
]
#: pc with 5 GiB: pc.ram continues above 4 GiB at block offset 3 GiB (sparse, cheap).
BIG_MACHINE = ["-M", "pc", "-m", "5G"]


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


@functools.cache
def kvm_unavailable_reason() -> str | None:
    """None when `-accel kvm -S` starts and reports KVM enabled, else why not."""
    if not qemu_available():
        return f"{QEMU} not installed"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible"
    d = tempfile.mkdtemp(prefix="vmwipe-kvmprobe-")
    qp: QemuProcess | None = None
    try:
        qp = start_qemu(
            [QEMU, "-nodefaults", "-display", "none", "-M", "pc", "-m", "64M", "-accel", "kvm"],
            f"{d}/qmp", log_path=f"{d}/log", wait=15,
        )
        with QMPSession(qp.qmp_path) as s:
            kvm = s.cmd("query-kvm")
        if not kvm.get("enabled"):
            return "QEMU reports KVM not enabled"
        return None
    except LaunchError as e:
        return f"QEMU -accel kvm does not start: {e}"
    finally:
        if qp is not None:
            qp.kill()
        shutil.rmtree(d, ignore_errors=True)


def accel_params() -> list[object]:
    return [
        pytest.param("tcg", id="tcg"),
        pytest.param("kvm", id="kvm"),
    ]


def require_accel(accel: str) -> None:
    if not qemu_available():
        pytest.skip(f"{QEMU} not installed")
    if accel == "kvm":
        why = kvm_unavailable_reason()
        if why is not None:
            pytest.skip(f"KVM unavailable: {why}")


def write_region_files(directory: Path, region: Region = REGION) -> tuple[Path, Path]:
    """The SSDT and 4 KiB zero page a protected VM carries."""
    ssdt = directory / "vmwipe.aml"
    zero = directory / "zero.bin"
    ssdt.write_bytes(encode_ssdt(region.base, region.size))
    zero.write_bytes(bytes(PAGE_SIZE))
    return ssdt, zero


def region_args(directory: Path, region: Region = REGION, guard: bool = True) -> list[str]:
    ssdt, zero = write_region_files(directory, region)
    args = ["-acpitable", f"file={ssdt}"]
    if guard:
        args += ["-device", f"loader,file={zero},addr={region.base:#x},force-raw=on"]
    return args


def _hash_stream(path: Path, cuts: list[tuple[int, int]], h: Any, got: list[int]) -> None:
    """Hash what QEMU writes into the FIFO `path`, leaving out the sorted, disjoint `cuts`."""
    pos = 0
    ci = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            start, end = pos, pos + len(chunk)
            view = memoryview(chunk)
            cur = start
            while ci < len(cuts) and cuts[ci][0] < end:
                a, b = cuts[ci]
                if a > cur:
                    h.update(view[cur - start : a - start])
                cur = max(cur, min(b, end))
                if b <= end:
                    ci += 1
                else:
                    break
            if cur < end:
                h.update(view[cur - start :])
            pos = end
    got.append(pos)


@dataclass
class VM:
    """A paused QEMU under test plus the agent's view of it."""

    qemu: QemuProcess
    directory: Path
    argv: list[str]
    region: Region = REGION
    name: str = "vm"
    _session: QMPSession | None = field(default=None, repr=False)

    @property
    def qmp(self) -> str:
        return self.qemu.qmp_path

    @property
    def pid(self) -> int:
        return self.qemu.pid

    @property
    def test_qmp(self) -> str:
        """A second QMP monitor reserved for the test, so the agent can use `qmp` meanwhile."""
        return str(self.directory / f"{self.name}.test.qmp")

    def session(self) -> QMPSession:
        """The test's own QMP session (on `test_qmp`), kept open."""
        if self._session is None:
            self._session = QMPSession(self.test_qmp).connect()
        return self._session

    def disconnect(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def target(self, backend: str = "auto") -> Target:
        opts = AgentOptions(region=self.region, reset_guard=False, backend=backend)
        s = self.session()
        return open_target(s, s.pid, opts, guard=False)

    def status(self) -> str:
        return self.session().status()

    def kill(self) -> None:
        self.disconnect()
        self.qemu.kill()

    # -- planting --------------------------------------------------------------------
    def plant(
        self,
        slots: Sequence[tuple[int, int]],
        pattern: bytes = b"\xa5",
        image: bytes | None = None,
        backend: str = "process_vm",
    ) -> None:
        """Fill the listed pages with `pattern` and write a table listing them."""
        t = self.target(backend)
        try:
            for gpa, n in slots:
                t.backend.write(gpa, pattern * (n * PAGE_SIZE // len(pattern)))
            t.backend.write(self.region.base, image or build_region(self.region.size, slots))
        finally:
            t.close()

    def write(self, gpa: int, data: bytes) -> None:
        t = self.target("process_vm")
        try:
            t.backend.write(gpa, data)
        finally:
            t.close()

    def read(self, gpa: int, size: int) -> bytes:
        t = self.target("process_vm")
        try:
            return t.backend.read(gpa, size)
        finally:
            t.close()

    # -- checking with pmemsave --------------------------------------------------------
    def pmemsave(self, gpa: int, size: int) -> bytes:
        path = self.directory / "pmem.bin"
        self.session().cmd("pmemsave", {"val": gpa, "size": size, "filename": str(path)})
        data = path.read_bytes()
        path.unlink()
        return data

    def ram_digest(self, exclude: Sequence[tuple[int, int]] = ()) -> str:
        """sha256 of all guest RAM (via pmemsave into a FIFO), minus `exclude` spans."""
        s = self.session()
        ranges = self.target().memmap.ranges
        h = hashlib.sha256()
        for r in ranges:
            cuts = [
                (a, a + n)
                for a, n in merge_ranges(
                    (max(g, r.gpa) - r.gpa, min(g + n, r.end) - max(g, r.gpa))
                    for g, n in exclude
                    if g < r.end and r.gpa < g + n
                )
            ]
            h.update(f"{r.gpa:x}+{r.size:x}".encode())
            fifo = self.directory / "pmem.fifo"
            if fifo.exists():
                fifo.unlink()
            os.mkfifo(fifo)
            got: list[int] = []
            reader = threading.Thread(target=_hash_stream, args=(fifo, cuts, h, got))
            reader.start()
            s.cmd("pmemsave", {"val": r.gpa, "size": r.size, "filename": str(fifo)}, timeout=120)
            reader.join(60)
            fifo.unlink()
            assert got == [r.size]
        return h.hexdigest()

    def header_host_fields(self) -> tuple[int, int]:
        raw = self.pmemsave(self.region.base + WIPE_GENERATION_OFFSET, HOST_FIELDS_SIZE)
        return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def start_vm(
    directory: Path,
    machine: Sequence[str],
    accel: str = "tcg",
    *,
    guard: bool = True,
    incoming: bool = False,
    paused: bool = True,
    extra: Sequence[str] = (),
    region: Region = REGION,
    name: str = "vm",
    qemu: str | None = None,
) -> VM:
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        qemu or QEMU, "-nodefaults", "-display", "none", "-accel", accel, *machine,
        *region_args(directory, region, guard), *extra,
        "-qmp", f"unix:{directory / (name + '.test.qmp')},server=on,wait=off",
    ]
    qp = start_qemu(
        argv, str(directory / f"{name}.qmp"), log_path=str(directory / f"{name}.log"),
        paused=paused, incoming_defer=incoming,
    )
    return VM(qp, directory, argv, region, name)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the `vmwipe` CLI in a subprocess (exit codes and signals are real)."""
    return subprocess.run(
        [sys.executable, "-m", "vmwipe.host_agent.cli", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


@pytest.fixture(scope="module")
def image() -> GuestImage:
    """The default lab guest (packaged kernel + initramfs with vmwipe.ko and the examples).

    Built once and cached by content; skips with the reason where this host cannot
    build or boot it.  Modules that need a different image define their own `image`.
    """
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    kernel = default_kernel()
    assert kernel is not None
    return build_guest_image(kernel)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agent")


@pytest.fixture
def vm_factory(tmp_path: Path) -> Iterator[list[VM]]:
    """Function-scoped VMs: append what you start; all are killed by PID at teardown."""
    started: list[VM] = []
    yield started
    for vm in started:
        vm.kill()
