"""What a VM needs to carry a vmwipe region: where it goes, its SSDT and zero page, QEMU args.

A protected VM needs three things that must agree on one address: the SSDT the
guest reads (`-acpitable`), the reset-time zero page at the same base
(`-device loader`, see SPEC.md "stale tables"), and the guest kernel's
`memmap=` reservation so Linux never uses the region as RAM.  Generating all
three from one place is how they stay in agreement; `vmwipe qemu-args` and
`vmwipe libvirt protect` both come here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmwipe.protocol import PAGE_SIZE, Region, encode_ssdt, validate_region

from ..atomic import write_atomic

DEFAULT_BASE = 0x1F00_0000
DEFAULT_SIZE = 1 << 20
#: Keep the region at least this far below the top of RAM under 4 GiB.  There, on
#: q35 with OVMF and SMM, sits TSEG (QEMU's mch `extended-tseg-mbytes`: 16 MiB by
#: default, 48 MiB as libvirt's `<tseg>` suggests for large guests): guest writes to
#: it from outside SMM do not land, so a table there reads as "nothing registered".
#: Firmware tables and the initrd also tend to land near the top.
_TOP_MARGIN = 64 << 20
_MIB = 1 << 20
LOW_RAM_LIMIT = 0x8000_0000  # q35 keeps at most 2 GiB below 4 GiB; pc keeps 3 GiB


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
    """Place the region inside low RAM, ending at least _TOP_MARGIN below its top (never
    in q35's TSEG): 0x1f000000 for guests of 576 MiB and more."""
    low_ram = min(mem, LOW_RAM_LIMIT)
    base = min(DEFAULT_BASE, (low_ram - _TOP_MARGIN - size) // _MIB * _MIB)
    if base < 32 * _MIB or base + size > low_ram - _TOP_MARGIN:
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
