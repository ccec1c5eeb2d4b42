"""`vmwipe libvirt status`: what protects a domain, and what the hook last did to it.

Read-only: the domain's persistent XML (is it protected, which region, how it is
reserved, which policy), its live XML when it runs (a protection added while it
ran applies only from its next cold boot), the files `protect` wrote, where the
hook is installed, and the hook's last line about the domain in its log file.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ProtectError
from .domain_xml import Protection, protection_of
from .domain_xml import parse_domain as _parse
from .install import MARKER
from .paths import DROPIN_NAME, HOOKS_DIR, LOG_DIR

#: The hook's log line: "2026-12-07 06:14:00,123 vmwipe-hook[42]: INFO: NAME: ..."
_LOG_LINE = re.compile(r"^(\S+ \S+) vmwipe-hook\[\d+\]: (INFO|ERROR): (.*)$")
#: Only the end of a long log is read: the last event of a domain is near its end.
_LOG_TAIL = 4 << 20


@dataclass
class HookEvent:
    """The hook's last log line about a domain: when, and what it did (or refused)."""

    time: str
    outcome: str  # wiped, nothing-registered, skipped, refused
    message: str


@dataclass
class DomainStatus:
    domain: str
    state: str
    protected: bool
    region: dict[str, int] | None = None
    reservation: str = ""
    policies: dict[str, str] = field(default_factory=dict)
    files: dict[str, bool] = field(default_factory=dict)
    running_protected: bool | None = None  # None: not running
    last_hook_event: HookEvent | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The text report of one domain."""
        if not self.protected:
            out = [f"{self.domain}: not protected ({self.state})"]
        else:
            assert self.region is not None
            out = [f"{self.domain}: protected ({self.state}), region "
                   f"{self.region['base']:#x}+{self.region['size']:#x}, reserved by "
                   f"{self.reservation}",
                   "  policies: " + ", ".join(f"{k} {v}" for k, v in self.policies.items())]
            missing = [k for k, ok in self.files.items() if not ok]
            out.append("  files: " + (f"missing {', '.join(missing)}" if missing else
                                      ", ".join(self.files) + " present"))
        if self.running_protected is not None and (self.protected or self.running_protected):
            out.append("  running QEMU: " + ("protected" if self.running_protected else
                                             "started without protection (until its next "
                                             "cold boot)"))
        ev = self.last_hook_event
        out.append(f"  last hook event: {ev.time} {ev.outcome}: {ev.message}" if ev else
                   "  last hook event: none in the hook log")
        out += [f"  note: {n}" for n in self.notes]
        return out


def _protection(xml: str) -> tuple[Protection | None, str | None]:
    try:
        return protection_of(_parse(xml)), None
    except ProtectError as e:
        return None, str(e)


def _outcome(level: str, message: str) -> str:
    if level == "ERROR":
        return "refused"
    if "nothing registered" in message:
        return "nothing-registered"
    if "wiped and verified" in message:
        return "wiped"
    return "skipped"


def last_hook_event(name: str, log_path: Path) -> HookEvent | None:
    """The last INFO/ERROR line of the hook about `name` (OSError if the log is unreadable)."""
    with open(log_path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _LOG_TAIL))
        text = f.read().decode("utf-8", "replace")
    prefixes = (f"{name}: ", f"vmwipe: {name}: ")
    for line in reversed(text.splitlines()):
        m = _LOG_LINE.match(line)
        if m and m.group(3).startswith(prefixes):
            message = m.group(3).removeprefix("vmwipe: ").removeprefix(f"{name}: ")
            return HookEvent(m.group(1), _outcome(m.group(2), m.group(3)), message)
    return None


def hook_installed(hooks_dir: Path = HOOKS_DIR) -> str | None:
    """Where the vmwipe hook is installed (the drop-in or a chained `qemu`), or None."""
    for path in (hooks_dir / DROPIN_NAME, hooks_dir / "qemu"):
        try:
            with open(path, "rb") as f:
                if MARKER.encode() in f.read(4096):
                    return str(path)
        except OSError:
            continue
    return None


_STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down",
           5: "shut off", 6: "crashed", 7: "suspended (PM)"}


def domain_status(dom: Any, log_path: Path = LOG_DIR / "hook.log") -> DomainStatus:
    """The status of one libvirt domain (`dom`: a libvirt.virDomain)."""
    import libvirt

    name = str(dom.name())
    state = _STATES.get(dom.state()[0], "unknown")
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    prot, problem = _protection(str(dom.XMLDesc(flags)))
    st = DomainStatus(name, state, prot is not None)
    if problem:
        st.notes.append(f"the vmwipe metadata is unreadable: {problem} (the hook refuses "
                        "to start this domain after a restore)")
    if prot is not None:
        st.region = {"base": prot.base, "size": prot.size}
        st.reservation = (f"memmap ({prot.cmdline_param})" if prot.reservation == "memmap"
                          else f"dimm ({prot.dimm_kib} KiB at {prot.dimm_base:#x})")
        st.policies = {"on-invalid": "fail", "reset-guard": "required", "backend": "auto",
                       "require-crng": "yes" if getattr(prot, "require_crng", False)
                       else "no"}
        st.files = {"ssdt": os.path.isfile(prot.ssdt),
                    "zero-page": os.path.isfile(prot.zero_page)}
    if dom.isActive():
        live, _ = _protection(str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE)))
        st.running_protected = live is not None
        if live is not None:
            st.files["monitor"] = os.path.exists(live.monitor)
    try:
        st.last_hook_event = last_hook_event(name, log_path)
    except FileNotFoundError:
        pass
    except OSError as e:
        st.notes.append(f"hook log {log_path}: {(e.strerror or str(e)).lower()}")
    return st
