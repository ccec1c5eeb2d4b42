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

from vmwipe.protocol import encode_ssdt

from ..atomic import write_atomic
from ..errors import UsageError
from ..qemu.vmconfig import DEFAULT_BASE, LOW_RAM_LIMIT, choose_region, write_vm_config
from .options import byte_size, check_region, common, mem_size, output_file


def _cmd_ssdt(args: argparse.Namespace) -> int:
    base, size = check_region(args.base, args.size)
    data = encode_ssdt(base, size)
    out = Path(output_file(args.output, "-o"))  # like cp: into a directory that exists
    write_atomic(out, data)
    if args.json:
        print(json.dumps({"path": str(out.resolve()), "base": base, "size": size,
                          "bytes": len(data)}))
    else:
        print(f"wrote {out} ({len(data)} bytes): VMWP0001 region {base:#x}+{size:#x}")
    return 0


def _cmd_qemu_args(args: argparse.Namespace) -> int:
    mem = args.mem
    if args.base is not None:
        region = check_region(args.base, args.size)
    else:
        check_region(DEFAULT_BASE, args.size, "--size")
        try:
            region = choose_region(mem, args.size)
        except ValueError as e:
            raise UsageError(f"--mem {mem >> 20}M: {e}") from None
    if region.base + region.size > min(mem, LOW_RAM_LIMIT):
        raise UsageError(
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
    shared = common()
    p = sub.add_parser("ssdt", parents=[shared],
                       help="write the ACPI SSDT describing a vmwipe region",
                       description="Write the SSDT (for QEMU -acpitable file=) that gives the "
                       "guest the VMWP0001 device and its region. No iasl needed.")
    p.add_argument("--base", default=hex(DEFAULT_BASE), type=byte_size,
                   help="guest-physical base, 4 KiB aligned (default %(default)s)")
    p.add_argument("--size", default="1M", type=byte_size,
                   help="region size in bytes, K/M/G suffixes, >= 8K (default %(default)s)")
    p.add_argument("-o", "--output", default="vmwipe.aml",
                   help="output file, in a directory that exists (default %(default)s)")
    p.set_defaults(func=_cmd_ssdt)

    p = sub.add_parser("qemu-args", parents=[shared],
                       help="print the QEMU arguments and memmap= for a region",
                       description="Write the SSDT and the 4 KiB zero page into --dir and print "
                       "the QEMU arguments (-acpitable, -device loader) and the guest kernel "
                       "memmap= parameter for a region placed safely inside --mem.")
    p.add_argument("--mem", required=True, type=mem_size, metavar="SIZE",
                   help="guest RAM as given to QEMU's -m: a bare number is MiB (512, 512M, 4G)")
    p.add_argument("--size", default="1M", type=byte_size,
                   help="region size in bytes, K/M/G suffixes (default %(default)s)")
    p.add_argument("--base", default=None, type=byte_size,
                   help="region base (default: chosen from --mem)")
    p.add_argument("--dir", default=".", help="where to write the files (default: current)")
    p.set_defaults(func=_cmd_qemu_args)
