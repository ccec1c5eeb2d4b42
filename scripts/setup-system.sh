#!/usr/bin/env bash
# Install the Debian packages vmwipe needs, only when something is missing, so a
# second `make setup` is instant.  Works on Debian 12 and 13 as root.
set -euo pipefail

# apparmor: its parser compiles the rules `vmwipe libvirt install-hook` writes
# (tests/test_libvirt_unit.py); nothing is loaded into a kernel.
# xfsprogs: mkfs.xfs for the reflink scrub test (tests/test_scrub_reflink.py, a loop-mounted image).
# The rest of the second block: `make deb` (Debian's packaging tools and the Build-Depends
# in debian/control) and the package tests (debootstrap, zstd for the cached roots;
# checkpolicy and selinux-policy-dev compile the SELinux module, tests/test_packaging.py).
# ovmf: UEFI firmware with SMM, whose TSEG the module must refuse (tests/test_kmod_uefi.py).
# debootstrap, fdisk (sfdisk): the Debian disk images of `make guest-images`.
packages=(qemu-system-x86 qemu-utils linux-image-amd64 linux-headers-amd64 busybox-static
          libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc make cpio
          acpica-tools python3-venv python3-dev libc6-dev sparse
          android-libboringssl apparmor xfsprogs
          dpkg-dev fakeroot debhelper dh-python dh-dkms pybuild-plugin-pyproject
          python3-all-dev python3-setuptools python3-wheel python3-construct python3-shtab
          python3-tqdm debootstrap zstd checkpolicy selinux-policy-dev ovmf fdisk)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: missing Debian packages: ${missing[*]} (run 'make setup' as root)" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # libvirt-daemon-system starts services through systemd when it can; on a
    # machine without systemd the postinst still succeeds.
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# vmwipe.ko must build warning-free against both 6.1 and 6.12 (tests/test_kmod_build.py):
# install a 6.12 image and headers beside the distribution kernel (idempotent; on
# Debian 12 from bookworm-backports without touching the system's apt sources).
if [ "$(id -u)" = 0 ]; then
    "$(dirname "$0")/../guest_kmod/install-6.12-headers.sh" >/dev/null
fi

# The mapped-ram / file: tests need QEMU >= 9.0: on Debian 12 unpack bookworm-backports'
# QEMU 10 into build/qemu10/ (idempotent; a no-op on Debian 13, whose QEMU is 10.x).
if [ "$(id -u)" = 0 ]; then
    "$(dirname "$0")/fetch-qemu10.sh" >/dev/null ||
        echo "setup: could not unpack QEMU 10 into build/qemu10 (the QEMU >= 9 tests will skip)" >&2
fi

# The tests boot /boot/vmlinuz-VER with a module built against headers VER:
# make sure at least one version has both.
for hdr in /usr/src/linux-headers-*-amd64; do
    ver=${hdr#/usr/src/linux-headers-}
    if [ -e "/boot/vmlinuz-$ver" ] && [ -e "/lib/modules/$ver" ]; then
        exit 0
    fi
done
if [ "$(id -u)" != 0 ]; then
    echo "setup: no kernel image matches the installed headers (run 'make setup' as root)" >&2
    exit 1
fi
ver=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | grep -o 'linux-headers-[^ ,]*-amd64' | head -1)
ver=${ver#linux-headers-}
echo "setup: installing linux-image-$ver to match its headers"
apt-get install -y -q --no-install-recommends "linux-image-$ver" "linux-headers-$ver"
