#!/usr/bin/env bash
# Build vmwipe.ko with W=1 against the Debian 12 kernel (6.1) and a 6.12 kernel
# (Debian 13, or bookworm-backports on Debian 12, installed on demand) and fail
# on any compiler warning. Builds happen in build/kmod-<release>/ so the source
# tree stays clean. The in-kernel API test module is built too. Used by
# `make kmod-check`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${VMWIPE_BUILD_DIR:-$here/../build}

# The newest header tree of a series, or nothing: a series may be missing (Debian 13
# has no 6.1), and under pipefail a failing `ls` would end the script silently.
newest() {
	local d found=()
	for d in /usr/src/linux-headers-"$1"*-amd64; do
		[ -f "$d/Makefile" ] && found+=("$d")
	done
	[ "${#found[@]}" -gt 0 ] && printf '%s\n' "${found[@]}" | sort -V | tail -n 1
	return 0
}

[ -n "$(newest 6.12.)" ] || "$here/install-6.12-headers.sh" >/dev/null
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
kdirs=()
for series in 6.1. 6.12.; do
	kdir=$(newest "$series")
	if [ -n "$kdir" ]; then
		kdirs+=("$kdir")
	elif [ "$series" = 6.1. ] && [ "$codename" != bookworm ]; then
		# Debian 13 only ships 6.12; the 6.1 check needs a Debian 12 machine.
		echo "check-builds: no 6.1 headers on $codename, 6.1 build SKIPPED" >&2
	else
		echo "check-builds: no linux-headers-${series}*-amd64" >&2
		exit 1
	fi
done

# sparse (endianness annotations, locking) when installed: apt-get install sparse
check=()
if command -v sparse >/dev/null; then
	check=(C=1)
else
	echo "check-builds: sparse not installed, skipping the sparse pass" >&2
fi

rc=0
for kdir in "${kdirs[@]}"; do
	rel=${kdir#/usr/src/linux-headers-}
	dir=$out/kmod-$rel
	rm -rf "$dir"
	mkdir -p "$dir"
	cp "$here"/Kbuild "$here"/*.c "$here"/*.h "$dir"/
	log=$dir/build.log
	if ! make -C "$kdir" M="$dir" W=1 "${check[@]}" CONFIG_VMWIPE_KAPI_TEST=m modules >"$log" 2>&1; then
		echo "check-builds: $rel: build FAILED" >&2
		cat "$log" >&2
		rc=1
	elif grep -q 'warning:' "$log"; then
		echo "check-builds: $rel: warnings" >&2
		grep -A3 'warning:' "$log" >&2
		rc=1
	else
		echo "check-builds: $rel: OK, no warnings (W=1${check:+, sparse})"
	fi
done
exit $rc
