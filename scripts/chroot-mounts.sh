# Sourced (bash) by scripts/pkgroot.sh, guest-root.sh and build-deb.sh, and run by
# tests/debroot.py: the mounts a package-installing chroot needs, and their removal.
#
# The root gets its own /proc and /sys binds but NOT the host's /dev: a tmpfs with
# only null, zero, full, random, urandom, tty, ptmx, pts and shm bound in (as
# debootstrap does inside containers), the block device the root lives on (for
# grub-probe), and its own fd/stdin/stdout/stderr links.  A
# maintainer script that rewrites /dev (systemd, udev) then changes the root's copy;
# with the host's /dev bound it would change the host's.
#
#   chroot_mount ROOT      chroot_umount ROOT      (umount: 0 when nothing is left mounted)

chroot_mount() {
	local r=$1 d src
	mkdir -p "$r/proc" "$r/sys" "$r/dev"
	mount --bind /proc "$r/proc"
	mount --bind /sys "$r/sys"
	mount -t tmpfs -o mode=755,size=16m vmwipe-dev "$r/dev"
	for d in null zero full random urandom tty ptmx; do
		touch "$r/dev/$d"
		mount --bind "/dev/$d" "$r/dev/$d"
	done
	for d in pts shm; do
		mkdir -p "$r/dev/$d"
		mount --bind "/dev/$d" "$r/dev/$d"
	done
	# the block device that holds the root, so grub-probe (update-grub) can name it
	src=$(findmnt -n -o SOURCE -T "$r" | sed 's/\[.*//')
	if [ -b "$src" ]; then
		mkdir -p "$r/dev/$(dirname "${src#/dev/}")"
		touch "$r$src"
		mount --bind "$src" "$r$src"
	fi
	ln -s /proc/self/fd "$r/dev/fd"
	ln -s /proc/self/fd/0 "$r/dev/stdin"
	ln -s /proc/self/fd/1 "$r/dev/stdout"
	ln -s /proc/self/fd/2 "$r/dev/stderr"
}

chroot_umount() {
	local r m
	r=$(cd "$1" 2>/dev/null && pwd -P) || return 0
	# deepest first; lazily if busy
	for m in $(findmnt -rn -o TARGET | awk -v p="$r" 'index($0, p "/") == 1' | sort -r); do
		umount "$m" 2>/dev/null || umount -l "$m"
	done
	[ -z "$(findmnt -rn -o TARGET | awk -v p="$r" 'index($0, p "/") == 1')" ]
}
