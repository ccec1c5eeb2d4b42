"""`vmwipe ssdt` and `vmwipe qemu-args`: print and write what a VM needs for a region.

The files and arguments themselves come from `qemu.vmconfig`, which `vmwipe
libvirt protect` uses too, so the two front ends cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict
from pathlib import Path

from vmwipe.protocol import Region, encode_ssdt, parse_size, validate_region

from ..atomic import write_atomic
from ..qemu.vmconfig import DEFAULT_BASE, LOW_RAM_LIMIT, choose_region, write_vm_config


def _cmd_ssdt(args: argparse.Namespace) -> int:
    base, size = parse_size(args.base), parse_size(args.size)
    data = encode_ssdt(base, size)
    out = Path(args.output)
    write_atomic(out, data)
    if args.json:
        print(json.dumps({"path": str(out.resolve()), "base": base, "size": size,
                          "bytes": len(data)}))
    else:
        print(f"wrote {out} ({len(data)} bytes): VMWP0001 region {base:#x}+{size:#x}")
    return 0


def _cmd_qemu_args(args: argparse.Namespace) -> int:
    mem = parse_size(args.mem)
    size = parse_size(args.size)
    region = Region(parse_size(args.base), size) if args.base else choose_region(mem, size)
    validate_region(region)
    if region.base + region.size > min(mem, LOW_RAM_LIMIT):
        raise ValueError(
            f"region {region.base:#x}+{region.size:#x} does not fit in {mem >> 20} MiB of low RAM")
    config = write_vm_config(region, Path(args.dir))
    if args.json:
        print(json.dumps(asdict(config), indent=2))
    else:
        print(f"# vmwipe region {region.base:#x}+{region.size:#x} for a {mem >> 20} MiB guest")
        print("# QEMU arguments:")
        print(shlex.join(config.qemu_args))
        print("# guest kernel command line (direct kernel boot or the guest's bootloader):")
        print(shlex.quote(config.kernel_param))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `ssdt` and `qemu-args` to the `vmwipe` command."""
    p = sub.add_parser("ssdt", help="write the ACPI SSDT describing a vmwipe region",
                       description="Write the SSDT (for QEMU -acpitable file=) that gives the "
                       "guest the VMWP0001 device and its region. No iasl needed.")
    p.add_argument("--base", default=hex(DEFAULT_BASE),
                   help="guest-physical base, 4 KiB aligned (default %(default)s)")
    p.add_argument("--size", default="1M", help="region size, >= 8K (default %(default)s)")
    p.add_argument("-o", "--output", default="vmwipe.aml", help="output file (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=_cmd_ssdt)

    p = sub.add_parser("qemu-args", help="print the QEMU arguments and memmap= for a region",
                       description="Write the SSDT and the 4 KiB zero page into --dir and print "
                       "the QEMU arguments (-acpitable, -device loader) and the guest kernel "
                       "memmap= parameter for a region placed safely inside --mem.")
    p.add_argument("--mem", required=True, help="guest RAM size as given to -m, e.g. 512M")
    p.add_argument("--size", default="1M", help="region size (default %(default)s)")
    p.add_argument("--base", default=None, help="region base (default: chosen from --mem)")
    p.add_argument("--dir", default=".", help="where to write the files (default: current)")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=_cmd_qemu_args)
