"""Packaging pieces that need no Debian root: versions from one place, the SELinux
module compiles, vmwipe-memmap's escaping, the Debian 12 private qemu.qmp fallback.

The packages themselves are built and installed by tests/test_packages.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENDORED = ROOT / "host_agent" / "qemu" / "_vendored.py"


def test_one_version() -> None:
    """pyproject.toml's version is the package's and (through dh_dkms -V) the module's."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    head = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    m = re.match(r"vmwipe \(([^)]+)\)", head)
    assert m, head
    assert m[1].split("-")[0] == version, (m[1], version)
    dkms = (ROOT / "guest_kmod" / "dkms.conf").read_text()
    assert 'PACKAGE_VERSION="#MODULE_VERSION#"' in dkms
    assert "dh_dkms -V $(DEB_VERSION_UPSTREAM)" in (ROOT / "debian" / "rules").read_text()


SELINUX_MAKEFILE = Path("/usr/share/selinux/devel/Makefile")


@pytest.mark.skipif(not SELINUX_MAKEFILE.exists() or shutil.which("checkmodule") is None,
                    reason="selinux-policy-dev and checkpolicy are not installed (make setup)")
def test_selinux_module_compiles(tmp_path: Path) -> None:
    """Against Debian's reference policy headers; a module with an unknown interface fails
    (so the build really checks).  Loading it needs an SELinux host: selinux/README.md."""
    for name in ("good", "bad"):
        d = tmp_path / name
        d.mkdir()
        te = (ROOT / "selinux" / "vmwipe.te").read_text()
        if name == "bad":
            te = te.replace("read_files_pattern(", "read_filez_pattern(", 1)
        (d / "vmwipe.te").write_text(te)
        shutil.copy(ROOT / "selinux" / "vmwipe.fc", d)
        r = subprocess.run(["make", "-f", str(SELINUX_MAKEFILE), "vmwipe.pp"], cwd=d,
                           capture_output=True, text=True, timeout=300, check=False)
        built = (d / "vmwipe.pp").exists() and r.returncode == 0
        assert built == (name == "good"), r.stdout[-2000:] + r.stderr[-2000:]


def _memmap(tmp_path: Path, setting: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "default").write_text(setting)
    env = {"PATH": "/usr/bin:/bin", "VMWIPE_DEFAULT": str(tmp_path / "default"),
           "VMWIPE_GRUB_CFG": str(tmp_path / "grub.d" / "vmwipe.cfg")}
    return subprocess.run(["sh", str(ROOT / "guest_kmod" / "vmwipe-memmap"),
                           "--no-update-grub"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_memmap_escaping(tmp_path: Path) -> None:
    """grub-mkconfig's shell sources the .cfg: GRUB_CMDLINE_LINUX must come out with `\\$`,
    which grub.cfg keeps and GRUB's parser reads as `$` (tests/test_packages.py runs the
    real grub-mkconfig)."""
    cfg = tmp_path / "grub.d" / "vmwipe.cfg"
    r = _memmap(tmp_path, "VMWIPE_RESERVATION=memmap\nVMWIPE_REGION=0x1f000000:0x100000\n")
    assert r.returncode == 0, r.stderr
    out = subprocess.run(["sh", "-c", 'GRUB_CMDLINE_LINUX="quiet"; . "$1"; '
                          'printf %s "$GRUB_CMDLINE_LINUX"', "sh", str(cfg)],
                         capture_output=True, text=True, check=True).stdout
    assert out == "quiet memmap=0x100000\\$0x1f000000"
    assert _memmap(tmp_path, "VMWIPE_RESERVATION=memmap\nVMWIPE_REGION=0x1f000000:0x100000\n"
                   ).stdout == ""  # unchanged: nothing written, update-grub not run
    for bad in ("VMWIPE_RESERVATION=memmap\nVMWIPE_REGION='1;reboot'\n",
                "VMWIPE_RESERVATION=memmap\n", "VMWIPE_RESERVATION=ram\n"):
        r = _memmap(tmp_path, bad)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, (bad, r.stderr)
        assert cfg.exists()  # a bad setting changes nothing
    r = _memmap(tmp_path, "VMWIPE_RESERVATION=dimm\n")
    assert r.returncode == 0 and not cfg.exists(), r.stderr


def test_vendored_qmp_only_as_a_fallback(tmp_path: Path) -> None:
    """The private copy is used only when the interpreter has no qemu.qmp of its own."""
    vendor = tmp_path / "vendor"
    (vendor / "qemu" / "qmp").mkdir(parents=True)
    (vendor / "qemu" / "qmp" / "__init__.py").write_text("VENDORED = True\n")
    code = ("import sys, vmwipe.host_agent.qemu._vendored as v; from pathlib import Path; "
            f"v.VENDOR_DIR = Path({str(vendor)!r}); v.add_vendored_qmp(); "
            "import qemu.qmp; print(getattr(qemu.qmp, 'VENDORED', False))")
    own = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert own == "False"  # the venv's qemu.qmp wins
    # an interpreter without qemu.qmp (no site-packages: -S), as Debian 12's python3
    standalone = ("import importlib.util as u, sys; from pathlib import Path; "
                  f"spec = u.spec_from_file_location('v', {str(VENDORED)!r}); "
                  "v = u.module_from_spec(spec); spec.loader.exec_module(v); "
                  f"v.VENDOR_DIR = Path({str(vendor)!r}); v.add_vendored_qmp(); "
                  "import qemu.qmp; print(qemu.qmp.VENDORED, sys.path[-1])")
    r = subprocess.run([sys.executable, "-S", "-c", standalone], capture_output=True,
                       text=True, check=False, timeout=60)
    assert r.stdout.split() == ["True", str(vendor)], r.stderr
