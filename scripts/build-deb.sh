#!/usr/bin/env bash
# `make deb`: build the Debian packages (vmwipe, vmwipe-dkms, libvmwipe0, libvmwipe-dev)
# with Debian's own tooling (debian/, dpkg-buildpackage, dh-python/pybuild, dh-dkms).
#
#   scripts/build-deb.sh [SUITE]        # default: this host's release
#
# The host package carries C extensions built for one Python, so it is built per
# release: for this host's release on the host itself (missing build dependencies
# are apt-installed, as root), for another one (bookworm on trixie, trixie on
# bookworm) in a throwaway root from scripts/pkgroot.sh with the build dependencies
# in it.  Output: build/deb/SUITE/*.deb.  The source is a copy of the working tree
# (tracked and untracked, not ignored, files) in build/deb/SUITE/src.
#
# For bookworm the qemu.qmp 0.0.6 sdist goes into the source as debian/vendor/ (from
# build/vendor/, downloaded from PyPI once, checked against debian/vendor/SHA256SUMS).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/chroot-mounts.sh
. "$repo/scripts/chroot-mounts.sh"
say() { printf 'build-deb: %s\n' "$*" >&2; }
host_suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
suite=${1:-$host_suite}
out=$repo/build/deb/$suite
version=$(dpkg-parsechangelog -l "$repo/debian/changelog" -S Version)
src=$out/src/vmwipe-$version
# A clean PATH: dpkg-buildpackage and pybuild must find Debian's python3, not another one.
export PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH VIRTUAL_ENV || true

rm -rf "$out"
mkdir -p "$src"
tree_files() { # NUL-separated: tracked and untracked-not-ignored files, or (no git) all but outputs
	if command -v git >/dev/null && git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
		git -C "$repo" ls-files -z -c -o --exclude-standard |
			while IFS= read -r -d '' f; do if [ -e "$repo/$f" ]; then printf '%s\0' "$f"; fi; done
	else  # a copy of the tree without .git (make test-debian13)
		(cd "$repo" && find . \( -name .venv -o -name build -o -name demo-out -o -name __pycache__ \
			-o -name .git -o -name '*.egg-info' \) -prune -o \( -type f -o -type l \) -print0 |
			sed -z 's#^\./##')
	fi
}
tree_files | (cd "$repo" && tar -c --null -T - -f -) | tar -x -C "$src" -f -

if [ "$suite" = bookworm ]; then
	sdist=qemu_qmp-0.0.6.tar.gz
	if [ ! -f "$repo/build/vendor/$sdist" ]; then
		say "downloading the $sdist sdist (PyPI)"
		py=$(command -v python3)
		[ -x "$repo/.venv/bin/python" ] && py=$repo/.venv/bin/python
		"$py" -m pip download -q --no-deps --no-binary :all: -d "$repo/build/vendor" qemu.qmp==0.0.6
	fi
	cp "$repo/build/vendor/$sdist" "$src/debian/vendor/"
	(cd "$src/debian/vendor" && sha256sum -c --quiet SHA256SUMS) ||
		{ say "$sdist does not match debian/vendor/SHA256SUMS"; exit 1; }
fi

build_deps() { # the Build-Depends names, without versions or alternatives
	sed -n '/^Build-Depends:/,/^[A-Z]/p' "$repo/debian/control" | sed '1s/^Build-Depends://;$d' |
		tr ',' '\n' | sed 's/[(|].*//; s/<.*//' | awk 'NF { print $1 }' |
		sed 's/^dh-sequence-python3$/dh-python/; s/^dh-sequence-dkms$/dh-dkms/;
		     s/^debhelper-compat$/debhelper/'
}

t0=$(date +%s)
if [ "$suite" = "$host_suite" ]; then
	if ! (cd "$src" && dpkg-checkbuilddeps) 2>/dev/null; then
		[ "$(id -u)" = 0 ] || { (cd "$src" && dpkg-checkbuilddeps); exit 1; }
		say "installing the build dependencies"
		DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600 install \
			--no-install-recommends build-essential fakeroot $(build_deps) >&2
	fi
	(cd "$src" && dpkg-buildpackage -us -uc -b) > "$out/build.log" 2>&1 ||
		{ tail -n 40 "$out/build.log" >&2; say "failed; the whole log: $out/build.log"; exit 1; }
else
	[ "$(id -u)" = 0 ] || { say "building for $suite needs root (a chroot)"; exit 1; }
	root=$out/root
	# shellcheck disable=SC2046
	"$repo/scripts/pkgroot.sh" "$suite" "$root" build-essential fakeroot $(build_deps)
	# remove the root only once nothing is mounted in it
	trap 'chroot_umount "$root" && rm -rf --one-file-system "$root"' EXIT
	chroot_mount "$root"
	mkdir -p "$root/build"
	cp -a "$out/src" "$root/build/"
	chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
		sh -c "cd /build/src/vmwipe-$version && dpkg-buildpackage -us -uc -b" > "$out/build.log" 2>&1 ||
		{ tail -n 40 "$out/build.log" >&2; say "failed; the whole log: $out/build.log"; exit 1; }
	cp "$root"/build/src/*.deb "$out/src/"
fi
mv "$out"/src/*.deb "$out/"
say "built in $(( $(date +%s) - t0 )) s: $(cd "$out" && echo *.deb)"
