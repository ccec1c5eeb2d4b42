"""The Debian disk image as a libvirt domain (issue 25): protected, hooked, restored.

`osguest.py` boots the image under plain QEMU; users with libvirt define a
domain on it instead.  This module is that domain's side of the lab: its disk
(a copy of the cached image with a qcow2 overlay on top, so libvirt's relabeling
and internal snapshots touch only files of the test), its XML (GRUB from the
disk under TCG, `-cpu qemu64`, the serial port on a UNIX socket the lab shell
of `diskimage.py` answers on), and what the guest and the host say after each
libvirt operation:

- the guest: `/sys/class/misc/vmwipe/generation`, and a **sentinel**, a
  python3 process that holds one page from /dev/vmwipe with a marker in it and
  logs "wiped zero" each time it finds the page zeroed (then marks it again);
- the hook's log line for the domain (reason, region, generation a -> b);
- the table's `wipe_generation`, read by `vmwipe inspect` through the second
  monitor `vmwipe libvirt protect` adds.

The libvirtd, the hook install and virsh come from the test (tests/
libvirtd_fixture.py); `OsDomain` takes them as callables.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import socket
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .agent import attach_console
from .build import DiskImage, overlay
from .e2e import run_cli
from .guest import Console, GuestError
from .osguest import CPU, SYSFS

MEMORY_MIB = 1024
SENTINEL_LOG = "/run/vmwipe-sentinel.log"
#: One zeroed page from vmwipe.ko with a marker; a line per wipe it sees.  The generation
#: comes from sysfs separately: the module may take up to poll_ms longer to notice.
SENTINEL = textwrap.dedent(f"""\
    import mmap, os, time
    MARK = b"vmwipe-sentinel\\n"
    fd = os.open("/dev/vmwipe", os.O_RDWR)
    page = mmap.mmap(fd, 4096)  # MAP_SHARED: the module lists the page in its table
    os.close(fd)
    page[:len(MARK)] = MARK
    log = open("{SENTINEL_LOG}", "a", buffering=1)
    log.write("armed\\n")
    while True:
        time.sleep(0.2)
        if page[:len(MARK)] != MARK:
            log.write("wiped zero\\n" if page[:] == bytes(4096) else "wiped NONZERO\\n")
            page[:len(MARK)] = MARK
    """)
Virsh = Callable[..., "subprocess.CompletedProcess[str]"]


def domain_xml(name: str, disk: Path, console_sock: Path, serial_log: Path,
               memory_mib: int = MEMORY_MIB) -> str:
    """A domain booting the disk through SeaBIOS and GRUB: no <kernel>, no -kernel."""
    return textwrap.dedent(f"""\
        <domain type='qemu'>
          <name>{name}</name>
          <uuid>{uuid.uuid4()}</uuid>
          <memory unit='MiB'>{memory_mib}</memory>
          <vcpu>1</vcpu>
          <os>
            <type arch='x86_64' machine='pc'>hvm</type>
            <boot dev='hd'/>
          </os>
          <features><acpi/></features>
          <cpu mode='custom' match='exact' check='none'>
            <model fallback='forbid'>{CPU}</model>
          </cpu>
          <on_poweroff>destroy</on_poweroff>
          <on_reboot>restart</on_reboot>
          <on_crash>destroy</on_crash>
          <devices>
            <emulator>/usr/bin/qemu-system-x86_64</emulator>
            <disk type='file' device='disk'>
              <driver name='qemu' type='qcow2'/>
              <source file='{disk}'/>
              <target dev='vda' bus='virtio'/>
            </disk>
            <serial type='unix'>
              <source mode='bind' path='{console_sock}'/>
              <log file='{serial_log}' append='on'/>
              <target port='0'/>
            </serial>
            <memballoon model='none'/>
          </devices>
        </domain>
        """)


def prepare_disk(image: DiskImage, work: Path) -> Path:
    """A sparse copy of the cached image and a qcow2 overlay over it, both in `work`.

    libvirt relabels every file of a disk's chain for QEMU's user, and internal
    snapshots need qcow2: neither may touch the image the other tests share.
    """
    copy = work / f"{image.name}.raw"
    subprocess.run(["cp", "--sparse=always", str(image.path), str(copy)], check=True)
    return overlay(copy, work / "disk.qcow2")


@dataclass(frozen=True)
class GuestState:
    """What the guest says about itself: its vmwipe generation and the sentinel's log."""

    generation: int
    wiped_zero: int  # times the sentinel found its page zeroed
    wiped_nonzero: int  # times it found the marker gone but the page not all zero


@dataclass(frozen=True)
class HookWipe:
    """One "wiped and verified" line of the hook for the domain."""

    reason: str
    pid: int
    region: int
    before: int
    after: int
    line: str


def hook_wipes(log: str, name: str) -> list[HookWipe]:
    """The hook's wipe lines for domain `name` in `log` (hook.log text), in order."""
    pat = re.compile(rf"{re.escape(name)}: (.+?) \[state [^\]]*\]: QEMU pid (\d+), region "
                     rf"(0x[0-9a-f]+)\+0x[0-9a-f]+, .*?wiped and verified, generation "
                     rf"(\d+) -> (\d+)")
    return [HookWipe(m[1], int(m[2]), int(m[3], 16), int(m[4]), int(m[5]), m[0])
            for m in pat.finditer(log)]


def hook_lines(log: str, name: str) -> list[str]:
    """Every hook log line about domain `name` (wiped, skipped or refused)."""
    return [ln for ln in log.splitlines() if f" {name}: " in ln]


class OsDomain:
    """The protected domain on the disk image, driven through its serial console."""

    def __init__(self, name: str, work: Path, virsh: Virsh, monitor: str = "") -> None:
        self.name = name
        self.work = work
        self.virsh = virsh
        self.monitor = monitor  # the second QMP monitor from `vmwipe libvirt protect`
        self.console_sock = work / "console" / "ttyS0.sock"
        self.serial_log = work / "serial.log"
        self.console: Console | None = None
        self._sock: socket.socket | None = None
        self._attach = 0

    def xml(self, disk: Path, qemu_user: str = "libvirt-qemu") -> str:
        """The domain's XML; the console socket's directory is QEMU's user's to create in."""
        self.console_sock.parent.mkdir(exist_ok=True)
        pw = pwd.getpwnam(qemu_user)
        os.chown(self.console_sock.parent, pw.pw_uid, pw.pw_gid)
        return domain_xml(self.name, disk, self.console_sock, self.serial_log)

    # -- the console ---------------------------------------------------------------------
    def detach(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.console = None

    def attach(self, timeout: float = 600) -> Console:
        """(Re)connect to the lab shell on ttyS0, for a new QEMU or a reverted guest.

        Output written while nobody is connected is lost, so this does not wait for
        the shell's @@READY: it runs `true` until the shell answers.
        """
        self.detach()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._attach += 1
                con, sock = attach_console(str(self.console_sock),
                                           self.work / f"console-{self._attach}.log")
            except OSError:
                if time.monotonic() > deadline:
                    raise GuestError(f"{self.name}: no console at {self.console_sock}") from None
                time.sleep(1)
                continue
            self.console, self._sock = con, sock
            while True:
                try:
                    con.run("true", timeout=10)
                    return con
                except GuestError as e:
                    if time.monotonic() > deadline:
                        self.detach()
                        raise
                    if "console closed" in str(e):
                        break  # that QEMU went away under us: connect again
            self.detach()
            time.sleep(1)

    def check(self, cmd: str, timeout: float = 120) -> str:
        if self.console is None:
            raise GuestError(f"{self.name}: console not attached")
        return self.console.check(cmd, timeout)

    # -- what the guest says --------------------------------------------------------------
    def arm_sentinel(self) -> None:
        code = base64.b64encode(SENTINEL.encode()).decode()
        self.check(f"echo {code} | base64 -d > /run/vmwipe-sentinel.py")
        self.check("nohup python3 /run/vmwipe-sentinel.py > /run/vmwipe-sentinel.out 2>&1 &")
        deadline = time.monotonic() + 120
        while "armed" not in self.check(f"cat {SENTINEL_LOG} 2>/dev/null || true"):
            if time.monotonic() > deadline:
                raise GuestError("the sentinel did not start: "
                                 + self.check("cat /run/vmwipe-sentinel.out"))
            time.sleep(1)

    def state(self) -> GuestState:
        out = self.check(f"echo gen $(cat {SYSFS}/generation); "
                         f"echo zero $(grep -c '^wiped zero' {SENTINEL_LOG}); "
                         f"echo nonzero $(grep -c '^wiped NONZERO' {SENTINEL_LOG})")
        vals = dict(ln.split() for ln in out.splitlines() if len(ln.split()) == 2)
        return GuestState(int(vals["gen"]), int(vals["zero"]), int(vals["nonzero"]))

    def settle(self, want_wipes: int, timeout: float = 60) -> GuestState:
        """The guest's state once the sentinel counted `want_wipes` wipes, or at `timeout`.

        The module polls its header every 100 ms and the sentinel its page every
        200 ms: a wipe reaches both shortly after the guest runs again.
        """
        deadline = time.monotonic() + timeout
        while True:
            st = self.state()
            if st.wiped_zero >= want_wipes or time.monotonic() > deadline:
                # one more read: the module's generation may trail the sentinel by a poll
                time.sleep(1)
                return self.state()
            time.sleep(1)

    def table_generation(self) -> int:
        """The table header's wipe_generation, read through the protected monitor."""
        r = run_cli("inspect", "--qmp", self.monitor, "--json", timeout=120)
        if r.returncode != 0:
            raise GuestError(f"vmwipe inspect failed ({r.returncode}): {r.stderr[-500:]}")
        return int(json.loads(r.stdout)["extra"]["header"]["wipe_generation"])

    def qemu_pid(self) -> int:
        return int(Path(f"/var/run/libvirt/qemu/{self.name}.pid").read_text().strip())
