"""`vmwipe ssdt` and `vmwipe qemu-args`: produce what a VM needs to carry a vmwipe region.

A protected VM needs three things that must agree on one address: the SSDT the
guest reads (`-acpitable`), the reset-time zero page at the same base
(`-device loader`, see SPEC.md "stale tables"), and the guest kernel's
`memmap=` reservation so Linux never uses the region as RAM.  Generating all
three from one place is how they stay in agreement.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from vmwipe.protocol import PAGE_SIZE, encode_ssdt, parse_size, validate_region
from vmwipe.protocol.table import Region

from .atomic import write_atomic

DEFAULT_BASE = 0x1F00_0000
DEFAULT_SIZE = 1 << 20
#: Keep the region clear of the top of low RAM, where firmware tables and the
#: initrd tend to land, and below the PCI hole on pc and q35.
_TOP_MARGIN = 16 << 20
_MIB = 1 << 20
_LOW_RAM_LIMIT = 0x8000_0000  # q35 keeps at most 2 GiB below 4 GiB; pc keeps 3 GiB


@dataclass(frozen=True)
class VmConfig:
    """Everything a QEMU command line needs for one vmwipe region."""

    base: int
    size: int
    ssdt_path: str
    zero_page_path: str
    qemu_args: list[str]
    kernel_param: str


def choose_region(mem: int, size: int = DEFAULT_SIZE) -> Region:
    """Place the region inside low RAM: 0x1f000000 for guests of 512 MiB and more."""
    low_ram = min(mem, _LOW_RAM_LIMIT)
    base = min(DEFAULT_BASE, (low_ram - _TOP_MARGIN) // _MIB * _MIB)
    if base < 32 * _MIB or base + size > low_ram - _TOP_MARGIN // 2:
        raise ValueError(f"guest RAM of {mem >> 20} MiB is too small for a {size} byte region")
    region = Region(base, size)
    validate_region(region)
    return region


def write_vm_config(region: Region, directory: Path) -> VmConfig:
    """Write the SSDT and the zero page into `directory` and return the matching arguments."""
    ssdt = directory / "vmwipe-ssdt.aml"
    zero = directory / "vmwipe-zero-page.bin"
    write_atomic(ssdt, encode_ssdt(region.base, region.size))
    write_atomic(zero, bytes(PAGE_SIZE))
    return VmConfig(
        base=region.base,
        size=region.size,
        ssdt_path=str(ssdt.resolve()),
        zero_page_path=str(zero.resolve()),
        qemu_args=qemu_args_for(region, ssdt.resolve(), zero.resolve()),
        kernel_param=f"memmap={region.size:#x}${region.base:#x}",
    )


def qemu_args_for(region: Region, ssdt: Path, zero_page: Path) -> list[str]:
    """The QEMU options; the loader rewrites the header page at every system reset."""
    return [
        "-acpitable", f"file={ssdt}",
        "-device", f"loader,file={zero_page},addr={region.base:#x},force-raw=on",
    ]


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
    if region.base + region.size > min(mem, _LOW_RAM_LIMIT):
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
