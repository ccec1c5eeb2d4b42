"""`vmwipe libvirt ...`: protect domains, install the hook, and API-driven restores.

The subcommands are thin: XML edits live in `libvirt.domain_xml`, the hook
in `libvirt.hook` and `libvirt.install`, the wipe and the libvirt calls in
`libvirt.flows`.  Every
command prints what it changed (or `--json`), and errors surface as the
agent's one-line `vmwipe: error: ...` with a typed exit code.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LibvirtFailure, UsageError
from ..libvirt.flows import (
    DomainWipe,
    connect,
    lookup,
    one_line,
    restore_file,
    revert_snapshot,
    start_domain,
)
from ..libvirt.paths import APPARMOR_LOCAL, HOOKS_DIR, LOG_DIR, STATE_DIR
from ..wipe.backends import BACKENDS
from ..wipe.engine import ON_INVALID
from .options import (
    REQUIRE_CRNG_HELP,
    RESUME_RULE,
    add_resume,
    byte_size,
    common,
    input_file,
)

if TYPE_CHECKING:
    from ..flows.target import AgentOptions


def _inactive_xml(dom: Any) -> str:
    import libvirt

    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    return str(dom.XMLDesc(flags))


def _define(conn: Any, xml: str) -> None:
    import libvirt

    try:
        conn.defineXML(xml)
    except libvirt.libvirtError as e:
        raise LibvirtFailure(f"libvirt refused the edited XML: {one_line(e)}") from None


def _notes(dom: Any) -> list[str]:
    notes = []
    if dom.isActive():
        notes.append("the domain is running: the change applies from its next cold boot; a "
                     "save of the running domain keeps the old configuration")
    if dom.hasManagedSaveImage(0):
        notes.append("the domain has a managed save image made with the old configuration")
    return notes


def _diff(old: str, new: str, name: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                        f"{name}.xml (before)", f"{name}.xml (after)"))


def _cmd_protect(args: argparse.Namespace) -> int:
    from ..errors import ProtectError
    from ..libvirt.domain_xml import prepare_files, protect_xml, read_protection

    conn = connect(args.connect)
    dom = lookup(conn, args.domain)
    if not dom.isPersistent():
        raise LibvirtFailure(f"domain {dom.name()} is transient; define it first")
    old = _inactive_xml(dom)
    try:
        edit = protect_xml(old, Path(args.state_dir), args.size, args.reservation,
                           args.require_crng)
    except ProtectError as e:
        raise LibvirtFailure(f"cannot protect {dom.name()}: {e}") from None
    assert edit.protection is not None
    files: list[str] = []
    new = old
    if not args.dry_run:
        files = prepare_files(edit.protection)
        if edit.changed:
            _define(conn, edit.xml)
            new = _inactive_xml(dom)
            if read_protection(new) != edit.protection:
                raise LibvirtFailure("libvirt did not keep the vmwipe metadata")
    else:
        new = edit.xml
    return _report(args, dom, "protect", edit.lines(), files, old, new,
                   {"protection": edit.protection.to_attrib()})


def _cmd_unprotect(args: argparse.Namespace) -> int:
    from ..libvirt.domain_xml import unprotect_xml

    conn = connect(args.connect)
    dom = lookup(conn, args.domain)
    old = _inactive_xml(dom)
    edit = unprotect_xml(old)
    new = edit.xml
    if edit.changed and not args.dry_run:
        _define(conn, edit.xml)
        new = _inactive_xml(dom)
    return _report(args, dom, "unprotect", edit.lines(), [], old, new, {})


def _report(args: argparse.Namespace, dom: Any, what: str, lines: list[str], files: list[str],
            old: str, new: str, extra: dict[str, Any]) -> int:
    name = dom.name()
    changed = bool(lines)
    notes = _notes(dom) if changed else []
    if args.json:
        print(json.dumps({"domain": name, "command": what, "changed": changed,
                          "dry_run": args.dry_run, "changes": lines, "files": files,
                          "notes": notes, **extra}, indent=2))
        return 0
    verb = "would change" if args.dry_run else "changed"
    if changed:
        print(f"{what} {name}: {verb} the persistent XML:")
        for line in lines:
            print(f"  {line}")
    else:
        print(f"{what} {name}: nothing to change "
              f"({'already protected' if what == 'protect' else 'not protected'})")
    for f in files:
        print(f"  {f}")
    for n in notes:
        print(f"note: {n}")
    if args.diff and old != new:
        print(_diff(old, new, name), end="")
    return 0


def _cmd_install_hook(args: argparse.Namespace) -> int:
    from ..libvirt.install import install_hook

    done = install_hook(Path(args.hooks_dir), args.python,
                        None if args.no_apparmor else Path(args.apparmor_file), args.layout)
    print(json.dumps({"done": done}) if args.json else "\n".join(done))
    return 0


def _cmd_uninstall_hook(args: argparse.Namespace) -> int:
    from ..libvirt.install import uninstall_hook

    done = uninstall_hook(Path(args.hooks_dir),
                          None if args.no_apparmor else Path(args.apparmor_file))
    print(json.dumps({"done": done}) if args.json else "\n".join(done))
    return 0


def _opts(args: argparse.Namespace) -> AgentOptions:
    from ..flows.target import AgentOptions

    return AgentOptions(reset_guard=not args.no_reset_guard, backend=args.backend,
                        on_invalid=args.on_invalid, require_crng=args.require_crng)


def _emit(args: argparse.Namespace, res: DomainWipe) -> int:
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    print(res.summary())
    for w in res.warnings:
        print(f"warning: {w}")
    if res.wipe is not None:
        print("resumed" if res.resumed else f"domain {res.domain} left paused (--paused)")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    xml = Path(input_file(args.xml, "--xml")).read_text() if args.xml else None
    # libvirtd reads FILE (as its own user, so only its existence is ours to check, and
    # only on this host); else a missing file is "libvirt refused" with a long reason
    local = args.connect is None or args.connect.startswith("qemu:///")
    if local and not os.path.lexists(args.file):
        raise UsageError(f"save image {args.file}: no such file")
    conn = connect(args.connect)
    return _emit(args, restore_file(conn, args.file, _opts(args), not args.paused, xml))


def _cmd_revert(args: argparse.Namespace) -> int:
    conn = connect(args.connect)
    return _emit(args, revert_snapshot(conn, args.domain, args.snapshot, _opts(args),
                                       not args.paused))


def _cmd_start(args: argparse.Namespace) -> int:
    conn = connect(args.connect)
    return _emit(args, start_domain(conn, args.domain, _opts(args), not args.paused))


def _cmd_status(args: argparse.Namespace) -> int:
    from ..libvirt.status import domain_status, hook_installed

    conn = connect(args.connect)
    doms = [lookup(conn, args.domain)] if args.domain else sorted(
        conn.listAllDomains(0), key=lambda d: str(d.name()))
    log = Path(args.hook_log)
    states = [domain_status(d, log) for d in doms]
    hook = hook_installed(Path(args.hooks_dir))
    if args.json:
        print(json.dumps({"hook": hook, "hook_log": str(log),
                          "domains": [s.to_dict() for s in states]}, indent=2))
        return 0
    print(f"hook: {hook or 'NOT installed (vmwipe libvirt install-hook)'}; log {log}")
    if not states:
        print("no domains")
    for s in states:
        print("\n".join(s.lines()))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `vmwipe libvirt ...` to the `vmwipe` parser."""
    top = sub.add_parser("libvirt", help="libvirt integration: protect, hook, restore",
                         description="Protect libvirt domains, install the restore hook, and "
                         "restore/revert/start domains with a wipe before they run.")
    lsub = top.add_subparsers(dest="libvirt_command", metavar="SUBCOMMAND", required=True)

    shared = common()
    conn = argparse.ArgumentParser(add_help=False, parents=[shared])
    conn.add_argument("--connect", "-c", metavar="URI", default=None,
                      help="libvirt URI (default: libvirt's default, e.g. qemu:///system)")

    edit = argparse.ArgumentParser(add_help=False)
    edit.add_argument("domain", help="domain name or UUID")
    edit.add_argument("--dry-run", action="store_true", help="show the changes, define nothing")
    edit.add_argument("--diff", action="store_true", help="also print a unified XML diff")

    p = lsub.add_parser("protect", parents=[conn, edit], help="add vmwipe to a domain's XML",
                        description="Edit the persistent domain XML (idempotently): qemu "
                        "namespace, -acpitable SSDT, second QMP monitor for the hook, reset-time "
                        "zero page, region reservation (memmap= for direct kernel boot, else a "
                        "2 MiB pc-dimm at the start of the hotplug area) and a <metadata> marker.")
    p.add_argument("--size", default="1M", type=byte_size,
                   help="region size in bytes, K/M/G suffixes (default %(default)s)")
    p.add_argument("--reservation", choices=("auto", "memmap", "dimm"), default="auto",
                   help="how the region is kept from the guest OS (default: memmap with direct "
                   "kernel boot, else dimm)")
    p.add_argument("--state-dir", default=str(STATE_DIR),
                   help="where SSDT, zero page and monitor sockets live (default %(default)s)")
    p.add_argument("--require-crng", action="store_true",
                   help="store the --require-crng policy in the domain metadata: the hook then "
                   "refuses a restored guest whose table does not register its kernel CRNG "
                   "(libvirt kills it); protecting again without this flag removes it")
    p.set_defaults(func=_cmd_protect)

    p = lsub.add_parser("unprotect", parents=[conn, edit], help="remove vmwipe from a domain",
                        description="Remove exactly what `protect` added.")
    p.set_defaults(func=_cmd_unprotect)

    hooks = argparse.ArgumentParser(add_help=False, parents=[shared])
    hooks.add_argument("--hooks-dir", default=str(HOOKS_DIR),
                       help="libvirt's hook directory (default %(default)s)")
    hooks.add_argument("--apparmor-file", default=str(APPARMOR_LOCAL),
                       help="local AppArmor abstraction that receives the rules for the SSDT, "
                       "zero page and monitor socket, when it exists (default %(default)s)")
    hooks.add_argument("--no-apparmor", action="store_true",
                       help="leave the AppArmor abstraction alone")
    p = lsub.add_parser("install-hook", parents=[hooks], help="install the qemu hook",
                        description="Install the hook as HOOKS_DIR/qemu.d/50-vmwipe (libvirt "
                        ">= 6.5 runs it after HOOKS_DIR/qemu), or, with --layout chain, as "
                        "HOOKS_DIR/qemu, moving an existing hook to qemu.vmwipe-chained and "
                        "running it first. libvirtd must be restarted.")
    p.add_argument("--python", default=None,
                   help="interpreter for the hook (default: the one running this command, "
                   "i.e. the installed vmwipe's; one in a temporary or build directory is "
                   "refused)")
    p.add_argument("--layout", choices=("auto", "qemu.d", "chain"), default="auto",
                   help="qemu.d drop-in or chained HOOKS_DIR/qemu (default: qemu.d when the "
                   "libvirt daemon is 6.5 or newer)")
    p.set_defaults(func=_cmd_install_hook)
    p = lsub.add_parser("uninstall-hook", parents=[hooks], help="remove the qemu hook",
                        description="Remove the vmwipe hook (qemu.d/50-vmwipe, or HOOKS_DIR/qemu "
                        "with a chained hook put back).")
    p.set_defaults(func=_cmd_uninstall_hook)

    wipe = argparse.ArgumentParser(add_help=False)
    add_resume(wipe, "the domain")
    wipe.add_argument("--backend", choices=BACKENDS, default="auto", help="memory backend")
    wipe.add_argument("--on-invalid", choices=ON_INVALID, default="fail",
                      help="see `vmwipe wipe --help`")
    wipe.add_argument("--no-reset-guard", action="store_true", help="see `vmwipe wipe --help`")
    wipe.add_argument("--require-crng", action="store_true", help=REQUIRE_CRNG_HELP)

    p = lsub.add_parser("restore", parents=[conn, wipe], help="restore a save image, wipe, resume",
                        description="virDomainRestoreFlags(FILE, PAUSED), wipe through libvirt's "
                        "monitor and the QEMU PID, then resume. On failure the domain stays "
                        "paused. " + RESUME_RULE)
    p.add_argument("file", help="save image from `virsh save`")
    p.add_argument("--xml", help="alternative domain XML for the restore")
    p.set_defaults(func=_cmd_restore)

    p = lsub.add_parser("revert", parents=[conn, wipe], help="revert to a snapshot, wipe, resume",
                        description="revertToSnapshot(REVERT_PAUSED), wipe, resume. "
                        + RESUME_RULE)
    p.add_argument("domain")
    p.add_argument("snapshot")
    p.set_defaults(func=_cmd_revert)

    p = lsub.add_parser("start", parents=[conn, wipe], help="start from managed save, wipe, resume",
                        description="Start a domain from its managed save image paused, wipe, "
                        "resume. Without a managed save image this is a plain boot. "
                        + RESUME_RULE)
    p.add_argument("domain")
    p.set_defaults(func=_cmd_start)

    p = lsub.add_parser("status", parents=[conn], help="which domains are protected, and how",
                        description="For DOMAIN, or every domain: protected or not, the region, "
                        "how it is reserved, the hook's policies, whether the files exist, "
                        "whether a running QEMU was started protected, and the hook's last "
                        "event for it from the hook log. Changes nothing.")
    p.add_argument("domain", nargs="?", help="domain name or UUID (default: all domains)")
    p.add_argument("--hook-log", default=str(LOG_DIR / "hook.log"),
                   help="the hook's log file (default %(default)s)")
    p.add_argument("--hooks-dir", default=str(HOOKS_DIR),
                   help="libvirt's hook directory (default %(default)s)")
    p.set_defaults(func=_cmd_status)
