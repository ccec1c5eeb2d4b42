#!/usr/bin/env bash
# Run one command inside the shared Debian 13 (trixie) root, for what Debian 12's
# toolchain cannot do: building modules against kernels from 6.19 on, whose kbuild
# calls gcc-14 and whose tools need trixie's glibc (see scripts/kernel-make.sh).
#
#   scripts/debian13-run.sh [--bind DIR]... [--install PKG]... -- CMD [ARG]...
#
# - the root is $VMWIPE_DEBIAN13_ROOT (default build/debian13-root), debootstrapped
#   and configured by scripts/debian13-root.sh exactly as `make test-debian13` does;
# - everything runs under `flock /tmp/vmwipe-debian13.lock` and then <root>.lock (the
#   lock `make test-debian13` holds): one user of the root at a time, waiting for it;
# - --install: packages apt-get installs inside the root when missing;
# - --bind DIR: DIR is visible at the same path inside (read-write), so paths in
#   CMD's arguments mean the same inside and outside;
# - the mounts (/proc, /dev, /sys and the --bind directories) live in a private mount
#   namespace (unshare -m): they vanish with the command, even when it is killed.
# Root only. Exit status: CMD's (or 1 when the root cannot be prepared).
set -euo pipefail

say() { printf 'debian13-run: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
usage() { echo "usage: $0 [--bind DIR]... [--install PKG]... -- CMD [ARG]..." >&2; exit 2; }

repo=$(cd "$(dirname "$0")/.." && pwd)
root=${VMWIPE_DEBIAN13_ROOT:-$repo/build/debian13-root}
suite=trixie
binds=() install=()
while [ $# -gt 0 ]; do
	case $1 in
		--bind) [ $# -ge 2 ] || usage; binds+=("$(cd "$2" && pwd)"); shift 2 ;;
		--install) [ $# -ge 2 ] || usage; install+=("$2"); shift 2 ;;
		--) shift; break ;;
		*) usage ;;
	esac
done
[ $# -gt 0 ] || usage
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, mounts)"
command -v unshare >/dev/null || die "unshare (util-linux) missing"
mkdir -p "$(dirname "$root")"
root=$(cd "$(dirname "$root")" && pwd)/$(basename "$root")

exec 9>/tmp/vmwipe-debian13.lock
if ! flock -n 9; then
	say "waiting for /tmp/vmwipe-debian13.lock (another user of the Debian 13 root)"
	flock 9
fi
# and the root's own lock, which `make test-debian13` holds for its whole run
exec 7>"$root.lock"
flock 7
# shellcheck source=scripts/debian13-root.sh
. "$repo/scripts/debian13-root.sh"
d13_prepare >/dev/null

# Inside a private mount namespace: mount, chroot, run; nothing outlives the command.
# shellcheck disable=SC2016
exec unshare -m --propagation private bash -euc '
	root=$1 nbind=$2
	shift 2
	binds=("${@:1:nbind}")
	shift "$nbind"
	ninst=$1
	shift
	inst=("${@:1:ninst}")
	shift "$ninst"
	mount -t proc proc "$root/proc"
	for d in /dev /dev/pts /sys; do mount --rbind "$d" "$root$d"; done
	for d in ${binds[@]+"${binds[@]}"}; do
		mkdir -p "$root$d"
		mount --bind "$d" "$root$d"
	done
	in_root() {
		chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
			HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
			${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} "$@"
	}
	missing=()
	for p in ${inst[@]+"${inst[@]}"}; do
		in_root dpkg-query -W -f="\${Status}" "$p" 2>/dev/null | grep -q "install ok installed" ||
			missing+=("$p")
	done
	if [ "${#missing[@]}" -gt 0 ]; then
		echo "debian13-run: installing in the root: ${missing[*]}" >&2
		in_root apt-get -q -o DPkg::Lock::Timeout=600 update >&2
		in_root apt-get -q -y -o DPkg::Lock::Timeout=600 install --no-install-recommends "${missing[@]}" >&2
	fi
	in_root "$@" 7>&- 9>&-
' debian13-run "$root" "${#binds[@]}" ${binds[@]+"${binds[@]}"} "${#install[@]}" ${install[@]+"${install[@]}"} "$@"
