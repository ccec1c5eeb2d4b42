"""Guest RAM layout from HMP `info mtree -f`, with host addresses from `gpa2hva`.

The table names guest-physical pages; the backends need host addresses or file
offsets.  QEMU has no QMP command for the flat memory map, so we parse the HMP
flat view of the system address space (the FlatView that lists `AS "memory"`).
Lines look like

    0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @0000000000100000 KVM

Only `ram` ranges of real guest RAM blocks count: rom/romd/i/o, PAM-shadowed
BIOS areas (shown as `rom`), ram devices (`ramd`), nvdimm (`nv-ram`) and device
RAM such as `vga.vram` are excluded.  Guest RAM blocks are the memory backends
QEMU reports in `query-memdev` (`pc.ram`, numa memdevs, pc-dimm backends).
This handles pc and q35, the legacy hole at 0xa0000-0xfffff, RAM above 4 GiB
(mapped at block offset `below_4g`), and several blocks.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

from ..errors import MemoryAccessError, QMPFailure

_RANGE_RE = re.compile(
    r"^\s+(?P<start>[0-9a-fA-F]+)-(?P<last>[0-9a-fA-F]+) "
    r"\(prio (?P<prio>-?\d+), (?P<kind>[a-z/-]+)\): (?P<rest>.*)$"
)
_REST_RE = re.compile(
    r"^(?P<name>.*?)(?: @(?P<off>[0-9a-fA-F]+))?(?: (?P<accel>KVM|HVF|WHPX|NVMM|HAX|xen))?$"
)
_AS_RE = re.compile(r'^\s+AS "(?P<name>[^"]*)", root: (?P<root>.*)$')
_GPA2HVA_RE = re.compile(
    r"Host virtual address for (0x[0-9a-fA-F]+) \((?P<block>.*)\) is (?P<hva>0x[0-9a-fA-F]+)"
)


@dataclass(frozen=True)
class FlatRange:
    """One line of a rendered FlatView; `end` is exclusive."""

    start: int
    end: int
    prio: int
    kind: str
    name: str
    offset: int
    accel: str | None = None


@dataclass(frozen=True)
class FlatView:
    """A rendered FlatView and the address spaces that share it."""

    address_spaces: tuple[str, ...]
    root: str
    ranges: tuple[FlatRange, ...]


@dataclass(frozen=True)
class RamRange:
    """Guest RAM at [gpa, gpa+size), backed by `block` at `offset`; `hva` once resolved."""

    gpa: int
    size: int
    block: str
    offset: int
    hva: int | None = None

    @property
    def end(self) -> int:
        return self.gpa + self.size


def parse_flatviews(text: str) -> list[FlatView]:
    """Split `info mtree -f` output into FlatViews."""
    return list(iter_flatviews(text))


def iter_flatviews(text: str) -> Iterator[FlatView]:
    """`parse_flatviews`, one view at a time: a caller that wants one view stops early."""
    spaces: list[str] = []
    root = ""
    ranges: list[FlatRange] = []
    started = False
    for line in text.splitlines():
        if line.startswith("FlatView #"):
            if started:
                yield FlatView(tuple(spaces), root, tuple(ranges))
            spaces, root, ranges, started = [], "", [], True
            continue
        m = _AS_RE.match(line)
        if m:
            spaces.append(m["name"])
            continue
        if line.strip().startswith("Root memory region:"):
            root = line.split(":", 1)[1].strip()
            continue
        m = _RANGE_RE.match(line)
        if m:
            rest = _REST_RE.match(m["rest"].rstrip())
            assert rest is not None  # the pattern matches any string
            if int(m["last"], 16) < int(m["start"], 16):
                raise QMPFailure(f"`info mtree -f`: range ends before it starts: {line.strip()!r}")
            ranges.append(
                FlatRange(
                    start=int(m["start"], 16),
                    end=int(m["last"], 16) + 1,
                    prio=int(m["prio"]),
                    kind=m["kind"],
                    name=rest["name"],
                    offset=int(rest["off"], 16) if rest["off"] else 0,
                    accel=rest["accel"],
                )
            )
    if started:
        yield FlatView(tuple(spaces), root, tuple(ranges))


def system_view(text: str) -> FlatView:
    """The FlatView of the system address space (`AS "memory"`, root `system`).

    QEMU prints it first, so parsing stops there (the rest is mostly I/O space).
    """
    views = []
    for v in iter_flatviews(text):
        if "memory" in v.address_spaces:
            return v
        views.append(v)
    for v in views:  # output without AS lines: fall back to the view rooted at `system`
        if v.root == "system":
            return v
    raise QMPFailure("`info mtree -f` has no FlatView for the system address space")


def ram_ranges(view: FlatView, blocks: Collection[str] | None) -> list[RamRange]:
    """Guest RAM ranges of `view`, sorted; adjacent pieces of one block are merged.

    `blocks` lists the RAM block names that are guest RAM (the `query-memdev`
    ids); None accepts every `ram` range (only for offline parsing).
    """
    out: list[RamRange] = []
    for r in sorted(view.ranges, key=lambda r: r.start):
        if r.kind != "ram" or (blocks is not None and r.name not in blocks):
            continue
        prev = out[-1] if out else None
        if (
            prev is not None
            and prev.block == r.name
            and prev.end == r.start
            and prev.offset + prev.size == r.offset
        ):
            out[-1] = replace(prev, size=prev.size + (r.end - r.start))
        else:
            out.append(RamRange(r.start, r.end - r.start, r.name, r.offset))
    return out


def parse_gpa2hva(text: str) -> int:
    """Host virtual address from HMP `gpa2hva` output; QMPFailure if QEMU said no."""
    m = _GPA2HVA_RE.search(text)
    if not m:
        raise QMPFailure(f"gpa2hva: unexpected answer {text.strip()!r}")
    return int(m["hva"], 16)


class GuestMemoryMap:
    """Sorted guest RAM ranges with lookups from guest-physical to host addresses."""

    def __init__(self, ranges: Iterable[RamRange]) -> None:
        self.ranges = sorted(ranges, key=lambda r: r.gpa)
        self._starts = [r.gpa for r in self.ranges]
        self._ends = [r.gpa + r.size for r in self.ranges]
        for a, b in zip(self.ranges, self.ranges[1:], strict=False):
            if b.gpa < a.end:
                raise QMPFailure(f"overlapping RAM ranges {a.gpa:#x} and {b.gpa:#x} in mtree")

    def pairs(self) -> list[tuple[int, int]]:
        """(gpa, size) list, the form `vmwipe.protocol.decode_table` takes."""
        return [(r.gpa, r.size) for r in self.ranges]

    @property
    def total(self) -> int:
        return sum(r.size for r in self.ranges)

    def find(self, gpa: int) -> RamRange | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self._ends[i]:
            return self.ranges[i]
        return None

    def split(self, gpa: int, size: int) -> list[tuple[int, int, RamRange]]:
        """Cut [gpa, gpa+size) at RAM-range boundaries; every byte must be RAM."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        end = gpa + size
        if i >= 0 and end <= self._ends[i]:  # fast path: one range holds it all
            return [(gpa, size, self.ranges[i])]
        pieces: list[tuple[int, int, RamRange]] = []
        pos = gpa
        while pos < end:
            r = self.find(pos)
            if r is None:
                raise MemoryAccessError(f"guest address {pos:#x} is not in guest RAM")
            n = min(end, r.end) - pos
            pieces.append((pos, n, r))
            pos += n
        return pieces

    def hva(self, gpa: int) -> int:
        r = self.find(gpa)
        if r is None or r.hva is None:
            raise MemoryAccessError(f"no host address for guest address {gpa:#x}")
        return r.hva + (gpa - r.gpa)

    def blocks(self) -> list[str]:
        return sorted({r.block for r in self.ranges})

    def block_bases(self) -> dict[str, int]:
        """Host address of each RAM block's offset 0 (ranges with a resolved `hva`)."""
        return {r.block: r.hva - r.offset for r in self.ranges if r.hva is not None}


def load_memory_map(
    hmp: Callable[[str], str],
    memdev_ids: Collection[str] | None,
    known_bases: Mapping[str, int] | None = None,
) -> GuestMemoryMap:
    """Build the map from a live QEMU: parse the flat view, then resolve host addresses.

    A RAM block is one host allocation and the flat view gives each range's
    offset into its block, so one `gpa2hva` per block (not per range) fixes
    every range's host address: `block_base + offset`.  Each call is a monitor
    round trip inside the paused window of a restore, so `known_bases` (from a
    map read earlier in the same QEMU process; see `flows.target.PreparedTarget`) skips
    the call for the blocks it names.
    """
    view = system_view(hmp("info mtree -f"))
    ranges = ram_ranges(view, memdev_ids)
    if not ranges:
        raise QMPFailure(
            "no guest RAM found in `info mtree -f` (query-memdev ids: "
            f"{sorted(memdev_ids) if memdev_ids is not None else 'any'})"
        )
    block_base = dict(known_bases or {})
    for r in ranges:
        if r.block not in block_base:
            base = parse_gpa2hva(hmp(f"gpa2hva {r.gpa:#x}")) - r.offset
            if base < 0:
                raise QMPFailure(f"gpa2hva: host address of {r.block!r} below its offset")
            block_base[r.block] = base
    return GuestMemoryMap(replace(r, hva=block_base[r.block] + r.offset) for r in ranges)
