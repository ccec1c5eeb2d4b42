"""`vmwipe scrub FILE`: zero the guest's listed secret pages inside a saved VM file.

Registered on the `vmwipe` parser with `cli.scrub.register(sub)`.  The file
is a QEMU migration stream (`migrate exec:cat > FILE`, `vmwipe save`) or a raw
libvirt save image (`virsh save`).  The command validates the whole file and
the table first and writes nothing unless both are sound, so a truncated,
corrupt or foreign file is left byte-for-byte untouched.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..snapshot.scrub import ScrubReport, scrub_file
from .options import common, input_file, mem_size, region_type

if TYPE_CHECKING:
    from ..flows.save_scrub import SaveMonitor, SaveScrubReport

# `save --scrub` imports its flow when it runs (see cli.agent for why).


def _human(rep: ScrubReport) -> str:
    reg = rep.region
    head = (f"{rep.file}: {rep.container} stream, machine {rep.machine or '?'}, "
            f"region {reg['base']:#x}+{reg['size']:#x}, layout from {rep.layout_source}")
    if rep.table == "absent":
        body = "no vmwipe table in the saved region (magic absent): nothing registered, " \
               "nothing to scrub"
    else:
        verb = "would zero" if rep.dry_run else "zeroed"
        body = (f"table: {rep.slots} slots, {rep.pages} pages; copies in the stream: "
                f"{rep.copies} page records + {rep.zero_records} zero records; "
                f"{verb} {rep.scrubbed_copies} copies ({rep.bytes} bytes written), "
                f"{rep.already_zero} already zero")
        if rep.noop and not rep.dry_run:
            body += " (no-op)"
        if rep.stale_copies:
            body += (f"; {rep.stale_copies} older copies of pages that older copies of the "
                     "table listed")
        if rep.fill_ranges:
            body += f"; {rep.fill_ranges} fill ranges given fresh random bytes"
        if rep.generation is not None:
            body += f"; saved header: wipe_generation {rep.generation}"
        if rep.replaced:
            body += "; the scrubbed copy replaced the file"
    lines = [head, body]
    if rep.crng is not None and rep.table != "absent":
        lines.append(f"saved table: {rep.crng.line()}")
    if rep.ksecrets is not None and rep.table != "absent":
        lines.append(f"saved table: {rep.ksecrets.line()}")
    if rep.stale_temps_removed:
        lines.append(f"removed {rep.stale_temps_removed} copies left by killed scrubs")
    lines.extend(f"invalid slot skipped: {e}" for e in rep.invalid_slots)
    lines.append(f"{rep.records} RAM page records, {rep.stream_bytes} stream bytes, "
                 f"{rep.seconds * 1000:.0f} ms")
    return "\n".join(lines)


def _cmd_scrub(args: argparse.Namespace) -> int:
    if (args.machine is None) != (args.mem is None) and args.machine is None:
        raise UsageError("--mem needs --machine (or neither: the stream says both)")
    if args.sidecar and (args.machine or args.mem):
        raise UsageError("give either --sidecar or --machine/--mem, not both")
    mem = args.mem
    input_file(args.file, "saved VM", write=not args.dry_run)
    if args.sidecar:
        input_file(args.sidecar, "--sidecar")
    rep = scrub_file(
        args.file, machine=args.machine, mem=mem, sidecar=args.sidecar, region=args.region,
        strict=args.on_invalid == "fail", dry_run=args.dry_run, bump=not args.no_bump,
    )  # progress: the reading walk reports to vmwipe.host_agent.progress
    if args.json:
        d: dict[str, Any] = rep.to_dict()
        print(json.dumps(d, indent=2))
    else:
        print(_human(rep))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `scrub` to the `vmwipe` command."""
    p = sub.add_parser(
        "scrub", parents=[common()], help="zero the guest's secret pages inside a saved VM file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Zero every copy of every page the guest's vmwipe table lists in a saved "
        "VM: a QEMU migration stream or a raw libvirt save image. The table is read from the "
        "file's own last copy of the region and validated as at resume. Record lengths never "
        "change, so the file still restores. Everything is checked before anything is "
        "written. The pages are zeroed in a copy (.FILE.vmwipe-scrub.*, same directory, "
        "needs room for it) that is fsynced, read back and renamed over FILE with FILE's "
        "owner, mode and xattrs: killed at any point, FILE is either untouched or fully "
        "scrubbed. A copy left by a SIGKILL is removed by the next run. A second run is a "
        "no-op that writes nothing.",
        epilog="guest RAM layout, in order of preference: --sidecar (default FILE.vmwipe.json "
        "when it exists), --machine/--mem, or the stream itself (machine type and pc.ram "
        "size). region: --region, else the sidecar, else the VMWP0001 SSDT found in the "
        "stream's ACPI tables.",
    )
    p.add_argument("file", help="saved VM: migration stream or libvirt save image")
    p.add_argument("--machine", choices=["pc", "q35"], help="machine type of the saved VM")
    p.add_argument("--mem", metavar="SIZE", type=mem_size,
                   help="guest RAM as given to QEMU's -m: a bare number is MiB (512, 512M, 5G)")
    p.add_argument("--sidecar", metavar="FILE.vmwipe.json", help="layout written by vmwipe save")
    p.add_argument("--region", metavar="BASE:SIZE", type=region_type, help="region override")
    p.add_argument("--on-invalid", choices=["fail", "skip"], default="fail",
                   help="invalid slots: fail (default, write nothing) or skip them and "
                   "scrub the valid ones")
    p.add_argument("--dry-run", action="store_true", help="validate and report, write nothing")
    p.add_argument("--no-bump", action="store_true",
                   help="do not store wipe_generation + 1 in the saved header (by default a "
                   "scrub that zeroes pages counts as a wipe, so the guest module notifies "
                   "its users after a plain restore)")
    p.set_defaults(func=_cmd_scrub)


# --- `vmwipe save --scrub`: the `save` subcommand belongs to cli.py; these two hook in ---


def add_save_scrub_arguments(p: argparse.ArgumentParser) -> None:
    """Add --scrub (and --no-bump) to the `save` subparser."""
    p.add_argument("--scrub", action="store_true",
                   help="save through a pipe and write the pages the guest's vmwipe table "
                   "lists as zeros, so its secrets never reach the disk; writes "
                   "FILE.vmwipe.json (stops the VM first; not with xbzrle, compress, "
                   "multifd, postcopy or mapped-ram)")
    p.add_argument("--no-bump", action="store_true",
                   help="with --scrub: keep the saved header's wipe_generation unchanged")


def _human_save(rep: SaveScrubReport) -> str:
    gen = f", saved header wipe_generation {rep.generation}" if rep.generation else ""
    table = ("no vmwipe table (nothing registered)" if rep.table == "absent" else
             f"table: {rep.slots} slots, {rep.pages} pages; {rep.zeroed_copies} page copies "
             f"written as zeros, {rep.fill_ranges} fill ranges as fresh random bytes{gen}")
    if rep.crng is not None and rep.table != "absent":
        table += f"\n{rep.crng.line()}"
    if rep.ksecrets is not None and rep.table != "absent":
        table += f"\n{rep.ksecrets.line()}"
    return (f"save --scrub: {rep.path} ({rep.bytes} bytes), QEMU {rep.qemu_version}, "
            f"region {rep.region['base']:#x}+{rep.region['size']:#x}\n{table}\n"
            f"sidecar {rep.sidecar}; state {rep.state_before} -> {rep.state_after}; "
            f"{rep.timings_ms.get('done', 0):.0f} ms")


def run_save_scrub(args: argparse.Namespace, session: SaveMonitor) -> int:
    """The body of `vmwipe save --scrub`: args has to, region, paused, timeout, json."""
    from ..flows.save_scrub import save_scrubbed

    rep = save_scrubbed(
        session, args.to, region=getattr(args, "region", None),
        strict=getattr(args, "on_invalid", "fail") == "fail",
        resume=not getattr(args, "paused", True),
        timeout=float(getattr(args, "timeout", 600.0)),
        bump=not getattr(args, "no_bump", False),
    )
    if getattr(args, "json", False):
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(_human_save(rep))
    return 0
