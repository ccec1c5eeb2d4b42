#!/usr/bin/env bash
# Make a throwaway Debian root for the package tests, from cached tarballs.
#
#   scripts/pkgroot.sh SUITE DEST [PACKAGE...]
#
# DEST receives a `debootstrap --variant=minbase SUITE` root with PACKAGEs apt-installed
# (no recommends).  A first PACKAGE `+backports` adds SUITE-backports to the root's
# sources first (python3-qemu-qmp is there for trixie).  Debootstrap plus apt take minutes, so two layers are kept as
# tarballs in $VMWIPE_PKGROOT_CACHE (default build/pkgroots): the bare debootstrap
# (keyed by suite and mirror) and the root with PACKAGEs (keyed by the base, the sorted
# package list and this script).  A second call with the same inputs only unpacks
# (seconds).  Delete the cache directory to refresh the roots (point releases).
#
# Root only.  DEST must not exist or be empty.  Nothing is left mounted.
set -euo pipefail

[ "$#" -ge 2 ] || { echo "usage: $0 SUITE DEST [PACKAGE...]" >&2; exit 2; }
suite=$1 dest=$2
shift 2
pkgs=("$@")
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/chroot-mounts.sh
. "$repo/scripts/chroot-mounts.sh"
cache=${VMWIPE_PKGROOT_CACHE:-$repo/build/pkgroots}
say() { printf 'pkgroot: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }
[ ! -e "$dest" ] || [ -z "$(ls -A "$dest")" ] || { say "$dest is not empty"; exit 1; }

# The host's Debian mirror (as scripts/test-debian13.sh reads it) and its apt proxy.
uris=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | tr ' ' '\n' || true)
mirror=$(echo "$uris" | grep -E '/debian/?$' | head -n 1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
mirror=${mirror%/}
security=$(echo "$uris" | grep -E '/debian-security/?$' | head -n 1 || true)
security=${security:-http://deb.debian.org/debian-security}
security=${security%/}
eval "$(apt-config shell http_proxy_apt Acquire::http::Proxy)"
if [ -n "${http_proxy_apt:-}" ] && [ "$http_proxy_apt" != DIRECT ]; then export http_proxy=$http_proxy_apt; fi

base_key=$(echo "$suite $mirror $security v1" | sha256sum | cut -c1-12)
key=$( { echo "$base_key"; printf '%s\n' "${pkgs[@]}" | sort -u; cat "$0"; } | sha256sum | cut -c1-12)
base=$cache/$suite-minbase-$base_key.tar.zst
tarball=$cache/$suite-$key.tar.zst
mkdir -p "$cache" "$dest"
unpack() { zstd -q -dc "$1" | tar -C "$2" --numeric-owner -xf -; }
pack() { tar -C "$1" --numeric-owner -cf - . | zstd -q -T0 -o "$2.part" && mv "$2.part" "$2"; }

if [ ! -f "$tarball" ]; then
	exec 8>"$cache/$suite.lock"
	flock 8  # one builder per suite; the others wait, then unpack its result
fi
if [ ! -f "$tarball" ]; then
	work=$(mktemp -d "$cache/.build-$suite-XXXXXX")
	r=$work/root
	mkdir "$r"
	# remove the build directory only once nothing is mounted in it
	trap 'chroot_umount "$r" && rm -rf --one-file-system "$work"' EXIT
	t0=$(date +%s)
	if [ ! -f "$base" ]; then
		say "debootstrap $suite (minutes; cached as $base)"
		debootstrap --variant=minbase --include=ca-certificates "$suite" "$r" "$mirror" \
			> "$work/debootstrap.out" 2>&1 || {
			tail -n 20 "$r/debootstrap/debootstrap.log" "$work/debootstrap.out" >&2 || true
			exit 1
		}
		printf '%s\n' "Types: deb" "URIs: $mirror" "Suites: $suite $suite-updates" \
			"Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" "" \
			"Types: deb" "URIs: $security" "Suites: $suite-security" "Components: main" \
			"Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" \
			> "$r/etc/apt/sources.list.d/debian.sources"
		rm -f "$r/etc/apt/sources.list"
		# no daemon starts from a postinst inside a test root
		printf '#!/bin/sh\nexit 101\n' > "$r/usr/sbin/policy-rc.d"
		chmod 755 "$r/usr/sbin/policy-rc.d"
		pack "$r" "$base"
		say "debootstrap $suite took $(( $(date +%s) - t0 )) s"
	else
		unpack "$base" "$r"
	fi
	for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
		[ -f "$f" ] && grep -q '^[[:space:]]*Acquire' "$f" || continue
		cp "$f" "$r/etc/apt/apt.conf.d/$(basename "$f")"
	done
	cp -L /etc/resolv.conf "$r/etc/resolv.conf" 2>/dev/null || true
	if [ "${pkgs[0]:-}" = +backports ]; then
		pkgs=("${pkgs[@]:1}")
		awk 'NR==1,/^$/' "$r/etc/apt/sources.list.d/debian.sources" | sed '/^$/d' |
			sed "s/^Suites:.*/Suites: $suite-backports/" > "$r/etc/apt/sources.list.d/backports.sources"
	fi
	if [ "${#pkgs[@]}" -gt 0 ]; then
		chroot_mount "$r"
		say "apt-get install ${pkgs[*]}"
		chroot "$r" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
			sh -c 'apt-get -q update && apt-get -q -y install --no-install-recommends "$@" && apt-get clean' \
			sh "${pkgs[@]}" > "$work/apt.out" 2>&1 || { tail -n 30 "$work/apt.out" >&2; exit 1; }
		chroot_umount "$r" || { say "mounts left under $r"; exit 1; }
	fi
	pack "$r" "$tarball"
	say "built $tarball in $(( $(date +%s) - t0 )) s"
fi
unpack "$tarball" "$dest"
