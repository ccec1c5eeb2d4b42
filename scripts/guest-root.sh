#!/usr/bin/env bash
# A Debian guest root with the vmwipe guest packages installed, for the package
# tests (tests/test_packages.py) and for booting a real guest from it (issue 25).
#
#   scripts/guest-root.sh SUITE DEST DEBDIR [BASE:SIZE]
#
# DEST receives a minbase SUITE root (scripts/pkgroot.sh, cached) with a kernel, its
# headers, DKMS, GRUB's configuration tools, systemd and udev, then vmwipe-dkms,
# libvmwipe0 and libvmwipe-dev from DEBDIR installed with apt (so DKMS builds the module
# for that root's kernel in the postinst, as on a real guest).  With BASE:SIZE,
# /etc/default/vmwipe gets VMWIPE_RESERVATION=memmap and that region before the
# install, so the postinst writes /etc/default/grub.d/vmwipe.cfg.
#
# To boot it (issue 25): make an ext4 image from DEST without mounting it,
#   mkfs.ext4 -d DEST -L root disk.img 4G
# and start QEMU with DEST/boot/vmlinuz-* and DEST/boot/initrd.img-* (-kernel/-initrd,
# root=LABEL=root or /dev/vda), the vmwipe SSDT and the reservation (`vmwipe qemu-args`).
# Root only.  Nothing is left mounted.
set -euo pipefail

[ "$#" -ge 3 ] || { echo "usage: $0 SUITE DEST DEBDIR [BASE:SIZE]" >&2; exit 2; }
suite=$1 dest=$2 debdir=$3 region=${4:-}
repo=$(cd "$(dirname "$0")/.." && pwd)

# What a guest needs around the package (the kernel's headers for DKMS, GRUB's
# update-grub for the memmap= entry, udev to load the module at boot).
"$repo/scripts/pkgroot.sh" "$suite" "$dest" linux-image-amd64 linux-headers-amd64 dkms \
	grub2-common grub-pc-bin systemd-sysv udev initramfs-tools kmod

# shellcheck source=scripts/chroot-mounts.sh
. "$repo/scripts/chroot-mounts.sh"
trap 'chroot_umount "$dest" || echo "guest-root: mounts left under $dest" >&2' EXIT
chroot_mount "$dest"
mkdir -p "$dest/tmp/vmwipe-debs"
cp "$debdir"/vmwipe-dkms_*_all.deb "$debdir"/libvmwipe0_*.deb "$debdir"/libvmwipe-dev_*.deb \
	"$dest/tmp/vmwipe-debs/"
if [ -n "$region" ]; then
	mkdir -p "$dest/etc/default"
	printf 'VMWIPE_RESERVATION=memmap\nVMWIPE_REGION=%s\n' "$region" > "$dest/etc/default/vmwipe"
fi
# GRUB as a guest has it: /boot/grub/grub.cfg exists, so the postinst runs update-grub.
mkdir -p "$dest/boot/grub"
[ -e "$dest/boot/grub/grub.cfg" ] || : > "$dest/boot/grub/grub.cfg"
chroot "$dest" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
	sh -c 'apt-get -q -y -o Dpkg::Options::=--force-confold install --no-install-recommends /tmp/vmwipe-debs/*.deb' >&2
rm -rf "$dest/tmp/vmwipe-debs"
