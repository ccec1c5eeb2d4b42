"""A real Debian guest OS (issue 25): booted from a disk image, then cloned with and without vmwipe.

The lab's other guests are a busybox initramfs started with `-kernel`; this one
is what users run (`diskimage.py`): SeaBIOS -> GRUB on the disk -> the
distribution kernel and initramfs -> systemd, udev loading vmwipe.ko (built by
DKMS) by its ACPI modalias, with the region reserved by the image's own GRUB
configuration.  The lab drives it through `vmwipe-lab-shell.service` on ttyS0,
which speaks the same line protocol as the initramfs's /init, so `Console`
and the shell helpers work unchanged.

`OsCloneScenario` boots it once (`-cpu qemu64`, no vmgenid device), checks what
the boot did (`boot_facts`), saves it with `vmwipe save`, and resumes N clones
of that one file twice: with `vmwipe clone` and with a plain restore (what a
hypervisor without vmwipe does).  Before the save a job in the guest waits on
ttyS1; the host writes one line to every clone's ttyS1 before `cont`, so the
first thing each clone does after resume is run unmodified programs --
`python3 -c` (secrets.token_hex, uuid.uuid4), `openssl rand -hex 16` and
/proc/sys/kernel/random/uuid -- whose values come back on the same port.
Each clone writes to its own qcow2 overlay over a copy of the original's disk
as saved.  Every QEMU is killed by its PID in `close()` (`e2e.CloneLab`).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agent import attach_console
from .build import DiskImage, overlay
from .e2e import CloneLab, Log, SerialTap, clone_argv, run_cli
from .guest import Guest, GuestConfig, GuestError, default_accel

CPU = "qemu64"  # no RDRAND: nothing but the host makes clones diverge early
SYSFS = "/sys/class/misc/vmwipe"
PLATFORM = "/sys/bus/platform/devices/VMWP0001:00"
#: The programs each clone runs right after resume, `rounds` times; one value per line.
DRAWS = ("python3 -c 'import secrets, uuid; print(\"py-secrets\", secrets.token_hex(16)); "
         "print(\"py-uuid4\", uuid.uuid4())'; "
         "echo openssl $(openssl rand -hex 16); "
         "echo kernel-uuid $(cat /proc/sys/kernel/random/uuid)")
KINDS = ("py-secrets", "py-uuid4", "openssl", "kernel-uuid")
LINE = re.compile(r"(py-secrets|py-uuid4|openssl|kernel-uuid) ([0-9a-f-]{32,36})")
MODES = ("vmwipe", "plain")


@dataclass
class BootFacts:
    """What a boot from disk shows from inside the guest and from the host."""

    cmdline: str = ""
    kernel: str = ""
    module_driver: str = ""  # the driver bound to the VMWP0001 platform device
    modalias: str = ""
    alias_resolves_to: str = ""  # `modprobe --resolve-alias` of that modalias
    loaded_by_config: str = ""  # any modules-load.d / /etc/modules line naming vmwipe
    crng_refresh: str = ""
    package: str = ""  # vmwipe-dkms's version, installed in the image by apt
    dkms: str = ""  # `dkms status vmwipe`
    iomem: list[str] = field(default_factory=list)  # /proc/iomem lines at the region
    inspect: dict[str, Any] = field(default_factory=dict)  # `vmwipe inspect --json`
    boot_s: float = 0.0


def boot_facts(g: Guest, agent_qmp: str) -> BootFacts:
    """Look at a freshly booted disk guest: how the module got loaded, and the region."""
    con = g.console
    assert con is not None
    f = BootFacts()
    con.check("udevadm settle", 120)
    f.cmdline = con.check("cat /proc/cmdline").strip()
    f.kernel = con.check("uname -r").strip()
    f.modalias = con.check(f"cat {PLATFORM}/modalias").strip()
    f.module_driver = con.check(f"basename $(readlink {PLATFORM}/driver)").strip()
    f.alias_resolves_to = con.check(f"modprobe --resolve-alias '{f.modalias}'").strip()
    f.loaded_by_config = con.check(
        "grep -rs vmwipe /etc/modules /etc/modules-load.d /usr/lib/modules-load.d "
        "/run/modules-load.d || true").strip()
    f.crng_refresh = con.check(f"cat {SYSFS}/crng_refresh").strip()
    f.package = con.check("dpkg-query -W -f '${Version}\\n' vmwipe-dkms").strip()
    f.dkms = con.check("dkms status vmwipe 2>/dev/null").strip()
    f.iomem = [ln.strip() for ln in con.check("grep -i 1f000000 /proc/iomem").splitlines()]
    r = run_cli("inspect", "--qmp", agent_qmp, "--json", timeout=120)
    if r.returncode != 0:
        raise GuestError(f"vmwipe inspect failed ({r.returncode}): {r.stderr[-500:]}")
    f.inspect = json.loads(r.stdout)
    return f


@dataclass
class ModeResult:
    """One mode's clones side by side: how many values of each kind, how many shared."""

    mode: str
    clones: int
    values: dict[str, list[list[str]]] = field(default_factory=dict)  # kind -> per clone
    drawn: dict[str, int] = field(default_factory=dict)
    shared: dict[str, int] = field(default_factory=dict)  # values printed by >= 2 clones
    generations: list[int] = field(default_factory=list)  # sysfs generation per clone


def compare(mode: str, outputs: Sequence[Sequence[str]]) -> ModeResult:
    """Pure: per kind, the values each clone printed and how many two or more clones share."""
    res = ModeResult(mode, len(outputs))
    owners: dict[tuple[str, str], set[int]] = defaultdict(set)
    for kind in KINDS:
        res.values[kind] = [[] for _ in outputs]
    for i, lines in enumerate(outputs):
        for line in lines:
            m = LINE.fullmatch(line.strip())
            if m:
                res.values[m[1]][i].append(m[2])
                owners[(m[1], m[2])].add(i)
    for kind in KINDS:
        res.drawn[kind] = sum(len(v) for v in res.values[kind])
        res.shared[kind] = sum(1 for v in res.values[kind] for x in v
                               if len(owners[(kind, x)]) > 1)
    return res


def summary(r: ModeResult) -> str:
    return f"{r.mode:7} " + "; ".join(f"{k} {r.shared[k]}/{r.drawn[k]} shared" for k in KINDS)


def with_disk(args: Sequence[str], disk: str) -> list[str]:
    """A command line with its one `-drive` replaced by `disk` (a clone's own overlay)."""
    out = list(args)
    i = out.index("-drive")
    out[i + 1] = f"file={disk},if=virtio,format=qcow2"
    return out


class OsCloneScenario(CloneLab):
    """Boot the disk image once, save once, resume N clones per mode.  A context manager."""

    def __init__(self, image: DiskImage, clones: int = 3, rounds: int = 2, *,
                 log: Log | None = None, accel: str | None = None,
                 memory_mib: int = 1024) -> None:
        if clones < 2:
            raise ValueError("at least 2 clones are needed to compare them")
        super().__init__(Path(tempfile.mkdtemp(prefix="vmwipe-os.")), own_dir=True)
        self.image = image
        self.n = clones
        self.rounds = rounds
        self.log: Log = log or (lambda msg: None)
        self.accel = accel or default_accel()
        self.memory_mib = memory_mib
        self.facts = BootFacts()
        self.saved_disk = self.dir / "saved.qcow2"

    def boot(self, timeout: float = 600) -> BootFacts:
        """Boot through GRUB (no -kernel, no insmod) and look at what the boot did."""
        t0 = time.monotonic()
        g = Guest(GuestConfig(self.image, memory_mib=self.memory_mib, cpus=1, accel=self.accel,
                              extra_args=self._original_args(CPU), vmgenid=False,
                              boot_timeout=timeout))
        self.guest = g.__enter__()
        boot_s = time.monotonic() - t0
        self.log(f"{self.image.name}: booted from disk in {boot_s:.0f} s")
        self.facts = boot_facts(g, f"{self.dir}/agent.qmp")
        self.facts.boot_s = round(boot_s, 1)
        return self.facts

    def save(self) -> None:
        """Arm the draw job on ttyS1, `vmwipe save`, and freeze the disk as it was saved."""
        assert self.guest is not None and self.guest.console is not None
        con = self.guest.console
        tap = self._tap_original()
        con.check("stty -F /dev/ttyS1 raw -echo")
        loop = "; ".join([DRAWS] * self.rounds)
        con.check(f"(read -r go < /dev/ttyS1; {loop}; echo END) > /dev/ttyS1 2>&1 &")
        time.sleep(1)  # the job has opened ttyS1 and sits in read()
        self._save()
        time.sleep(0.3)
        tap.close()
        self.tap = None
        # The original is stopped and its block devices flushed and inactive: its overlay is
        # the disk every clone must see.  Each clone writes to its own overlay over this copy.
        shutil.copy2(self.guest.disk, self.saved_disk)
        self.log(f"  saved {self.snapshot.stat().st_size >> 20} MiB")

    def _clone_args(self, d: Path, disks: Path) -> list[str]:
        assert self.guest is not None
        disks.mkdir()
        for i in range(self.n):
            overlay(self.saved_disk, disks / f"disk-{i}.qcow2", "qcow2")
        return with_disk(clone_argv(self.guest.qemu_args(), d, "auto"),
                         f"{disks}/disk-{{i}}.qcow2")

    def run_mode(self, mode: str, timeout: float = 300) -> ModeResult:
        """`vmwipe`: `vmwipe clone -n N`; `plain`: migrate-incoming only.  Go, cont, collect."""
        assert mode in MODES
        d = self.dir / mode
        d.mkdir(mode=0o700)  # `vmwipe clone --dir` takes only a new or empty private one
        argv = self._clone_args(d, self.dir / f"{mode}-disks")
        if mode == "vmwipe":
            r = run_cli("clone", str(self.snapshot), "-n", str(self.n), "--dir", str(d),
                        "--json", "--", *argv, timeout=600)
            if r.returncode != 0:
                raise GuestError(f"vmwipe clone failed ({r.returncode}): {r.stderr[-800:]}")
            clones = json.loads(r.stdout)["clones"]
            self._pids += [int(c["pid"]) for c in clones]
            qmps = [str(c["qmp"]) for c in clones]
        else:
            qmps = [self._restore_plain(d, i, [a.replace("{i}", str(i)) for a in argv],
                                        f"clone {i}").qmp_path for i in range(self.n)]
        taps = [self._attach(d, i) for i in range(self.n)]
        for tap in taps:
            tap.send(b"go\n")  # waiting in the clone's UART when it resumes
        self._cont(qmps)
        outputs = [self._wait_end(tap, timeout) for tap in taps]
        res = compare(mode, outputs)
        for i in range(self.n):
            con, sock = attach_console(f"{d}/con-{i}.sock", d / f"clone-{i}.ttyS0")
            self._socks.append(sock)
            res.generations.append(int(con.check(f"cat {SYSFS}/generation", 60).strip()))
        self._kill_clones()
        self.log("  " + summary(res))
        return res

    @staticmethod
    def _wait_end(tap: SerialTap, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = [ln.strip() for _t, ln in tap.snapshot()[0]]
            if "END" in lines:
                return lines
            if time.monotonic() > deadline:
                raise GuestError(f"no END from a clone in {timeout:.0f} s; got {lines[-8:]}")
            time.sleep(0.2)
