"""Debian 12 and 13 disk images for the real-guest tests (issue 25), made with debootstrap.

What users run is a disk: GRUB boots it, systemd and udev bring it up, DKMS
built the module against the image's own kernel, and udev loads it by its ACPI
modalias.  Everything the lab's initramfs guest skips.  `make guest-images`
(this module's `__main__`) builds both; tests call `ensure_image()`.

Two layers, each cached under build/guest-images/ with a hash of its inputs in
the file name, so they are rebuilt only when an input changes:

- **base** `NAME-base-HASH.raw` (minutes): a 3 GiB sparse raw disk, MBR with an
  ext4 root and a swap partition; `debootstrap --variant=minbase` plus
  systemd-sysv, udev, initramfs-tools, the distribution kernel and its headers
  from the security suite, dkms, python3, openssl, dbus (for logind: `systemctl
  suspend`), GRUB for BIOS, serial console, and the lab's command loop on ttyS0
  (`vmwipe-lab-shell.service`, the same line protocol as the initramfs guest's
  /init).  Inputs: the suite, the mirror, the package lists, the files written
  into it, and RECIPE.
- **vmwipe** `NAME-HASH.raw` (seconds): a copy of the base with vmwipe installed
  by `guestpkg.install_vmwipe()`.  Inputs: the base and the module's sources.

Mechanics (measured here, see docs/guest-images.md): loop devices do not scan
partitions, so each partition is its own offset loop device (mkfs, mount,
chroot); GRUB goes in without grub-install: `grub-mkimage` in the chroot makes
core.img (with an early config that finds the root by UUID), and the host
writes boot.img's code into the MBR and core.img into the gap after it.
`update-grub` in the chroot writes grub.cfg, so grub.d snippets apply as on a
real system.  Every loop device and mount is released on the way out,
whatever failed; results are renamed into place, so a half-built image is
never served.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from . import guestpkg
from .build import BuildError, DiskImage, _digest, build_root

#: The build steps of the base image; part of its cache key with the constants below.
RECIPE = "1"
#: image name -> Debian suite
SUITES = {"debian12": "bookworm", "debian13": "trixie", "debian12-point": "bookworm"}
#: what `make guest-images` builds by default
DEFAULT_IMAGES = ("debian12", "debian13")
#: images of the point release alone (no -security, no -updates): its kernel, 6.1.0-50 for
#: bookworm, whose headers export less (no free_uid) than the security suite's
POINT_RELEASE = frozenset({"debian12-point"})
DISK_MIB = 3072
SWAP_MIB = 512
ROOT_START = 2048  # sectors: the MBR gap before it holds GRUB's core.img
SECTOR = 512
# debootstrap brings the base system; the rest comes from apt once the security suite is
# in sources.list, so that the image gets the newest kernel, not the point release's.
# e2fsprogs: fsck.ext4 for the initramfs (not part of trixie's minbase).
DEBOOTSTRAP_INCLUDE = ("systemd-sysv", "udev", "initramfs-tools", "kmod", "e2fsprogs")
# dbus: the system bus that systemd-logind needs; without it systemd 257's `systemctl suspend`
# and `hibernate` fail ("Failed to connect to system scope bus"; 252 fell back to PID 1).
PACKAGES = ("linux-image-amd64", "linux-headers-amd64", "dkms", "python3", "openssl", "grub-pc",
            "dbus")
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root",
              "DEBIAN_FRONTEND": "noninteractive"}

# The lab's driver: one command per console line, "@@DONE ID RC" after each (build.INIT_SCRIPT).
LAB_SHELL = """#!/bin/bash
# vmwipe lab: the test driver's command loop on the serial console (not for production).
echo 1 > /proc/sys/kernel/printk
stty -echo
# systemd may have written a terminal reset sequence on the port: start a fresh line
echo
echo "@@READY $(cat /proc/sys/kernel/random/boot_id)"
while read -r id cmd; do
    eval "$cmd" </dev/null
    echo "@@DONE $id $?"
done
"""
LAB_UNIT = """[Unit]
Description=vmwipe lab command loop on ttyS0 (test driver)
After=systemd-user-sessions.service

[Service]
Type=idle
ExecStart=/usr/local/sbin/vmwipe-lab-shell
StandardInput=tty-force
StandardOutput=tty
TTYPath=/dev/ttyS0
Environment=HOME=/root

[Install]
WantedBy=multi-user.target
"""
# GRUB_DEVICE: update-grub in the chroot sees a file-backed loop device, for which 10_linux
# writes no menu entry at all; it is read after grub-mkconfig's probe, so it wins.
GRUB_DEFAULTS = """# lab image: serial console, no menu delay; root is the first virtio disk
GRUB_DEVICE=/dev/vda1
GRUB_TIMEOUT=0
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_CMDLINE_LINUX="console=ttyS0,115200 systemd.show_status=0"
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
"""


def mirrors() -> tuple[str, str]:
    """The host's Debian and security mirrors (its apt sources), else deb.debian.org."""
    main, security = "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    uri = uri.rstrip("/")
                    if uri.endswith("/debian-security"):
                        security = uri
                    elif uri.endswith("/debian"):
                        main = uri
    return main, security


def cache_dir(name: str) -> Path:
    """Downloaded .debs of image `name`, shared by every build of this checkout, or of
    every checkout that sets $VMWIPE_GUEST_APT_CACHE to the same directory."""
    env = os.environ.get("VMWIPE_GUEST_APT_CACHE")
    path = Path(env) if env else build_root() / "guest-images" / "apt-cache"
    path = path / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def images_dir() -> Path:
    path = build_root() / "guest-images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def base_key(name: str) -> str:
    """What the base image is made of.  Bump RECIPE when a build step changes."""
    return _digest([RECIPE.encode(), name.encode(), SUITES[name].encode(),
                    *(m.encode() for m in mirrors()), f"{DISK_MIB} {SWAP_MIB}".encode(),
                    " ".join((*DEBOOTSTRAP_INCLUDE, *PACKAGES)).encode(),
                    LAB_SHELL.encode(), LAB_UNIT.encode(), GRUB_DEFAULTS.encode()])


def image_key(name: str) -> str:
    return _digest([base_key(name).encode(), *guestpkg.inputs()])


def _say(msg: str) -> None:
    print(f"guest-images: {msg}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], stdin: str | None = None) -> str:
    proc = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    return proc.stdout


# --- partitions, loop devices, mounts --------------------------------------------------


def _partition(disk: Path) -> None:
    root_sectors = (DISK_MIB - SWAP_MIB) * (1 << 20) // SECTOR - ROOT_START
    with disk.open("wb") as f:
        f.truncate(DISK_MIB << 20)
    _run(["sfdisk", "--quiet", str(disk)],
         stdin=f"label: dos\nstart={ROOT_START}, size={root_sectors}, type=83, bootable\n"
               "type=82\n")


def _partitions(disk: Path) -> list[tuple[int, int]]:
    """(offset, size) in bytes of each partition, from sfdisk's own reading of the table."""
    table = json.loads(_run(["sfdisk", "--json", str(disk)]))["partitiontable"]
    return [(p["start"] * SECTOR, p["size"] * SECTOR) for p in table["partitions"]]


@contextlib.contextmanager
def _loop(disk: Path, offset: int, size: int) -> Iterator[str]:
    """One partition as its own loop device (no partition scanning here), detached on exit."""
    dev = _run(["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size),
                str(disk)]).strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def _mount(dev: str, target: Path, *opts: str) -> Iterator[Path]:
    """Mounted for the `with` body, then unmounted for sure.

    A mount something still uses (a daemon a package started in the chroot) is
    detached lazily rather than left behind: nothing may ever reach the host's
    /dev through a forgotten bind mount.
    """
    _run(["mount", *opts, dev, str(target)])
    try:
        yield target
    finally:
        busy = subprocess.run(["umount", str(target)], capture_output=True, text=True)
        if busy.returncode != 0:
            _say(f"{busy.stderr.strip()}: detaching it lazily")
            subprocess.run(["umount", "--lazy", str(target)], check=True)


@contextlib.contextmanager
def _chroot_mounts(root: Path, name: str) -> Iterator[None]:
    """/dev, /proc, /sys and the shared apt cache inside the image, for apt, DKMS, GRUB."""
    with contextlib.ExitStack() as stack:
        for src, dst, opts in (("/dev", "dev", ("--bind",)), ("/dev/pts", "dev/pts", ("--bind",)),
                               ("proc", "proc", ("-t", "proc")), ("sysfs", "sys", ("-t", "sysfs")),
                               (str(cache_dir(name)), "var/cache/apt/archives", ("--bind",))):
            (root / dst).mkdir(parents=True, exist_ok=True)
            stack.enter_context(_mount(src, root / dst, *opts))
        yield


def _chroot(root: Path) -> guestpkg.Chroot:
    def run(argv: Sequence[str]) -> str:
        env = [f"{k}={v}" for k, v in CHROOT_ENV.items()]
        return _run(["chroot", str(root), "/usr/bin/env", "-i", *env, *argv])
    return run


@contextlib.contextmanager
def _opened(disk: Path) -> Iterator[tuple[Path, str, str]]:
    """The image's root mounted (with chroot mounts) and its two partitions' loop devices."""
    (root_off, root_size), (swap_off, swap_size) = _partitions(disk)
    with contextlib.ExitStack() as stack:
        rdev = stack.enter_context(_loop(disk, root_off, root_size))
        sdev = stack.enter_context(_loop(disk, swap_off, swap_size))
        # Never a TemporaryDirectory: its cleanup deletes recursively, and this directory
        # holds mounts (bind mounts of /dev included) until everything above is undone.
        mnt = Path(tempfile.mkdtemp(prefix="vmwipe-img."))
        stack.callback(mnt.rmdir)  # empty once unmounted; an error otherwise, never a deletion
        yield mnt, rdev, sdev


# --- the base image --------------------------------------------------------------------


def _uuid(dev: str) -> str:
    return _run(["blkid", "-s", "UUID", "-o", "value", dev]).strip()


def _build_base(name: str, out: Path) -> None:
    suite = SUITES[name]
    main, security = mirrors()
    _partition(out)
    with _opened(out) as (mnt, rdev, sdev):
        _run(["mkfs.ext4", "-q", "-L", "root", rdev])
        _run(["mkswap", "-L", "swap", sdev])
        root_uuid, swap_uuid = _uuid(rdev), _uuid(sdev)
        with _mount(rdev, mnt):
            t0 = time.monotonic()
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(DEBOOTSTRAP_INCLUDE)}",
                  f"--cache-dir={cache_dir(name)}", suite, str(mnt), main])
            _say(f"{name}: debootstrap {time.monotonic() - t0:.0f} s")
            sources = f"deb {main} {suite} main\n"
            if name not in POINT_RELEASE:
                sources += (f"deb {main} {suite}-updates main\n"
                            f"deb {security} {suite}-security main\n")
            (mnt / "etc/apt/sources.list").write_text(sources)
            (mnt / "etc/fstab").write_text(f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\n"
                                           f"UUID={swap_uuid} none swap sw 0 0\n")
            (mnt / "etc/hostname").write_text(f"vmwipe-{name}\n")
            (mnt / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 vmwipe-{name}\n")
            conf = mnt / "etc/initramfs-tools/conf.d"
            conf.mkdir(parents=True, exist_ok=True)
            (conf / "resume").write_text(f"RESUME=UUID={swap_uuid}\n")  # S4 resumes from swap
            policy = mnt / "usr/sbin/policy-rc.d"  # start no daemon in the chroot
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            chroot = _chroot(mnt)
            with _chroot_mounts(mnt, name):
                t0 = time.monotonic()
                chroot(["sh", "-c", "echo 'grub-pc grub-pc/install_devices multiselect' | "
                        "debconf-set-selections"])
                chroot(["apt-get", "update", "-q"])
                chroot(["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES])
                _say(f"{name}: apt-get install {time.monotonic() - t0:.0f} s")
                _install_lab_shell(mnt, chroot)
                _install_grub(mnt, chroot, root_uuid)
                chroot(["apt-get", "clean"])
            policy.unlink()
            _write_boot_sectors(out, mnt)


def _install_lab_shell(root: Path, chroot: guestpkg.Chroot) -> None:
    shell = root / "usr/local/sbin/vmwipe-lab-shell"
    shell.write_text(LAB_SHELL)
    shell.chmod(0o755)
    (root / "etc/systemd/system/vmwipe-lab-shell.service").write_text(LAB_UNIT)
    chroot(["systemctl", "enable", "vmwipe-lab-shell.service"])
    # console=ttyS0 would start a login prompt there; the lab's loop owns the port.
    chroot(["systemctl", "mask", "serial-getty@ttyS0.service"])


def _install_grub(root: Path, chroot: guestpkg.Chroot, root_uuid: str) -> None:
    grub_d = root / "etc/default/grub.d"
    grub_d.mkdir(parents=True, exist_ok=True)
    (grub_d / "00-lab.cfg").write_text(GRUB_DEFAULTS)
    mods = root / "boot/grub/i386-pc"
    shutil.copytree(root / "usr/lib/grub/i386-pc", mods, dirs_exist_ok=True)
    (mods / "early.cfg").write_text(f"search.fs_uuid {root_uuid} root\n"
                                    "set prefix=($root)/boot/grub\n")
    chroot(["grub-mkimage", "-O", "i386-pc", "-o", "/boot/grub/i386-pc/core.img",
            "-c", "/boot/grub/i386-pc/early.cfg", "-p", "/boot/grub",
            "biosdisk", "part_msdos", "ext2", "search_fs_uuid"])
    chroot(["update-grub"])


def _write_boot_sectors(disk: Path, root: Path) -> None:
    """boot.img's code into the MBR (the partition table stays), core.img right after it.

    Unpatched boot.img loads sector 1 and diskboot's blocklist starts at sector 2:
    grub-mkimage fills in the length, which is all grub-bios-setup would change here.
    """
    boot = (root / "usr/lib/grub/i386-pc/boot.img").read_bytes()
    core = (root / "boot/grub/i386-pc/core.img").read_bytes()
    if len(boot) != SECTOR or len(core) > (ROOT_START - 1) * SECTOR:
        raise BuildError(f"boot.img {len(boot)} bytes, core.img {len(core)} bytes: do not fit")
    with disk.open("r+b") as f:
        f.write(boot[:440])
        f.seek(SECTOR)
        f.write(core)


# --- the layers ------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One builder per image name; a second waits, then finds the result in the cache."""
    with (cache_dir(name) / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _kernels(root: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in (root / "lib/modules").iterdir()))


def _fresh(out: Path, build: Callable[[Path], object]) -> Path:
    """Build into a temporary file next to `out`, then rename it into place."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        build(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def ensure_base(name: str) -> Path:
    out = images_dir() / f"{name}-base-{base_key(name)}.raw"
    if not out.is_file():
        t0 = time.monotonic()
        _say(f"{name}: building the base image (debootstrap {SUITES[name]})")
        _fresh(out, lambda tmp: _build_base(name, tmp))
        _say(f"{name}: base built in {time.monotonic() - t0:.0f} s: {out}")
        _prune(rf"{re.escape(name)}-base-[0-9a-f]{{16}}\.raw", out)
    return out


def _prune(pattern: str, keep: Path) -> None:
    """Remove the outdated builds of one layer (3 GiB each), once `keep` replaced them.

    A QEMU that still has one open keeps reading it; only new boots use `keep`.
    """
    for path in images_dir().iterdir():
        if path.stem != keep.stem and re.fullmatch(pattern, path.name):
            path.unlink(missing_ok=True)


def _build_vmwipe(name: str, base: Path, tmp: Path) -> tuple[str, ...]:
    _run(["cp", "--sparse=always", str(base), str(tmp)])
    with _opened(tmp) as (mnt, rdev, _sdev), _mount(rdev, mnt):
        chroot = _chroot(mnt)
        with _chroot_mounts(mnt, name):
            guestpkg.install_vmwipe(mnt, chroot)
        return _kernels(mnt)


def ensure_image(name: str) -> DiskImage:
    """The image `name` (see SUITES) with vmwipe installed, built if not cached."""
    if name not in SUITES:
        raise BuildError(f"unknown image {name!r} (known: {', '.join(SUITES)})")
    with _locked(name):
        out = images_dir() / f"{name}-{image_key(name)}.raw"
        meta = out.with_suffix(".kernels")
        if not (out.is_file() and meta.is_file()):
            base = ensure_base(name)
            t0 = time.monotonic()
            kernels: list[tuple[str, ...]] = []
            _fresh(out, lambda tmp: kernels.append(_build_vmwipe(name, base, tmp)))
            meta.write_text("\n".join(kernels[0]) + "\n")
            _say(f"{name}: vmwipe installed in {time.monotonic() - t0:.0f} s: {out}")
            _prune(rf"{re.escape(name)}-[0-9a-f]{{16}}\.(raw|kernels)", out)
        return DiskImage(name, out, tuple(meta.read_text().split()))


def missing_prerequisite() -> str | None:
    """Why images cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (loop devices, mount, chroot)"
    for tool in ("debootstrap", "sfdisk", "losetup", "mkfs.ext4", "mkswap", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make guest-images", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=list(DEFAULT_IMAGES),
                   help=f"images to build, of {', '.join(SUITES)}")
    args = p.parse_args(argv)
    why = missing_prerequisite()
    if why:
        print(f"guest-images: {why}", file=sys.stderr)
        return 1
    for name in args.names:
        img = ensure_image(name)
        print(f"{img.name}: {img.path} (kernel {', '.join(img.kernels)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
