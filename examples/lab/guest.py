"""Boot a real Debian kernel under QEMU and drive it over the serial console.

`Guest` is a context manager: whatever happens inside the `with`, the QEMU
process it started is killed (by its PID) and its temporary directory removed.
The guest gets the vmwipe SSDT, the loader zero page and, unless told
otherwise, a `memmap=` reservation, exactly as a production VM would.

KVM on this kind of machine cannot boot Linux (see NOTES.md), so the
accelerator is TCG unless VMWIPE_TEST_ACCEL says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from qemu.qmp import QMPClient

from vmwipe.host_agent.flows.incoming import stream_uses_mapped_ram
from vmwipe.protocol import (
    WIPE_GENERATION_OFFSET,
    Region,
    Table,
    decode_table,
    encode_host_fields,
    encode_ssdt,
)

from .build import DiskImage, GuestImage, overlay

QEMU = "qemu-system-x86_64"
# 1 MiB reserved at 496 MiB of a 512 MiB guest (NOTES.md), all of it the region.
RESERVE_BASE = 0x1F000000
RESERVE_SIZE = 0x100000


class GuestError(RuntimeError):
    """The guest did not do what we waited for; carries the console tail."""


def default_accel() -> str:
    return os.environ.get("VMWIPE_TEST_ACCEL", "tcg")


@dataclass(frozen=True)
class CommandResult:
    rc: int
    output: str


class Console:
    """Line-oriented driver for the /init command loop (see build.INIT_SCRIPT).

    A thread drains QEMU's serial output into a buffer (and a log file) so the
    guest can never block on a full pipe; callers wait for regexes in it.
    """

    def __init__(self, out: IO[bytes], inp: IO[bytes], log_path: Path) -> None:
        self._out = out
        self._inp = inp
        self._log = log_path.open("wb")
        self._buf = ""
        self._pos = 0  # waits only look at output after this point
        self._cond = threading.Condition()
        self._eof = False
        self._seq = 0
        self._thread = threading.Thread(target=self._pump, name="guest-console", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while chunk := self._out.read1(65536):  # type: ignore[attr-defined]
            self._log.write(chunk)
            self._log.flush()
            with self._cond:
                self._buf += chunk.decode(errors="replace").replace("\r", "")
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()
        self._log.close()

    def tail(self, chars: int = 3000) -> str:
        with self._cond:
            return self._buf[-chars:]

    def mark(self) -> None:
        """Forget everything printed so far (for example before a reboot)."""
        with self._cond:
            self._pos = len(self._buf)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait for `pattern` (multiline regex) in output after the mark, consume up to it.

        End patterns with a newline, not `$`: `$` also matches at the end of
        a line that is still arriving.
        """
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = regex.search(self._buf, self._pos)
                if m:
                    self._pos = m.end()
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    why = "console closed" if self._eof else f"{timeout:.0f} s timeout"
                    raise GuestError(f"waiting for {pattern!r}: {why}; console tail:\n"
                                     f"{self._buf[-3000:]}")
                self._cond.wait(left)

    def send(self, line: str) -> None:
        self._inp.write(line.encode() + b"\n")
        self._inp.flush()

    def run(self, cmd: str, timeout: float = 60) -> CommandResult:
        """Run one shell command in the guest; return its exit status and output."""
        self._seq += 1
        seq = self._seq
        with self._cond:
            start = self._pos = len(self._buf)
        self.send(f"{seq} {cmd}")
        m = self.wait_for(rf"^@@DONE {seq} (\d+)\n", timeout)
        with self._cond:
            output = self._buf[start:m.start()]
        return CommandResult(int(m.group(1)), output)

    def check(self, cmd: str, timeout: float = 60) -> str:
        """Run a command that must succeed; return its output."""
        res = self.run(cmd, timeout)
        if res.rc != 0:
            raise GuestError(f"{cmd!r} exited {res.rc}:\n{res.output}")
        return res.output


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL if the test process dies without cleaning up."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _write_process_memory(pid: int, address: int, data: bytes) -> None:
    """process_vm_writev into QEMU: no QMP/HMP command writes guest RAM."""
    buf = ctypes.create_string_buffer(data, len(data))
    local = _IOVec(ctypes.cast(buf, ctypes.c_void_p), len(data))
    remote = _IOVec(address, len(data))
    n = _libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != len(data):
        err = ctypes.get_errno()
        raise OSError(err, f"process_vm_writev(pid {pid}, {address:#x}): {os.strerror(err)}")


@dataclass
class GuestConfig:
    """How to boot. The defaults are the production layout on a 512 MiB guest."""

    image: GuestImage | DiskImage
    memory_mib: int = 512
    cpus: int = 2
    region: Region = field(default_factory=lambda: Region(RESERVE_BASE, RESERVE_SIZE))
    reserve: bool = True  # memmap= on the kernel command line (a disk image has its own)
    loader: bool = True  # zero page rewritten at every reset (SPEC.md section 7)
    accel: str = field(default_factory=default_accel)
    boot_timeout: float = 120
    # A state saved by Guest.save(): load it (paused, like a restore or a
    # clone) instead of booting. The rest of the config must match the source.
    incoming: Path | None = None
    # Start paused with -incoming defer and load nothing: a `vmwipe restore` does it.
    defer: bool = False
    extra_args: tuple[str, ...] = ()  # appended to the QEMU command line
    cmdline: tuple[str, ...] = ()  # appended to the guest kernel's command line
    vmgenid: bool = True  # -device vmgenid,guid=auto (a new GUID in every QEMU process)
    machine: str = "pc"  # -machine (e.g. "q35,smm=on" with OVMF in extra_args)
    qemu: str = QEMU  # the binary (a wrapper such as build/qemu10/qemu10 works too)


class Guest:
    """A running QEMU with a booted guest at the /init command loop."""

    def __init__(self, config: GuestConfig) -> None:
        self.config = config
        self.region = config.region
        self._tmp = Path(tempfile.mkdtemp(prefix="vmwipe-guest."))
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop = asyncio.new_event_loop()
        self._qmp: QMPClient | None = None
        self.console: Console | None = None
        self.log_path = self._tmp / "console.log"

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> Guest:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def disk(self) -> Path:
        """A disk image guest's own qcow2 overlay over the image (which no boot writes)."""
        return self._tmp / "disk.qcow2"

    def boot_args(self) -> list[str]:
        """How QEMU boots it: the lab kernel and initramfs, or a disk image through GRUB
        (whose kernel command line, memmap= included, is the image's own)."""
        cfg = self.config
        if isinstance(cfg.image, DiskImage):
            return ["-drive", f"file={self.disk},if=virtio,format=qcow2"]
        append = "console=ttyS0 panic=-1 quiet"
        if cfg.reserve:
            append += f" memmap={RESERVE_SIZE:#x}${RESERVE_BASE:#x}"
        append = " ".join((append, *cfg.cmdline))
        return ["-kernel", str(cfg.image.kernel.image), "-initrd", str(cfg.image.initramfs),
                "-append", append]

    def qemu_args(self) -> list[str]:
        cfg, tmp = self.config, self._tmp
        args = [
            cfg.qemu, "-machine", cfg.machine, "-accel", cfg.accel, "-m", f"{cfg.memory_mib}M",
            "-smp", str(cfg.cpus), "-nodefaults", "-no-user-config", "-display", "none",
            "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
            "-qmp", f"unix:{tmp / 'qmp.sock'},server=on,wait=off",
            *self.boot_args(),
            "-acpitable", f"file={tmp / 'ssdt.aml'}",
        ]
        if cfg.vmgenid:
            args += ["-device", "vmgenid,guid=auto"]
        if cfg.loader:
            args += ["-device", f"loader,file={tmp / 'zero.bin'},addr={self.region.base:#x},"
                     "force-raw=on"]
        if cfg.incoming is not None or cfg.defer:
            args += ["-incoming", "defer"]
        return args + list(cfg.extra_args)

    def _start(self) -> None:
        (self._tmp / "ssdt.aml").write_bytes(encode_ssdt(self.region.base, self.region.size))
        (self._tmp / "zero.bin").write_bytes(bytes(4096))
        if isinstance(self.config.image, DiskImage):
            overlay(self.config.image.path, self.disk)
        with (self._tmp / "qemu.stderr").open("wb") as stderr:
            self._proc = subprocess.Popen(
                self.qemu_args(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                preexec_fn=_die_with_parent)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self.console = Console(self._proc.stdout, self._proc.stdin, self.log_path)
        self._qmp = QMPClient("vmwipe-lab")
        self._call(self._connect())
        if self.config.defer:
            return
        if self.config.incoming is None:
            self.wait_ready()
        else:
            src = str(self.config.incoming)
            mapped = stream_uses_mapped_ram(src)  # `vmwipe save` on QEMU >= 9.0
            if mapped:
                self._mapped_ram(True)
                self.qmp("migrate-incoming", uri=f"file:{os.path.abspath(src)}")
            else:
                self.qmp("migrate-incoming", uri=f"exec:cat {shlex.quote(src)}")
            self._wait_migration()
            if mapped:
                self._mapped_ram(False)  # so that a later `vmwipe save --scrub` is allowed

    def _mapped_ram(self, state: bool) -> None:
        self.qmp("migrate-set-capabilities",
                 capabilities=[{"capability": "mapped-ram", "state": state}])

    async def _connect(self) -> None:
        assert self._qmp is not None
        sock = str(self._tmp / "qmp.sock")
        for _ in range(200):
            if os.path.exists(sock):
                break
            if self._proc is not None and self._proc.poll() is not None:
                raise GuestError(f"QEMU exited: {self.qemu_stderr()}")
            await asyncio.sleep(0.05)
        await self._qmp.connect(sock)

    def _wait_migration(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = self.qmp("query-migrate").get("status")
            # On the incoming side "completed" comes before the run state
            # leaves inmigrate; a cont sent before that would autostart.
            if status == "completed" and self.qmp("query-status")["status"] != "inmigrate":
                return
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise GuestError(f"migration {status}: {self.qemu_stderr()}")
            time.sleep(0.05)

    def save(self, path: Path) -> None:
        """Stop the guest and save its whole state to `path` (a QEMU migration stream).

        The guest stays stopped; a Guest with `incoming=path` continues it.
        """
        self.qmp("stop")
        # QEMU 7.2's default 128 MiB/s would make this take seconds.
        self.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        self.qmp("migrate", uri=f"exec:cat > {shlex.quote(str(path))}")
        self._wait_migration()

    def wait_ready(self) -> str:
        """Wait for /init's ready line; return the guest's boot_id."""
        assert self.console is not None
        # OVMF leaves terminal escapes on the serial line: no ^ anchor.
        m = self.console.wait_for(r"@@READY (\S+)\n", self.config.boot_timeout)
        return m.group(1)

    def qemu_stderr(self) -> str:
        path = self._tmp / "qemu.stderr"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Kill QEMU (our own PID only), close QMP, remove the temp directory."""
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._call(self._qmp.disconnect())
            self._qmp = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                with contextlib.suppress(Exception):
                    if pipe is not None:
                        pipe.close()
            self._proc = None
        if not self._loop.is_closed():
            self._loop.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    # -- monitor -----------------------------------------------------------
    def _call(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def qmp(self, cmd: str, **args: Any) -> Any:
        assert self._qmp is not None
        return self._call(self._qmp.execute(cmd, args or None))

    def hmp(self, line: str) -> str:
        return str(self.qmp("human-monitor-command", **{"command-line": line}))

    @property
    def tmpdir(self) -> Path:
        """This guest's private directory (removed on close): sockets, SSDT, logs."""
        return self._tmp

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    # -- guest memory ------------------------------------------------------
    def read_phys(self, gpa: int, size: int) -> bytes:
        """Guest-physical bytes, through QMP pmemsave."""
        path = self._tmp / "pmem.bin"
        self.qmp("pmemsave", val=gpa, size=size, filename=str(path))
        data = path.read_bytes()
        path.unlink()
        return data

    def hva(self, gpa: int) -> int:
        """QEMU's host virtual address for a guest-physical address (HMP gpa2hva)."""
        out = self.hmp(f"gpa2hva {gpa:#x}")
        m = re.search(r"is (0x[0-9a-f]+)", out)
        if not m:
            raise GuestError(f"gpa2hva {gpa:#x}: {out.strip()}")
        return int(m.group(1), 16)

    def write_phys(self, gpa: int, data: bytes) -> None:
        """Write guest RAM page by page (each page is contiguous in QEMU)."""
        off = 0
        while off < len(data):
            n = min(len(data) - off, 4096 - (gpa + off) % 4096)
            _write_process_memory(self.pid, self.hva(gpa + off), data[off:off + n])
            off += n

    def ram_ranges(self) -> list[tuple[int, int]]:
        """Guest RAM of the pc machine below 4 GiB: the 640 KiB and the rest past 1 MiB."""
        mem = self.config.memory_mib << 20
        return [(0, 0xA0000), (0x100000, min(mem, 0xC0000000) - 0x100000)]

    def read_region(self) -> bytes:
        return self.read_phys(self.region.base, self.region.size)

    def table(self) -> Table:
        """The region decoded and validated by vmwipe.protocol, as the host agent sees it."""
        return decode_table(self.read_region(), self.region, ram=self.ram_ranges())

    def bump_generation(self, wipe_pages: int) -> int:
        """Do what the host agent does after a verified wipe: wipe_generation += 1."""
        header = self.table().header
        assert header is not None, "no table to bump"
        gen = header.wipe_generation + 1
        self.write_phys(self.region.base + WIPE_GENERATION_OFFSET,
                        encode_host_fields(gen, wipe_pages))
        return gen

    def wipe(self) -> int:
        """Zero every listed page, fill every fill range with fresh random bytes, and bump
        the generation (a restore's wipe, done live)."""
        table = self.table()
        pages = 0
        for gpa, size in table.ranges():
            self.write_phys(gpa, bytes(size))
            pages += size // 4096
        for f in table.fills:
            self.write_phys(f.gpa, os.urandom(f.length))
        return self.bump_generation(pages)
