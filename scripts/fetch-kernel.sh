#!/usr/bin/env bash
# Fetch one Debian kernel (headers, and with --image the bootable image and its
# modules) and unpack it into a cache, for the kernel matrix and the build checks.
#
#   scripts/fetch-kernel.sh <abi> [--image]      e.g. 5.10.0-46-amd64, 7.3.4+deb13-amd64
#
# Prints the unpacked root, $VMWIPE_KERNEL_CACHE/<abi> (default build/kernels/<abi>):
#   <root>/usr/src/linux-headers-<abi>   build against it: make -C ... M=...
#   <root>/boot/vmlinuz-<abi>            with --image (from 6.19 on a link to
#                                        usr/lib/modules/<abi>/vmlinuz)
#   <root>/lib/modules/<abi> or <root>/usr/lib/modules/<abi>   with --image
# Kernels from 6.19 on split the image: linux-image-<abi> only depends on
# linux-binary-<abi>, linux-modules-<abi> and linux-base-<abi>; every versioned
# linux-* dependency is followed, so those come along.
#
# Nothing is installed and the system's apt configuration is not touched: a private
# apt configuration in <cache>/.apt (-oDir::Etc::SourceList/SourceParts,
# -oDir::State::Lists, -oDir::Cache, as scripts/backports-apt.sh does) lists
# bullseye-security, bookworm(-updates,-security,-backports) and
# trixie(-updates,-security,-backports) on the host's Debian mirror; `apt-get
# download` fetches the .debs, `dpkg-deb -x` unpacks them, the .debs are deleted.
# The header tree's Makefile names its -common tree (and from 6.19 on its output
# directory) by absolute path, and lib/modules/<abi>/build is an absolute link: both
# are rewritten to point into the unpacked root.
#
# Idempotent and shareable: a finished unpack is marked (<root>/.fetched-headers,
# .fetched-image) and reused; concurrent runs serialize on <cache>/.lock. Package
# lists are refreshed when older than 12 hours or when a package is not found.
# Does not need root.
set -euo pipefail

usage() { echo "usage: $0 <abi> [--image]   (e.g. 6.1.0-50-amd64, 7.3.4+deb13-amd64)" >&2; exit 2; }
say() { printf 'fetch-kernel: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

[ $# -ge 1 ] || usage
abi=$1
shift
image=0
for a in "$@"; do
	case $a in --image) image=1 ;; *) usage ;; esac
done
[[ $abi =~ ^[0-9]+\.[0-9]+[-.+0-9a-z~]*-[a-z0-9-]+$ ]] || die "not a kernel ABI name: $abi"

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${VMWIPE_KERNEL_CACHE:-$repo/build/kernels}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
root=$cache/$abi

done_for() { # everything asked for is already unpacked
	[ -f "$root/.fetched-headers" ] && { [ "$image" = 0 ] || [ -f "$root/.fetched-image" ]; }
}
if done_for; then echo "$root"; exit 0; fi

exec 8>"$cache/.lock"
flock 8
if done_for; then echo "$root"; exit 0; fi  # another run finished it meanwhile

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "needs apt-get and dpkg-deb (Debian)"

# --- private apt configuration ------------------------------------------------------------
apt_dir=$cache/.apt
mkdir -p "$apt_dir/parts" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
uris=""
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
	uris=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/debian.sources | tr ' ' '\n')
elif [ -f /etc/apt/sources.list ]; then
	uris=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; break } }' \
		/etc/apt/sources.list)
fi
mirror=$(echo "$uris" | grep -E '/debian/?$' | head -n 1 || true)
security=$(echo "$uris" | grep -E '/debian-security/?$' | head -n 1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
security=${security:-http://deb.debian.org/debian-security}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "$keyring missing (apt-get install debian-archive-keyring)"
sources=$(cat <<EOF
# written by scripts/fetch-kernel.sh
Types: deb
URIs: ${mirror%/}
Suites: bookworm bookworm-updates bookworm-backports trixie trixie-updates trixie-backports
Components: main
Signed-By: $keyring

Types: deb
URIs: ${security%/}
Suites: bullseye-security bookworm-security trixie-security
Components: main
Signed-By: $keyring
EOF
)
stamp=$apt_dir/lists/.updated
if [ "$(cat "$apt_dir/parts/kernels.sources" 2>/dev/null)" != "$sources" ]; then
	printf '%s\n' "$sources" > "$apt_dir/parts/kernels.sources"
	rm -f "$stamp"
fi
apt_opts=(-oDir::Etc::SourceList=/dev/null -oDir::Etc::SourceParts="$apt_dir/parts"
	-oDir::State::Lists="$apt_dir/lists" -oDir::Cache="$apt_dir/cache"
	-oDir::State::status=/dev/null -oAPT::Architecture=amd64 -oAPT::Sandbox::User=root -q)
refresh() {
	say "refreshing the package lists in $apt_dir (about 20 MB)"
	apt-get "${apt_opts[@]}" update >&2 || die "apt-get update failed"
	touch "$stamp"
}
if [ -z "$(find "$stamp" -mmin -720 2>/dev/null)" ]; then refresh; fi

# --- which packages: follow the versioned linux-* dependencies -------------------------------
# Prints "name=version" for the package and for every dependency named linux-headers-*,
# linux-kbuild-*, linux-image-*, linux-binary-*, linux-modules-* or linux-base-<abi>
# (not the generic linux-base tools), pinned where the dependency pins a version.
resolve() {
	local -a queue=("$@") seen=()
	local spec name info dep dname dver s
	while [ "${#queue[@]}" -gt 0 ]; do
		spec=${queue[0]}
		queue=("${queue[@]:1}")
		name=${spec%%=*}
		for s in ${seen[@]+"${seen[@]}"}; do [ "$s" != "$name" ] || continue 2; done
		seen+=("$name")
		info=$(apt-cache "${apt_opts[@]}" show --no-all-versions "$spec" 2>/dev/null) || return 1
		echo "$name=$(echo "$info" | sed -n 's/^Version: //p' | head -n 1)"
		while IFS= read -r dep; do
			dep=$(echo "$dep" | sed 's/^ *//; s/ *|.*//') # first alternative
			dname=${dep%% *}
			[[ $dname =~ ^linux-(headers|kbuild|image|binary|modules|base)- ]] || continue
			dver=$(echo "$dep" | sed -n 's/.*(= \(.*\))/\1/p')
			queue+=("$dname${dver:+=$dver}")
		done < <(echo "$info" | sed -n 's/^\(Pre-\)\?Depends: //p' | tr ',' '\n')
	done
}
want=("linux-headers-$abi")
[ "$image" = 0 ] || want+=("linux-image-$abi")
if ! pkgs=$(resolve "${want[@]}"); then
	refresh
	pkgs=$(resolve "${want[@]}") || die "no ${want[*]} in bullseye-security, bookworm* or trixie* (apt-cache ${apt_opts[*]} search linux-headers)"
fi

# --- download and unpack --------------------------------------------------------------------
debs=$(mktemp -d "$cache/.debs.XXXXXX")
trap 'rm -rf "$debs"' EXIT
say "downloading into $debs: $(echo $pkgs)"
# shellcheck disable=SC2086
(cd "$debs" && apt-get "${apt_opts[@]}" download $pkgs >&2) || die "apt-get download failed"
mkdir -p "$root"
for d in "$debs"/*.deb; do
	dpkg-deb -x "$d" "$root"
done
hdr=$root/usr/src/linux-headers-$abi
[ -f "$hdr/Makefile" ] || die "no $hdr/Makefile in the packages"
sed -i -E "s#^(include |KBUILD_OUTPUT=)/usr/src/#\1$root/usr/src/#" "$hdr/Makefile"
# Absolute symlinks (lib/modules/<abi>/build -> /usr/src/...) point into the unpacked root.
while IFS= read -r -d '' link; do
	target=$(readlink "$link")
	if [ -e "$root$target" ]; then ln -sfnr "$root$target" "$link"; fi
done < <(find "$root" -lname '/*' -print0)
touch "$root/.fetched-headers"
if [ "$image" = 1 ]; then
	# From 6.19 on the image sits in usr/lib/modules/<abi>/vmlinuz: link it where it used to be.
	if [ ! -e "$root/boot/vmlinuz-$abi" ] && [ -f "$root/usr/lib/modules/$abi/vmlinuz" ]; then
		mkdir -p "$root/boot"
		ln -s "../usr/lib/modules/$abi/vmlinuz" "$root/boot/vmlinuz-$abi"
	fi
	[ -f "$root/boot/vmlinuz-$abi" ] || die "no boot/vmlinuz-$abi in the packages"
	touch "$root/.fetched-image"
fi
say "unpacked $(du -sh "$root" | cut -f1) into $root"
echo "$root"
