# Sourced (bash) by scripts/test-debian13.sh and scripts/debian13-run.sh: the shared
# Debian 13 (trixie) root those run in, made and configured the same way for both.
#
# d13_prepare: debootstraps $suite into $root once (a second call reuses it; an
# unfinished one in $root.partial is removed first), from the Debian mirror the host's
# apt uses and through its apt proxy (exported as http_proxy/https_proxy for the
# caller too); then, every call, writes the chroot's apt sources ($suite,
# $suite-updates, $suite-security) and copies in the host's apt Acquire settings, CA
# certificates, DNS config and a policy-rc.d that keeps daemons from starting.
# Sets d13_debootstrapped=1 when it debootstrapped.
# The caller sets root and suite, defines say() and die(), and holds a lock on $root.
# mounts_under DIR: the mount points at or below DIR, deepest first.

mounts_under() { # mount points at or below $1, deepest first
	findmnt -rn -o TARGET | awk -v p="$1" '$0 == p || index($0, p "/") == 1' | sort -r
}

d13_prepare() {
	d13_debootstrapped=0
	# --- host tools ----------------------------------------------------------------
	local need=() uris f partial
	command -v debootstrap >/dev/null || need+=(debootstrap)
	command -v findmnt >/dev/null || need+=(util-linux)
	if [ "${#need[@]}" -gt 0 ]; then
		say "installing on the host: ${need[*]}"
		DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=1200 update >&2
		DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=1200 \
			install --no-install-recommends "${need[@]}" >&2
	fi
	[ -e "/usr/share/debootstrap/scripts/$suite" ] ||
		die "this debootstrap does not know $suite (upgrade debootstrap)"

	# --- the host's mirror and apt proxy --------------------------------------------
	mirror="" security=""
	if [ -f /etc/apt/sources.list.d/debian.sources ]; then
		uris=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/debian.sources | tr ' ' '\n')
	else
		uris=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
			awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; break } }')
	fi
	mirror=$(echo "$uris" | grep -E '/debian/?$' | head -n 1 || true)
	security=$(echo "$uris" | grep -E '/debian-security/?$' | head -n 1 || true)
	mirror=${mirror:-http://deb.debian.org/debian}
	mirror=${mirror%/}
	security=${security:-http://deb.debian.org/debian-security}
	security=${security%/}
	# debootstrap does not read apt.conf: hand it apt's proxy through the environment.
	eval "$(apt-config shell http_proxy_apt Acquire::http::Proxy https_proxy_apt Acquire::https::Proxy)"
	if [ -n "${http_proxy_apt:-}" ] && [ "$http_proxy_apt" != DIRECT ]; then export http_proxy=$http_proxy_apt; fi
	if [ -n "${https_proxy_apt:-}" ] && [ "$https_proxy_apt" != DIRECT ]; then export https_proxy=$https_proxy_apt; fi
	say "mirror $mirror, security $security${http_proxy:+, proxy $http_proxy}"

	# --- debootstrap (once) -------------------------------------------------------------
	if [ ! -f "$root/etc/vmwipe-debootstrap-done" ]; then
		[ ! -e "$root" ] || [ -z "$(ls -A "$root" 2>/dev/null)" ] ||
			die "$root exists but is not a finished debootstrap; remove it (rm -rf --one-file-system $root)"
		partial=$root.partial
		if [ -e "$partial" ]; then
			say "removing an unfinished debootstrap in $partial"
			rm -rf --one-file-system "$partial"
		fi
		say "debootstrap $suite into $root (a few minutes)"
		debootstrap --include=make,ca-certificates,python3 "$suite" "$partial" "$mirror" >&2 || {
			say "debootstrap failed; its log: $partial/debootstrap/debootstrap.log"
			tail -n 20 "$partial/debootstrap/debootstrap.log" >&2 || true
			for m in $(mounts_under "$partial"); do umount "$m" || umount -l "$m"; done
			exit 1
		}
		rmdir "$root" 2>/dev/null || true
		mv "$partial" "$root"
		touch "$root/etc/vmwipe-debootstrap-done"
		d13_debootstrapped=1
	else
		say "reusing $root"
	fi

	# --- configuration copied in (every run: the host's may have changed) ---------------
	rm -f "$root/etc/apt/sources.list"
	cat > "$root/etc/apt/sources.list.d/debian.sources" <<EOF
# written by scripts/debian13-root.sh (the host's mirror)
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
	cat > "$root/etc/apt/sources.list.d/debian-security.sources" <<EOF
# written by scripts/debian13-root.sh (removed when unreachable)
Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
	# apt settings that make the host's mirror usable (proxies, validity checks, ...)
	for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
		[ -f "$f" ] && grep -q '^[[:space:]]*Acquire' "$f" || continue
		cp "$f" "$root/etc/apt/apt.conf.d/$(basename "$f")"
	done
	if [ -d /etc/apt/auth.conf.d ]; then cp -a /etc/apt/auth.conf.d/. "$root/etc/apt/auth.conf.d/"; fi
	# no daemon may start from a package's postinst inside the chroot: the tests start
	# their own libvirtd and refuse to touch one they did not start
	printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
	chmod 755 "$root/usr/sbin/policy-rc.d"
	cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
	cp /etc/hosts "$root/etc/hosts"
	# CA certificates: local ones (so the chroot's update-ca-certificates keeps them), then the bundle
	if [ -d /usr/local/share/ca-certificates ]; then
		mkdir -p "$root/usr/local/share/ca-certificates"
		cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
	fi
	mkdir -p "$root/etc/ssl/certs"
	cp -a /etc/ssl/certs/. "$root/etc/ssl/certs/"
}
