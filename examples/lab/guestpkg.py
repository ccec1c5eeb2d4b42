"""Install vmwipe into a guest image's root as a user does: the guest packages, with apt.

`install_vmwipe()` is the one place the disk images (`diskimage.py`) get the
module from.  It runs the README's "Install in the guest" steps, in its order,
inside the image's chroot: `apt install` of `vmwipe-dkms` and `libvmwipe0` as
built by `make deb` (scripts/build-deb.sh; docs/packaging.md), so that DKMS
builds vmwipe.ko against the image's own kernel (udev then loads it at boot by
its ACPI modalias); then `/etc/default/vmwipe` for the memmap= reservation and
`vmwipe-memmap`, which writes the grub.d snippet and runs update-grub.  The
packages are built once per content of their sources and kept under
build/guest-images/debs-HASH/.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .build import BuildError, _digest, build_root, source_root

#: The region `vmwipe qemu-args` puts in the SSDT by default (host_agent/qemu/vmconfig.py).
REGION = "0x1f000000:0x100000"
DEFAULTS = f"VMWIPE_RESERVATION=memmap\nVMWIPE_REGION={REGION}\n"
PACKAGES = ("vmwipe-dkms", "libvmwipe0")
#: what the guest packages are built from (as build-deb.sh copies it: tracked and untracked,
#: not ignored)
SOURCES = ("guest_kmod", "debian", "examples/vmwipe.c", "examples/vmwipe.h", "examples/preload",
           "pyproject.toml", "scripts/build-deb.sh")

Chroot = Callable[[Sequence[str]], str]


#: what build-deb.sh leaves out of a tree that has no .git
_OUTPUTS = {".venv", "build", "demo-out", "__pycache__", ".git"}


def _source_files() -> list[Path]:
    """The files of SOURCES that build-deb.sh packs: git's tracked and untracked-not-ignored
    ones, or, in a copy without .git (make test-debian13's), all but build outputs."""
    root = source_root()
    if shutil.which("git") and (root / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard", "--",
                              *SOURCES], cwd=root, capture_output=True, check=True).stdout
        names = out.decode().split("\0")
    else:
        names = [str(p.relative_to(root)) for s in SOURCES for p in
                 ([root / s] if (root / s).is_file() else (root / s).rglob("*"))
                 if not _OUTPUTS.intersection(p.relative_to(root).parts)
                 and not p.name.endswith(".egg-info")]
    return [root / f for f in sorted(set(names)) if f and (root / f).is_file()]


def inputs() -> list[bytes]:
    """What the installed result depends on (hashed into the image's cache key)."""
    root = source_root()
    return [Path(__file__).read_bytes(),
            *(str(p.relative_to(root)).encode() + p.read_bytes() for p in _source_files())]


def _codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise BuildError("/etc/os-release names no VERSION_CODENAME")


def debs() -> list[Path]:
    """The guest packages for the current sources, built with `make deb`'s script if needed.

    The host's build serves Debian 12 and 13 guests alike: vmwipe-dkms is
    Architecture: all and libvmwipe plain C against an older glibc.
    """
    out = build_root() / "guest-images" / f"debs-{_digest(inputs()[1:])}"
    found = [next(out.glob(f"{p}_*.deb"), None) for p in PACKAGES]
    if all(found):
        return [p for p in found if p is not None]
    proc = subprocess.run(["bash", str(source_root() / "scripts/build-deb.sh")],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"make deb failed:\n{proc.stderr[-3000:]}")
    src = build_root() / "deb" / _codename()  # where build-deb.sh puts this host's release's
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    for p in PACKAGES:
        deb = next(src.glob(f"{p}_*.deb"), None)
        if deb is None:
            raise BuildError(f"make deb made no {p} in {src}")
        shutil.copy2(deb, tmp / deb.name)
    tmp.rename(out)
    return [next(out.glob(f"{p}_*.deb")) for p in PACKAGES]


def install_vmwipe(root: Path, chroot: Chroot) -> None:
    """Put vmwipe into the image mounted at `root`; `chroot(argv)` runs a command inside it."""
    stage = root / "tmp/vmwipe-debs"
    stage.mkdir()
    names = []
    for deb in debs():
        shutil.copy2(deb, stage / deb.name)
        names.append(f"/tmp/vmwipe-debs/{deb.name}")
    chroot(["apt-get", "-q", "-y", "install", "--no-install-recommends", *names])
    shutil.rmtree(stage)
    # the package's default is the pc-dimm reservation; this host uses memmap=
    (root / "etc/default/vmwipe").write_text(DEFAULTS)
    chroot(["vmwipe-memmap"])
    # the postinst builds for the chroot's kernels, not for the host's `uname -r`
    for kdir in sorted((root / "lib/modules").iterdir()):
        # (compressed as the kernel's own modules are: vmwipe.ko.xz on Debian 13)
        if (kdir / "build").exists() and not any((kdir / "updates").rglob("vmwipe.ko*")):
            raise BuildError(f"vmwipe-dkms built no module for {kdir.name}")
    if "memmap=" not in (root / "boot/grub/grub.cfg").read_text():
        raise BuildError("grub.cfg has no memmap= after installing vmwipe-dkms")
