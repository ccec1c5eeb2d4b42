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
of that one file per mode (`MODES`): with `vmwipe clone`; with `vmwipe template
--from` the save (a never-running QEMU loads it into a share=on RAM file on
/dev/shm, which is scrubbed) and `vmwipe clone --template`; and with a plain
restore (what a hypervisor without vmwipe does).  Before the save the lab
installs and starts `vmwipe-keyd.service` over the console (so the image stays
the shared one `make guest-images` builds), and a job in the guest waits on
ttyS1; the host writes one line to every clone's ttyS1 before `cont`, so the
first thing each clone does after resume is run unmodified programs --
`python3 -c` (secrets.token_hex, uuid.uuid4), `openssl rand -hex 16` and
/proc/sys/kernel/random/uuid -- whose values come back on the same port.
Each clone writes to its own qcow2 overlay over a copy of the original's disk
as saved.  Every QEMU is killed by its PID in `close()` (`e2e.CloneLab`), and
the template's RAM file is removed once its clones are gone.
"""

from __future__ import annotations

import base64
import functools
import json
import operator
import re
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .agent import attach_console
from .build import DiskImage, overlay
from .e2e import CloneLab, Log, SerialTap, clone_argv, run_cli
from .guest import QEMU, Console, Guest, GuestConfig, GuestError, default_accel
from .shell import _console

CPU = "qemu64"  # no RDRAND: nothing but the host makes clones diverge early
SYSFS = "/sys/class/misc/vmwipe"
PLATFORM = "/sys/bus/platform/devices/VMWP0001:00"
#: The programs each clone runs right after resume, `rounds` times; one value per line.
DRAWS = ("python3 -c 'import secrets, uuid; print(\"py-secrets\", secrets.token_hex(16)); "
         "print(\"py-uuid4\", uuid.uuid4())'; "
         "echo openssl $(openssl rand -hex 16); "
         "echo kernel-uuid $(cat /proc/sys/kernel/random/uuid)")
KINDS = ("py-secrets", "py-uuid4", "openssl", "kernel-uuid")
#: A service as a user would write one: its key lives in a vmwipe page (libvmwipe from the
#: libvmwipe0 package, through ctypes), and a new key is drawn whenever the module signals
#: a wipe (POLLPRI on /dev/vmwipe).  So that the lab can compare keys without the key
#: leaving the page, it publishes "GENERATION SHA256(KEY) HOW" in /run/vmwipe-keyd, HOW
#: saying what the page held when the key was drawn: `start` (the first key), `zeroed`
#: (the host wiped it) or `intact` (signalled, yet the old key was still there).
KEYD = """#!/usr/bin/python3
import ctypes, hashlib, os, select
lib = ctypes.CDLL("libvmwipe.so.0", use_errno=True)
lib.vmwipe_alloc.restype = ctypes.c_void_p
lib.vmwipe_alloc.argtypes = [ctypes.c_size_t]
page = lib.vmwipe_alloc(4096)
if not page:
    raise OSError(ctypes.get_errno(), "vmwipe_alloc")
fd = os.open("/dev/vmwipe", os.O_RDONLY)
def rotate(how):
    gen = int.from_bytes(os.read(fd, 8), "little")
    if how is None:
        how = "zeroed" if ctypes.string_at(page, 32) == bytes(32) else "intact"
    ctypes.memmove(page, os.urandom(32), 32)
    fpr = hashlib.sha256(ctypes.string_at(page, 32)).hexdigest()
    with open("/run/vmwipe-keyd.tmp", "w") as f:
        f.write(f"{gen} {fpr} {how}\\n")
    os.replace("/run/vmwipe-keyd.tmp", "/run/vmwipe-keyd")
rotate("start")
poller = select.poll()
poller.register(fd, select.POLLPRI)
while True:
    poller.poll()
    rotate(None)
"""
KEYD_UNIT = """[Unit]
Description=vmwipe lab: a key kept in a vmwipe page, rotated on every wipe
[Service]
ExecStart=/usr/local/sbin/vmwipe-keyd
"""
#: RNDRESEEDCRNG (root).  See `OsCloneScenario._reseed_far`.
RESEED = "python3 -c 'import fcntl; fcntl.ioctl(open(\"/dev/urandom\"), 0x5207)'"
LINE = re.compile(r"(py-secrets|py-uuid4|openssl|kernel-uuid) ([0-9a-f-]{32,36})")
#: `vmwipe clone` of the save, `vmwipe clone --template` of a template made from the save,
#: and a plain restore of the save (what a hypervisor without vmwipe does).
MODES = ("vmwipe", "template", "plain")


class KeyState(NamedTuple):
    """What vmwipe-keyd published: the generation it read, its key's SHA-256, and what the
    page held when that key was drawn (`start`, `zeroed` or `intact`)."""

    generation: int
    fingerprint: str
    how: str


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


def boot_facts(g: Guest | Console, agent_qmp: str) -> BootFacts:
    """Look at a freshly booted disk guest: how the module got loaded, and the region.

    `g` may be a bare console: a libvirt domain's (oslibvirt.py) has no lab Guest."""
    con = _console(g)
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
    keys: list[KeyState] = field(default_factory=list)  # vmwipe-keyd's, per clone
    seconds: float = 0.0  # from the first clone started (or the template made) to the last kill


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
    keys = [k.fingerprint for k in r.keys]
    shared = sum(1 for k in keys if keys.count(k) > 1)
    return (f"{r.mode:7} " + "; ".join(f"{k} {r.shared[k]}/{r.drawn[k]} shared" for k in KINDS)
            + f"; vmwipe-keyd key {shared}/{len(keys)} shared")


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
                 memory_mib: int = 1024, qemu: str = QEMU) -> None:
        if clones < 2:
            raise ValueError("at least 2 clones are needed to compare them")
        super().__init__(Path(tempfile.mkdtemp(prefix="vmwipe-os.")), own_dir=True)
        self.image = image
        self.n = clones
        self.rounds = rounds
        self.log: Log = log or (lambda msg: None)
        self.accel = accel or default_accel()
        self.memory_mib = memory_mib
        self.qemu = qemu  # the binary (S3 across a save needs QEMU >= 9: ossleep.py)
        self.facts = BootFacts()
        self.saved_disk = self.dir / "saved.qcow2"
        self.key_before = ""  # the SHA-256 of vmwipe-keyd's key in the snapshot
        self._shm: Path | None = None  # the template's RAM file's directory, while it exists

    def boot(self, timeout: float = 600) -> BootFacts:
        """Boot through GRUB (no -kernel, no insmod) and look at what the boot did."""
        t0 = time.monotonic()
        g = Guest(GuestConfig(self.image, memory_mib=self.memory_mib, cpus=1, accel=self.accel,
                              extra_args=self._original_args(CPU), vmgenid=False,
                              boot_timeout=timeout, qemu=self.qemu))
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
        self.key_before = self._start_keyd()
        con.check("stty -F /dev/ttyS1 raw -echo")
        loop = "; ".join([DRAWS] * self.rounds)
        con.check(f"(read -r go < /dev/ttyS1; {loop}; echo END) > /dev/ttyS1 2>&1 &")
        time.sleep(1)  # the job has opened ttyS1 and sits in read()
        self._reseed_far(con)
        self._save()
        time.sleep(0.3)
        tap.close()
        self.tap = None
        # The original is stopped and its block devices flushed and inactive: its overlay is
        # the disk every clone must see.  Each clone writes to its own overlay over this copy.
        shutil.copy2(self.guest.disk, self.saved_disk)
        self.log(f"  saved {self.snapshot.stat().st_size >> 20} MiB")

    def _reseed_far(self, con: Console, timeout: float = 150) -> None:
        """Have the kernel's CRNG reseed now, so that its own next reseed is an interval away.

        The kernel reseeds by itself every uptime/2 s early on, every 60 s from two minutes
        up.  If that fell in the seconds after resume, the plain clones would diverge by
        themselves and the vmwipe clones' divergence would prove nothing (measured before
        this was done: 0/6 of every kind shared by the plain clones, once on each image).
        6.1 reseeds on demand once its seed is that old, so RNDRESEEDCRNG resets the age;
        from 6.2 a delayed work reseeds on a schedule the ioctl does not move, so the host
        watches `base_crng.generation` (the table's second fill range) for the next one.
        """
        m = re.match(r"(\d+)\.(\d+)", self.facts.kernel)
        if m is None or (int(m[1]), int(m[2])) < (6, 2):
            con.check(RESEED, 60)
            return
        assert self.guest is not None
        gen = self.facts.inspect["extra"]["fill_ranges"][1]
        if int(gen["length"]) != 8:
            raise GuestError(f"fill range 1 is not base_crng.generation: {gen}")
        t0 = time.monotonic()
        before = self.guest.read_phys(int(gen["gpa"]), 8)
        while self.guest.read_phys(int(gen["gpa"]), 8) == before:
            if time.monotonic() - t0 > timeout:
                raise GuestError(f"the kernel CRNG did not reseed in {timeout:.0f} s")
            time.sleep(0.2)
        self.log(f"  the kernel reseeded its CRNG after {time.monotonic() - t0:.0f} s")

    def _start_keyd(self) -> str:
        """Install and start vmwipe-keyd.service; the key it holds (what the snapshot has)."""
        assert self.guest is not None and self.guest.console is not None
        con = self.guest.console
        for path, text, mode in (("/usr/local/sbin/vmwipe-keyd", KEYD, "755"),
                                 ("/etc/systemd/system/vmwipe-keyd.service", KEYD_UNIT, "644")):
            b64 = base64.b64encode(text.encode()).decode()
            con.check(f"echo {b64} | base64 -d > {path} && chmod {mode} {path}")
        con.check("systemctl daemon-reload && systemctl start vmwipe-keyd.service", 120)
        return self._keyd(con, lambda gen: True).fingerprint

    @staticmethod
    def _keyd(con: Console, done: Callable[[int], bool], timeout: float = 60) -> KeyState:
        """What vmwipe-keyd published, once `done(generation)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            out = con.check("cat /run/vmwipe-keyd 2>/dev/null || true", 60).split()
            if len(out) == 3 and done(int(out[0])):
                return KeyState(int(out[0]), out[1], out[2])
            if time.monotonic() > deadline:
                raise GuestError(f"vmwipe-keyd published {out} after {timeout:.0f} s")
            time.sleep(0.5)

    def _clone_args(self, d: Path, disks: Path, names: Sequence[str]) -> list[str]:
        """The clones' command line (`{i}` per clone), with an overlay per name in `names`."""
        assert self.guest is not None
        disks.mkdir()
        for name in names:
            overlay(self.saved_disk, disks / f"disk-{name}.qcow2", "qcow2")
        return with_disk(clone_argv(self.guest.qemu_args(), d, "auto"),
                         f"{disks}/disk-{{i}}.qcow2")

    def _clone_cli(self, source: Sequence[str], d: Path, argv: Sequence[str]) -> list[str]:
        """`vmwipe clone SOURCE -n N` (resumed once all are wiped); the clones' QMP sockets."""
        r = run_cli("clone", *source, "-n", str(self.n), "--dir", str(d), "--json", "--", *argv,
                    timeout=600)
        if r.returncode != 0:
            raise GuestError(f"vmwipe clone failed ({r.returncode}): {r.stderr[-800:]}")
        clones = json.loads(r.stdout)["clones"]
        self._pids += [int(c["pid"]) for c in clones]
        return [str(c["qmp"]) for c in clones]

    def _make_template(self, argv: Sequence[str]) -> Path:
        """`vmwipe template --from` the save: a never-running QEMU loads it into a share=on RAM
        file on /dev/shm (tmpfs, as docs/templates.md advises), the file is scrubbed, the
        device state saved, that QEMU quit.  The template's directory."""
        self._shm = Path(tempfile.mkdtemp(prefix="vmwipe-os-tpl.", dir="/dev/shm"))
        tdir = self.dir / "template-dir"
        r = run_cli("template", "--from", str(self.snapshot), "--ram", str(self._shm / "ram"),
                    "--dir", str(tdir), "--json", "--",
                    *[a.replace("{i}", "tpl") for a in argv], timeout=600)
        if r.returncode != 0:
            raise GuestError(f"vmwipe template failed ({r.returncode}): {r.stderr[-800:]}")
        return tdir

    def _drop_template(self) -> None:
        """Remove the template's RAM file (1 GiB of tmpfs); its clones must be gone."""
        if self._shm is not None:
            shutil.rmtree(self._shm, ignore_errors=True)
            self._shm = None

    def close(self) -> None:
        super().close()  # every clone killed first: none maps the template file any more
        self._drop_template()

    def run_mode(self, mode: str, timeout: float = 300) -> ModeResult:
        """N clones of the save: `vmwipe` by `vmwipe clone -n N`, `template` by `vmwipe
        template --from` + `vmwipe clone --template -n N`, `plain` by migrate-incoming only.
        Go, cont, collect the draws, then each clone's sysfs generation and vmwipe-keyd."""
        assert mode in MODES
        t0 = time.monotonic()
        d = self.dir / mode
        d.mkdir(mode=0o700)  # `vmwipe clone --dir` takes only a new or empty private one
        names = [str(i) for i in range(self.n)] + (["tpl"] if mode == "template" else [])
        argv = self._clone_args(d, self.dir / f"{mode}-disks", names)
        if mode == "vmwipe":
            qmps = self._clone_cli([str(self.snapshot)], d, argv)
        elif mode == "template":
            tdir = self._make_template(argv)
            self.log(f"  template made in {time.monotonic() - t0:.0f} s")
            qmps = self._clone_cli(["--template", str(tdir)], d, argv)
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
            gen = int(con.check(f"cat {SYSFS}/generation", 60).strip())
            res.generations.append(gen)
            # the key as of that generation: rotated after a wipe, the snapshot's otherwise
            res.keys.append(self._keyd(con, functools.partial(operator.le, gen)))
        self._kill_clones()
        self._drop_template()
        res.seconds = round(time.monotonic() - t0, 1)
        self.log(f"  {summary(res)}; generations {res.generations}; vmwipe-keyd "
                 f"{[k.how for k in res.keys]} ({res.seconds:.0f} s)")
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
