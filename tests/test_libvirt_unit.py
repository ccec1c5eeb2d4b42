"""libvirt integration pieces that need no libvirtd: XML edits, classification, hook install.

The real-libvirtd scenarios are in test_libvirt.py; these pin the rules those
scenarios rely on (idempotence, exact reversal, what the hook prints, how it
chains) in a few milliseconds each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmwipe.host_agent.errors import ProtectError, UsageError
from vmwipe.host_agent.libvirt.domain_xml import (
    device_memory_base,
    protect_xml,
    qemu_commandline,
    read_protection,
    unprotect_xml,
)
from vmwipe.host_agent.libvirt.hook import classify, main
from vmwipe.host_agent.libvirt.install import MARKER, install_hook, uninstall_hook
from vmwipe.host_agent.libvirt.paths import CHAINED_NAME
from vmwipe.protocol import decode_ssdt

UUID = "6a1f2b3c-0000-4000-8000-00000000abcd"


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A short directory: protect puts a unix socket path under it (sun_path: 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vw-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def domain(kernel: bool = True, extra_os: str = "", extra: str = "", mem_mib: int = 512) -> str:
    boot = (f"<kernel>/boot/vmlinuz</kernel><initrd>/i.img</initrd>{extra_os}" if kernel
            else "")
    return textwrap.dedent(f"""\
        <domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
          <name>guest1</name>
          <uuid>{UUID}</uuid>
          <metadata><app:info xmlns:app='urn:example:app'>keep me</app:info></metadata>
          <memory unit='KiB'>{mem_mib << 10}</memory>
          <currentMemory unit='KiB'>{mem_mib << 10}</currentMemory>
          <vcpu>2</vcpu>
          <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type>{boot}</os>
          <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
          {extra}
        </domain>""")


def canon(xml: str) -> bytes:
    root = ET.fromstring(xml)
    for el in root.iter():
        el.text = (el.text or "").strip() or None
        el.tail = None
    return ET.tostring(root)


def test_protect_memmap_round_trip(tmp_path: Path) -> None:
    src = domain(extra_os="<cmdline>console=ttyS0 quiet</cmdline>",
                 extra="<qemu:commandline><qemu:arg value='-S'/></qemu:commandline>")
    edit = protect_xml(src, tmp_path)
    prot = edit.protection
    assert prot is not None and prot.reservation == "memmap"
    assert edit.changed and not edit.removed
    root = ET.fromstring(edit.xml)
    assert root.findtext("os/cmdline") == f"console=ttyS0 quiet {prot.cmdline_param}"
    args = qemu_commandline(root)
    assert args[0] == "-S" and args[1:] == prot.qemu_args()
    assert prot.monitor == str(tmp_path / "mon" / f"libvirt-{UUID}.qmp")
    assert read_protection(edit.xml) == prot
    assert root.find("metadata/{urn:example:app}info") is not None

    again = protect_xml(edit.xml, tmp_path)
    assert not again.changed and again.xml == edit.xml

    back = unprotect_xml(edit.xml)
    assert back.changed and not back.added
    assert canon(back.xml) == canon(src)
    assert not unprotect_xml(back.xml).changed


def test_protect_refreshes_when_memory_changes(tmp_path: Path) -> None:
    # 256 MiB places the region at 0xbf00000, 1 GiB at 0x1f000000 (qemu.vmconfig.choose_region)
    first = protect_xml(domain(mem_mib=256), tmp_path)
    grown = first.xml.replace(">262144<", ">1048576<")
    second = protect_xml(grown, tmp_path)
    assert second.changed
    assert any("memmap=" in x for x in second.removed) and any("memmap=" in x
                                                                for x in second.added)
    assert second.protection is not None and first.protection is not None
    assert second.protection.base != first.protection.base


def test_protect_dimm_round_trip(tmp_path: Path) -> None:
    src = domain(kernel=False, mem_mib=4096)
    edit = protect_xml(src, tmp_path)
    prot = edit.protection
    assert prot is not None and prot.reservation == "dimm"
    # q35 with 4 GiB: 2 GiB below 4 GiB, 2 GiB above, hotplug area at 4 GiB + 2 GiB rounded up
    assert prot.base == prot.dimm_base == 6 << 30
    root = ET.fromstring(edit.xml)
    assert root.find("maxMemory") is not None
    cell = root.find("cpu/numa/cell")
    assert cell is not None and cell.get("cpus") == "0-1"
    assert root.findtext("memory") == str((4096 << 10) + 2048)
    assert root.find("devices/memory[@model='dimm']/address").get("base") == hex(6 << 30)  # type: ignore[union-attr]
    assert not protect_xml(edit.xml, tmp_path).changed
    assert canon(unprotect_xml(edit.xml).xml) == canon(src)


def test_protect_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(ProtectError, match="direct kernel boot"):
        protect_xml(domain(kernel=False), tmp_path, reservation="memmap")
    with pytest.raises(ProtectError, match="too small"):
        protect_xml(domain(mem_mib=16), tmp_path)
    with pytest.raises(ProtectError, match="not a domain"):
        protect_xml("<network/>", tmp_path)


def test_device_memory_base() -> None:
    assert device_memory_base("pc-i440fx-7.2", 512 << 20) == 4 << 30
    assert device_memory_base("pc-i440fx-7.2", 5 << 30) == 6 << 30  # 3 GiB low, 2 GiB high
    assert device_memory_base("pc-q35-7.2", 3 << 30) == 5 << 30  # 2 GiB low, 1 GiB high


def test_ssdt_files_match_protection(tmp_path: Path) -> None:
    from vmwipe.host_agent.libvirt.domain_xml import prepare_files

    prot = protect_xml(domain(), tmp_path).protection
    assert prot is not None
    prepare_files(prot)
    assert decode_ssdt(Path(prot.ssdt).read_bytes()) == prot.region
    assert Path(prot.zero_page).read_bytes() == bytes(4096)
    assert Path(prot.monitor).parent.is_dir()


@pytest.mark.parametrize(
    ("state", "migration", "argv", "kind"),
    [
        ("running", "none", [], "fresh-boot"),
        # libvirt 11 reverts a shut-off domain by snapshot-load in prelaunch: wiped, like a
        # --paused boot, whose region reads as nothing registered
        ("prelaunch", "none", [], "prelaunch"),
        ("inmigrate", "none", [], "migration"),
        ("inmigrate", "active", [], "migration"),
        ("paused", "active", [], "migration"),
        ("paused", "completed", [], "restore"),
        ("prelaunch", "none", ["-loadvm", "s1"], "revert"),
        ("paused", "none", [], "paused"),
        ("postmigrate", "none", [], "paused"),
    ],
)
def test_classify(state: str, migration: str, argv: list[str], kind: str) -> None:
    sit = classify(state, migration, ["qemu", *argv])
    assert sit.kind == kind
    assert sit.wipe == (kind in ("restore", "revert", "prelaunch", "paused"))


def _chained(hooks: Path, body: str) -> Path:
    p = hooks / "qemu"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def test_install_chains_and_uninstall_restores(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    original = _chained(hooks, 'echo "$*" >> "$(dirname "$0")/calls"; cat\n').read_bytes()
    aa = tmp_path / "libvirt-qemu"
    aa.write_text("  /srv/site/** r,\n")
    done = install_hook(hooks, apparmor=aa, layout="chain")
    assert any("moved the existing hook" in d for d in done) and "restart" in done[-1]
    assert any("AppArmor" in d for d in done)
    assert (hooks / CHAINED_NAME).read_bytes() == original
    assert MARKER in (hooks / "qemu").read_text()
    rules = aa.read_text()
    assert rules.startswith("  /srv/site/** r,\n") and "/mon/@{profile_name}.qmp rw," in rules
    assert install_hook(hooks, apparmor=aa, layout="chain")[0] == (
        f"{hooks / 'qemu'} is already the vmwipe hook; nothing changed")
    assert aa.read_text() == rules

    # restore begin: the chained hook's stdout (an XML rewrite) passes through; ours adds nothing
    p = subprocess.run([str(hooks / "qemu"), "dom", "restore", "begin", "-"], input=b"<x/>",
                       capture_output=True, check=False, timeout=60)
    assert (p.returncode, p.stdout) == (0, b"<x/>"), p.stderr
    assert (hooks / "calls").read_text() == "dom restore begin -\n"

    with pytest.raises(UsageError):  # a foreign hook and a chained one: refuse to guess
        (hooks / "qemu").write_text("#!/bin/sh\n")
        install_hook(hooks, apparmor=None, layout="chain")
    (hooks / "qemu").write_text(f"#!/bin/sh\n{MARKER}\n")
    done = uninstall_hook(hooks, apparmor=aa)
    assert (hooks / "qemu").read_bytes() == original
    assert not (hooks / CHAINED_NAME).exists()
    assert aa.read_text() == "  /srv/site/** r,\n"
    assert "nothing changed" in uninstall_hook(hooks, apparmor=aa)[0]


def test_install_dropin_leaves_the_site_hook_alone(tmp_path: Path) -> None:
    """qemu.d layout: the site's `qemu` is not touched; an earlier chain install is undone."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    original = _chained(hooks, 'echo "$*" >> "$(dirname "$0")/calls"; cat\n').read_bytes()
    install_hook(hooks, apparmor=None, layout="chain")
    done = install_hook(hooks, apparmor=None, layout="qemu.d")
    dropin = hooks / "qemu.d" / "50-vmwipe"
    assert (hooks / "qemu").read_bytes() == original and not (hooks / CHAINED_NAME).exists()
    assert any("moved" in d and "back" in d for d in done), done
    assert MARKER in dropin.read_text() and os.access(dropin, os.X_OK)
    assert "CHAINED = ''" in dropin.read_text()
    assert install_hook(hooks, apparmor=None, layout="qemu.d")[0].endswith("nothing changed")
    # as libvirtd runs it: restore begin prints nothing (the XML stays), a plain domain runs
    p = subprocess.run([str(dropin), "dom", "restore", "begin", "-"], input=b"<x/>",
                       capture_output=True, check=False, timeout=60)
    assert (p.returncode, p.stdout) == (0, b""), p.stderr
    assert not (hooks / "calls").exists()  # ours does not run the site's hook: libvirtd does
    (dropin.parent / "10-other").write_text("#!/bin/sh\n")
    done = uninstall_hook(hooks, apparmor=None)
    assert not dropin.exists() and (dropin.parent / "10-other").exists()
    assert (hooks / "qemu").read_bytes() == original
    foreign = dropin
    foreign.write_text("#!/bin/sh\n")
    with pytest.raises(UsageError, match="not the vmwipe hook"):
        install_hook(hooks, apparmor=None, layout="qemu.d")


def test_install_hook_refuses_a_temporary_or_build_interpreter(tmp_path: Path) -> None:
    """libvirtd runs the hook long after install-hook: a venv in /tmp or a build tree, or an
    interpreter that imports vmwipe only through this shell's PYTHONPATH, is refused."""
    import tempfile
    import venv

    hooks = tmp_path / "hooks"
    tmpvenv = Path(tempfile.mkdtemp()) / "venv"
    venv.create(tmpvenv)
    with pytest.raises(UsageError, match="temporary directory"):
        install_hook(hooks, python=str(tmpvenv / "bin" / "python"), apparmor=None,
                     layout="qemu.d")
    proj = Path(tempfile.mkdtemp(dir="/var/lib", prefix="vmwipe-unit-"))
    try:
        (proj / "pyproject.toml").write_text("")
        (proj / "build").mkdir()
        os.symlink(sys.executable, proj / "build" / "python3")
        with pytest.raises(UsageError, match="build tree"):
            install_hook(hooks, python=str(proj / "build" / "python3"), apparmor=None,
                         layout="qemu.d")
        # a system interpreter without vmwipe: cannot import it by itself
        bare = proj / "bare"
        venv.create(bare)
        with pytest.raises(UsageError, match="cannot import vmwipe"):
            install_hook(hooks, python=str(bare / "bin" / "python"), apparmor=None,
                         layout="qemu.d")
    finally:
        import shutil

        shutil.rmtree(proj)
        shutil.rmtree(tmpvenv.parent)
    assert not hooks.exists()


def test_chained_failure_propagates(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    chained = tmp_path / "prev"
    chained.write_text("#!/bin/sh\necho nope >&2\nexit 3\n")
    chained.chmod(0o755)
    assert main(["d", "prepare", "begin", "-"], chained=str(chained), stdin=b"") == 3


def test_hook_ignores_unprotected_and_fails_closed(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import vmwipe.host_agent.libvirt.hook as hook

    monkeypatch.setattr(hook, "LOG_DIR", tmp_path / "log")
    assert main(["d", "started", "begin", "-"], stdin=domain().encode()) == 0
    assert capsys.readouterr() == ("", "")
    prot_xml = protect_xml(domain(), tmp_path).xml  # its monitor socket does not exist
    assert main(["guest1", "restore", "begin", "-"], stdin=prot_xml.encode()) == 0
    assert capsys.readouterr().out == ""
    assert main(["guest1", "started", "begin", "-"], stdin=prot_xml.encode()) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("vmwipe: guest1: ")
    assert "not allowed to run" in (tmp_path / "log" / "hook.log").read_text()


def test_hook_script_survives_a_broken_agent(tmp_path: Path) -> None:
    """If the agent cannot be imported, only protected domains are refused."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    install_hook(hooks, python=sys.executable, apparmor=None, layout="chain")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "shadow"))
    shadow = tmp_path / "shadow" / "vmwipe"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    for xml, want in ((domain(), 0), (protect_xml(domain(), tmp_path).xml, 1)):
        p = subprocess.run([sys.executable, str(hooks / "qemu"), "g", "started", "begin", "-"],
                           input=xml.encode(), capture_output=True, env=env, check=False,
                           timeout=60)
        assert p.returncode == want, p.stderr
        assert p.stdout == b""
        if want:
            assert b"cannot load the agent (broken on purpose)" in p.stderr, p.stderr


def test_monitor_path_is_the_apparmor_profile_name(tmp_path: Path) -> None:
    from vmwipe.host_agent.errors import ProtectError
    from vmwipe.host_agent.libvirt.domain_xml import monitor_path

    assert monitor_path(tmp_path, UUID) == str(tmp_path / "mon" / f"libvirt-{UUID}.qmp")
    with pytest.raises(ProtectError, match="not a UUID"):
        monitor_path(tmp_path, "../x")
    with pytest.raises(ProtectError, match="longer than"):
        monitor_path(tmp_path / ("d" * 80), UUID)


def _compiled_rules(tmp_path: Path, profile: str) -> str:
    """The file rules apparmor_parser compiles for a libvirt-style per-VM profile that
    includes the libvirt-qemu abstraction with the vmwipe block (variables expanded)."""
    from vmwipe.host_agent.libvirt.install import apparmor_rules

    parser = shutil.which("apparmor_parser")
    if parser is None:
        pytest.fail("apparmor_parser is missing (make setup installs apparmor)")
    inc = tmp_path / "inc"
    (inc / "abstractions").mkdir(parents=True, exist_ok=True)
    (inc / "abstractions" / "libvirt-qemu").write_text(apparmor_rules())
    prof = tmp_path / profile
    prof.write_text(f"profile {profile} flags=(attach_disconnected) {{\n"
                    "  #include <abstractions/libvirt-qemu>\n}\n")
    run = subprocess.run([parser, "-I", str(inc), "-Q", "-K", "--skip-kernel-load",
                          "-D", "rule-exprs", str(prof)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    return run.stdout + run.stderr


def test_apparmor_rules_give_each_domain_only_its_own_monitor(tmp_path: Path) -> None:
    """AppArmor is not enabled in this kernel, so compile the rules with the real parser and
    read back what each profile may open."""
    other = "0b9c1c52-9b2e-4d33-9d2a-5f1b0e4c7a11"
    text = _compiled_rules(tmp_path, f"libvirt-{UUID}")
    mon = [ln for ln in text.splitlines() if ln.startswith("rule:") and "/mon/" in ln]
    assert mon and all(f"/var/lib/vmwipe/mon/libvirt-{UUID}" in ln for ln in mon), mon
    assert not any(other in ln or "[^/" in ln or "*" in ln.split("->")[0] for ln in mon), mon


def test_records_naming_different_regions_are_refused(tmp_path: Path) -> None:
    """`vmwipe libvirt restore|start|revert` compare the region of every record of the
    loaded state (live XML, save image, managed save, snapshot); two that differ refuse."""
    from vmwipe.host_agent.errors import RegionError
    from vmwipe.host_agent.libvirt.flows import recorded_region

    memmap = protect_xml(domain(), tmp_path, reservation="memmap")
    dimm = protect_xml(domain(), tmp_path, reservation="dimm")
    assert recorded_region([("plain", domain())]) is None
    region, said = recorded_region([("live", memmap.xml), ("image", memmap.xml),
                                    ("plain", domain())]) or (None, "")
    assert memmap.protection is not None
    assert region == memmap.protection.region and said == "live and image"
    with pytest.raises(RegionError, match=r"live says region .*, image says 0x100000000"):
        recorded_region([("live", memmap.xml), ("image", dimm.xml)])
