"""Throwaway Debian roots for the package tests: unpack (scripts/pkgroot.sh), mount, run, remove.

The roots come from cached tarballs (build/pkgroots, or $VMWIPE_PKGROOT_CACHE), so
only the first run on a machine pays for debootstrap.  Every root is private to one
test module and removed afterwards; nothing is left mounted, and only the PIDs a
test started inside a root are ever killed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "pkgtest"
#: chroot_mount / chroot_umount: /proc, /sys and a private /dev (never the host's).
MOUNTS = ROOT / "scripts" / "chroot-mounts.sh"


def host_suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise RuntimeError("no VERSION_CODENAME in /etc/os-release")


def unavailable_reason() -> str | None:
    """None when package tests can run here, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "package tests need root (chroot, mounts, dpkg-buildpackage as root)"
    for tool in ("debootstrap", "dpkg-buildpackage", "zstd", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make setup installs the packaging tools)"
    return None


@dataclass
class DebRoot:
    """One unpacked root under build/pkgtest, with /proc, /sys and a private /dev."""

    path: Path
    suite: str

    @classmethod
    def create(cls, suite: str, packages: Sequence[str] = (), script: str = "pkgroot.sh",
               extra: Sequence[str] = ()) -> DebRoot:
        WORK.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{suite}-", dir=WORK)) / "root"
        subprocess.run([str(ROOT / "scripts" / script), suite, str(path), *extra, *packages],
                       check=True, timeout=1800)
        root = cls(path, suite)
        root.mount()
        return root

    def _mounts(self, fn: str) -> bool:
        return subprocess.run(["bash", "-c", f'. "$0" && {fn} "$1"', str(MOUNTS),
                               str(self.path)], check=False, timeout=120).returncode == 0

    def mount(self) -> None:
        if not self._mounts("chroot_mount"):
            self._mounts("chroot_umount")
            raise RuntimeError(f"cannot mount /proc, /sys, /dev in {self.path}")

    def run(self, cmd: str, *, check: bool = True, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """`sh -c CMD` inside the root, in a clean environment, from `/`."""
        env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME=/root", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"]
        proc = subprocess.run(["chroot", str(self.path), "env", "-i", *env, "sh", "-c",
                               f"cd / && {cmd}"], capture_output=True, text=True,
                              timeout=timeout, input=input, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the {self.suite} root: {cmd!r} exited {proc.returncode}:"
                                 f"\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def remove(self) -> None:
        """Unmount, then delete, but never across a mount point left behind."""
        if not self._mounts("chroot_umount"):
            raise RuntimeError(f"mounts left under {self.path}; not deleting it")
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.path.parent)], check=True,
                       timeout=600)


def build_debs(suite: str) -> Path:
    """`make deb` for SUITE (scripts/build-deb.sh); returns build/deb/SUITE."""
    subprocess.run(["bash", str(ROOT / "scripts" / "build-deb.sh"), suite], check=True,
                   timeout=1800)
    return ROOT / "build" / "deb" / suite
