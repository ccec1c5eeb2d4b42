"""Faults: the agent killed anywhere, QEMU killed mid-wipe, the QMP socket gone.

- SIGKILL of `vmwipe wipe` (which resumes) at 20 random moments of a 65,280-page wipe
  of a 1 GiB `-S` VM.  Afterwards the VM is paused, or it runs only because
  the wipe completed and verified first (generation bumped, every listed page
  zero).  Between iterations the test re-plants the pages and the header with
  process_vm_writev (65,280 iovecs on one buffer; tens of ms).
- QEMU SIGKILLed while the agent zeroes: one-line error, non-zero exit, no
  traceback, no process or file left behind.
- The QMP socket unlinked, left stale by a dead QEMU, or the monitor closing
  the connection after each possible number of commands (a proxy between the
  agent and QEMU): one-line error, exit 3, VM paused, never a half commit.

Every QEMU is killed by the PID the test started, in teardown.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VM, qemu_available, run_cli, start_vm

from vmwipe.host_agent.wipe.backends import MemoryBackend
from vmwipe.protocol import (
    HOST_FIELDS_SIZE,
    PAGE_SIZE,
    WIPE_GENERATION_OFFSET,
    Region,
    build_region,
)

pytestmark = pytest.mark.skipif(not qemu_available(), reason="QEMU not installed")

P = PAGE_SIZE
M = 1 << 20
REGION = Region(0x1F00_0000, M)
MACHINE_1G = ["-M", "pc", "-m", "1G"]
#: A full table: 65,280 single pages, every other page from 512 MiB up (not coalescable).
BIG = [(0x2000_0000 + 2 * i * P, 1) for i in range(65_280)]
BIG_IMAGE = build_region(REGION.size, BIG)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong,
                                    ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_ulong]
_PATTERN = ctypes.create_string_buffer(b"\xa5" * P, P)


def fill_pages(pid: int, hvas: list[int]) -> None:
    """Write 0xa5 into every page at `hvas` in process `pid` (1024 pages per call)."""
    local = (_IOVec * 1)(_IOVec(ctypes.addressof(_PATTERN), P))
    for i in range(0, len(hvas), 1024):
        chunk = hvas[i : i + 1024]
        remote = (_IOVec * len(chunk))(*(_IOVec(h, P) for h in chunk))
        # one local page, reused: process_vm_writev consumes local iovecs in order, so
        # feed the same buffer once per remote page
        loc = (_IOVec * len(chunk))(*([local[0]] * len(chunk)))
        n = _libc.process_vm_writev(pid, loc, len(chunk), remote, len(chunk), 0)
        assert n == P * len(chunk), os.strerror(ctypes.get_errno())


def host_fields(backend: MemoryBackend) -> tuple[int, int]:
    raw = backend.read(REGION.base + WIPE_GENERATION_OFFSET, HOST_FIELDS_SIZE)
    return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")


def _agent(vm: VM, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmwipe.host_agent.cli", "-v", "wipe", "--qmp", vm.qmp, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [x for x in stderr.splitlines() if not x.startswith("vmwipe: INFO")
             and not x.startswith("vmwipe: DEBUG") and not x.startswith("vmwipe: WARNING")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vmwipe: error: "), stderr
    return lines[0]


def halting_bios(directory: Path) -> Path:
    """A 64 KiB firmware whose reset vector is `hlt; jmp .-1` with interrupts off: a resumed
    VM runs but never writes a byte of RAM, so the test can still check the wipe."""
    rom = bytearray(b"\xff" * 0x10000)
    rom[0xFFF0:0xFFF3] = b"\xf4\xeb\xfd"
    path = directory / "hlt.bin"
    path.write_bytes(bytes(rom))
    return path


@pytest.fixture(scope="module")
def big_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    d = tmp_path_factory.mktemp("faults")
    v = start_vm(d, [*MACHINE_1G, "-bios", str(halting_bios(d))], "tcg", region=REGION)
    yield v
    v.kill()


@pytest.mark.slow
def test_sigkill_agent_at_random_points_never_leaves_an_unwiped_vm_running(big_vm: VM) -> None:
    vm = big_vm
    t = vm.target("process_vm")
    try:
        hvas = [t.memmap.hva(g) for g, _n in BIG]
        spans = [(g, n * P) for g, n in BIG]

        def reset() -> None:
            fill_pages(vm.pid, hvas)
            t.backend.write(REGION.base, BIG_IMAGE)

        # calibrate: one uninterrupted run (start to exit) and its zero+verify window
        reset()
        t0 = time.monotonic()
        p = _agent(vm, "--paused")
        assert p.stderr is not None
        t_zero = 0.0
        for line in p.stderr:
            if "zeroing" in line:
                t_zero = time.monotonic() - t0
        assert p.wait(60) == 0
        total = time.monotonic() - t0
        assert host_fields(t.backend) == (1, len(BIG))
        window = max(total - t_zero, 0.05)

        rng = random.Random(int(os.environ.get("VMWIPE_FAULT_SEED", "9")))
        outcomes: dict[str, int] = {}
        times = []
        for i in range(20):
            ti = time.monotonic()
            if vm.status() == "running":
                vm.session().cmd("stop")
            reset()
            p = _agent(vm)
            assert p.stderr is not None
            if i % 2 == 0:  # anywhere in the run, start-up and QMP included
                time.sleep(rng.uniform(0, total * 1.05))
            else:  # somewhere between "zeroing" and the end
                for line in p.stderr:
                    if "zeroing" in line:
                        break
                time.sleep(rng.uniform(0, window))
            p.send_signal(signal.SIGKILL)
            p.communicate(timeout=60)
            state = vm.status()
            gen, pages = host_fields(t.backend)
            if state == "running":
                # cont only ever follows a verified, committed wipe
                assert (gen, pages) == (1, len(BIG)), f"iteration {i}: running, gen {gen}"
                assert t.backend.first_nonzero(spans) is None, f"iteration {i}"
                outcomes["resumed after a full wipe"] = outcomes.get(
                    "resumed after a full wipe", 0) + 1
            else:
                assert state in ("prelaunch", "paused"), f"iteration {i}: {state}"
                assert gen in (0, 1)
                if gen == 1:  # committed: every page was verified zero before
                    assert t.backend.first_nonzero(spans) is None
                key = "paused, committed" if gen else "paused, not committed"
                outcomes[key] = outcomes.get(key, 0) + 1
            times.append(time.monotonic() - ti)
        print(f"SIGKILL outcomes over 20 runs: {outcomes} (run {total:.2f} s, "
              f"wipe window {window:.2f} s, iterations {min(times):.2f}-{max(times):.2f} s)")
        assert outcomes.get("paused, not committed", 0) >= 5, outcomes
    finally:
        t.close()
        if vm.status() == "running":
            vm.session().cmd("stop")


def _procs_mentioning(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            with contextlib.suppress(OSError):
                if text.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
    return out


def _files(*dirs: Path) -> set[str]:
    return {str(p) for d in dirs for p in d.rglob("*")}


def test_qemu_killed_mid_wipe(tmp_path: Path) -> None:
    """Zeroing first-touch RAM (about a second), QEMU is SIGKILLed: one line, exit != 0."""
    vm = start_vm(tmp_path / "vm", MACHINE_1G, "tcg", region=REGION)
    try:
        vm.write(REGION.base, BIG_IMAGE)  # pages never touched: QEMU allocates as we zero
        vm.disconnect()
        shm = Path("/dev/shm")
        before = _files(tmp_path, shm)
        p = _agent(vm)
        assert p.stderr is not None
        for line in p.stderr:
            if "zeroing" in line:
                break
        time.sleep(0.05)
        os.kill(vm.pid, signal.SIGKILL)
        vm.qemu.proc.wait(10)
        _out, err = p.communicate(timeout=60)
        assert p.returncode not in (0, None) and p.returncode > 0, (p.returncode, err)
        line = _error_line(err)
        assert str(vm.pid) in line or "QMP" in line or "guest" in line, line
        print(f"QEMU killed mid-wipe: exit {p.returncode}: {line}")
        # nothing left behind: no process mentions the VM's directory, no new files
        assert _procs_mentioning(str(tmp_path)) == []
        assert _files(tmp_path, shm) - before == set()
        # the socket QEMU left behind is stale now: a clear error too
        r = run_cli("wipe", "--paused", "--qmp", vm.qmp)
        assert r.returncode == 3 and "cannot connect to QMP socket" in _error_line(r.stderr)
    finally:
        vm.kill()


@pytest.fixture(scope="module")
def small_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    d = tmp_path_factory.mktemp("faults-small")
    v = start_vm(d, ["-M", "pc", "-m", "512M", "-bios", str(halting_bios(d))], "tcg",
                 region=REGION)
    yield v
    v.kill()


SMALL = [(0x200000, 2), (0x300000, 1)]


def test_qmp_socket_unlinked(small_vm: VM, tmp_path: Path) -> None:
    vm = small_vm
    vm.plant(SMALL)
    vm.disconnect()
    moved = tmp_path / "moved.qmp"
    os.rename(vm.qmp, moved)  # QEMU still listens, but nobody can find it by name
    try:
        r = run_cli("wipe", "--qmp", vm.qmp)
        line = _error_line(r.stderr)
        assert r.returncode == 3 and "cannot connect to QMP socket" in line
        assert "No such file" in line
    finally:
        os.rename(moved, vm.qmp)
    assert vm.status() == "prelaunch"
    assert vm.pmemsave(0x200000, P) == b"\xa5" * P


class CuttingProxy:
    """A unix-socket proxy to QEMU's QMP that closes both ends after `cut` agent messages."""

    def __init__(self, path: str, upstream: str, cut: int | None) -> None:
        self.path, self.upstream, self.cut = path, upstream, cut
        self.sent = 0
        self.did_cut = False
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            client, _ = self.srv.accept()
        except OSError:
            return
        qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        qemu.connect(self.upstream)
        done = threading.Event()

        def down() -> None:  # QEMU -> agent, verbatim
            with contextlib.suppress(OSError):
                while data := qemu.recv(65536):
                    client.sendall(data)
            done.set()

        threading.Thread(target=down, daemon=True).start()
        buf = ""
        dec = json.JSONDecoder()
        with contextlib.suppress(OSError):
            while not done.is_set():
                data = client.recv(65536)
                if not data:
                    break
                buf += data.decode()
                while True:
                    buf = buf.lstrip()
                    try:
                        _obj, end = dec.raw_decode(buf)
                    except ValueError:
                        break  # incomplete: wait for more
                    if self.cut is not None and self.sent >= self.cut:
                        self.did_cut = True
                        raise OSError("cut")
                    qemu.sendall(buf[:end].encode() + b"\n")
                    buf = buf[end:]
                    self.sent += 1
        for s in (client, qemu):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.srv.close()
        self.thread.join(10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _agent_via(proxy: str, vm: VM) -> subprocess.CompletedProcess[str]:
    """The real CLI, except that SO_PEERCRED would name the proxy: report QEMU's PID."""
    code = ("import sys, vmwipe.host_agent.qemu.qmp as q; "
            f"q.peer_pid = lambda s: {vm.pid}; "
            "from vmwipe.host_agent.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "wipe", "--qmp", proxy],
                          capture_output=True, text=True, timeout=60, check=False)


def test_monitor_closes_after_each_command(small_vm: VM, tmp_path: Path) -> None:
    vm = small_vm
    vm.plant(SMALL)
    vm.disconnect()
    proxy_path = str(tmp_path / "proxy.qmp")
    px = CuttingProxy(proxy_path, vm.qmp, None)  # count the messages of a full run
    try:
        r = _agent_via(proxy_path, vm)
    finally:
        px.close()
    assert r.returncode == 0, r.stderr
    total = px.sent
    assert total >= 5
    assert vm.status() == "running"
    vm.session().cmd("stop")
    results = []
    for cut in range(total):
        vm.plant(SMALL)
        gen0 = vm.header_host_fields()
        vm.disconnect()
        px = CuttingProxy(proxy_path, vm.qmp, cut)
        try:
            r = _agent_via(proxy_path, vm)
        finally:
            px.close()
        results.append(r.returncode)
        state = vm.status()
        gen = vm.header_host_fields()
        if r.returncode == 0:  # the cut came after `cont` went through
            assert state == "running", cut
            assert px.did_cut and "run state unreadable" in r.stdout, (cut, r.stdout)
            vm.session().cmd("stop")
        else:  # an error exit means the VM was left paused
            assert r.returncode == 3, (cut, r.stderr)
            line = _error_line(r.stderr)
            assert "QMP" in line
            if line.startswith("vmwipe: error: cont:"):  # QEMU may or may not have got it
                assert "the VM may be running" in line, line
            assert state == "paused", cut
        if gen != gen0:  # committed before the cut: then every listed page is zero
            assert gen == (gen0[0] + 1, 3)
            for g, n in SMALL:
                assert vm.pmemsave(g, n * P) == bytes(n * P)
        else:
            assert state == "paused"
    print(f"monitor closed after k of {total} agent messages: exit codes {results}")


_GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},'
             b' "capabilities": ["oob"]}}\r\n')


def _hostile_peer(path: str, mode: str, done: threading.Event) -> threading.Thread:
    """A unix socket that is not QEMU's QMP: it misbehaves as `mode` says."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        c, _ = srv.accept()
        with contextlib.suppress(OSError):
            c.settimeout(10)
            if mode == "garbage":
                c.sendall(b"\x00\xff not json {{{\n" * 10)
            elif mode == "huge":
                c.sendall(b'{"QMP": "' + b"A" * (4 << 20))
            elif mode in ("wrong-answer", "not-an-object"):
                c.sendall(_GREETING)
                c.recv(4096)
                c.sendall(b'{"return": {}}\r\n')
                c.recv(4096)
                c.sendall(b'{"return": 42, "id": "__qmp#00000"}\r\n' if mode == "wrong-answer"
                          else b"[1, 2, 3]\r\n")
            if mode != "close":
                done.wait(10)
        c.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("mode", ["close", "silent", "garbage", "huge", "wrong-answer",
                                  "not-an-object"])
def test_hostile_qmp_peer(tmp_path: Path, mode: str) -> None:
    """--qmp naming a socket that is not QEMU's: one line, non-zero exit, no traceback."""
    path = str(tmp_path / "fake.qmp")
    done = threading.Event()
    t = _hostile_peer(path, mode, done)
    r = run_cli("wipe", "--qmp", path, "--qmp-timeout", "1", timeout=60)
    done.set()
    assert r.returncode != 0
    _error_line(r.stderr)
    t.join(10)
