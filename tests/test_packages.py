"""The Debian packages, built with Debian's tooling and installed into clean Debian roots.

`make test` runs the slice for this host's release: `make deb`, then the host package
into a fresh minbase root (apt resolves its dependencies from the archive), where
`vmwipe --version`, `vmwipe inspect` against a QEMU started in that root, and
`install-hook` followed by runs of the installed hook must work, and the logrotate
rule must rotate.  `make test-packages` (VMWIPE_PACKAGE_TESTS=full) adds the other
release's host package (Debian 12 and 13 both) and the guest packages in a Debian 12
and a Debian 13 root: DKMS builds the module for that root's kernel, modules.alias has
the ACPI alias, and update-grub puts the escaped memmap= into grub.cfg.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from debroot import DebRoot, build_debs, host_suite, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=str(unavailable_reason()))

FULL = os.environ.get("VMWIPE_PACKAGE_TESTS") == "full"
HOST = host_suite() if unavailable_reason() is None else "bookworm"
OTHER = {"bookworm": "trixie", "trixie": "bookworm"}.get(HOST, "bookworm")
VERSION = "0.1.0"
#: What the host package's test root has before the package: QEMU to inspect, logrotate
#: to run the rule.  In the full run the package's own dependencies come from the
#: archive at install time (apt resolves them); the `make test` slice has them in the
#: cached root already and installs with dpkg.
HOST_ROOT_PACKAGES = ("python3", "qemu-system-x86", "logrotate")
HOST_DEPENDS = ("python3-construct", "python3-libvirt", "python3-tqdm")
#: The region the guest roots ask GRUB to reserve (/etc/default/vmwipe).
REGION = "0x1f000000:0x100000"


def _suites(full_only: bool = False) -> list[object]:
    host = [] if full_only else [HOST]
    other = pytest.param(OTHER, marks=pytest.mark.skipif(
        not FULL, reason="the other release: make test-packages"))
    return [*host, other] if not full_only else [
        pytest.param(s, marks=pytest.mark.skipif(not FULL, reason="make test-packages"))
        for s in (HOST, OTHER)]


_debs: dict[str, Path] = {}


def debs(suite: str) -> Path:
    """The packages for SUITE, built once per test session."""
    if suite not in _debs:
        _debs[suite] = build_debs(suite)
    return _debs[suite]


# --- host package --------------------------------------------------------------------

_PROTECT = """
import json, sys
from pathlib import Path
from vmwipe.host_agent.libvirt.domain_xml import prepare_files, protect_xml
xml = '''<domain type='qemu'><name>pkgtest</name>
<uuid>6a1f2b3c-0000-4000-8000-0000000000aa</uuid><memory unit='KiB'>524288</memory>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>/boot/vmlinuz</kernel></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>'''
edit = protect_xml(xml, Path('/var/lib/vmwipe'))
prepare_files(edit.protection)
print(json.dumps({'xml': edit.xml, 'args': edit.protection.qemu_args(),
                  'region': {'base': edit.protection.base, 'size': edit.protection.size}}))
"""


def _wait_gone(pid: int, timeout: float = 60) -> None:
    """Until the (daemonized, so not our child) QEMU has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1][:1] == "Z":  # exited, not yet reaped
                    return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.1)
    raise AssertionError(f"QEMU {pid} still alive {timeout} s after SIGKILL")


@pytest.fixture(scope="module", params=_suites())
def host_root(request: pytest.FixtureRequest) -> Iterator[DebRoot]:
    suite = request.param
    debdir = debs(suite)
    t0 = time.monotonic()
    backports = ("+backports",) if suite != "bookworm" else ()  # python3-qemu-qmp
    packages: tuple[str, ...] = HOST_ROOT_PACKAGES
    if not FULL:
        packages += HOST_DEPENDS + (("python3-qemu-qmp",) if backports else ())
    root = DebRoot.create(suite, (*backports, *packages))
    try:
        deb = next(debdir.glob(f"vmwipe_{VERSION}_*.deb"))
        (root.path / "tmp" / deb.name).write_bytes(deb.read_bytes())
        if FULL:  # apt resolves the package's dependencies from the archive
            root.run(f"apt-get -q update && apt-get -q -y install --no-install-recommends "
                     f"/tmp/{deb.name}", timeout=900)
        else:  # dpkg refuses the package if a dependency is missing from the root
            root.run(f"dpkg -i /tmp/{deb.name}")
        print(f"\n{suite}: root and host package install took {time.monotonic() - t0:.0f} s")
        yield root
    finally:
        root.remove()


def test_host_package_version_and_files(host_root: DebRoot) -> None:
    r = host_root.run("vmwipe --version")
    assert r.stdout.strip() == f"vmwipe {VERSION}", r.stdout
    # the compiled extensions, imported by the system interpreter from outside any tree
    host_root.run("python3 -I -c 'import vmwipe.host_agent.wipe._pages, "
                  "vmwipe.host_agent.snapshot._ramwalk'")
    p = host_root.path
    assert (p / "usr/share/man/man1/vmwipe.1.gz").is_file()
    completion = p / "usr/share/bash-completion/completions/vmwipe"
    assert "vmwipe" in completion.read_text()
    host_root.run("bash -n /usr/share/bash-completion/completions/vmwipe")
    for d in ("var/lib/vmwipe", "var/log/vmwipe"):
        assert (p / d).is_dir()
    assert (p / "usr/share/vmwipe/selinux/vmwipe.te").is_file()
    vendored = p / "usr/share/vmwipe/vendor/qemu/qmp/qmp_client.py"
    depends = host_root.run("dpkg-query -W -f='${Depends}' vmwipe").stdout
    if host_root.suite == "bookworm":
        assert vendored.is_file() and "qemu-qmp" not in depends, depends
    else:
        assert not vendored.exists() and "python3-qemu-qmp" in depends, depends
    for dep in ("python3-construct", "python3-libvirt"):
        assert dep in depends, depends


def test_host_package_logrotate(host_root: DebRoot) -> None:
    log = host_root.path / "var/log/vmwipe/hook.log"
    log.write_text("pkgtest line\n")
    host_root.run("logrotate -f /etc/logrotate.d/vmwipe")
    assert (host_root.path / "var/log/vmwipe/hook.log.1").read_text() == "pkgtest line\n"
    assert not log.exists() or log.read_text() == ""


def test_host_package_inspect_and_hook(host_root: DebRoot) -> None:
    """`vmwipe inspect` against a QEMU in the root, then the installed hook on it."""
    prot = json.loads(host_root.run(f"python3 -I -c {shlex.quote(_PROTECT)}").stdout)
    qemu = ["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
            "-M", "pc", "-m", "512M", *prot["args"],
            "-qmp", "unix:/run/pkgtest.qmp,server=on,wait=off",
            "-daemonize", "-pidfile", "/run/pkgtest.pid"]
    host_root.run(shlex.join(qemu), timeout=120)
    pid = int((host_root.path / "run/pkgtest.pid").read_text())
    try:
        r = host_root.run("vmwipe inspect --qmp /run/pkgtest.qmp --json")
        rep = json.loads(r.stdout)
        assert rep["extra"]["region"] == prot["region"], rep  # what protect chose
        assert rep["state_after"] == "prelaunch"

        done = host_root.run("vmwipe libvirt install-hook --no-apparmor").stdout
        hook = host_root.path / "etc/libvirt/hooks/qemu.d/50-vmwipe"
        assert f"installed the vmwipe hook as /{hook.relative_to(host_root.path)}" in done, done
        assert "editable" not in done, done
        assert hook.read_text().startswith("#!/usr/bin/python3\n")
        run = "/etc/libvirt/hooks/qemu.d/50-vmwipe pkgtest {} begin -"
        # restore begin: prints nothing (the XML stays libvirt's); started begin: the
        # hook reaches QEMU's second monitor through the installed agent and wipes
        # (nothing is registered: no guest ran), exit 0
        r = host_root.run(run.format("restore"), input=prot["xml"], check=False)
        assert (r.returncode, r.stdout) == (0, ""), r.stderr
        r = host_root.run(run.format("started"), input=prot["xml"], check=False)
        assert (r.returncode, r.stdout) == (0, ""), r.stderr
        log = (host_root.path / "var/log/vmwipe/hook.log").read_text()
        assert "pkgtest" in log, log
    finally:
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
    # the same domain with its QEMU gone: refused (fail closed), one line on stderr
    r = host_root.run(run.format("started"), input=prot["xml"], check=False)
    assert r.returncode == 1 and r.stderr.startswith("vmwipe: pkgtest: "), r.stderr


# --- guest packages ------------------------------------------------------------------


@pytest.fixture(scope="module", params=_suites(full_only=True))
def guest_root(request: pytest.FixtureRequest) -> Iterator[DebRoot]:
    suite = request.param
    # vmwipe-dkms is Architecture: all and libvmwipe plain C: the host's build serves both
    root = DebRoot.create(suite, script="guest-root.sh", extra=(str(debs(HOST)), REGION))
    try:
        yield root
    finally:
        root.remove()


def test_guest_dkms_module(guest_root: DebRoot) -> None:
    kver = guest_root.run("ls /lib/modules").stdout.split()
    assert len(kver) == 1, kver
    status = guest_root.run("dkms status").stdout
    assert f"vmwipe/{VERSION}, {kver[0]}, x86_64: installed" in status, status
    alias = (guest_root.path / "lib/modules" / kver[0] / "modules.alias").read_text()
    assert re.search(r"(?m)^alias acpi\*:VMWP0001:\* vmwipe$", alias), alias[-2000:]
    info = guest_root.run(f"modinfo -k {kver[0]} vmwipe").stdout
    assert f"vermagic:       {kver[0]} " in info, info


def test_guest_grub_memmap(guest_root: DebRoot) -> None:
    cfg = (guest_root.path / "etc/default/grub.d/vmwipe.cfg").read_text()
    assert 'memmap=0x100000\\\\\\$0x1f000000"' in cfg, cfg
    # what GRUB's own tools make of it: grub-mkconfig sources the .cfg and writes the
    # kernel line; in grub.cfg the `$` must stay escaped for GRUB's parser
    out = guest_root.run("grub-mkconfig -o /boot/grub/grub.cfg", check=False)
    grub_cfg = (guest_root.path / "boot/grub/grub.cfg").read_text()
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in grub_cfg.splitlines() if ln.strip().startswith("linux\t")
             or ln.strip().startswith("linux ")]
    assert lines and all("memmap=0x100000\\$0x1f000000" in ln for ln in lines), lines
    # back to the pc-dimm reservation: the file goes
    (guest_root.path / "etc/default/vmwipe").write_text("VMWIPE_RESERVATION=dimm\n")
    guest_root.run("vmwipe-memmap --no-update-grub")
    assert not (guest_root.path / "etc/default/grub.d/vmwipe.cfg").exists()


def test_guest_library_links(guest_root: DebRoot) -> None:
    src = guest_root.path / "tmp/use.c"
    src.write_text('#include <vmwipe.h>\nint main(void) { return vmwipe_alloc(4096) ? 0 : 3; }\n')
    # the root has the kernel's compiler (gcc-12 or gcc-14, for DKMS), not libc6-dev
    guest_root.run("apt-get -q -y install --no-install-recommends libc6-dev", timeout=600)
    guest_root.run('"$(ls /usr/bin/gcc-[0-9]* | head -n 1)" -o /tmp/use /tmp/use.c -lvmwipe')
    r = guest_root.run("/tmp/use", check=False)
    assert r.returncode == 3  # no /dev/vmwipe outside a vmwipe guest: NULL, as documented
    assert (guest_root.path / "usr/lib/x86_64-linux-gnu/vmwipe/libvmwipe-preload.so").is_file()
    rules = guest_root.path / "lib/udev/rules.d/60-vmwipe.rules"
    if not rules.exists():
        rules = guest_root.path / "usr/lib/udev/rules.d/60-vmwipe.rules"
    assert 'GROUP="vmwipe"' in rules.read_text()
    guest_root.run("getent group vmwipe")


# --- SELinux module against a whole policy -------------------------------------------

SELINUX_ROOT_PACKAGES = ("selinux-policy-default", "selinux-policy-dev", "checkpolicy",
                         "semodule-utils", "policycoreutils", "make")


@pytest.mark.skipif(not FULL, reason="make test-packages")
def test_selinux_module_links_into_debian_policy() -> None:
    """`semodule -n -i` links the module into Debian's reference policy store (no kernel
    needed): every type it requires (svirt_t, virtd_t) and interface it calls exists; a
    module that requires a type the policy lacks is refused.  RHEL's targeted policy is
    not available here (docs/packaging.md)."""
    root = DebRoot.create(HOST, SELINUX_ROOT_PACKAGES)
    try:
        src = Path(__file__).resolve().parent.parent / "selinux"
        te = (src / "vmwipe.te").read_text()
        bad = te + ("require {\n\ttype vmwipe_nosuch_t;\n}\n"
                    "allow vmwipe_nosuch_t self:process fork;\n")
        for name, text in (("good", te), ("bad", bad)):
            d = root.path / "tmp" / name
            d.mkdir()
            (d / "vmwipe.te").write_text(text)
            (d / "vmwipe.fc").write_text((src / "vmwipe.fc").read_text())
            r = root.run(f"cd /tmp/{name} && make -f /usr/share/selinux/devel/Makefile "
                         "vmwipe.pp && semodule -n -i vmwipe.pp && semodule -n -l", check=False)
            if name == "good":
                assert r.returncode == 0 and "vmwipe" in r.stdout.split(), r.stderr[-2000:]
            else:
                assert r.returncode != 0 and "Failed" in r.stderr, r.stdout + r.stderr
    finally:
        root.remove()
