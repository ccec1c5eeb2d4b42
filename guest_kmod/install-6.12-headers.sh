#!/bin/sh
# Install a 6.12 kernel image and its headers next to the distribution's
# kernel, so that vmwipe.ko can be build-checked (and booted) against both
# the Debian 12 kernel (6.1) and the Debian 13 / bookworm-backports one (6.12).
#
# Idempotent: does nothing when a 6.12 header tree and image already exist.
# On Debian 12 the packages come from bookworm-backports, configured in a
# private directory so that the system's apt configuration is left alone.
# Exact package names are installed: "-t bookworm-backports" on the
# metapackages would also move linux-headers-amd64 to 6.12.
#
# Prints the installed kernel release (e.g. 6.12.95+deb12-amd64) on stdout.
set -eu

have() {
	for d in /usr/src/linux-headers-6.12.*-amd64; do
		[ -f "$d/Makefile" ] || continue
		rel=${d#/usr/src/linux-headers-}
		if [ -f "/boot/vmlinuz-$rel" ]; then
			echo "$rel"
			return 0
		fi
	done
	return 1
}

have && exit 0

[ "$(id -u)" = 0 ] || { echo "install-6.12-headers: must run as root" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")

if [ "$codename" = bookworm ]; then
	bpo_caller=install-6.12-headers
	. "$(dirname "$0")/../scripts/backports-apt.sh"
	rel=$(apt-cache "$@" search --names-only '^linux-headers-6\.12\.[0-9]+\+deb12-amd64$' |
		sed -n 's/^linux-headers-\(6\.12\.[0-9]*+deb12-amd64\) .*/\1/p' |
		sort -V | tail -n 1)
	[ -n "$rel" ] || { echo "install-6.12-headers: no 6.12 kernel in bookworm-backports" >&2; exit 1; }
	apt-get "$@" -q -y install -t bookworm-backports --no-install-recommends \
		"linux-headers-$rel" "linux-image-$rel" >&2
else
	# Debian 13 ships 6.12 as its own kernel.
	apt-get -q update >&2
	apt-get -q -y install --no-install-recommends linux-headers-amd64 linux-image-amd64 >&2
fi

have || { echo "install-6.12-headers: 6.12 headers not found after install" >&2; exit 1; }
