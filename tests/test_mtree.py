"""`info mtree -f` parsing on real captured outputs from QEMU 7.2 and 10.0 (tests/data/mtree)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmwipe.host_agent.errors import MemoryAccessError, QMPFailure
from vmwipe.host_agent.wipe.memmap import (
    GuestMemoryMap,
    RamRange,
    parse_flatviews,
    parse_gpa2hva,
    ram_ranges,
    system_view,
)

DATA = Path(__file__).parent / "data" / "mtree"
G = 1 << 30
M = 1 << 20

# (gpa, size, block, offset) per capture; identical for 7.2 and 10.0.
LOW_512M = [(0, 0xC0000, "pc.ram", 0), (M, 512 * M - M, "pc.ram", M)]
EXPECTED: dict[str, list[tuple[int, int, str, int]]] = {
    "pc-512M": LOW_512M,
    "q35-512M": LOW_512M,
    "pc-loader": LOW_512M,
    "pc-5G": [(0, 0xC0000, "pc.ram", 0), (M, 3 * G - M, "pc.ram", M),
              (4 * G, 2 * G, "pc.ram", 3 * G)],
    "q35-5G": [(0, 0xC0000, "pc.ram", 0), (M, 2 * G - M, "pc.ram", M),
               (4 * G, 3 * G, "pc.ram", 2 * G)],
    "pc-numa": [(0, 0xC0000, "m0", 0), (M, 3 * G - M, "m0", M), (4 * G, G, "m1", 0)],
    "q35-numa-5G": [(0, 0xC0000, "m0", 0), (M, 2 * G - M, "m0", M), (4 * G, G, "m0", 2 * G),
                    (5 * G, 2 * G, "m1", 0)],
    "pc-dimm": [*LOW_512M, (4 * G, 2 * M, "wm", 0)],
    "q35-dimm-5G": [(0, 0xC0000, "pc.ram", 0), (M, 2 * G - M, "pc.ram", M),
                    (4 * G, 3 * G, "pc.ram", 2 * G), (7 * G, 128 * M, "wm", 0)],
    "pc-memfd": [(0, 0xC0000, "ram0", 0), (M, G - M, "ram0", M)],
    # with VGA, 0xa0000-0xbffff is vga-lowmem (i/o): the legacy hole starts at 640 KiB
    "pc-default-kvm": [(0, 0xA0000, "pc.ram", 0), (M, 3 * G - M, "pc.ram", M),
                       (4 * G, 2 * G, "pc.ram", 3 * G)],
    "q35-default-tcg": [(0, 0xA0000, "pc.ram", 0), (M, G - M, "pc.ram", M)],
    # after SeaBIOS ran: PAM shadows parts of 0xc0000-0xfffff as rom; vga.vram is a BAR
    "pc-booted-vga": [(0, 0xA0000, "pc.ram", 0), (0xCA000, 0x3000, "pc.ram", 0xCA000),
                      (0xE8000, 0x8000, "pc.ram", 0xE8000), (M, G - M, "pc.ram", M)],
    "q35-booted-vga": [(0, 0xA0000, "pc.ram", 0), (0xCA000, 0x3000, "pc.ram", 0xCA000),
                       (0xE8000, 0x8000, "pc.ram", 0xE8000), (M, G - M, "pc.ram", M)],
}
VERSIONS = ["q72", "q10"]


def memdev_ids(name: str) -> set[str]:
    path = DATA / f"{name}.memdev.json"
    if not path.exists():  # the booted captures were made without query-memdev
        return {"pc.ram"}
    return {str(m["id"]) for m in json.loads(path.read_text())}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("config", sorted(EXPECTED))
def test_captured_layouts(version: str, config: str) -> None:
    name = f"{version}-{config}"
    text = (DATA / f"{name}.mtree.txt").read_text()
    view = system_view(text)
    assert "memory" in view.address_spaces
    got = [(r.gpa, r.size, r.block, r.offset) for r in ram_ranges(view, memdev_ids(name))]
    assert got == EXPECTED[config]


@pytest.mark.parametrize("version", VERSIONS)
def test_device_ram_is_not_guest_ram(version: str) -> None:
    """vga.vram is `ram` in the flat view but not a memory backend: it must not count."""
    view = system_view((DATA / f"{version}-q35-booted-vga.mtree.txt").read_text())
    assert any(r.name == "vga.vram" and r.kind == "ram" for r in view.ranges)
    assert "vga.vram" not in {r.block for r in ram_ranges(view, {"pc.ram"})}
    assert "vga.vram" in {r.block for r in ram_ranges(view, None)}


@pytest.mark.parametrize("version", VERSIONS)
def test_kvm_suffix_and_kinds(version: str) -> None:
    view = system_view((DATA / f"{version}-pc-default-kvm.mtree.txt").read_text())
    kinds = {r.kind for r in view.ranges}
    assert {"ram", "rom", "i/o"} <= kinds
    # KVM tags the ranges it maps (ram/rom), not i/o
    assert all(r.accel == "KVM" for r in view.ranges if r.kind != "i/o")
    assert all(r.accel is None for r in view.ranges if r.kind == "i/o")
    bios = [r for r in view.ranges if r.name == "pc.bios"]
    assert [(r.start, r.offset) for r in bios] == [(0xE0000, 0x20000), (0xFFFC0000, 0)]


def test_flatview_order_varies_and_smm_views_are_ignored() -> None:
    """The system view is not always FlatView #0; SMM views (root `memory`) look alike."""
    views = parse_flatviews((DATA / "q72-q35-5G.mtree.txt").read_text())
    assert views[0].address_spaces == ("cpu-smm-0",)
    assert views.index(system_view((DATA / "q72-q35-5G.mtree.txt").read_text())) == 1
    assert any(v.ranges == () and v.root == "(none)" for v in views)


def test_fallback_without_as_lines() -> None:
    text = """FlatView #0
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #1
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram
"""
    assert system_view(text).ranges[0].name == "pc.ram"
    with pytest.raises(QMPFailure):
        system_view("FlatView #0\n Root memory region: io\n")


def test_region_names_with_at_sign_and_nv_ram() -> None:
    text = """FlatView #0
 AS "memory", root: system
  0000000000000000-0000000000000fff (prio 0, rom): /rom@etc/acpi/tables @0000000000001000
  0000000000001000-0000000000001fff (prio 0, nv-ram): nvmem
  0000000000002000-0000000000002fff (prio 0, ramd): bar
  0000000000003000-0000000000003fff (prio 0, romd): flash @0000000000000010 KVM
"""
    view = system_view(text)
    assert view.ranges[0].name == "/rom@etc/acpi/tables" and view.ranges[0].offset == 0x1000
    assert [r.kind for r in view.ranges] == ["rom", "nv-ram", "ramd", "romd"]
    assert ram_ranges(view, None) == []


def test_adjacent_pieces_of_one_block_merge() -> None:
    text = """FlatView #0
 AS "memory", root: system
  0000000000000000-0000000000000fff (prio 0, ram): a
  0000000000001000-0000000000001fff (prio 0, ram): a @0000000000001000
  0000000000002000-0000000000002fff (prio 0, ram): b
  0000000000003000-0000000000003fff (prio 0, ram): a @0000000000005000
"""
    got = [(r.gpa, r.size, r.block, r.offset) for r in ram_ranges(system_view(text), None)]
    assert got == [(0, 0x2000, "a", 0), (0x2000, 0x1000, "b", 0), (0x3000, 0x1000, "a", 0x5000)]


@pytest.mark.parametrize("version", VERSIONS)
def test_gpa2hva(version: str) -> None:
    text = (DATA / f"{version}-pc-5G.gpa2hva.txt").read_text()
    assert parse_gpa2hva(text) & 0xFFF == 0x000 and parse_gpa2hva(text) > 0x7F0000000000
    with pytest.raises(QMPFailure):
        parse_gpa2hva("No memory is mapped at address 0xa0000\n")


def test_map_split_and_hva() -> None:
    mm = GuestMemoryMap([
        RamRange(0, 0xA0000, "pc.ram", 0, hva=0x10000000),
        RamRange(0x100000, 0x3FF00000, "m0", 0x100000, hva=0x20100000),
        RamRange(0x40000000, 0x1000000, "m1", 0, hva=0x90000000),
    ])
    assert mm.pairs()[1] == (0x100000, 0x3FF00000)
    pieces = mm.split(0x3FFFF000, 0x2000)
    assert [(g, n, r.block) for g, n, r in pieces] == [
        (0x3FFFF000, 0x1000, "m0"), (0x40000000, 0x1000, "m1")]
    assert mm.hva(0x40000010) == 0x90000010
    assert mm.hva(0x1000) == 0x10001000
    with pytest.raises(MemoryAccessError, match="0xa0000"):
        mm.split(0x9F000, 0x2000)  # runs into the legacy hole
    with pytest.raises(MemoryAccessError):
        mm.hva(0xC0000)
    with pytest.raises(QMPFailure):
        GuestMemoryMap([RamRange(0, 0x2000, "a", 0), RamRange(0x1000, 0x1000, "b", 0)])
