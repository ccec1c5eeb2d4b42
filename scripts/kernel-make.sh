#!/usr/bin/env bash
# Build an out-of-tree module against a Debian kernel header tree, with the compiler
# that tree asks for, on this host when it can and in the Debian 13 root when not.
#
#   scripts/kernel-make.sh <headers-dir> <module-dir> [MAKE-ARG]...
#   e.g. scripts/kernel-make.sh "$(scripts/fetch-kernel.sh 5.10.0-46-amd64)/usr/src/linux-headers-5.10.0-46-amd64" \
#            build/kmod-5.10 W=1 modules
#
# runs `make -C <headers-dir> M=<module-dir> MAKE-ARG...`. The tree's .kernelvariables
# names its compiler (CC = ...gcc-N):
# - gcc-N installed here: used as is (Debian 12: 6.1, 6.12+deb12);
# - N older than this host's gcc: CC=gcc (5.10's kbuild asks for gcc-10, Debian 12's
#   gcc-12 builds it; its warnings are gcc-12's);
# - N newer (kernels from 6.19 on, and +deb13 builds: gcc-14, and kbuild tools linked
#   against trixie's glibc): inside the shared Debian 13 root (scripts/debian13-run.sh,
#   root only; gcc-N, make and the kbuild's libraries installed there on first use),
#   with the kernel root and <module-dir> visible at the same paths.
# Prints "kernel-make: <where>" on stderr first; exit status is make's.
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: $0 <headers-dir> <module-dir> [MAKE-ARG]..." >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
hdr=$(cd "$1" && pwd)
mdir=$(cd "$2" && pwd)
shift 2
[ -f "$hdr/Makefile" ] || { echo "kernel-make: no $hdr/Makefile" >&2; exit 2; }

want=$(sed -n 's/^CC = .*gcc-\([0-9][0-9]*\).*/\1/p' "$hdr/.kernelvariables" 2>/dev/null | head -n 1)
host=$(gcc -dumpversion 2>/dev/null | cut -d. -f1 || true)
if [ -z "$want" ] || command -v "gcc-$want" >/dev/null; then
	echo "kernel-make: this host${want:+, gcc-$want}" >&2
	exec make -C "$hdr" M="$mdir" "$@"
elif [ -n "$host" ] && [ "$want" -lt "$host" ]; then
	echo "kernel-make: this host, gcc-$host for the gcc-$want this kernel names" >&2
	exec make -C "$hdr" M="$mdir" CC=gcc "$@"
fi
# The kernel root: the directory holding usr/src/linux-headers-*/ (a fetch-kernel.sh root),
# or / for installed headers.
kroot=$(cd "$hdr/../../.." && pwd)
echo "kernel-make: the Debian 13 root (gcc-$want)" >&2
exec "$here/debian13-run.sh" --bind "$kroot" --bind "$mdir" \
	--install "gcc-$want" --install make --install libc6-dev --install perl --install pahole \
	--install sparse --install libelf1t64 --install libssl3t64 --install zlib1g \
	-- make -C "$hdr" M="$mdir" "$@"
