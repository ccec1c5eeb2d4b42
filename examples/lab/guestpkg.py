"""Install vmwipe into a guest image's root the way the guest package (issue 24) will.

`install_vmwipe()` is the one place the disk images (`diskimage.py`) get the
module from.  Until the `vmwipe-dkms` package exists it does by hand what the
package's postinst is meant to do: DKMS builds the module from guest_kmod/
against the image's own kernel (so udev loads it at boot by its ACPI modalias),
the udev rule goes in, and the region is reserved through a grub.d snippet plus
`update-grub`.  When the package lands this becomes `apt-get install ./*.deb`
in the chroot, and `inputs()` its hash.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from .build import KMOD_SOURCES, source_root

#: The region `vmwipe qemu-args` puts in the SSDT by default (host_agent/qemu/vmconfig.py).
RESERVE = "memmap=0x100000$0x1f000000"
#: /etc/default/grub is sourced by sh, and grub.cfg expands `$`: it must reach grub.cfg as `\$`.
GRUB_SNIPPET = ('# vmwipe: keep the region the host names in its SSDT out of System RAM\n'
                'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX '
                + RESERVE.replace("$", "\\\\\\$") + '"\n')
EXTRA_FILES = ("dkms.conf", "Makefile", "60-vmwipe.rules")

Chroot = Callable[[Sequence[str]], str]


def dkms_version() -> str:
    """PACKAGE_VERSION from guest_kmod/dkms.conf (the package will set it to its own)."""
    text = (source_root() / "guest_kmod" / "dkms.conf").read_text()
    m = re.search(r'^PACKAGE_VERSION="?([^"\n]+)"?$', text, re.MULTILINE)
    if not m:
        raise ValueError("guest_kmod/dkms.conf has no PACKAGE_VERSION")
    return m.group(1)


def inputs() -> list[bytes]:
    """What the installed result depends on (hashed into the image's cache key)."""
    src = source_root() / "guest_kmod"
    return [Path(__file__).read_bytes(),
            *((src / f).read_bytes() for f in (*KMOD_SOURCES, *EXTRA_FILES))]


def install_vmwipe(root: Path, chroot: Chroot) -> None:
    """Put vmwipe into the image mounted at `root`; `chroot(argv)` runs a command inside it."""
    version = dkms_version()
    src = source_root() / "guest_kmod"
    dest = root / "usr/src" / f"vmwipe-{version}"
    dest.mkdir(parents=True)
    for f in (*KMOD_SOURCES, "dkms.conf", "Makefile"):
        shutil.copy2(src / f, dest / f)
    chroot(["dkms", "add", "-m", "vmwipe", "-v", version])
    # For the image's kernels, not the host's `uname -r` (this runs in a chroot).
    for kdir in sorted((root / "lib/modules").iterdir()):
        if (kdir / "build").exists():
            chroot(["dkms", "install", "-m", "vmwipe", "-v", version, "-k", kdir.name])
    shutil.copy2(src / "60-vmwipe.rules", root / "lib/udev/rules.d/60-vmwipe.rules")
    chroot(["groupadd", "--system", "--force", "vmwipe"])
    grub_d = root / "etc/default/grub.d"
    grub_d.mkdir(parents=True, exist_ok=True)
    (grub_d / "vmwipe.cfg").write_text(GRUB_SNIPPET)
    chroot(["update-grub"])
