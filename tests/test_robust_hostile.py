"""Hostile tables in a real paused VM: the agent refuses, names the slot, writes nothing.

One `-S` QEMU for the module (TCG; 128 MiB of pc.ram below 4 GiB plus a
16 MiB pc-dimm at 4 GiB; region 1 MiB at 112 MiB).  For each case the test
plants the table (and 0xa5 in the pages it names) through the agent's own
process_vm_writev backend, hashes all guest RAM with `pmemsave`, runs the
real CLI (`vmwipe wipe --qmp SOCK`, which resumes) as a subprocess, and checks:
exit code 6, one line on stderr naming the slot and field (or the header
field), the same whole-RAM hash afterwards, and the VM still paused.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator

import pytest
from conftest import VM, qemu_available, run_cli, start_vm

from vmwipe.host_agent.wipe.engine import FILL_CHUNK
from vmwipe.protocol import (
    HEADER_CRC_LEN,
    PAGE_SIZE,
    SLOTS_OFFSET,
    Region,
    build_region,
    encode_fill,
    encode_header,
    encode_slot,
)

pytestmark = pytest.mark.skipif(not qemu_available(), reason="QEMU not installed")

P = PAGE_SIZE
M = 1 << 20
HIGH = 1 << 32
RAM_LOW = 128 * M
DIMM = 16 * M
REGION = Region(0x0700_0000, M)
MACHINE = [
    "-M", "pc", "-m", "128M,slots=2,maxmem=1G",
    "-object", "memory-backend-ram,id=hi,size=16M",
    "-device", "pc-dimm,memdev=hi,addr=0x100000000",
]
GOOD = [(0x400000, 2), (HIGH + 0x10000, 1)]  # valid slots 0 and 1 in every slot case


def _header(**fields: int | bytes) -> bytes:
    """A header with some fields forged and the CRC recomputed (so the field itself is at fault)."""
    raw = bytearray(encode_header(REGION.size))
    offsets = {"magic": (0, "8s"), "version": (8, "<I"), "header_size": (12, "<I"),
               "region_size": (16, "<Q"), "slot_size": (24, "<I"), "slot_count": (28, "<I"),
               "slots_offset": (32, "<Q"), "reserved0": (0x3C, "<I")}
    for name, value in fields.items():
        if name == "tail":
            raw[0x100] = 1
            continue
        off, fmt = offsets[name]
        struct.pack_into(fmt, raw, off, value)
    struct.pack_into("<I", raw, HEADER_CRC_LEN, zlib.crc32(bytes(raw[:HEADER_CRC_LEN])))
    return bytes(raw)


def _bad_crc() -> bytes:
    raw = bytearray(encode_header(REGION.size))
    raw[HEADER_CRC_LEN] ^= 0x40
    return bytes(raw)


def image(*slots: bytes, header: bytes | None = None, at: int = 0) -> bytes:
    """The region: GOOD as slots 0-1, then `slots` from index max(2, at)."""
    img = bytearray(build_region(REGION.size, GOOD))
    if header is not None:
        img[:P] = header
    for i, raw in enumerate(slots, start=max(2, at)):
        img[SLOTS_OFFSET + 16 * i : SLOTS_OFFSET + 16 * (i + 1)] = raw
    return bytes(img)


S = encode_slot
F = encode_fill
V1 = encode_header(REGION.size, version=1)
INREG = ("slot 2", "overlaps the vmwipe region")
LAST = (REGION.size - SLOTS_OFFSET) // 16 - 1  # 65,279 in a 1 MiB region

#: name -> (region image, words that must appear in the one-line error)
CASES: dict[str, tuple[bytes, tuple[str, ...]]] = {
    # where the slot points
    "mmio-ioapic": (image(S(0xFEC00000, 1)), ("slot 2", "word", "not wholly in guest RAM")),
    "mmio-lapic": (image(S(0xFEE00000, 1)), ("slot 2", "word")),
    # (no VGA here, so 0xa0000-0xbffff is pc.ram in QEMU's flat view; ROM starts at 0xc0000)
    "rom-option-roms": (image(S(0xC0000, 1)), ("slot 2", "word")),
    "straddles-ram-into-rom": (image(S(0xBF000, 2)), ("slot 2", "word")),
    "rom-bios-shadow": (image(S(0xF0000, 16)), ("slot 2", "word")),
    "rom-bios-flash": (image(S(0xFFFC0000, 1)), ("slot 2", "word")),
    "pci-hole": (image(S(0xE0000000, 1)), ("slot 2", "word")),
    "just-past-low-ram": (image(S(RAM_LOW, 1)), ("slot 2", "word")),
    "straddles-low-ram-end": (image(S(RAM_LOW - P, 2)), ("slot 2", "word")),
    "straddles-dimm-end": (image(S(HIGH + DIMM - P, 2)), ("slot 2", "word")),
    "beyond-all-ram": (image(S(HIGH + (1 << 30), 1)), ("slot 2", "word")),
    "top-of-address-space": (image(S((1 << 64) - P, 1)), ("slot 2", "word")),
    "into-region-header": (image(S(REGION.base, 1)), INREG),
    "into-region-tail": (image(S(REGION.end - P, 1)), INREG),
    "reaches-into-region": (image(S(REGION.base - P, 2)), INREG),
    "spans-whole-region": (image(S(REGION.base - P, 258)), INREG),
    # the slot's own bits
    "unaligned-bit2": (image(S(0x500000, 1, low_bits=0x4)), ("slot 2", "word", "bits 11..2")),
    "unaligned-bit11": (image(S(0x500000, 1, low_bits=0x800)), ("slot 2", "word", "bits 11..2")),
    "unaligned-all": (image(S(0x500000, 1, low_bits=0xFFE)), ("slot 2", "word")),
    "offset-low": (image(S(0x500000, 1, reserved=1)), ("slot 2", "offset")),
    "offset-high": (image(S(0x500000, 1, reserved=0x8000_0000)), ("slot 2", "offset")),
    "overflow": (image(S((1 << 64) - P, 2)), ("slot 2", "count", "overflows")),
    "overflow-max": (image(S((1 << 64) - P, 0xFFFF_FFFF)), ("slot 2", "count", "overflows")),
    "npages-0": (image(S(0x500000, 0)), ("slot 2", "count", ">= 1")),
    "npages-max": (image(S(0x100000, 0xFFFF_FFFF)), ("slot 2", "word")),
    "npages-max-high": (image(S(HIGH, 0xFFFF_FFFF)), ("slot 2", "not wholly in guest RAM")),
    "bad-slot-is-the-last": (image(S(0xE0000000, 1), at=LAST), (f"slot {LAST}", "word")),
    # v1 tables: bit 1 (FILL in v2) is reserved, the fields have their v1 names
    "v1-bit1": (image(S(0x500000, 1, low_bits=0x2), header=V1), ("slot 2", "bits 11..1")),
    "v1-fill-slot": (image(F(0x500008, 8), header=V1), ("slot 2", "word", "bits 11..1")),
    "v1-reserved": (image(S(0x500000, 1, reserved=1), header=V1), ("slot 2", "reserved")),
    # v2 fill ranges
    "fill-crosses-page-end": (image(F(0x500FF8, 16)), ("slot 2", "offset", "crosses")),
    "fill-one-past-page-end": (image(F(0x500001, 4096)), ("slot 2", "offset", "crosses")),
    "fill-offset-past-page": (image(F(0x500000, 8, offset=4096)), ("slot 2", "offset")),
    "fill-zero-length": (image(F(0x500000, 0)), ("slot 2", "count", ">= 1 byte")),
    "fill-reserved-bits": (image(F(0x500000, 8, low_bits=0x4)), ("slot 2", "bits 11..2")),
    "fill-in-region-header": (image(F(REGION.base + 0x40, 8)), INREG),
    "fill-in-region-slots": (image(F(REGION.base + SLOTS_OFFSET, 32)), INREG),
    "fill-in-rom": (image(F(0xC0008, 8)), ("slot 2", "word", "not wholly in guest RAM")),
    "fill-in-mmio": (image(F(0xFEE00020, 4)), ("slot 2", "word", "not wholly in guest RAM")),
    "fill-past-all-ram": (image(F(HIGH + (1 << 30), 32)), ("slot 2", "not wholly in guest RAM")),
    "fill-at-top": (image(F((1 << 64) - 8, 8)), ("slot 2", "not wholly in guest RAM")),
    "fill-in-zero-range": (image(F(0x401008, 32)), ("slot 2", "overlaps a zero range")),
    "fill-covers-zero-range": (image(F(0x400000, 4096)), ("slot 2", "overlaps a zero range")),
    "fill-duplicate": (image(F(0x500000, 8), F(0x500000, 8)), ("slot 3", "overlaps slot 2")),
    "fill-overlap": (image(F(0x500000, 8), F(0x500004, 8)), ("slot 3", "overlaps slot 2")),
    "zero-range-over-fill": (image(F(0x600010, 8), S(0x600000, 1)), ("slot 2",
                                                                     "overlaps a zero range")),
    # slots against each other
    "duplicate": (image(S(0x400000, 2)), ("slot 2", "overlaps slot 0")),
    "duplicate-high": (image(S(HIGH + 0x10000, 1)), ("slot", "overlaps slot")),
    "overlap-tail": (image(S(0x401000, 1)), ("slot", "overlaps slot")),
    "overlap-contains": (image(S(0x3FF000, 8)), ("slot", "overlaps slot")),
    # the header (CRC recomputed unless the CRC is the point)
    "bad-crc": (image(header=_bad_crc()), ("header_crc32",)),
    "bad-magic": (image(header=_header(magic=b"VMWIPEv9")), ("magic",)),
    "v2-magic-v1-version": (image(header=_header(version=1)), ("version",)),
    "bad-version": (image(header=_header(version=3)), ("version",)),
    "bad-header-size": (image(header=_header(header_size=8192)), ("header_size",)),
    "region-size-larger": (image(header=_header(region_size=2 * M)), ("region_size",)),
    "region-size-smaller": (image(header=_header(region_size=64 * 1024)), ("region_size",)),
    "region-size-huge": (image(header=_header(region_size=(1 << 64) - P)), ("region_size",)),
    "bad-slot-size": (image(header=_header(slot_size=8)), ("slot_size",)),
    "bad-slot-count": (image(header=_header(slot_count=0xFFFF_FFFF)), ("slot_count",)),
    "bad-slots-offset": (image(header=_header(slots_offset=0)), ("slots_offset",)),
    "reserved0": (image(header=_header(reserved0=1)), ("reserved0",)),
    "reserved-tail": (image(header=_header(tail=1)), ("reserved",)),
}


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    v = start_vm(tmp_path_factory.mktemp("hostile"), MACHINE, "tcg", region=REGION)
    yield v
    v.kill()


def plant(vm: VM, img: bytes) -> None:
    """Reset the table to `img`; the pages the good slots name hold 0xa5."""
    for gpa, n in GOOD:
        vm.write(gpa, b"\xa5" * n * P)
    vm.write(0x500000, b"\xa5" * P)
    vm.write(REGION.base, img)


def refuse(vm: VM, img: bytes, needles: tuple[str, ...], *args: str) -> str:
    plant(vm, img)
    before = vm.ram_digest()
    vm.disconnect()  # the test's monitor stays free; the agent uses its own socket
    r = run_cli("wipe", "--qmp", vm.qmp, *args)
    line = r.stderr.strip()
    assert r.returncode == 6, r.stderr
    assert "\n" not in line and line.startswith("vmwipe: error: invalid"), line
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert vm.status() == "prelaunch"
    assert vm.ram_digest() == before, "a refused wipe changed guest RAM"
    return line


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_table_refused(vm: VM, case: str) -> None:
    img, needles = CASES[case]
    refuse(vm, img, needles)


def test_one_bad_slot_in_a_large_table(vm: VM) -> None:
    """20,000 valid slots and one bad one in the middle: the fast validator's fallback
    still names it, and nothing of the 20,000 pages is touched."""
    slots = [S(0x1000000 + i * P, 1) for i in range(20_000)]
    slots[12_345] = S(0xFEE00000, 1)
    vm.write(0x1000000, b"\xa5" * 20_000 * P)
    refuse(vm, image(*slots), ("slot 12347", "word"))  # +2: after the two GOOD slots


def test_sanity_good_table_is_wiped(vm: VM) -> None:
    """The same plant with a clean table is wiped (the refusals above are not vacuous)."""
    plant(vm, image())
    vm.disconnect()
    r = run_cli("wipe", "--paused", "--qmp", vm.qmp)
    assert r.returncode == 0, r.stderr
    for gpa, n in GOOD:
        assert vm.pmemsave(gpa, n * P) == bytes(n * P)
    assert vm.pmemsave(0x500000, P) == b"\xa5" * P
    assert vm.status() == "prelaunch"


def test_fill_ranges_get_fresh_random_bytes_verified_and_committed(vm: VM) -> None:
    """A clean v2 table: zero ranges zeroed, fill ranges (8 and 32 bytes inside a page,
    and one ending exactly at a page end) get random bytes that differ per wipe, the
    bytes around them are untouched, and the generation is committed."""
    fills = [(0x500008, 8), (0x500020, 32), (0x500FE0, 32)]
    img = bytearray(image(*(F(g, n) for g, n in fills)))
    plant(vm, bytes(img))
    seen = []
    for _ in range(2):
        gen0 = struct.unpack("<Q", vm.pmemsave(REGION.base + 0x40, 8))[0]
        vm.disconnect()
        r = run_cli("wipe", "--paused", "--qmp", vm.qmp, "--json")
        assert r.returncode == 0, r.stderr
        page = vm.pmemsave(0x500000, P)
        got = b"".join(page[g - 0x500000 : g - 0x500000 + n] for g, n in fills)
        assert got.count(0) < 8 and got not in seen
        seen.append(got)
        rest = bytearray(page)
        for g, n in fills:
            rest[g - 0x500000 : g - 0x500000 + n] = b"\xa5" * n
        assert bytes(rest) == b"\xa5" * P, "bytes beside a fill range changed"
        for gpa, n in GOOD:
            assert vm.pmemsave(gpa, n * P) == bytes(n * P)
        assert struct.unpack("<Q", vm.pmemsave(REGION.base + 0x40, 8))[0] == gen0 + 1
    assert vm.status() == "prelaunch"


def _cli_max_rss(*args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the CLI; its result and its own peak RSS in bytes (wait4, not the children's max)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "vmwipe.host_agent.cli", *args],
                                stdout=out, stderr=err, text=True)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return (subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()),
                usage.ru_maxrss * 1024)


def test_hostile_fill_table_bounded_memory(vm: VM) -> None:
    """A region full of page-long fill ranges (26,624 x 4096 bytes, all the low RAM below
    the region): the wipe fills and verifies them all, and the agent's peak memory stays
    within FILL_CHUNK batches instead of copies of all 104 MiB (it was three)."""
    fills = [(0x800000 + i * P, P) for i in range((REGION.base - 0x800000) // P)]
    fill_bytes = len(fills) * P
    plant(vm, image())
    vm.disconnect()
    base_run, base_rss = _cli_max_rss("wipe", "--paused", "--qmp", vm.qmp)  # a tiny table
    assert base_run.returncode == 0, base_run.stderr
    plant(vm, image(*(F(g, n) for g, n in fills)))
    vm.disconnect()
    r, rss = _cli_max_rss("wipe", "--paused", "--qmp", vm.qmp, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["wipe"]["fill_bytes"] == fill_bytes
    assert rss - base_rss < 3 * FILL_CHUNK + fill_bytes // 4, (
        f"agent peak RSS {rss >> 20} MiB vs {base_rss >> 20} MiB for a tiny table "
        f"({fill_bytes >> 20} MiB of fill ranges)")
    first, last = vm.pmemsave(fills[0][0], P), vm.pmemsave(fills[-1][0], P)
    assert first.count(0xA5) < 64 and last.count(0xA5) < 64 and first != last
    assert vm.status() == "prelaunch"
