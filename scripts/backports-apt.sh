# Sourced (POSIX sh) by guest_kmod/install-6.12-headers.sh and scripts/fetch-qemu10.sh.
# Sets up a private apt configuration that sees bookworm-backports beside the main
# archive, without touching the system's sources, and refreshes its package lists.
# Afterwards "$@" holds the apt options to pass: apt-get "$@" install ...
# The caller sets bpo_caller (its name, for error messages) before sourcing.
: "${bpo_caller:?set bpo_caller before sourcing backports-apt.sh}"
bpo=${VMWIPE_BPO_DIR:-/tmp/vmwipe-bpo}
mkdir -p "$bpo/lists/partial"
# Keep the main archive stanza (the first one) and point it at backports.
awk 'NR==1,/^$/' /etc/apt/sources.list.d/debian.sources |
	sed -e 's/^Suites:.*/Suites: bookworm-backports/' > "$bpo/bpo.sources"
cp /etc/apt/sources.list.d/debian.sources "$bpo/debian.sources"
grep -q '^URIs: .*debian/*$' "$bpo/bpo.sources" || {
	echo "$bpo_caller: unexpected main stanza in debian.sources" >&2
	exit 1
}
set -- -oDir::Etc::SourceParts="$bpo" -oDir::State::Lists="$bpo/lists"
apt-get "$@" -q update >&2
