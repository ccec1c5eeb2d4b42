"""Every libvirt-side path and name vmwipe uses, defined once.

The hook, the installer, the XML editor and the CLI defaults all read these;
a packager who moves one (another distribution's hook directory, say) changes
it here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

#: libvirt's hook directory; libvirtd runs `HOOKS_DIR/qemu` for every QEMU domain.
HOOKS_DIR = Path("/etc/libvirt/hooks")
#: The hook as a drop-in (libvirt >= 6.5 runs qemu.d/* in order after `qemu`).
DROPIN_NAME = "qemu.d/50-vmwipe"
#: Where `install-hook --layout chain` moves a hook that was there before (it runs first).
CHAINED_NAME = "qemu.vmwipe-chained"
#: libvirt's per-domain runtime files (NAME.pid).
RUN_DIR = Path("/var/run/libvirt/qemu")
#: SSDT, zero page and monitor sockets of protected domains.
STATE_DIR = Path("/var/lib/vmwipe")
#: The hook's log file lives here (besides syslog).
LOG_DIR = Path("/var/log/vmwipe")
#: The local AppArmor abstraction that receives the rules QEMU needs for the files above.
APPARMOR_LOCAL = Path("/etc/apparmor.d/local/abstractions/libvirt-qemu")
#: The XML namespace of `<vmwipe:protect>` in a domain's metadata; the hook looks for it
#: in the XML on its stdin to know a domain is protected.
META_NS = "urn:vmwipe:libvirt:1"
META_URN = META_NS.encode()
