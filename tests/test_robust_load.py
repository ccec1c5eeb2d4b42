"""Load: 8 concurrent `vmwipe restore` runs of one snapshot, and 100 sequential restore,
wipe and resume cycles, with every clone checked wiped and nothing leaked.

The snapshot is a `-S` VM (512 MiB, halting firmware: a resumed clone runs but
writes no RAM, so the wipe can still be checked after `cont`) holding a valid
table of 6 slots.  Leaks are counted, not guessed: open fds, threads, mappings
and child processes of the test process (the 100 cycles run the agent's flows
in-process, as a long-lived caller such as a hook daemon would), unix sockets
and `/dev/shm` entries, and processes that still mention the test directory.
Half of the cycles use memfd RAM with `--populate` (the prefetching, mmap-based
shared backend), half private RAM (process_vm_writev).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import VM, qemu_available, run_cli, start_vm

from vmwipe.host_agent.flows.live import restore_flow
from vmwipe.host_agent.flows.target import AgentOptions
from vmwipe.host_agent.qemu.launcher import QemuProcess, start_qemu
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.protocol import HOST_FIELDS_SIZE, PAGE_SIZE, WIPE_GENERATION_OFFSET, Region

pytestmark = pytest.mark.skipif(not qemu_available(), reason="QEMU not installed")

P = PAGE_SIZE
REGION = Region(0x1F00_0000, 1 << 20)
SLOTS = [(0x200000, 4), (0x1000000, 16), (0x1800000, 1), (0x9F000, 1), (REGION.end, 2),
         (512 * (1 << 20) - P, 1)]
MARKER = 0x300000  # not listed: must keep its bytes


def _bios(directory: Path) -> Path:
    rom = bytearray(b"\xff" * 0x10000)
    rom[0xFFF0:0xFFF3] = b"\xf4\xeb\xfd"  # hlt; jmp .-1
    path = directory / "hlt.bin"
    path.write_bytes(bytes(rom))
    return path


@dataclass
class Snap:
    directory: Path
    private: Path
    shared: Path
    argv_private: list[str]
    argv_shared: list[str]


def _machine(d: Path, shared: bool) -> list[str]:
    m = ["-M", "pc", "-m", "512M", "-bios", str(_bios(d))]
    if shared:
        m += ["-object", "memory-backend-memfd,id=lo,size=512M,share=on",
              "-machine", "memory-backend=lo"]
    return m


def _save(vm: VM, path: Path) -> None:
    vm.plant(SLOTS)
    vm.write(MARKER, b"\x5a" * P)
    vm.disconnect()
    r = run_cli("save", "--paused", "--qmp", vm.qmp, "--to", str(path))
    assert r.returncode == 0, r.stderr


def _argv(vm: VM) -> list[str]:
    """The source's QEMU command line without its two monitors (start_qemu adds one)."""
    out, i = [], 0
    argv = vm.qemu.argv
    while i < len(argv):
        if argv[i] == "-qmp":
            i += 2
            continue
        if argv[i] == "-S":
            i += 1
            continue
        out.append(argv[i])
        i += 1
    return out


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snap]:
    d = tmp_path_factory.mktemp("load")
    vms = [start_vm(d / "priv", _machine(d, False), "tcg", region=REGION),
           start_vm(d / "shared", _machine(d, True), "tcg", region=REGION)]
    try:
        _save(vms[0], d / "private.state")
        _save(vms[1], d / "shared.state")
        yield Snap(d, d / "private.state", d / "shared.state", _argv(vms[0]), _argv(vms[1]))
    finally:
        for v in vms:
            v.kill()


def check_wiped(qmp: str, directory: Path, resumed: bool) -> None:
    with QMPSession(qmp) as s:
        assert s.status() == ("running" if resumed else "paused")

        def pmem(gpa: int, size: int) -> bytes:
            path = directory / f"pmem-{os.getpid()}-{threading.get_ident()}.bin"
            s.cmd("pmemsave", {"val": gpa, "size": size, "filename": str(path)})
            data = path.read_bytes()
            path.unlink()
            return data

        for g, n in SLOTS:
            assert pmem(g, n * P) == bytes(n * P), f"{qmp}: {g:#x} not wiped"
        assert pmem(MARKER, P) == b"\x5a" * P
        host = pmem(REGION.base + WIPE_GENERATION_OFFSET, HOST_FIELDS_SIZE)
        assert int.from_bytes(host[:8], "little") == 1
        assert int.from_bytes(host[8:], "little") == sum(n for _g, n in SLOTS)


# --- what could leak --------------------------------------------------------------------


def _children() -> list[int]:
    me = str(os.getpid())
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (d / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[1] == me:
                    out.append(int(d.name))
    return out


def _mentioning(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
    return out


def _unix_sockets(text: str) -> int:
    return sum(text in line for line in Path("/proc/net/unix").read_text().splitlines())


def _shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()}


def _foreign_holders(name: str) -> bool:
    """True if a process other than this one or its children holds /dev/shm/NAME open:
    other users of this machine, not a leak of ours."""
    mine = {os.getpid(), *_children()}
    target = f"/dev/shm/{name}"
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        with contextlib.suppress(OSError):
            for fd in (d / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        return True
            if target in (d / "maps").read_text():
                return True
    return False


def assert_no_leaks(before: dict[str, object], directory: Path) -> None:
    """Compare with `before`, giving transient clean-up (threads, closing fds) 3 s."""
    deadline = time.monotonic() + 3
    while True:
        after = _resources(directory)
        shm_before, shm_after = before["shm"], after["shm"]
        assert isinstance(shm_before, set) and isinstance(shm_after, set)
        new = {n for n in shm_after - shm_before if not _foreign_holders(n)}
        diff = {k: (before[k], after[k]) for k in before if k != "shm" and before[k] != after[k]}
        if not diff and not new:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"leaked: {diff}, new /dev/shm entries {sorted(new)}")
        time.sleep(0.1)


def _resources(directory: Path) -> dict[str, object]:
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "maps": len(Path("/proc/self/maps").read_text().splitlines()),
        "children": len(_children()),
        "sockets": _unix_sockets(str(directory)),
        "shm": _shm(),
        "procs": len(_mentioning(str(directory))),
    }


@pytest.mark.slow
def test_eight_concurrent_restores(snap: Snap, tmp_path: Path) -> None:
    before = _resources(tmp_path)
    qemus: list[QemuProcess] = []
    try:
        for i in range(8):
            qemus.append(start_qemu(snap.argv_private, str(tmp_path / f"c{i}.qmp"),
                                    log_path=str(tmp_path / f"c{i}.log"), incoming_defer=True))
        agents = [subprocess.Popen(
            [sys.executable, "-m", "vmwipe.host_agent.cli", "restore", "--qmp", q.qmp_path,
             "--from", str(snap.private)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) for q in qemus]
        for a in agents:
            out, err = a.communicate(timeout=300)
            assert a.returncode == 0, err
            assert "resumed" in out
        for q in qemus:
            check_wiped(q.qmp_path, tmp_path, resumed=True)
    finally:
        for q in qemus:
            q.kill()
    assert_no_leaks(before, tmp_path)


@pytest.mark.slow
def test_hundred_sequential_restore_wipe_resume_cycles(snap: Snap, tmp_path: Path) -> None:
    def cycle(i: int) -> None:
        shared = i % 2 == 1
        argv = snap.argv_shared if shared else snap.argv_private
        q = start_qemu(argv, str(tmp_path / "cyc.qmp"), log_path=str(tmp_path / "cyc.log"),
                       incoming_defer=True)
        try:
            opts = AgentOptions(populate=shared)
            with QMPSession(q.qmp_path) as s:
                rep = restore_flow(s, opts, str(snap.shared if shared else snap.private))
            assert rep.resumed and rep.wipe is not None
            assert rep.wipe.pages == sum(n for _g, n in SLOTS)
            assert rep.wipe.backend == ("shared" if shared else "process_vm")
            check_wiped(q.qmp_path, tmp_path, resumed=True)
        finally:
            q.kill()

    cycle(0)  # one cycle of each kind first: lazily created process-wide state (imports,
    cycle(1)  # caches) is not a leak
    before = _resources(tmp_path)
    for i in range(100):
        cycle(i)
    assert_no_leaks(before, tmp_path)
