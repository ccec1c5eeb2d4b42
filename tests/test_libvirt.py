"""libvirt integration against a real libvirtd: protect, the restore hook, API-driven flows.

One libvirtd for the whole module (see `libvirtd_fixture`), one protected test
domain: the Debian kernel under TCG, direct kernel boot of the `vmwipe.lab`
initramfs plus a small overlay whose /init loads vmwipe.ko and runs
`drbg_stream`, the example DRBG that keeps its state in vmwipe pages.  Its
serial output goes to a file; every line is "EPOCH COUNTER VALUE" and a new
EPOCH means the DRBG found its state zeroed and reseeded.  That is the guest's
own report: after a restore, the first line the guest prints must carry a new
epoch (at most one line already in flight at save time may still carry the
old one), so the secret pages were zero when the guest first ran again.

The tests run in file order and share the domain's state: fresh boot, virsh
save/restore, managedsave/start, snapshot revert, the API-driven commands, a
forged table that makes the restore fail, and the migration path of the hook.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from libvirtd_fixture import DROPIN, HOOKS_DIR, STATE_DIR, URI, LibvirtLab, unavailable_reason

DOMAIN = f"vmwipe-test-{os.getpid()}"
MEM_MIB = 512
LINE_RE = re.compile(r"^([0-9a-f]{16}) (\d+) ([0-9a-f]{16})$")

pytestmark = pytest.mark.slow

OVERLAY_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo 1 > /proc/sys/kernel/printk
# like modprobe, pass vmwipe.crng_refresh= from the kernel command line (test_require_crng_*)
crng=
for w in $(cat /proc/cmdline); do
  case $w in vmwipe.crng_refresh=*) crng=crng_refresh=${w#vmwipe.crng_refresh=};; esac
done
if insmod /vmwipe.ko $crng; then echo "@@MODULE loaded $crng"; else echo "@@MODULE failed"; fi
echo "@@READY $(cat /proc/sys/kernel/random/boot_id)"
drbg_stream -i 150
echo "@@DRBG exited $?"
exec sleep 100000
"""


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmwipe.host_agent.cli", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def build_initrd(work: Path) -> tuple[Path, Path]:
    """The lab's kernel and initramfs, plus our /init appended as a second cpio archive."""
    from vmwipe.lab.build import build_guest_image, default_kernel

    kernel = default_kernel()
    if kernel is None or kernel.missing():
        pytest.skip("no Debian kernel with headers installed (make setup)")
    image = build_guest_image(kernel)
    root = work / "overlay"
    root.mkdir()
    init = root / "vmwipe-libvirt-init"
    init.write_text(OVERLAY_INIT)
    init.chmod(0o755)
    overlay = work / "overlay.cpio"
    with overlay.open("wb") as fh:
        subprocess.run(["cpio", "-o", "-H", "newc", "--owner=0:0", "--quiet"], cwd=root,
                       input=b"vmwipe-libvirt-init\n", stdout=fh, check=True)
    initrd = work / "initrd.cpio"
    initrd.write_bytes(image.initramfs.read_bytes() + overlay.read_bytes())
    initrd.chmod(0o644)
    return kernel.image, initrd


def domain_xml(name: str, kernel: Path, initrd: Path, disk: Path | None, serial: Path) -> str:
    disk_xml = "" if disk is None else (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>")
    return textwrap.dedent(f"""\
        <domain type='qemu'>
          <name>{name}</name>
          <uuid>{uuid.uuid4()}</uuid>
          <memory unit='MiB'>{MEM_MIB}</memory>
          <vcpu>1</vcpu>
          <os>
            <type arch='x86_64' machine='pc'>hvm</type>
            <kernel>{kernel}</kernel>
            <initrd>{initrd}</initrd>
            <cmdline>console=ttyS0 panic=-1 quiet rdinit=/vmwipe-libvirt-init</cmdline>
          </os>
          <features><acpi/></features>
          <on_poweroff>destroy</on_poweroff>
          <on_reboot>restart</on_reboot>
          <on_crash>destroy</on_crash>
          <devices>
            <emulator>/usr/bin/qemu-system-x86_64</emulator>
            {disk_xml}
            <serial type='file'>
              <source path='{serial}' append='on'/>
              <target port='0'/>
            </serial>
            <memballoon model='none'/>
          </devices>
        </domain>
        """)


@dataclass
class Env:
    """The module's shared state: lab, domain, serial log, epochs seen so far."""

    lab: LibvirtLab
    name: str
    serial: Path
    kernel: Path = Path()
    initrd: Path = Path()
    epochs: set[str] = field(default_factory=set)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def dom(self) -> Any:
        return self.lab.conn.lookupByName(self.name)

    def log_size(self) -> int:
        try:
            return self.serial.stat().st_size
        except OSError:
            return 0

    def lines_since(self, offset: int) -> list[str]:
        """Complete serial lines written after `offset` (a line cut at `offset` is dropped)."""
        try:
            data = self.serial.read_bytes()
        except OSError:
            return []
        text = data[offset:].decode("utf-8", "replace")
        if offset > 0 and data[offset - 1 : offset] != b"\n":
            text = text.split("\n", 1)[1] if "\n" in text else ""
        return [ln.strip("\r") for ln in text.split("\n")[:-1]]

    def drbg_since(self, offset: int) -> list[tuple[str, int]]:
        out = []
        for ln in self.lines_since(offset):
            m = LINE_RE.match(ln.strip())
            if m:
                out.append((m[1], int(m[2])))
        return out

    def wait_lines(self, offset: int, n: int, timeout: float = 90) -> list[tuple[str, int]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.drbg_since(offset)
            if len(got) >= n:
                self.epochs.update(e for e, _c in got)
                return got
            if time.monotonic() > deadline:
                tail = "\n".join(self.lines_since(max(0, self.log_size() - 1500)))
                raise AssertionError(f"guest printed {len(got)} DRBG lines, wanted {n}; "
                                     f"serial tail:\n{tail}\nhook log:\n{self.lab.hook_log()}")
            time.sleep(0.1)

    def assert_reseeded(self, offset: int, stale: str, running: str | None = None) -> str:
        """The guest's first output after `offset` comes from a reseeded DRBG.

        `stale` is the epoch held in the restored memory image.  At most one
        line of it may appear (a line already past the DRBG's last validity
        check when the state was saved); every later line must come from one
        new epoch.  `running` names the epoch of a guest still running when
        `offset` was taken; its lines before the restore are skipped.  (A new
        epoch can repeat one seen before: two restores of one image start from
        the same kernel CRNG state, which is vmgenid's business, not ours.)
        """
        skip = 0
        while True:
            got = self.wait_lines(offset, skip + 4)
            skip = 0
            while running is not None and skip < len(got) and got[skip][0] == running != stale:
                skip += 1
            if len(got) - skip >= 4:
                got = got[skip:]
                break
        first_new = next(i for i, (e, _c) in enumerate([*got, ("", 0)]) if e != stale)
        assert first_new <= 1, (
            f"the guest printed {first_new} lines from the restored epoch {stale}: its secrets "
            f"survived the restore: {got[:5]}\nhook log:\n{self.lab.hook_log()}")
        new = got[first_new][0]
        assert new and all(e == new for e, _c in got[first_new:]), got
        assert got[first_new][1] <= 1, f"the new epoch does not start at counter 0: {got}"
        return new

    def assert_continued(self, offset: int, epoch: str) -> None:
        got = self.wait_lines(offset, 3)
        assert {e for e, _c in got} == {epoch}, got

    def current_epoch(self) -> str:
        got = self.wait_lines(max(0, self.log_size() - 400), 1)
        return got[-1][0]

    def domstate(self) -> str:
        return self.lab.virsh("domstate", self.name).stdout.strip()

    def wait_running_output(self) -> str:
        off = self.log_size()
        return self.wait_lines(off, 2)[-1][0]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    why = unavailable_reason()
    if why is not None:
        pytest.skip(why)
    lab = LibvirtLab.create()
    try:
        kernel, initrd = build_initrd(lab.work)
        disk = lab.work / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
        os.chmod(disk, 0o666)
        serial = lab.work / "serial.log"
        lab.start()
        lab.conn.defineXML(domain_xml(DOMAIN, kernel, initrd, disk, serial))
        lab.domains.append(DOMAIN)
        e = Env(lab, DOMAIN, serial, kernel, initrd)
        yield e
    finally:
        lab.stop()
        print(f"\nlibvirt test timings (s): {json.dumps(lab.timings)}", file=sys.stderr)


def _timed(e: Env, key: str, t0: float) -> None:
    e.lab.timings[key] = round(time.monotonic() - t0, 2)


# --- hook install, protect/unprotect ------------------------------------------------------


def test_install_hook_dropin(env: Env) -> None:
    """libvirt 9 and 11 run qemu.d/: the hook goes there and the site's `qemu` stays as it is
    (the restore tests below see libvirtd run both: the stand-in logs its calls)."""
    out = env.lab.install_output
    assert f"installed the vmwipe hook as {DROPIN}" in out, out
    assert "restart" in out, out
    assert "vmwipe-libvirt-hook" in DROPIN.read_text()
    assert os.access(DROPIN, os.X_OK)
    assert "stand-in for a site's own hook" in (HOOKS_DIR / "qemu").read_text()
    assert not (HOOKS_DIR / "qemu.vmwipe-chained").exists()
    from libvirtd_fixture import APPARMOR_LOCAL

    if APPARMOR_LOCAL.exists():
        assert "/var/lib/vmwipe/mon/@{profile_name}.qmp rw," in APPARMOR_LOCAL.read_text()
    again = run_cli("libvirt", "install-hook")
    assert again.returncode == 0 and "already" in again.stdout, again.stdout + again.stderr


def test_protect_unprotect_idempotent(env: Env) -> None:
    dom = env.dom
    original = dom.XMLDesc(0)
    dry = run_cli("libvirt", "protect", env.name, "--connect", URI, "--dry-run")
    assert dry.returncode == 0 and "would change" in dry.stdout, dry.stderr
    assert dom.XMLDesc(0) == original

    first = run_cli("libvirt", "protect", env.name, "--connect", URI, "--diff")
    assert first.returncode == 0, first.stderr
    for needle in ("+ metadata vmwipe:protect", "+ kernel cmdline memmap=0x100000$",
                   "+ qemu:arg -acpitable", "+ qemu:arg -chardev socket,id=vmwipe",
                   "+ qemu:arg -mon chardev=vmwipe,mode=control",
                   "+ qemu:arg -device loader,file=", "+++ "):
        assert needle in first.stdout, first.stdout
    protected = dom.XMLDesc(0)
    assert "qemu:commandline" in protected and "urn:vmwipe:libvirt:1" in protected

    second = run_cli("libvirt", "protect", env.name, "--connect", URI, "--json")
    rep = json.loads(second.stdout)
    assert rep["changed"] is False and rep["changes"] == [], second.stdout
    assert dom.XMLDesc(0) == protected

    un = run_cli("libvirt", "unprotect", env.name, "--connect", URI)
    assert un.returncode == 0 and "- kernel cmdline memmap=" in un.stdout, un.stdout + un.stderr
    assert dom.XMLDesc(0) == original
    un2 = run_cli("libvirt", "unprotect", env.name, "--connect", URI)
    assert "nothing to change" in un2.stdout

    final = run_cli("libvirt", "protect", env.name, "--connect", URI)
    assert final.returncode == 0, final.stderr
    assert dom.XMLDesc(0) == protected
    rep2 = json.loads(run_cli("libvirt", "protect", env.name, "-c", URI, "--json").stdout)
    prot = rep2["protection"]
    files = STATE_DIR / "domains" / dom.UUIDString()
    assert (files / "vmwipe-ssdt.aml").is_file() and (files / "vmwipe-zero-page.bin").is_file()
    mon_dir = Path(prot["monitor"]).parent
    import pwd

    assert mon_dir.stat().st_uid == pwd.getpwnam("libvirt-qemu").pw_uid


def test_dimm_reservation_end_to_end(env: Env) -> None:
    """The reservation for guests whose command line cannot change: a 2 MiB pc-dimm at the
    start of the hotplug area (plus the NUMA node libvirt then requires).  Linux does not
    online it, vmwipe.ko binds to it, and a save/restore wipes through it."""
    import libvirt_qemu

    name = f"{env.name}-dimm"
    serial = env.lab.work / "serial-dimm.log"
    env.lab.conn.defineXML(domain_xml(name, env.kernel, env.initrd, None, serial))
    env.lab.domains.append(name)
    r = run_cli("libvirt", "protect", name, "-c", URI, "--reservation", "dimm")
    assert r.returncode == 0, r.stdout + r.stderr
    for needle in ("+ pc-dimm 2048 KiB at 0x100000000", "+ NUMA node 0", "+ <maxMemory"):
        assert needle in r.stdout, r.stdout
    assert "memmap=" not in r.stdout
    again = run_cli("libvirt", "protect", name, "-c", URI)
    assert "nothing to change" in again.stdout, again.stdout
    e2 = Env(env.lab, name, serial)
    e2.lab.virsh("start", name)
    env.lab.note_qemu(name)
    try:
        e2.wait_lines(0, 3, timeout=120)
        assert "@@MODULE loaded" in "\n".join(e2.lines_since(0))
        devs = json.loads(libvirt_qemu.qemuMonitorCommand(
            e2.dom, '{"execute":"query-memory-devices"}', 0))["return"]
        assert [(d["data"]["addr"], d["data"]["size"]) for d in devs] == [(1 << 32, 2 << 20)]
        save = env.lab.work / "dimm.save"
        env.lab.virsh("save", name, str(save))
        old = e2.current_epoch()
        off = e2.log_size()
        env.lab.virsh("restore", str(save))
        env.lab.note_qemu(name)
        e2.assert_reseeded(off, old)
        assert re.search(rf"{name}: restored from a saved state.*region 0x100000000\+0x100000.*"
                         r"wiped and verified", env.lab.hook_log()), env.lab.hook_log()
        _restore_after_reprotect_refused(env, name)
    finally:
        env.lab.virsh("destroy", name, check=False)
    un = run_cli("libvirt", "unprotect", name, "-c", URI)
    assert un.returncode == 0 and "- pc-dimm" in un.stdout, un.stdout + un.stderr
    xml = e2.dom.XMLDesc(0)
    assert "<maxMemory" not in xml and "memory model" not in xml and "<numa>" not in xml


def _restore_after_reprotect_refused(env: Env, name: str) -> None:
    """`protect` run again switches the reservation (dimm -> memmap: the SSDT file now names
    low RAM); an image saved before still holds a guest whose table is in the DIMM.  Given
    an XML without the vmwipe metadata the hook does not look, and even with the reset
    guard off the API restore must refuse: the region the image's own XML records differs
    from the SSDT's, and reading the SSDT's would find "nothing registered"."""
    save = env.lab.work / "dimm-reprotect.save"
    env.lab.virsh("save", name, str(save))
    r = run_cli("libvirt", "protect", name, "-c", URI, "--reservation", "memmap")
    assert r.returncode == 0 and "memmap=" in r.stdout, r.stdout + r.stderr
    root = ET.fromstring(env.lab.conn.saveImageGetXMLDesc(str(save), 0))
    meta = root.find("metadata")
    assert meta is not None
    for el in list(meta):
        meta.remove(el)
    xml = env.lab.work / "dimm-reprotect.xml"
    xml.write_text(ET.tostring(root, encoding="unicode"))
    r = run_cli("libvirt", "restore", str(save), "--xml", str(xml), "--no-reset-guard",
                "--no-resume", "-c", URI)
    env.lab.note_qemu(name)
    assert r.returncode == 5, r.stdout + r.stderr
    assert re.search(r"the XML in \S+ says region 0x100000000\+0x100000, QEMU's SSDT says",
                     r.stderr), r.stderr
    assert env.lab.virsh("domstate", name).stdout.strip() == "paused"
    env.lab.virsh("destroy", name)
    r = run_cli("libvirt", "protect", name, "-c", URI, "--reservation", "dimm")
    assert r.returncode == 0, r.stdout + r.stderr


# --- the hook on a real guest ---------------------------------------------------------------


def test_paused_fresh_boot_starts(env: Env) -> None:
    """`virsh start --paused` looks like libvirt 11's snapshot revert at `started` (prelaunch,
    no migration, no -loadvm): the hook reads the region, finds nothing, and lets it boot."""
    off = env.log_size()
    env.lab.virsh("start", "--paused", env.name)
    env.lab.note_qemu(env.name)
    try:
        assert env.domstate() == "paused"
        log = env.lab.hook_log()
        assert re.search(rf"{env.name}: fresh --paused boot .*no vmwipe table in the region",
                         log), log
        env.lab.virsh("resume", env.name)
        env.wait_lines(off, 1, timeout=120)
        assert "@@MODULE loaded" in "\n".join(env.lines_since(off))
    finally:
        env.lab.virsh("destroy", env.name, check=False)


def test_fresh_boot_untouched(env: Env) -> None:
    t0 = time.monotonic()
    off = env.log_size()
    env.lab.virsh("start", env.name)
    env.lab.note_qemu(env.name)
    got = env.wait_lines(off, 3, timeout=120)
    _timed(env, "boot to first DRBG lines", t0)
    text = "\n".join(env.lines_since(off))
    assert "@@MODULE loaded" in text, text
    assert len({e for e, _c in got}) == 1, got
    log = env.lab.hook_log()
    assert f"{env.name}: skipped: fresh boot" in log, log
    chained = env.lab.chained_log.read_text()
    assert f"{env.name} started begin -" in chained, chained


def test_virsh_save_restore_wipes(env: Env) -> None:
    save = env.lab.work / "a.save"
    t0 = time.monotonic()
    env.lab.virsh("save", env.name, str(save))
    _timed(env, "virsh save", t0)
    old = env.current_epoch()
    off = env.log_size()
    t0 = time.monotonic()
    env.lab.virsh("restore", str(save))
    _timed(env, "virsh restore (with hook wipe)", t0)
    env.lab.note_qemu(env.name)
    env.assert_reseeded(off, old)
    log = env.lab.hook_log()
    assert re.search(rf"{env.name}: restored from a saved state.*pages in \d+ spans wiped and "
                     r"verified, generation \d+ -> \d+", log), log
    chained = env.lab.chained_log.read_text()
    assert f"{env.name} restore begin -" in chained


def test_managedsave_start_wipes(env: Env) -> None:
    env.lab.virsh("managedsave", env.name)
    old = env.current_epoch()
    off = env.log_size()
    t0 = time.monotonic()
    env.lab.virsh("start", env.name)
    _timed(env, "managedsave start (with hook wipe)", t0)
    env.lab.note_qemu(env.name)
    env.assert_reseeded(off, old)


@pytest.fixture(scope="module")
def snapshot_epoch() -> list[str]:
    """The DRBG epoch held in snapshot s1 (filled by test_snapshot_revert_wipes)."""
    return []


def test_snapshot_revert_wipes(env: Env, snapshot_epoch: list[str]) -> None:
    """Internal snapshot with memory, reverted while shut off: libvirt 9 starts QEMU with
    -loadvm, libvirt 11 starts it with -S and loads the snapshot over QMP (snapshot-load)."""
    env.lab.virsh("snapshot-create-as", env.name, "s1", timeout=180)
    at_snapshot = env.current_epoch()
    snapshot_epoch.append(at_snapshot)
    env.lab.virsh("destroy", env.name)
    off = env.log_size()
    t0 = time.monotonic()
    env.lab.virsh("snapshot-revert", env.name, "s1", timeout=180)
    _timed(env, "snapshot-revert (with hook wipe)", t0)
    env.lab.note_qemu(env.name)
    new = env.assert_reseeded(off, at_snapshot)
    assert new != at_snapshot
    assert "reverted to an internal snapshot" in env.lab.hook_log()


def test_api_restore(env: Env) -> None:
    save = env.lab.work / "b.save"
    env.lab.virsh("save", env.name, str(save))
    old = env.current_epoch()
    off = env.log_size()
    t0 = time.monotonic()
    r = run_cli("libvirt", "restore", str(save), "-c", URI, "--json")
    _timed(env, "vmwipe libvirt restore", t0)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["resumed"] is True and rep["wipe"]["status"] == "wiped", rep
    # the hook wiped first (the domain is protected), so this second wipe is verified too
    assert rep["wipe"]["generation_after"] is not None
    env.lab.note_qemu(env.name)
    env.assert_reseeded(off, old)


def test_api_start_and_revert(env: Env, snapshot_epoch: list[str]) -> None:
    env.lab.virsh("managedsave", env.name)
    old = env.current_epoch()
    off = env.log_size()
    r = run_cli("libvirt", "start", env.name, "-c", URI)
    assert r.returncode == 0 and "resumed" in r.stdout, r.stdout + r.stderr
    env.lab.note_qemu(env.name)
    env.assert_reseeded(off, old)

    running = env.current_epoch()  # revert a running domain
    off = env.log_size()
    r = run_cli("libvirt", "revert", env.name, "s1", "-c", URI, timeout=240)
    assert r.returncode == 0 and "wiped and verified" in r.stdout, r.stdout + r.stderr
    env.assert_reseeded(off, snapshot_epoch[0], running)


def _save_xml(env: Env, save: Path, require_crng: bool | None) -> Path:
    """The save image's domain XML with its vmwipe metadata edited: None drops the marker
    (the hook then stands aside), a bool sets the policy as `protect` stores it."""
    import xml.etree.ElementTree as ET
    from dataclasses import replace

    import libvirt

    from vmwipe.host_agent.libvirt.domain_xml import Protection

    root = ET.fromstring(env.lab.conn.saveImageGetXMLDesc(str(save),
                                                         libvirt.VIR_DOMAIN_XML_SECURE))
    meta = root.find("metadata")
    assert meta is not None
    el = meta.find("{urn:vmwipe:libvirt:1}protect")
    assert el is not None
    if require_crng is None:
        meta.remove(el)
    else:
        prot = replace(Protection.from_element(el), require_crng=require_crng)
        el.attrib.clear()
        el.attrib.update(prot.to_attrib())
    alt = save.with_suffix(".xml")
    alt.write_text(ET.tostring(root, encoding="unicode"))
    return alt


def test_require_crng_lets_a_registered_guest_run(env: Env) -> None:
    """The guest's module registers the kernel CRNG: with the policy in the domain's
    metadata (as `protect --require-crng` stores it) the hook wipes and logs
    "kernel CRNG: refreshed", and `libvirt restore --require-crng` resumes it."""
    import libvirt

    from vmwipe.host_agent.libvirt.domain_xml import read_protection

    def policy() -> bool:
        prot = read_protection(env.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert prot is not None
        return prot.require_crng

    r = run_cli("libvirt", "protect", env.name, "-c", URI, "--require-crng")
    try:
        assert r.returncode == 0 and "require-crng" in r.stdout, r.stdout + r.stderr
        assert policy()
    finally:
        r = run_cli("libvirt", "protect", env.name, "-c", URI)
    assert r.returncode == 0 and not policy(), r.stdout + r.stderr
    save = env.lab.work / "crng-active.save"
    env.lab.virsh("save", env.name, str(save))
    old = env.current_epoch()
    off = env.log_size()
    r = run_cli("libvirt", "restore", str(save), "--xml", str(_save_xml(env, save, True)),
                "--require-crng", "-c", URI, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    env.lab.note_qemu(env.name)
    crng = json.loads(r.stdout)["wipe"]["crng"]
    assert crng["registered"] and crng["summary"] == f"refreshed ({crng['ranges']} ranges)", crng
    assert re.search(rf"{env.name}: restored from a saved state.*wiped and verified, "
                     rf"generation \d+ -> \d+; kernel CRNG: refreshed \({crng['ranges']} ranges\)",
                     env.lab.hook_log()), env.lab.hook_log()
    env.assert_reseeded(off, old)


def _forge_table(env: Env) -> None:
    """Set a reserved bit in the first VALID slot of the paused guest's table."""
    from vmwipe.host_agent.libvirt.flows import LibvirtMonitor, qemu_pid_of
    from vmwipe.host_agent.qemu.region import discover_region, read_cmdline
    from vmwipe.host_agent.wipe.backends import ProcessVMBackend
    from vmwipe.host_agent.wipe.memmap import load_memory_map
    from vmwipe.protocol import SLOT_SIZE, SLOT_VALID, SLOTS_OFFSET

    mon = LibvirtMonitor(env.dom)
    pid = qemu_pid_of(env.name)
    region = discover_region(pid, read_cmdline(pid)).region
    ids = {str(m["id"]) for m in mon.cmd("query-memdev")}
    with ProcessVMBackend(load_memory_map(mon.hmp, ids), pid) as be:
        slots = be.read(region.base + SLOTS_OFFSET, region.size - SLOTS_OFFSET)
        for i in range(0, len(slots), SLOT_SIZE):
            word = int.from_bytes(slots[i : i + 8], "little")
            if word & SLOT_VALID:
                be.write(region.base + SLOTS_OFFSET + i, (word | 0x4).to_bytes(8, "little"))
                return
    raise AssertionError("no VALID slot in the guest's table (is drbg_stream running?)")


def test_forged_table_blocks_restore(env: Env) -> None:
    env.lab.virsh("suspend", env.name)
    _forge_table(env)
    bad = env.lab.work / "forged.save"
    env.lab.virsh("save", env.name, str(bad))
    off = env.log_size()
    r = env.lab.virsh("restore", str(bad), "--running", check=False)
    assert r.returncode != 0, r.stdout
    assert "vmwipe" in r.stderr and "slot" in r.stderr, r.stderr
    print(f"\nvirsh restore of a forged table: {r.stderr.strip()}")
    assert env.domstate() == "shut off"
    time.sleep(1.0)
    assert env.drbg_since(off) == [], "the guest ran although the wipe failed"
    assert "the guest is not allowed to run" in env.lab.hook_log()
    # the API path refuses too, and leaves nothing running
    r = run_cli("libvirt", "restore", str(bad), "-c", URI)
    assert r.returncode != 0 and "restore" in r.stderr, r.stderr
    assert env.domstate() == "shut off"


def test_api_restore_refuses_to_resume(env: Env) -> None:
    """Restored with XML lacking the marker, the hook stands aside; the API flow must
    then find the forged table itself, refuse, and leave the domain paused."""
    import xml.etree.ElementTree as ET

    import libvirt

    bad = env.lab.work / "forged.save"
    root = ET.fromstring(env.lab.conn.saveImageGetXMLDesc(str(bad),
                                                         libvirt.VIR_DOMAIN_XML_SECURE))
    meta = root.find("metadata")
    assert meta is not None
    for el in list(meta):
        if el.tag.startswith("{urn:vmwipe:libvirt:1}"):
            meta.remove(el)
    alt = env.lab.work / "no-marker.xml"
    alt.write_text(ET.tostring(root, encoding="unicode"))
    off = env.log_size()
    r = run_cli("libvirt", "restore", str(bad), "--xml", str(alt), "-c", URI)
    env.lab.note_qemu(env.name)
    try:
        assert r.returncode == 6, r.stdout + r.stderr  # InvalidTableError
        assert "left paused" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert env.domstate() == "paused"
        time.sleep(1.0)
        assert env.drbg_since(off) == [], "the guest ran although the wipe failed"
    finally:
        env.lab.virsh("destroy", env.name, check=False)


def test_hook_leaves_incoming_migration_alone(env: Env, tmp_path: Path) -> None:
    """A QEMU waiting for an incoming migration (RAM not here yet) is not wiped."""
    from vmwipe.host_agent.libvirt.domain_xml import protect_xml
    from vmwipe.host_agent.qemu.launcher import start_qemu

    d = Path(env.lab.work) / "mig"
    d.mkdir()
    xml = protect_xml(env.dom.XMLDesc(0), state_dir=d).xml
    from vmwipe.host_agent.libvirt.domain_xml import read_protection

    prot = read_protection(xml)
    assert prot is not None
    from vmwipe.host_agent.libvirt.domain_xml import prepare_files

    prepare_files(prot)
    argv = ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-accel", "tcg",
            "-M", "pc", "-m", f"{MEM_MIB}M", *prot.qemu_args()[:4]]
    q = start_qemu(argv, prot.monitor, log_path=str(d / "qemu.log"), incoming_defer=True)
    try:
        for step in ("defer", "listening"):
            if step == "listening":
                from vmwipe.host_agent.qemu.qmp import QMPSession

                with QMPSession(prot.monitor) as s:
                    s.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            p = subprocess.run([str(DROPIN), "mig-test", "started", "begin", "-"],
                               input=xml, capture_output=True, text=True, timeout=60, check=False)
            assert p.returncode == 0 and p.stdout == "", p.stdout + p.stderr
        log = env.lab.hook_log()
        assert log.count("mig-test: skipped: incoming live migration") == 2, log
        with QMPSession(prot.monitor) as s:
            assert s.status() == "inmigrate"
    finally:
        q.kill()


def test_restore_begin_prints_nothing(env: Env) -> None:
    xml = env.dom.XMLDesc(0)
    p = subprocess.run([str(DROPIN), env.name, "restore", "begin", "-"],
                       input=xml, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0 and p.stdout == "", (p.stdout, p.stderr)


def test_live_migration_to_second_libvirtd_untouched(env: Env) -> None:
    """A real live migration into a second libvirtd on this host: the destination's hook
    runs at `started` while QEMU is inmigrate and leaves the guest alone (not a clone)."""
    from libvirtd_fixture import SecondLibvirtd

    from vmwipe.host_agent.libvirt.domain_xml import read_protection

    prot = read_protection(env.dom.XMLDesc(0))
    assert prot is not None
    dest = SecondLibvirtd(env.lab.work / "dest")
    try:
        try:
            dest.start(Path(prot.monitor).parent)
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            pytest.skip(f"a second libvirtd cannot run side by side here: {e}")
        for snap in env.dom.listAllSnapshots(0):  # libvirt refuses to migrate with snapshots
            env.lab.virsh("snapshot-delete", env.name, snap.getName(), "--metadata")
        off = env.log_size()
        env.lab.virsh("start", env.name)
        env.lab.note_qemu(env.name)
        before = env.wait_lines(off, 3, timeout=120)
        epoch, last = before[-1]
        t0 = time.monotonic()
        env.lab.virsh("migrate", "--live", "--unsafe", env.name, dest.uri,
                      "--migrateuri", "tcp://127.0.0.1", timeout=300)
        _timed(env, "live migration to the second libvirtd", t0)
        assert env.domstate() == "shut off"
        ddom = dest.conn.lookupByName(env.name)
        assert ddom.isActive()
        after = env.wait_lines(env.log_size(), 3)  # the destination appends to the same file
        assert {e for e, _c in after} == {epoch}, (epoch, after)
        assert after[0][1] > last
        log = env.lab.hook_log()
        assert f"{env.name}: skipped: incoming live migration" in log, log
    finally:
        dest.stop()


def test_require_crng_refuses_a_guest_with_crng_refresh_0(env: Env) -> None:
    """A guest booted with vmwipe.crng_refresh=0 and protected with --require-crng: its
    restore is refused by the hook (libvirt kills it; it never runs) and by
    `libvirt restore --require-crng` (exit 15, left paused), before anything is written."""
    import libvirt

    dom = env.dom
    if dom.isActive():
        env.lab.virsh("destroy", env.name)
    original = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    try:
        cmdline = "rdinit=/vmwipe-libvirt-init"
        env.lab.conn.defineXML(original.replace(cmdline, f"{cmdline} vmwipe.crng_refresh=0"))
        r = run_cli("libvirt", "protect", env.name, "-c", URI, "--require-crng")
        assert r.returncode == 0, r.stdout + r.stderr
        off = env.log_size()
        env.lab.virsh("start", env.name)  # a fresh boot: the policy does not apply
        env.lab.note_qemu(env.name)
        env.wait_lines(off, 2, timeout=120)
        assert "@@MODULE loaded crng_refresh=0" in "\n".join(env.lines_since(off))
        save = env.lab.work / "crng-off.save"
        env.lab.virsh("save", env.name, str(save))

        off = env.log_size()
        r = env.lab.virsh("restore", str(save), "--running", check=False)
        assert r.returncode != 0, r.stdout
        why = "--require-crng: kernel CRNG: NOT registered (disabled in the guest: "
        assert why in r.stderr and "not allowed to run" in r.stderr, r.stderr
        print(f"\nvirsh restore refused by --require-crng: {r.stderr.strip()}")
        assert env.domstate() == "shut off"
        assert why in env.lab.hook_log()

        alt = _save_xml(env, save, None)  # no marker: the hook stands aside, the API refuses
        r = run_cli("libvirt", "restore", str(save), "--xml", str(alt), "--require-crng",
                    "-c", URI)
        env.lab.note_qemu(env.name)
        assert r.returncode == 15, r.stdout + r.stderr
        assert why in r.stderr and "left paused" in r.stderr and r.stderr.count("\n") == 1
        assert env.domstate() == "paused"
        time.sleep(1.0)
        assert env.drbg_since(off) == [], "the guest ran although it was refused"
    finally:
        env.lab.virsh("destroy", env.name, check=False)
        env.lab.conn.defineXML(original)
