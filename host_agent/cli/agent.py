"""`vmwipe` command line: wipe secret guest pages before a paused VM runs.

Subcommands register themselves on an argparse subparser (`register(sub)`):
the agent's own here, `ssdt` and `qemu-args` in `cli.setup`, `scrub` in
`cli.scrub`, `libvirt ...` in `cli.libvirt`.  Every report can
be printed as JSON, every error is one line on stderr, and the exit code says
what went wrong (see `vmwipe --help`).  Whatever fails, the VM stays paused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, TypeAlias

from vmwipe.protocol import ProtocolError

from .. import progress
from ..errors import AgentError, Interrupted, UsageError, exit_code_help
from ..wipe.backends import BACKENDS
from ..wipe.engine import ON_INVALID
from . import libvirt as libvirt_cmds
from . import scrub as scrub_cmds
from . import setup as setup_cmds
from . import template as template_cmds
from .options import (
    REQUIRE_CRNG_HELP,
    RESUME_RULE,
    Parser,
    add_resume,
    common,
    input_file,
    os_error,
    output_file,
    positive_int,
    region_type,
)

if TYPE_CHECKING:
    from ..flows.report import FlowReport
    from ..flows.target import AgentOptions
    from ..qemu.qmp import QMPSession

# The flows and the QMP client are imported by the commands that use them: every
# `vmwipe` run parses the whole command line, and `vmwipe scrub` (no VM) should not
# pay ~80 ms for importing the live-VM machinery first.

log = logging.getLogger("vmwipe")


def _vm(with_guard: bool = True, memory: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--qmp", required=True, metavar="SOCK", help="QEMU's QMP unix socket")
    p.add_argument(
        "--qmp-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for a QMP answer (default %(default)s)",
    )
    if not memory:
        return p
    p.add_argument(
        "--region",
        metavar="BASE:SIZE",
        type=region_type,
        help="region override (default: decoded from QEMU's -acpitable SSDT)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="memory access backend (default: auto = process_vm, then shared)",
    )
    if with_guard:
        p.add_argument(
            "--no-reset-guard",
            action="store_true",
            help="wipe even without the reset-time zero page (-device loader at the "
            "region base); unsafe across guest reboots, prints a warning",
        )
        p.add_argument(
            "--on-invalid",
            choices=ON_INVALID,
            default="fail",
            help="fail (default): any invalid slot aborts and leaves the VM paused; "
            "skip: wipe the valid slots, report the invalid ones, continue",
        )
        p.add_argument(
            "--populate",
            action="store_true",
            help="pre-populate the mapping of shared (memfd/file share=on) guest RAM; restore and "
            "clone do it while QEMU loads, outside the paused window; auto then prefers the "
            "shared backend. Makes every page of a shared RAM block resident",
        )
        p.add_argument(
            "--timeout",
            type=float,
            default=600.0,
            metavar="S",
            help="seconds to wait for migrations (default %(default)s)",
        )
        p.add_argument("--require-crng", action="store_true", help=REQUIRE_CRNG_HELP)
    return p


def _opts(args: argparse.Namespace) -> AgentOptions:
    from ..flows.target import AgentOptions

    return AgentOptions(
        region=getattr(args, "region", None),
        reset_guard=not getattr(args, "no_reset_guard", False),
        backend=getattr(args, "backend", "auto"),
        on_invalid=getattr(args, "on_invalid", "fail"),
        populate=getattr(args, "populate", False),
        timeout=getattr(args, "timeout", 600.0),
        require_crng=getattr(args, "require_crng", False),
    )


def fleet_progress(args: argparse.Namespace) -> Callable[[str], None]:
    """Where `clone` reports each clone's steps: stderr, or nowhere with -q."""
    from ..flows.fleet import stderr_progress

    return (lambda _msg: None) if args.quiet else stderr_progress


def _fmt_report(rep: FlowReport) -> str:
    lines = [
        f"{rep.command}: QEMU {rep.qemu_version} pid {rep.pid} ({rep.qmp}), "
        f"state {rep.state_before} -> {rep.state_after}"
    ]
    lines += [f"warning: {msg}" for msg in rep.warnings]
    if rep.wipe is None and rep.region_source:
        lines.append(f"region source: {rep.region_source}")
    w = rep.wipe
    if w is not None:
        lines.append(
            f"region {w.region[0]:#x}+{w.region[1]:#x} ({rep.region_source}), backend {w.backend}"
        )
        if w.status == "nothing-registered":
            lines.append("no vmwipe table in the region: nothing registered, nothing wiped")
        else:
            lines.append(
                f"{w.status}: {w.slots_valid} valid of {w.slots_used} used slots, "
                f"{w.pages} pages ({w.bytes} bytes) in {w.spans} spans, "
                f"generation {w.generation_before} -> {w.generation_after}"
            )
        for e in w.invalid:
            lines.append(f"skipped: {e}")
        if w.crng is not None:
            lines.append(w.crng.line())
        if w.ksecrets is not None:
            lines.append(w.ksecrets.line())
    for k, v in rep.extra.items():
        if k == "crng":
            lines.append(f"kernel CRNG: {v['summary']}")
            continue
        if k == "ksecrets":
            lines.append(f"kernel secrets: {v['summary']}")
            continue
        if k in ("slots", "ram_ranges", "fill_ranges"):
            continue
        if isinstance(v, dict) and set(v) == {"base", "size"}:
            v = f"{v['base']:#x}+{v['size']:#x}"  # a region, as the other commands spell it
        lines.append(f"{k}: {v}")
    if rep.command == "inspect":
        for r in rep.extra.get("ram_ranges", []):
            lines.append(f"ram {r['gpa']:#x}+{r['size']:#x} {r['block']} @{r['offset']:#x}")
        for s in rep.extra.get("slots", [])[:50]:
            lines.append(f"slot {s['index']}: {s['gpa']:#x} x{s['npages']}")
        for f in rep.extra.get("fill_ranges", [])[:50]:
            lines.append(f"fill {f['index']}: {f['gpa']:#x} {f['length']} bytes")
    lines.append("resumed" if rep.resumed else "VM left paused" if rep.command != "inspect" else "")
    lines.append("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in rep.timings_ms.items()))
    return "\n".join(x for x in lines if x)


def _emit(args: argparse.Namespace, rep: FlowReport) -> int:
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(_fmt_report(rep))
    return 0


def _session(args: argparse.Namespace) -> QMPSession:
    from ..qemu.qmp import QMPSession

    return QMPSession(args.qmp, timeout=args.qmp_timeout)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..flows.live import inspect_flow

    with _session(args) as s:
        return _emit(args, inspect_flow(s, _opts(args)))


def _cmd_wipe(args: argparse.Namespace) -> int:
    from ..flows.live import wipe_flow

    with _session(args) as s:
        return _emit(args, wipe_flow(s, _opts(args), not args.paused))


def _cmd_restore(args: argparse.Namespace) -> int:
    from ..flows.live import restore_flow

    input_file(args.from_file, "--from")
    with _session(args) as s:
        return _emit(args, restore_flow(s, _opts(args), args.from_file, not args.paused,
                                        show_progress=True))


def _cmd_loadvm(args: argparse.Namespace) -> int:
    from ..flows.live import loadvm_flow

    with _session(args) as s:
        return _emit(args, loadvm_flow(s, _opts(args), args.tag, not args.paused))


def _cmd_save(args: argparse.Namespace) -> int:
    from ..flows.save import save_flow

    output_file(args.to, "--to")
    with _session(args) as s:
        if args.scrub:
            return scrub_cmds.run_save_scrub(args, s)
        return _emit(args, save_flow(s, _opts(args), args.to, not args.paused,
                                     mapped_ram=not args.no_mapped_ram))


def _cmd_template(args: argparse.Namespace) -> int:
    return template_cmds.run_template(args, _opts(args))


def _cmd_clone(args: argparse.Namespace) -> int:
    if args.template:
        return template_cmds.run_clone_template(args, _opts(args))
    if not args.snapshot:
        raise UsageError("clone needs SNAPSHOT or --template DIR")
    qemu = list(args.qemu_args)
    if not qemu:
        raise UsageError("clone needs the QEMU arguments after --")
    input_file(args.snapshot, "saved state")
    if args.qemu:
        qemu.insert(0, args.qemu)
    from ..flows.clone import clone_flow

    res = clone_flow(
        args.snapshot, args.n, qemu, _opts(args), directory=args.dir, do_resume=not args.paused,
        jobs=args.jobs, progress=fleet_progress(args),
    )
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
    else:
        print(template_cmds.clone_table(res.clones))
    return 0



# A string: argparse's class is generic only to the type checker, not at run time.
_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _command(sub: _Subparsers, name: str, func: Callable[[argparse.Namespace], int],
             parents: list[argparse.ArgumentParser], epilog: str, *, help: str,
             description: str, usage: str | None = None) -> argparse.ArgumentParser:
    """Add one of the agent's subcommands, all alike: `description` printed as written
    (line breaks kept), the exit codes as `epilog`, and `func` for main() to call."""
    p = sub.add_parser(
        name,
        parents=parents,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog,
        help=help,
        usage=usage,
        description=description,
    )
    p.set_defaults(func=func)
    return p


def _register_wipes(sub: _Subparsers, common: argparse.ArgumentParser, epilog: str) -> None:
    """inspect, wipe, restore, loadvm: the commands that wipe (or read) a live VM."""
    _command(
        sub, "inspect", _cmd_inspect, [common, _vm(with_guard=False)], epilog,
        help="show the guest's vmwipe table (read-only)",
        description="Read the vmwipe region of a VM and show header fields, "
        "slots in use, pages, validity problems and the wipe generation. "
        "Writes nothing.",
    )

    p = _command(
        sub, "wipe", _cmd_wipe, [common, _vm()], epilog,
        help="wipe a paused VM, then resume it",
        description="Wipe the pages a paused VM's table lists, then resume it (cont) "
        "after a verified wipe. Refuses a running VM; waits while QEMU is inmigrate.\n\n"
        + RESUME_RULE,
    )
    add_resume(p)

    p = _command(
        sub, "restore", _cmd_restore, [common, _vm()], epilog,
        help="load a saved state into a -S -incoming defer QEMU, wipe, cont",
        description="For a QEMU started with -S -incoming defer: migrate-incoming "
        "from FILE (exec:cat, or file: on QEMU >= 8.2; a mapped-ram save gets the "
        "mapped-ram capability and file:), wait until completed, wipe, then cont.\n\n"
        + RESUME_RULE,
    )
    p.add_argument(
        "--from",
        dest="from_file",
        required=True,
        metavar="FILE",
        help="saved migration stream (e.g. from `vmwipe save`)",
    )
    add_resume(p)

    p = _command(
        sub, "loadvm", _cmd_loadvm, [common, _vm()], epilog,
        help="stop, load an internal snapshot, wipe, cont",
        description="stop the VM, loadvm TAG (internal qcow2 snapshot), wipe, cont.\n\n"
        + RESUME_RULE,
    )
    p.add_argument("tag", help="snapshot tag")
    add_resume(p)


def _register_save_clone(sub: _Subparsers, common: argparse.ArgumentParser, epilog: str) -> None:
    """save and clone: the commands that write or start saved states."""
    p = _command(
        sub, "save", _cmd_save, [common, _vm(with_guard=False, memory=False)], epilog,
        help="stop the VM and save its state to a file",
        description="stop, raise max-bandwidth, migrate to FILE (exec:cat > FILE, "
        "or file: on QEMU >= 8.2, with the mapped-ram capability where QEMU >= 9.0 "
        "offers it: every page at a fixed file offset), report, and cont the source if "
        "it was running before (--paused: leave it paused).\n\n" + RESUME_RULE,
    )
    p.add_argument("--to", required=True, metavar="FILE", help="output file")
    add_resume(p, "the source VM")
    p.add_argument("--no-mapped-ram", action="store_true",
                   help="write a sequential stream even where QEMU offers mapped-ram")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds to wait for the save (default %(default)s)",
    )
    scrub_cmds.add_save_scrub_arguments(p)

    p = _command(
        sub, "clone", _cmd_clone, [common], epilog,
        help="start N wiped clones of a saved state",
        usage="vmwipe clone (SNAPSHOT | --template DIR) -n N [options] -- [QEMU] QEMU-ARGS...",
        description="Start N QEMU processes (-S -incoming defer, own QMP sockets in "
        "--dir), restore SNAPSHOT into each and wipe it while it is paused (-j at a "
        "time), then, once every clone is wiped and verified, cont them all together "
        "(--paused: leave them all paused), and print a table of PIDs, sockets and pages "
        "wiped. Progress goes to stderr (-q silences it). On any failure every QEMU "
        "started is killed, so no clone ever ran. `{i}` in a QEMU argument becomes the "
        "clone index (per-clone serial sockets, logs, overlays).\n\n" + RESUME_RULE,
    )
    p.add_argument("snapshot", nargs="?", help="saved migration stream")
    template_cmds.add_clone_template_arguments(p)
    p.add_argument("-n", type=positive_int, default=1, help="number of clones (default 1)")
    add_resume(p, "the clones")
    p.add_argument("-j", "--jobs", type=positive_int, metavar="J",
                   help="clones prepared at a time (default: one per CPU, at most N)")
    p.add_argument("--dir", help="directory for QMP sockets and logs (default: a new temp dir)")
    p.add_argument(
        "--qemu",
        help="QEMU binary (default: first QEMU-ARG if it is not an option, "
        "else qemu-system-x86_64)",
    )
    p.add_argument("--region", metavar="BASE:SIZE", type=region_type, help="region override")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="memory backend")
    p.add_argument("--no-reset-guard", action="store_true", help="see `vmwipe wipe --help`")
    p.add_argument(
        "--on-invalid", choices=ON_INVALID, default="fail", help="see `vmwipe wipe --help`"
    )
    p.add_argument(
        "--populate",
        action="store_true",
        help="pre-map shared guest RAM while each clone loads (see `vmwipe wipe --help`)",
    )
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="restore timeout")
    p.add_argument("--require-crng", action="store_true", help=REQUIRE_CRNG_HELP)


def register(sub: _Subparsers) -> None:
    """Add the agent's commands to the `vmwipe` parser."""
    shared = common()
    epilog = exit_code_help()
    _register_wipes(sub, shared, epilog)
    _register_save_clone(sub, shared, epilog)
    template_cmds.register(sub, shared, _vm())
    sub.choices["template"].set_defaults(func=_cmd_template)


def version() -> str:
    """The installed distribution's version (one source: pyproject.toml's `version`)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("vmwipe")
    except PackageNotFoundError:  # run from a bare source tree (PYTHONPATH)
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = Parser(
        prog="vmwipe",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Zero the guest pages a vmwipe table lists before a restored or cloned VM "
        "runs. The VM is resumed only after a verified wipe.\n\n" + RESUME_RULE,
        epilog=exit_code_help(),
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log progress to stderr (-vv for QMP traffic)",
    )
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress output (the report and errors still print)")
    parser.add_argument("--version", action="version", version=f"vmwipe {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(sub)
    setup_cmds.register(sub)
    scrub_cmds.register(sub)
    libvirt_cmds.register(sub)
    return parser


class _Terminate(BaseException):
    """Raised from the SIGTERM handler so cleanup code runs and the VM stays paused."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminate()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # For `clone`, everything after the first `--` belongs to QEMU; argparse must not see it.
    tail: list[str] = []
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in ("clone", "template") and "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1 :]
    args = parser.parse_args(argv)
    args.qemu_args = tail
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    if args.quiet and not args.verbose:
        level = logging.ERROR
    progress.configure(progress.mode_for(args.quiet))
    logging.basicConfig(level=level, format="vmwipe: %(levelname)s: %(message)s")
    if args.verbose < 2:
        # above CRITICAL: qemu.qmp logs a multi-line traceback at CRITICAL when a peer
        # sends something it cannot parse; our one-line error says what failed
        logging.getLogger("qemu").setLevel(logging.CRITICAL + 1)
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc: int = args.func(args)
        return rc
    except (KeyboardInterrupt, _Terminate):
        err: AgentError = Interrupted("interrupted; the VM was not resumed")
    except AgentError as e:
        err = e
    except (ProtocolError, ValueError) as e:
        err = AgentError(str(e))
        err.exit_code = 2
    except BrokenPipeError:  # stdout closed early (e.g. `| head`): the work itself is done
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        err = os_error(e)  # a path the user gave that no earlier check caught
    except Exception as e:  # a bug: still one line (traceback with -v); the VM stays paused
        log.info("internal error", exc_info=True)
        err = AgentError(f"internal error: {type(e).__name__}: {e} (run with -v for a traceback)")
    finally:
        signal.signal(signal.SIGTERM, old)
    message = " ".join(str(err).split()) or type(err).__name__  # always one line
    print(f"vmwipe: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(
            json.dumps({"error": message, "exit_code": err.exit_code, "kind": type(err).__name__})
        )
    return err.exit_code

