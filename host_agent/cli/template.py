"""`vmwipe template` and `vmwipe clone --template`: scrubbed VM templates and their clones.

The flows are in `flows.template` (make one) and `flows.template_clone` (start
clones); this module only parses arguments and prints reports.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from ..errors import UsageError, exit_code_help
from .options import input_dir, input_file, output_file

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..flows.fleet import CloneResult
    from ..flows.target import AgentOptions

# The flows are imported by the commands that run them (see cli.agent for why).


def run_template(args: argparse.Namespace, opts: AgentOptions) -> int:
    from ..flows.template import make_template
    from ..flows.template_load import template_from_state
    from ..qemu.qmp import QMPSession

    if (args.qmp is None) == (args.from_state is None):
        raise UsageError("give either --qmp SOCK (a live VM) or --from STATE --ram FILE "
                         "-- QEMU-ARGS")
    if args.from_state is not None:
        if not args.ram or not args.qemu_args:
            raise UsageError("--from needs --ram FILE and the template QEMU's arguments after --")
        input_file(args.from_state, "--from")
        output_file(args.ram, "--ram")
        _restored, rep, manifest = template_from_state(args.from_state, args.qemu_args,
                                                       args.ram, args.dir, opts)
    else:
        with QMPSession(args.qmp, timeout=args.qmp_timeout) as s:
            rep, manifest = make_template(s, opts, args.dir)
    if args.json:
        print(json.dumps({"report": rep.to_dict(), "manifest": manifest.to_dict()}, indent=2))
    else:
        w = rep.wipe
        print(f"template {args.dir}: RAM file {manifest.ram_path} "
              f"({manifest.ram_size >> 20} MiB, sha256 {manifest.ram_sha256[:16]}...), "
              f"{w.pages if w else 0} listed pages scrubbed in the file "
              f"({w.status if w else '?'}), template QEMU quit")
        if w is not None and w.crng is not None:
            print(w.crng.line())
        if w is not None and w.ksecrets is not None:
            print(w.ksecrets.line())
    return 0


def run_clone_template(args: argparse.Namespace, opts: AgentOptions) -> int:
    from ..flows.fleet import stderr_progress
    from ..flows.template_clone import clone_template_flow

    qemu = list(args.qemu_args)
    if not qemu:
        raise UsageError("clone needs the QEMU arguments after --")
    if args.snapshot:
        raise UsageError("give either SNAPSHOT or --template, not both")
    input_dir(args.template, "--template")
    input_file(os.path.join(args.template, "manifest.json"), "template manifest")
    if args.qemu:
        qemu.insert(0, args.qemu)
    res = clone_template_flow(args.template, args.n, qemu, opts, directory=args.dir,
                              do_resume=not args.paused, check_digest=not args.skip_digest,
                              jobs=args.jobs,
                              progress=(lambda _m: None) if args.quiet else stderr_progress)
    if args.json:
        print(json.dumps(res.to_dict() | {"template": res.template,
                                          "digest_checked": res.digest_checked}, indent=2))
    else:
        print(clone_table(res.clones))
    return 0


def clone_table(clones: Sequence[CloneResult]) -> str:
    """The text report of `clone` and `clone --template`: one row per clone."""
    rows = [f"{'#':>3} {'pid':>8} {'pages':>8} {'state':<8} {'kernel CRNG':<24} "
            f"{'kernel secrets':<40} qmp"]
    for c in clones:
        w = c.report.wipe
        crng = w.crng.summary if w is not None and w.crng is not None else "-"
        secrets = w.ksecrets.summary if w is not None and w.ksecrets is not None else "-"
        rows.append(f"{c.index:>3} {c.pid:>8} {w.pages if w else 0:>8} "
                    f"{c.report.state_after:<8} {crng:<24} {secrets:<40} {c.qmp}")
    return "\n".join(rows)


def add_clone_template_arguments(p: argparse.ArgumentParser) -> None:
    """`--template DIR` and its options on the `clone` parser."""
    p.add_argument("--template", metavar="DIR",
                   help="clone the template DIR made by `vmwipe template` instead of loading "
                   "SNAPSHOT: each clone maps the template's RAM file privately (copy-on-write) "
                   "and loads only its device state; do not pass a memory backend for it")
    p.add_argument("--skip-digest", action="store_true",
                   help="with --template: check the RAM file's inode, size and times but not "
                   "its SHA-256 (misses writes that change no timestamp, such as through a "
                   "shared mapping of a tmpfs file)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser],
             common: argparse.ArgumentParser, vm: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "template",
        parents=[common, vm],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=exit_code_help(),
        help="make a scrubbed clone template of a VM whose RAM is a share=on file",
        usage="vmwipe template (--qmp SOCK | --from STATE --ram FILE) --dir DIR [options] "
        "[-- QEMU-ARGS]",
        description="The VM's RAM must be `-object memory-backend-file,id=ID,mem-path=FILE,"
        "share=on -machine memory-backend=ID`. Stops it, zeroes and verifies the listed pages "
        "in FILE itself (read back from the file), saves the device state with x-ignore-shared "
        "to DIR/devstate, quits the template QEMU (it must never run again: it would write "
        "into every clone's RAM), and writes DIR/manifest.json (QEMU version, machine, "
        "backend, layout, region, SHA-256 and stat of FILE). Clone it with "
        "`vmwipe clone --template DIR`.",
    )
    p.add_argument("--dir", required=True, help="template directory (created)")
    p.add_argument("--from", dest="from_state", metavar="STATE",
                   help="instead of --qmp: load this saved state into a new template QEMU "
                   "(the QEMU arguments after --, without a memory backend) whose RAM is a "
                   "share=on file created at --ram, then proceed as above")
    p.add_argument("--ram", metavar="FILE",
                   help="with --from: the template RAM file to create (must not exist; tmpfs "
                   "recommended)")
    # --qmp comes from the shared VM options, where it is required; here --from replaces it
    for action in p._actions:
        if action.dest == "qmp":
            action.required = False
