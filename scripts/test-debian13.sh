#!/usr/bin/env bash
# `make test-debian13`: run the whole suite (`make test`) inside a Debian 13
# (trixie) chroot, from a Debian 12 or 13 host.  Root only.
#
# 1. debootstraps trixie into build/debian13-root (once; a second run reuses it),
#    from the Debian mirror the host's apt uses (and its apt proxy, if any);
#    sources inside: trixie, trixie-updates, trixie-security (dropped if unreachable);
# 2. copies in the host's CA certificates, DNS config, apt proxy/Acquire settings,
#    pip configuration (/etc/pip.conf, /etc/xdg/pip, ~/.config/pip, ~/.pip) and
#    bind-mounts read-only the local directories that configuration points pip at;
# 3. bind-mounts the chroot onto itself (libvirt's per-domain mount namespace needs
#    `/` to be a mount point), then /proc, /sys, /dev, /dev/pts, /dev/shm;
# 4. copies the working tree, uncommitted and untracked (not ignored) files
#    included, to /work/vmwipe in the chroot (its .venv and build/ are kept);
# 5. runs `make setup` then `make test` there (scripts/setup-system.sh apt-installs
#    QEMU, libvirt, the kernel and headers inside the chroot), passing PYTEST_ARGS,
#    PIP_*, VMWIPE_* and proxy variables through;
# 6. always (exit, error, Ctrl-C, SIGTERM): kills only the processes whose root is
#    the chroot (started inside it; reported), then unmounts everything it mounted,
#    in reverse order.
#
# Exit status: that of `make test` (or of the step that failed).
#   make test-debian13 PYTEST_ARGS="-x -q tests/test_libvirt.py"
#   VMWIPE_DEBIAN13_ROOT=/elsewhere scripts/test-debian13.sh
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/debian13-root.sh
. "$repo/scripts/debian13-root.sh" # mounts_under, d13_prepare (debootstrap and configuration)
root=${VMWIPE_DEBIAN13_ROOT:-$repo/build/debian13-root}
suite=trixie
work=/work/vmwipe # the tree's path inside the chroot (world-readable: QEMU runs as libvirt-qemu)

say() { printf 'test-debian13: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
now() { date +%s; }
phase_start=$(now)
phases=()
phase_done() { # record how long the phase since the previous call took
	local t; t=$(now)
	phases+=("$1: $((t - phase_start)) s")
	say "$1 took $((t - phase_start)) s"
	phase_start=$t
}

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, mounts)"
mkdir -p "$(dirname "$root")"
root=$(cd "$(dirname "$root")" && pwd)/$(basename "$root")

# One run at a time per chroot: the mounts and processes below are this run's own.
exec 9>"$root.lock"
flock -n 9 || die "another test-debian13 run holds $root.lock"

mounted=()  # in mount order; unmounted in reverse

chroot_pids() { # processes whose root directory is the chroot
	local want p r
	want=$(stat -c %d:%i "$root" 2>/dev/null) || return 0
	for p in /proc/[0-9]*; do
		p=${p#/proc/}
		[ "$p" != $$ ] || continue
		r=$(readlink "/proc/$p/root" 2>/dev/null) || continue
		if [ "$r" = "$root" ] || [ "$(stat -L -c %d:%i "/proc/$p/root" 2>/dev/null)" = "$want" ]; then
			echo "$p"
		fi
	done
}

kill_chroot_procs() {
	local pids p i
	pids=$(chroot_pids)
	[ -n "$pids" ] || return 0
	say "processes still running inside the chroot (killing them):"
	for p in $pids; do
		say "  $p $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-150)"
	done
	# shellcheck disable=SC2086
	kill -TERM $pids 2>/dev/null || true
	for i in $(seq 50); do
		pids=$(chroot_pids)
		[ -n "$pids" ] || return 0
		sleep 0.2
	done
	say "  still alive after SIGTERM, SIGKILL: $(echo $pids)"
	# shellcheck disable=SC2086
	kill -KILL $pids 2>/dev/null || true
	sleep 0.5
}

unmount_all() {
	local i m n
	for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
		m=${mounted[i]}
		for n in 1 2 3 4 5 6 7 8 9 10; do
			umount "$m" 2>/dev/null && break
			if [ "$n" = 10 ]; then
				say "umount $m: busy; detaching it lazily"
				umount -l "$m" || say "umount -l $m failed"
			fi
			sleep 0.5
		done
	done
	mounted=()
	if [ -n "$(mounts_under "$root")" ]; then
		say "mounts left under $root (not ours?):"
		mounts_under "$root" >&2
	fi
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	kill_chroot_procs
	unmount_all
	[ "${#phases[@]}" -eq 0 ] || say "timings: $(IFS=';'; echo "${phases[*]}")"
	exit "$rc"
}
trap cleanup EXIT
trap 'say interrupted; exit 130' INT
trap 'say terminated; exit 143' TERM

bind() { # bind SRC DST [ro]
	mkdir -p "$2"
	mount --bind "$1" "$2"
	mounted+=("$2")
	mount --make-private "$2"
	if [ "${3:-}" = ro ]; then
		mount -o remount,bind,ro "$2"
	fi
}

# A previous run that was SIGKILLed can leave mounts behind; we hold the lock,
# so they are not in use by another run: take them down before anything else.
stale=$(mounts_under "$root"; mounts_under "$root.partial")
if [ -n "$stale" ]; then
	say "unmounting stale mounts from an earlier run: $(echo $stale)"
	kill_chroot_procs
	for m in $stale; do umount "$m" || umount -l "$m"; done
fi

# --- the root: debootstrapped once, the host's apt mirror, proxy and CAs copied in -------------
d13_prepare
[ "$d13_debootstrapped" = 0 ] || phase_done debootstrap
# pip configuration
pipconf=()
for f in /etc/pip.conf /etc/xdg/pip "$HOME/.config/pip" "$HOME/.pip"; do
	[ -e "$f" ] || continue
	dst=$root${f/#$HOME//root}
	mkdir -p "$(dirname "$dst")"
	rm -rf "$dst"
	cp -a "$f" "$dst"
	pipconf+=("$f")
done
# env for the chroot: a clean environment plus what the caller configured
envv=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
      LANG=C.UTF-8 TERM="${TERM:-dumb}" PYTEST_ARGS="${PYTEST_ARGS:-}")
while IFS= read -r v; do
	envv+=("$v")
done < <(env | grep -E '^(PIP_[A-Z_]*|VMWIPE_[A-Z0-9_]*|HYPOTHESIS_[A-Z_]*|(http|https|no|ftp)_proxy|(HTTP|HTTPS|NO)_PROXY)=' |
	grep -v '^VMWIPE_DEBIAN13_ROOT=' || true)
# local directories pip's configuration points at (find-links, file:// indexes):
# visible read-only at the same path inside, so pip behaves as on the host
piplocal=$( { for f in ${pipconf[@]+"${pipconf[@]}"}; do
                  if [ -d "$f" ]; then cat "$f"/*.conf 2>/dev/null; else cat "$f"; fi
              done
              env | grep '^PIP_' | cut -d= -f2- | tr ' ' '\n'; } |
	grep -oE '(^|[[:space:]=])(file://)?/[^[:space:]]+' | sed -E 's#^[[:space:]=]?(file://)?##' |
	sort -u || true)
piplocal_dirs=()
for d in $piplocal; do
	[ -d "$d" ] || continue
	# a "simple" index links its files relative to itself (../../files/...)
	case "$d" in */simple|*/simple/) d=$(dirname "${d%/}") ;; esac
	case "$d" in /|/etc|/etc/*|/usr|/usr/*|/proc*|/sys*|/dev*|/root|/home) continue ;; esac
	case "$repo/" in "$d"/*) continue ;; esac
	piplocal_dirs+=("$d")
done

# --- mounts --------------------------------------------------------------------------
bind "$root" "$root"  # `/` of the chroot becomes a mount point
mkdir -p "$root/proc" "$root/sys" "$root/dev"
bind /proc "$root/proc"
bind /sys "$root/sys"
bind /dev "$root/dev"
bind /dev/pts "$root/dev/pts"
bind /dev/shm "$root/dev/shm"
for d in ${piplocal_dirs[@]+"${piplocal_dirs[@]}"}; do
	bind "$d" "$root$d" ro
done
say "mounted: / (onto itself) ${mounted[*]:1}"

# --- apt sources reachable? (security dropped if not) ---------------------------------
in_chroot() { chroot "$root" /usr/bin/env -i "${envv[@]}" "$@" 9>&-; } # fd 9: our lock
if ! in_chroot apt-get -q update >&2; then
	say "apt-get update failed; retrying without $suite-security"
	rm -f "$root/etc/apt/sources.list.d/debian-security.sources"
	in_chroot apt-get -q update >&2
fi
in_chroot update-ca-certificates >/dev/null 2>&1 || true
phase_done "chroot configuration and mounts"

# --- the working tree ------------------------------------------------------------------
mkdir -p "$root$work"
chmod 755 "$root/work" "$root$work"
# Files are copied over the previous run's copy, so that what `make setup` built there
# (.venv, the in-place host_agent/wipe/_pages.*.so, build/) stays; files the previous run
# copied that are gone from the tree now are deleted.
list=$root/var/lib/vmwipe-test-debian13.files # what the previous run copied
files=$(mktemp)
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
	# tracked (with uncommitted changes) and untracked-but-not-ignored files
	(cd "$repo" && git ls-files -z -c -o --exclude-standard |
		grep -zvE '^(\.venv|build|demo-out)/|(^|/)__pycache__/' |
		while IFS= read -r -d '' f; do if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi; done
	) > "$files"
else
	(cd "$repo" && find . \( -name .venv -o -name build -o -name demo-out -o -name __pycache__ \
		-o -name .git \) -prune -o \( -type f -o -type l \) -print0 | sed -z 's#^\./##') > "$files"
fi
if [ -f "$list" ]; then
	comm -z -23 <(sort -z "$list") <(sort -z "$files") | (cd "$root$work" && xargs -0 -r rm -f --)
fi
(cd "$repo" && tar -c --null -T "$files" -f -) | tar -x -C "$root$work" -f -
cp "$files" "$list"
rm -f "$files"
say "copied the working tree to $work ($(tr -cd '\0' < "$list" | wc -c) files)"
phase_done "copy of the tree"

# --- make setup, make test ---------------------------------------------------------------
run() { # run in the chroot, in the background so that INT/TERM reach our trap at once
	in_chroot /bin/sh -c "cd $work && $*" &
	local pid=$! rc=0
	wait "$pid" || rc=$?
	return "$rc"
}
say "make setup (in the chroot)"
run make setup || { rc=$?; say "make setup failed ($rc)"; exit "$rc"; }
phase_done "make setup"
say "make test PYTEST_ARGS='${PYTEST_ARGS:-}' (in the chroot)"
rc=0
run make test || rc=$?
phase_done "make test"
say "make test in Debian 13 exited $rc"
exit "$rc"
