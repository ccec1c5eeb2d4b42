"""S3 and S4 on a real Debian guest OS (issue 25): systemd puts it to sleep, vmwipe wipes it.

The disk image of `diskimage.py`, booted once through GRUB by `osguest.OsCloneScenario`
(on a QEMU >= 9, which keeps the `suspended` run state across a save and a restore),
then driven the way a user's VM goes to sleep:

- **S3** (`run_s3`): `systemctl suspend` in the guest; QEMU reports `suspended`;
  `vmwipe save` of the sleeping VM; that QEMU quits; a fresh QEMU on the same disk gets
  it back with `vmwipe restore` (the wipe, while the guest still sleeps); QMP
  `system_wakeup`.  The module must see the new generation although QEMU's reset at
  wake-up put the loader's zero page over the header (issue 23 item 1), force a CRNG
  reseed, and tell user space: a python3 `poll()` waiter on /dev/vmwipe started before
  the suspend, and a udev rule on the `VMWIPE_GENERATION` uevent.
- **S4** (`run_s4`): `systemctl hibernate` writes the image to the swap partition and
  ACPI powers off, so QEMU exits; a fresh QEMU boots the same disk through GRUB, and the
  image's initramfs (`RESUME=` in conf.d, which writes /sys/power/resume) resumes it.
  The table must be rebuilt (same boot id, slots and generation, read by `vmwipe
  inspect` from the host), the CRNG refresh still active, and a wipe after the resume
  must work (`vmwipe save` + `vmwipe restore` into another fresh QEMU).

The guest gets three small things at run time (in its own overlay, never in the image):
a systemd-sleep hook that says `@@SLEEP pre|post suspend|hibernate` on ttyS0 (so the lab
knows when user space runs again: the serial port drops what is typed before that), the
udev rule, and the waiter.  Every QEMU is killed by its PID in `close()`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmwipe.host_agent.qemu.launcher import start_qemu
from vmwipe.host_agent.qemu.qmp import QMPSession

from .agent import attach_console
from .build import DiskImage
from .e2e import Log, clone_argv, read_gpa, run_cli
from .guest import Console, GuestError
from .osguest import SYSFS, BootFacts, OsCloneScenario, with_disk
from .shell import sh, start, wait_output

PAGE = 4096
PATTERN = 0xA5  # what the waiter writes into its vmwipe page (and again after each wipe)
WAITER_OUT = "/tmp/waiter.out"  # shell.start() puts a job's output in /tmp/NAME.out
UEVENTS = "/run/vmwipe-lab-uevents"
#: The user-space side: one vmwipe page full of PATTERN, its PFN from pagemap, then one
#: line per POLLPRI: the generation read() returns and whether the page was zero.
WAITER = f"""\
import ctypes, mmap, os, select, struct
def say(s):
    print(s, flush=True)
fd = os.open("/dev/vmwipe", os.O_RDWR)
page = mmap.mmap(fd, {PAGE}, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
page[:] = bytes([{PATTERN}]) * {PAGE}
addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
with open("/proc/self/pagemap", "rb") as pm:
    pm.seek(addr // {PAGE} * 8)
    pfn = struct.unpack("<Q", pm.read(8))[0] & ((1 << 55) - 1)
say("HELD pfn=%#x gen=%d" % (pfn, struct.unpack("=Q", os.read(fd, 8))[0]))
p = select.poll()
p.register(fd, select.POLLPRI)
while True:
    ev = p.poll()
    raw = os.read(fd, 8)
    gen = struct.unpack("=Q", raw)[0] if len(raw) == 8 else -1
    say("WOKE events=%#x gen=%d zero=%d" % (ev[0][1], gen, page[:] == bytes({PAGE})))
    page[:] = bytes([{PATTERN}]) * {PAGE}
"""
SLEEP_HOOK = '#!/bin/sh\necho "@@SLEEP $1 $2" > /dev/ttyS0\n'
UEVENT_RULE = ('ACTION=="change", KERNEL=="vmwipe", SUBSYSTEM=="misc", '
               'ENV{VMWIPE_GENERATION}=="?*", '
               f"RUN+=\"/bin/sh -c 'echo UEVENT gen=$env{{VMWIPE_GENERATION}} >> {UEVENTS}'\"\n")
WOKE = re.compile(r"^WOKE events=(0x[0-9a-f]+) gen=(-?\d+) zero=([01])$", re.MULTILINE)
POLLPRI = 0x2


def put_file(con: Console, path: str, data: str, mode: int = 0o644) -> None:
    """Write a file in the guest through the console (base64, in lines the tty keeps whole)."""
    b64 = base64.b64encode(data.encode()).decode()
    sh(con, f"mkdir -p $(dirname {path}) && : > {path}.b64")
    for i in range(0, len(b64), 1024):
        sh(con, f"printf %s '{b64[i:i + 1024]}' >> {path}.b64")
    sh(con, f"base64 -d {path}.b64 > {path} && rm {path}.b64 && chmod {mode:o} {path}")


def woke_lines(out: str) -> list[tuple[int, int, bool]]:
    """Pure: the waiter's (poll events, generation, page was zero) per POLLPRI."""
    return [(int(m[1], 16), int(m[2]), m[3] == "1") for m in WOKE.finditer(out)]


@dataclass
class Vm:
    """One QEMU of the chain on the same disk: the agent's QMP socket and the console."""

    name: str
    qmp: str
    con: Console
    pid: int


@dataclass
class Waiter:
    """The python3 waiter's page (its PFN) and the generation it started at."""

    pfn: int = 0
    gen: int = -1


@dataclass
class S3Result:
    """What `run_s3` saw, from the host and from inside the guest; the test judges it."""

    power_states: str = ""  # /sys/power/state
    mem_sleep: str = ""  # /sys/power/mem_sleep ("s2idle [deep]": ACPI S3)
    suspend_status: str = ""  # QEMU's run state once the guest slept
    hook: list[str] = field(default_factory=list)  # the @@SLEEP lines systemd-sleep ran
    waiter: Waiter = field(default_factory=Waiter)
    page_before: bool = False  # the host saw PATTERN in the waiter's page before the save
    save: dict[str, Any] = field(default_factory=dict)  # `vmwipe save --json`
    restore: dict[str, Any] = field(default_factory=dict)  # `vmwipe restore --json`
    status_after_restore: str = ""
    page_zero_after_restore: bool = False
    slot_gpas: list[int] = field(default_factory=list)  # the table's pages, after the restore
    slots_zero_after_restore: bool = False
    host_generation: int = -1  # header wipe_generation the host wrote
    crng_generation_written: int = -1  # base_crng.generation as the host refilled it
    seed_filled: bool = False  # the module's seed range held the host's bytes
    woke: str = ""  # "post suspend" (resumed) or "booted" (the firmware booted afresh)
    boot_id_same: bool = False
    sysfs_generation: int = -1
    header_generation: int = -1  # `vmwipe inspect` after wake-up
    header_boot_id_same: bool = False
    polls: list[tuple[int, int, bool]] = field(default_factory=list)  # WOKE lines
    uevents: list[str] = field(default_factory=list)
    crng_reseeds: int = -1  # base_crng.generation after wake-up minus what the host wrote
    seed_zero_after: bool = False  # the module mixed the host's seed in and cleared it
    dmesg: list[str] = field(default_factory=list)  # PM lines
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass
class S4Result:
    """What `run_s4` saw: the resume configuration, the power-off, the resume, the wipe."""

    resume_dev: str = ""  # /sys/power/resume, as the initramfs's resume script wrote it
    swap_dev: str = ""  # /sys/class/block/vda2/dev
    initramfs_resume: str = ""  # the RESUME= the initramfs carries (conf/conf.d/resume)
    disk_modes: str = ""  # /sys/power/disk
    before: dict[str, Any] = field(default_factory=dict)  # boot id, sysfs, header
    hook: list[str] = field(default_factory=list)
    powered_off: bool = False  # the guest powered off once the image was written
    hibernate_said: str = ""  # what `systemctl hibernate` printed, if the guest stayed up
    region_zero_at_poweroff: bool = False  # no live table left by .poweroff (issue 23 #10)
    grub: list[str] = field(default_factory=list)  # what GRUB printed on the second boot
    woke: str = ""  # "post hibernate" (resumed) or "booted" (no resume)
    after: dict[str, Any] = field(default_factory=dict)
    dmesg: list[str] = field(default_factory=list)
    wipe_restore: dict[str, Any] = field(default_factory=dict)  # the wipe after resume
    wipe_page_zero: bool = False
    wipe_header_generation: int = -1
    wipe_polls: list[tuple[int, int, bool]] = field(default_factory=list)
    wipe_sysfs_generation: int = -1
    wipe_uevents: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)


class SleepLab(OsCloneScenario):
    """One disk boot, then a chain of QEMUs on its disk through S3 and S4.  A context manager.

    `vm` is the QEMU the guest currently lives in: the booted one, then each fresh QEMU
    a restore or a resume from hibernation moved it to.
    """

    def __init__(self, image: DiskImage, qemu: str, *, log: Log | None = None,
                 accel: str | None = None) -> None:
        super().__init__(image, log=log, accel=accel, qemu=qemu)
        self.vm: Vm | None = None
        self.waiter = Waiter()
        self._seq = 0

    def boot(self, timeout: float = 600) -> BootFacts:
        facts = super().boot(timeout)
        assert self.guest is not None and self.guest.console is not None
        self.vm = Vm("booted", f"{self.dir}/agent.qmp", self.guest.console, self.guest.pid)
        return facts

    def ensure_alive(self) -> None:
        """Boot the image afresh unless the guest answers with its waiter running (an
        earlier step failed), so that the S4 test does not depend on how S3 ended."""
        if self.vm is not None:
            with contextlib.suppress(GuestError, OSError):  # no answer, or its QEMU is gone
                if self.vm.con.run("kill -0 $(cat /tmp/waiter.pid)", 30).rc == 0:
                    return
        self.log("  the guest does not answer: booting the image again")
        self._kill_clones()
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        self.boot()
        self.prepare()

    # -- plumbing -------------------------------------------------------------------------
    def _fresh(self, what: str, *, incoming: bool) -> Vm:
        """A new QEMU (started paused) on the guest's disk, console attached.

        Same machine, SSDT and loader as the booted one (`clone_argv`); the disk is the
        booted guest's overlay itself, which the previous QEMU has released.
        """
        assert self.guest is not None
        self._seq += 1
        d = self.dir / f"{self._seq}-{what}"
        d.mkdir(mode=0o700)
        argv = with_disk(clone_argv(self.guest.qemu_args(), d, "auto", "0"), str(self.guest.disk))
        qp = start_qemu(argv, str(d / "agent.qmp"), log_path=str(d / "qemu.log"), paused=True,
                        incoming_defer=incoming)
        self._procs.append(qp)
        con, sock = attach_console(str(d / "con-0.sock"), d / "ttyS0.log")
        self._socks.append(sock)
        return Vm(what, qp.qmp_path, con, qp.pid)

    @staticmethod
    def _status(vm: Vm) -> str:
        with QMPSession(vm.qmp) as s:
            return s.status()

    @staticmethod
    def _qmp(vm: Vm, cmd: str, **args: Any) -> Any:
        with QMPSession(vm.qmp) as s:
            return s.cmd(cmd, args or None)

    def _wait_status(self, vm: Vm, want: str, timeout: float) -> float:
        t0 = time.monotonic()
        while (st := self._status(vm)) != want:
            if time.monotonic() - t0 > timeout:
                raise GuestError(f"{vm.name}: QEMU still {st!r}, not {want!r}, after "
                                 f"{timeout:.0f} s; console:\n{vm.con.tail(1500)}")
            time.sleep(0.2)
        return time.monotonic() - t0

    @staticmethod
    def _wait_exit(pid: int, timeout: float) -> bool:
        """Until process `pid` (a QEMU of ours) has exited; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                return True
            if state in ("Z", "X"):
                return True
            time.sleep(0.2)
        return False

    def _quit(self, vm: Vm) -> None:
        """Stop this QEMU for good (the next one opens its disk)."""
        with contextlib.suppress(Exception):  # it may be gone already; the wait tells
            self._qmp(vm, "quit")
        if not self._wait_exit(vm.pid, 60):
            raise GuestError(f"{vm.name}: QEMU pid {vm.pid} did not quit")

    @staticmethod
    def _cli(*args: str) -> dict[str, Any]:
        r = run_cli(*args, "--json", timeout=900)
        if r.returncode != 0:
            raise GuestError(f"vmwipe {args[0]} failed ({r.returncode}): {r.stderr[-800:]}")
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    def _inspect(self, vm: Vm) -> dict[str, Any]:
        extra: dict[str, Any] = self._cli("inspect", "--qmp", vm.qmp)["extra"]
        return extra

    def _wait_back(self, vm: Vm, kind: str, timeout: float) -> str:
        """After a wake-up: systemd-sleep's post hook, or a fresh boot's @@READY."""
        m = vm.con.wait_for(rf"@@SLEEP (post {kind})\n|@@READY", timeout)
        return m.group(1) or "booted"

    def _hook_lines(self, vm: Vm, kind: str) -> list[str]:
        return re.findall(rf"@@SLEEP ((?:pre|post) {kind})", vm.con.tail(20000))

    @staticmethod
    def _fills(inspect: dict[str, Any]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """The kernel CRNG's base_crng.generation and seed ranges, and the witness.

        crng.c lists key, generation, input pool, [vDSO generation,] seed, in that
        order and before the module's witness: the seed is the last CRNG range.
        """
        n = int(inspect["header"]["crng_ranges"])
        fills = inspect["fill_ranges"]
        gen, seed, witness = fills[1], fills[n - 1], fills[n]
        if (gen["length"], seed["length"], witness["length"]) != (8, 32, 32):
            raise GuestError(f"unexpected fill ranges {fills[:n + 1]}")
        return gen, seed, witness

    def _dmesg(self, con: Console, pattern: str) -> list[str]:
        out = sh(con, "dmesg", 60)
        return [ln.strip() for ln in out.splitlines() if re.search(pattern, ln)]

    def _polls(self, con: Console, count: int, timeout: float = 120) -> list[tuple[int, int, bool]]:
        """The waiter's first `count` WOKE lines (each one POLLPRI it saw)."""
        deadline = time.monotonic() + timeout
        while True:
            polls = woke_lines(sh(con, f"cat {WAITER_OUT}"))
            if len(polls) >= count or time.monotonic() > deadline:
                return polls
            time.sleep(0.5)

    # -- the user-space side --------------------------------------------------------------
    def prepare(self) -> Waiter:
        """The sleep hook, the udev rule and the waiter (holding its page) in the guest."""
        assert self.vm is not None
        con = self.vm.con
        put_file(con, "/usr/lib/systemd/system-sleep/vmwipe-lab", SLEEP_HOOK, 0o755)
        put_file(con, "/etc/udev/rules.d/99-vmwipe-lab.rules", UEVENT_RULE)
        sh(con, "udevadm control --reload")
        put_file(con, "/tmp/waiter.py", WAITER)
        start(con, "waiter", "python3 /tmp/waiter.py")
        m = re.search(r"^HELD pfn=(0x[0-9a-f]+) gen=(\d+)$",
                      wait_output(con, "waiter", r"^HELD ", 120), re.MULTILINE)
        assert m is not None
        self.waiter = Waiter(int(m[1], 16), int(m[2]))
        self.log(f"  waiter holds PFN {self.waiter.pfn:#x} at generation {self.waiter.gen}")
        return self.waiter

    @staticmethod
    def _uevents(con: Console, gen: int, timeout: float = 60) -> list[str]:
        """The lines the udev rule wrote, once one says `gen` (udev runs it on its own time)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [ln.strip() for ln in sh(con, f"cat {UEVENTS} 2>/dev/null || true").splitlines()
                     if ln.startswith("UEVENT")]
            if f"UEVENT gen={gen}" in lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.5)

    # -- S3 -------------------------------------------------------------------------------
    def run_s3(self, wake_timeout: float = 300) -> S3Result:
        """systemctl suspend, vmwipe save, vmwipe restore into a fresh QEMU, system_wakeup."""
        assert self.vm is not None
        r = S3Result(waiter=self.waiter)
        src = self.vm
        t0 = time.monotonic()
        r.power_states = sh(src.con, "cat /sys/power/state").strip()
        r.mem_sleep = sh(src.con, "cat /sys/power/mem_sleep").strip()
        boot_id = sh(src.con, "cat /proc/sys/kernel/random/boot_id").strip()
        header_before = self._inspect(src)["header"]
        gpa = self.waiter.pfn * PAGE
        r.page_before = read_gpa(src.qmp, gpa, PAGE) == bytes([PATTERN]) * PAGE
        start(src.con, "suspend", "systemctl suspend")
        try:
            r.timings_s["suspend"] = round(self._wait_status(src, "suspended", 120), 1)
        except GuestError as e:
            said = sh(src.con, "cat /tmp/suspend.out")
            raise GuestError(f"systemctl suspend did not suspend the guest; it said: {said}") from e
        r.suspend_status = self._status(src)
        self.log(f"  S3: {src.name} suspended by systemctl suspend")

        t = time.monotonic()
        state = self.dir / "s3.state"
        r.save = self._cli("save", "--qmp", src.qmp, "--to", str(state), "--paused")
        self._quit(src)
        dst = self.vm = self._fresh("s3-restore", incoming=True)
        r.restore = self._cli("restore", "--qmp", dst.qmp, "--from", str(state))
        r.timings_s["save+restore"] = round(time.monotonic() - t, 1)
        _remove_state(state)
        r.status_after_restore = self._status(dst)
        wiped = self._inspect(dst)
        r.host_generation = int(wiped["header"]["wipe_generation"])
        r.slot_gpas = [int(s["gpa"]) for s in wiped["slots"]]
        r.page_zero_after_restore = read_gpa(dst.qmp, gpa, PAGE) == bytes(PAGE)
        r.slots_zero_after_restore = all(
            read_gpa(dst.qmp, int(s["gpa"]), int(s["npages"]) * PAGE) == bytes(
                int(s["npages"]) * PAGE) for s in wiped["slots"])
        gen_fill, seed_fill, _w = self._fills(wiped)
        r.crng_generation_written = struct.unpack(
            "<Q", read_gpa(dst.qmp, gen_fill["gpa"], 8))[0]
        r.seed_filled = read_gpa(dst.qmp, seed_fill["gpa"], 32) != bytes(32)
        self.log(f"  S3: restored into a fresh QEMU ({r.status_after_restore}), wiped: "
                 f"generation {r.host_generation}, the waiter's page "
                 f"{'zero' if r.page_zero_after_restore else 'NOT ZERO'}")

        t = time.monotonic()
        self._qmp(dst, "system_wakeup")
        r.woke = self._wait_back(dst, "suspend", wake_timeout)
        r.timings_s["wake"] = round(time.monotonic() - t, 1)
        self.log(f"  S3: system_wakeup -> {r.woke}")
        if r.woke == "booted":
            return r
        con = dst.con
        r.hook = self._hook_lines(src, "suspend") + self._hook_lines(dst, "suspend")
        r.boot_id_same = sh(con, "cat /proc/sys/kernel/random/boot_id").strip() == boot_id
        r.sysfs_generation = int(sh(con, f"cat {SYSFS}/generation").strip())
        r.polls = self._polls(con, 1)
        r.uevents = self._uevents(con, r.host_generation)
        after = self._inspect(dst)
        r.header_generation = int(after["header"]["wipe_generation"])
        r.header_boot_id_same = after["header"]["boot_id"] == header_before["boot_id"]
        r.crng_reseeds = (struct.unpack("<Q", read_gpa(dst.qmp, gen_fill["gpa"], 8))[0]
                          - r.crng_generation_written) % (1 << 64)
        r.seed_zero_after = read_gpa(dst.qmp, seed_fill["gpa"], 32) == bytes(32)
        r.dmesg = self._dmesg(con, r"PM: suspend|sleep state S3|crng reseeded|vmwipe")
        r.timings_s["total"] = round(time.monotonic() - t0, 1)
        self.log(f"  S3: woke at generation {r.sysfs_generation}; poll {r.polls}; "
                 f"uevents {r.uevents}; CRNG reseeds {r.crng_reseeds}")
        return r

    # -- S4 -------------------------------------------------------------------------------
    def _state(self, vm: Vm) -> dict[str, Any]:
        con = vm.con
        inspect = self._inspect(vm)
        return {
            "boot_id": sh(con, "cat /proc/sys/kernel/random/boot_id").strip(),
            "used": int(sh(con, f"cat {SYSFS}/used").strip()),
            "generation": int(sh(con, f"cat {SYSFS}/generation").strip()),
            "crng_refresh": sh(con, f"cat {SYSFS}/crng_refresh").strip(),
            "registered": inspect["registered"],
            "errors": inspect["errors"],
            "header": inspect["header"],
            "slot_gpas": sorted(int(s["gpa"]) for s in inspect["slots"]),
            "crng": inspect["crng"]["summary"],
        }

    def run_s4(self, resume_timeout: float = 900) -> S4Result:
        """systemctl hibernate, QEMU powers off, the same disk boots and resumes, then a wipe."""
        assert self.vm is not None
        r = S4Result()
        vm = self.vm
        con = vm.con
        t0 = time.monotonic()
        r.resume_dev = sh(con, "cat /sys/power/resume").strip()
        r.swap_dev = sh(con, "cat /sys/class/block/vda2/dev").strip()
        r.disk_modes = sh(con, "cat /sys/power/disk").strip()
        r.initramfs_resume = sh(
            con, "d=$(mktemp -d) && cd $d && unmkinitramfs /boot/initrd.img-$(uname -r) . && "
                 "cat $(find . -path '*conf/conf.d/resume'); cd / && rm -rf $d", 300).strip()
        r.before = self._state(vm)
        polls = len(woke_lines(sh(con, f"cat {WAITER_OUT}")))
        region = self._inspect(vm)["region"]
        # the guest's power-off stops QEMU instead of ending it, so that the host can read
        # the region as the power-off left it; then the QEMU quits
        self._qmp(vm, "set-action", shutdown="pause")
        t = time.monotonic()
        start(con, "hibernate", "systemctl hibernate")
        deadline = t + resume_timeout
        while not (off := self._status(vm) == "shutdown"):
            if ("post hibernate" in self._hook_lines(vm, "hibernate")  # it failed, runs on
                    or time.monotonic() > deadline):
                break
            time.sleep(0.5)
        r.powered_off = off
        if not off:
            r.hibernate_said = sh(con, "cat /tmp/hibernate.out").strip()
        if off:
            size = int(region["size"])
            r.region_zero_at_poweroff = read_gpa(vm.qmp, int(region["base"]), size) == bytes(size)
        r.timings_s["hibernate"] = round(time.monotonic() - t, 1)
        r.hook = self._hook_lines(vm, "hibernate")
        self._quit(vm)
        self.log(f"  S4: {vm.name} {'powered off' if r.powered_off else 'did NOT power off'} "
                 f"after systemctl hibernate ({r.timings_s['hibernate']} s)")
        if not r.powered_off:
            return r

        t = time.monotonic()
        vm = self.vm = self._fresh("s4-boot", incoming=False)
        self._qmp(vm, "cont")
        r.woke = self._wait_back(vm, "hibernate", resume_timeout)
        r.timings_s["boot+resume"] = round(time.monotonic() - t, 1)
        self.log(f"  S4: the same disk booted again -> {r.woke}")
        if r.woke == "booted":
            return r
        r.hook += self._hook_lines(vm, "hibernate")
        r.grub = re.findall(r"Loading Linux|Loading initial ramdisk", vm.con.tail(20000))
        r.after = self._state(vm)
        r.dmesg = self._dmesg(vm.con, r"PM: |hibernation|sleep state S4|vmwipe")

        # a wipe after the resume: save, restore into a fresh QEMU (paused), look, cont
        t = time.monotonic()
        state = self.dir / "s4.state"
        self._cli("save", "--qmp", vm.qmp, "--to", str(state), "--paused")
        self._quit(vm)
        vm = self.vm = self._fresh("s4-restore", incoming=True)
        r.wipe_restore = self._cli("restore", "--qmp", vm.qmp, "--from", str(state), "--paused")
        _remove_state(state)
        r.wipe_page_zero = read_gpa(vm.qmp, self.waiter.pfn * PAGE, PAGE) == bytes(PAGE)
        r.wipe_header_generation = int(self._inspect(vm)["header"]["wipe_generation"])
        self._qmp(vm, "cont")
        r.wipe_polls = self._polls(vm.con, polls + 1)[polls:]
        r.wipe_sysfs_generation = int(sh(vm.con, f"cat {SYSFS}/generation").strip())
        r.wipe_uevents = self._uevents(vm.con, r.wipe_header_generation)
        r.timings_s["wipe"] = round(time.monotonic() - t, 1)
        r.timings_s["total"] = round(time.monotonic() - t0, 1)
        self.log(f"  S4: resumed: generation {r.after['generation']}, used {r.after['used']}; "
                 f"wipe after resume: generation {r.wipe_sysfs_generation}, polls {r.wipe_polls}")
        return r


def _remove_state(state: Path) -> None:
    """A save and its sidecar, once restored (a GiB each time on /tmp)."""
    state.unlink()
    state.with_name(state.name + ".vmwipe.json").unlink(missing_ok=True)


def describe(r: S3Result | S4Result) -> str:
    """The whole result as JSON (the tests print it; docs/guest-images.md quotes it)."""
    return json.dumps(asdict(r), indent=1)
