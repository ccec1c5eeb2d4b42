"""Guest-physical RAM layout of pc (i440fx) and q35 machines whose RAM is one block.

A migration stream names RAM blocks and offsets, not guest-physical addresses.
When no sidecar recorded the map, `vmwipe scrub` rebuilds it from the machine
type and RAM size with QEMU's own low/high split rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vmwipe.protocol import PAGE_SIZE

from ..errors import LayoutError
from ..wipe.memmap import RamRange

GiB = 1 << 30
FOUR_GIB = 4 * GiB
#: Legacy VGA window and BIOS area: in the pc.ram block but never guest RAM.
LEGACY_HOLE = (0xA0000, 0x100000)


def below_4g(machine: str, mem: int) -> int:
    """RAM below 4 GiB for a pc or q35 machine with `mem` bytes (QEMU 2.x to 10.x rules).

    hw/i386/pc_piix.c: low RAM ends at 0xe0000000 (3.5 GiB) unless the guest
    has at least that much, then at 3 GiB (gigabyte alignment).
    hw/i386/pc_q35.c: low RAM ends at 0xb0000000 (2.75 GiB) unless the guest has
    at least that much, then at 2 GiB.  Neither applies `max-ram-below-4g`,
    which vmwipe does not support.
    """
    kind = machine_kind(machine)
    if kind == "pc":
        lowmem = 0xC000_0000 if mem >= 0xE000_0000 else 0xE000_0000
    else:
        lowmem = 0x8000_0000 if mem >= 0xB000_0000 else 0xB000_0000
    return min(mem, lowmem)


def machine_kind(machine: str) -> str:
    """'pc' for i440fx machine types (pc, pc-i440fx-*), 'q35' for q35 (q35, pc-q35-*)."""
    m = machine.strip()
    if m == "q35" or m.startswith("pc-q35"):
        return "q35"
    if m == "pc" or m.startswith("pc-i440fx") or m == "pc-1.0" or re.fullmatch(r"pc-\d.*", m):
        return "pc"
    raise LayoutError(f"unknown machine type {machine!r}: only pc (i440fx) and q35 are known")


#: q35's TSEG is SMRAM at the top of the RAM below 4 GiB: 1, 2 or 8 MiB, or QEMU's extended
#: TSEG, 16 MiB by default since 2.10.  Whether the firmware enabled it lives in the saved MCH
#: state, which the scrubber does not interpret; the live agent sees it in the flat view.
Q35_TSEG_MAX = 16 << 20


def smram_candidates(machine: str, mem: int) -> list[tuple[int, int]]:
    """RAM that may be SMRAM once the firmware has run (beyond the legacy hole)."""
    if machine_kind(machine) != "q35":
        return []
    low = below_4g(machine, mem)
    return [(low - Q35_TSEG_MAX, Q35_TSEG_MAX)]


def without_holes(ranges: Sequence[tuple[int, int]], holes: Sequence[tuple[int, int]]
                  ) -> list[tuple[int, int]]:
    """`ranges` with every byte of `holes` cut out."""
    out = list(ranges)
    for hs, hn in holes:
        cut: list[tuple[int, int]] = []
        for gpa, size in out:
            if gpa < hs:
                cut.append((gpa, min(size, hs - gpa)))
            if gpa + size > hs + hn:
                start = max(gpa, hs + hn)
                cut.append((start, gpa + size - start))
        out = cut
    return out


def machine_layout(machine: str, mem: int, block: str = "pc.ram") -> list[RamRange]:
    """Guest RAM ranges of a pc/q35 VM whose RAM is one block, as `info mtree -f` shows it.

    The legacy hole 0xa0000-0xfffff is left out: it is in the block but it is
    VGA and BIOS space, never RAM a table may list.
    """
    if mem < 2 << 20 or mem % PAGE_SIZE:
        raise LayoutError(f"guest RAM size {mem:#x} is not a usable -m value")
    low = below_4g(machine, mem)
    ranges = [RamRange(0, LEGACY_HOLE[0], block, 0),
              RamRange(LEGACY_HOLE[1], low - LEGACY_HOLE[1], block, LEGACY_HOLE[1])]
    if mem > low:
        ranges.append(RamRange(FOUR_GIB, mem - low, block, low))
    return ranges
