#!/usr/bin/env bash
# Build vmwipe.ko (and the in-kernel API test module) with W=1 against Debian's
# kernels, fail on any compiler warning, and check that crng.o makes no
# indirect call (no-indirect-calls.sh). Used by `make kmod-check`.
#
#   guest_kmod/check-builds.sh              every kernel of MATRIX below
#   guest_kmod/check-builds.sh --slice      the oldest and newest of MATRIX, and the
#                                           kernels whose headers are installed here
#   guest_kmod/check-builds.sh ABI...       these (e.g. 6.1.0-50-amd64)
#
# Headers installed in /usr/src are used as they are; the others are fetched on
# demand (scripts/fetch-kernel.sh, cached in $VMWIPE_KERNEL_CACHE). The build runs
# through scripts/kernel-make.sh: on this host with the compiler the kernel names
# (5.10's gcc-10 → CC=gcc), or, for kernels whose kbuild needs gcc-14 (Debian 13's,
# 6.19 on), inside the Debian 13 root ($VMWIPE_DEBIAN13_ROOT, debootstrapped on first
# use: a few minutes). Such a kernel is SKIPPED, saying why, only where that cannot
# work (not root). sparse runs too (C=1): in the Debian 13 root always, here when installed.
# Builds happen in $VMWIPE_BUILD_DIR/kmod-<abi>/ (default build/), so the tree stays
# clean. Exit status: 0 when every kernel that was not skipped built cleanly.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out=${VMWIPE_BUILD_DIR:-$repo/build}

# The kernels Debian ships with headers, oldest and newest of each series (the same
# as `make kernel-matrix`, examples/lab/matrix.py).
MATRIX=(
	5.10.0-43-amd64 5.10.0-46-amd64           # bullseye-security
	6.1.0-47-amd64 6.1.0-50-amd64 6.1.0-57-amd64  # bookworm, bookworm-security
	6.12.107+deb13-amd64 6.12.118+deb13-amd64  # trixie, trixie-security
	7.2.12+deb13-amd64 7.3.4+deb13-amd64       # trixie-backports
)

say() { printf 'check-builds: %s\n' "$*"; }

installed() { # ABIs with a header tree in /usr/src
	local d
	for d in /usr/src/linux-headers-*-amd64; do
		[ -f "$d/Makefile" ] && echo "${d#/usr/src/linux-headers-}"
	done
	return 0
}

case "${1:-}" in
"") abis=("${MATRIX[@]}") ;;
--slice) mapfile -t abis < <(printf '%s\n' "${MATRIX[0]}" $(installed) "${MATRIX[-1]}" | awk '!seen[$0]++') ;;
-*) echo "usage: $0 [--slice | ABI...]" >&2; exit 2 ;;
*) abis=("$@") ;;
esac

# The header tree of @1, fetched when not installed; empty (and a message) on failure.
headers() {
	local root
	if [ -f "/usr/src/linux-headers-$1/Makefile" ]; then
		echo "/usr/src/linux-headers-$1"
	elif root=$("$repo/scripts/fetch-kernel.sh" "$1" 2>"$out/fetch-$1.log"); then
		echo "$root/usr/src/linux-headers-$1"
	else
		tail -n 5 "$out/fetch-$1.log" >&2
	fi
}

# Does the kernel's kbuild need a compiler this host lacks (so the Debian 13 root)?
needs_debian13() {
	local want host
	want=$(sed -n 's/^CC = .*gcc-\([0-9][0-9]*\).*/\1/p' "$1/.kernelvariables" 2>/dev/null | head -n 1)
	host=$(gcc -dumpversion | cut -d. -f1)
	[ -n "$want" ] && ! command -v "gcc-$want" >/dev/null && [ "$want" -gt "$host" ]
}

mkdir -p "$out"
results=() rc=0
for abi in "${abis[@]}"; do
	hdr=$(headers "$abi")
	if [ -z "$hdr" ]; then
		say "$abi: FAILED, no headers (not installed, and fetch-kernel.sh failed)" >&2
		results+=("$abi: no headers") rc=1
		continue
	fi
	check=() where=host
	if needs_debian13 "$hdr"; then
		where="Debian 13 root"
		if [ "$(id -u)" != 0 ]; then
			say "$abi: SKIPPED: its kbuild needs gcc-14, built in the Debian 13 root, which needs root" >&2
			results+=("$abi: skipped (needs root for the Debian 13 root)")
			continue
		fi
		check=(C=1)  # kernel-make.sh installs sparse there
	elif command -v sparse >/dev/null; then
		check=(C=1)
	fi
	dir=$out/kmod-$abi
	rm -rf "$dir"
	mkdir -p "$dir"
	cp "$here"/Kbuild "$here"/*.c "$here"/*.h "$here"/compat-probes.sh "$dir"/
	rm -f "$dir"/compat-probed.h
	log=$dir/build.log
	if ! "$repo/scripts/kernel-make.sh" "$hdr" "$dir" W=1 ${check[@]+"${check[@]}"} \
		CONFIG_VMWIPE_KAPI_TEST=m modules >"$log" 2>&1; then
		say "$abi: build FAILED ($where)" >&2
		cat "$log" >&2
		results+=("$abi: build failed") rc=1
	elif grep -q 'warning:' "$log"; then
		say "$abi: warnings ($where)" >&2
		grep -A3 'warning:' "$log" >&2
		results+=("$abi: $(grep -c 'warning:' "$log") warnings") rc=1
	elif ! "$here/no-indirect-calls.sh" "$dir/crng.o" "$dir/ksecrets.o" >&2; then
		results+=("$abi: crng.o or ksecrets.o makes an indirect call") rc=1
	else
		extra=""
		[ "${#check[@]}" = 0 ] || extra=", sparse"
		say "$abi: OK, no warnings (W=1$extra; $where), ksecrets.o, crng.o: no indirect calls"
		results+=("$abi: OK, 0 warnings (W=1$extra; $where)")
	fi
done
say "summary:"
printf '  %s\n' "${results[@]}"
exit $rc
