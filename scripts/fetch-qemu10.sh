#!/bin/sh
# Unpack QEMU 10 from bookworm-backports into build/qemu10/ (Debian 12 only), so
# the tests that need QEMU >= 9.0 (mapped-ram, file: migration) run instead of
# skipping.  The system's QEMU 7.2 stays the default: nothing is installed as a
# package, nothing in the system's apt configuration changes.
#
# - Debian 13 (or any system QEMU >= 9): nothing to do.
# - Debian 12: `apt-get download` qemu-system-x86, qemu-system-common,
#   qemu-system-data and seabios from bookworm-backports, using a private apt
#   config like guest_kmod/install-6.12-headers.sh (-oDir::Etc::SourceParts,
#   -oDir::State::Lists in $VMWIPE_BPO_DIR), `dpkg -x` them into build/qemu10/,
#   install only shared libraries `ldd` reports missing (by package name, from
#   main or backports), and write build/qemu10/qemu10: a wrapper that runs the
#   unpacked binary with -L for its own data and firmware.
#
# Idempotent: a second run finds a working build/qemu10/qemu10 and exits at once.
# Prints the wrapper's path on stdout when there is one.
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
dest="$repo/build/qemu10"
wrapper="$dest/qemu10"

major() { # QEMU major version of binary $1, 0 when it does not run
	"$1" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p' | head -n 1 | grep . || echo 0
}

if [ -x "$wrapper" ] && [ "$(major "$wrapper")" -ge 9 ]; then
	echo "$wrapper"
	exit 0
fi

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
sys=$(command -v qemu-system-x86_64 || true)
if [ "$codename" != bookworm ] || { [ -n "$sys" ] && [ "$(major "$sys")" -ge 9 ]; }; then
	echo "fetch-qemu10: system QEMU ($codename) is used as is; nothing to fetch" >&2
	exit 0
fi

[ "$(id -u)" = 0 ] || { echo "fetch-qemu10: must run as root" >&2; exit 1; }
command -v dpkg-deb >/dev/null || { echo "fetch-qemu10: dpkg-deb missing" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
bpo_caller=fetch-qemu10
. "$(dirname "$0")/backports-apt.sh"

debs="$repo/build/qemu10-debs"
stage="$repo/build/qemu10.tmp.$$"
rm -rf "$debs" "$stage"
mkdir -p "$debs" "$stage"
trap 'rm -rf "$stage"' EXIT
# apt-get download as root warns that it runs unsandboxed; harmless here.
(cd "$debs" && apt-get "$@" -q download qemu-system-x86/bookworm-backports \
	qemu-system-common/bookworm-backports qemu-system-data/bookworm-backports \
	seabios/bookworm-backports >&2)
for d in "$debs"/*.deb; do
	dpkg-deb -x "$d" "$stage"
done
bin="$stage/usr/bin/qemu-system-x86_64"
[ -x "$bin" ] || { echo "fetch-qemu10: no qemu-system-x86_64 in the packages" >&2; exit 1; }

# Shared libraries the unpacked binary lacks: install the library packages that
# qemu-system-x86 and qemu-system-common depend on and that are not installed.
if ldd "$bin" | grep -q 'not found'; then
	libs=$(for d in "$debs"/qemu-system-x86_*.deb "$debs"/qemu-system-common_*.deb; do
		dpkg-deb -f "$d" Depends; done | tr ',' '\n' | sed 's/^ *//; s/[ (|].*//' |
		grep '^lib' | sort -u)
	want=""
	for p in $libs; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
			want="$want $p"
	done
	echo "fetch-qemu10: installing missing libraries:$want" >&2
	# shellcheck disable=SC2086
	apt-get "$@" -q -y install --no-install-recommends $want >&2 ||
		apt-get "$@" -q -y install --no-install-recommends -t bookworm-backports $want >&2
	if ldd "$bin" | grep 'not found' >&2; then
		echo "fetch-qemu10: shared libraries still missing (above)" >&2
		exit 1
	fi
fi
[ -d /usr/lib/ipxe/qemu ] || echo "fetch-qemu10: ipxe-qemu not installed (NIC ROMs)" >&2

rm -rf "$dest"
mv "$stage" "$dest"
trap - EXIT
cat > "$wrapper" <<EOF
#!/bin/sh
# QEMU 10 from bookworm-backports, unpacked by scripts/fetch-qemu10.sh.
export QEMU_MODULE_DIR=$dest/usr/lib/x86_64-linux-gnu/qemu
exec $dest/usr/bin/qemu-system-x86_64 -L $dest/usr/share/qemu -L $dest/usr/share/seabios \\
	-L /usr/lib/ipxe/qemu "\$@"
EOF
chmod 755 "$wrapper"
rm -rf "$debs"
v=$(major "$wrapper")
[ "$v" -ge 9 ] || { echo "fetch-qemu10: $wrapper does not run" >&2; "$wrapper" --version >&2; exit 1; }
echo "$wrapper"
