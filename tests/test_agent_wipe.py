"""Planted-table wipes in a real paused QEMU, under TCG and (where it starts) KVM.

The VM has RAM below 4 GiB (pc.ram) and above it (a pc-dimm at 4 GiB), so slots
land in two RAM blocks.  Each test plants pages and a table through the agent's
own write path, wipes, and checks with `pmemsave` that exactly the listed pages
are zero and every other byte of guest RAM (minus the 16 host-field bytes) is
unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    HIGH,
    REGION,
    SMALL_MACHINE,
    VM,
    accel_params,
    require_accel,
    run_cli,
    start_vm,
)

from vmwipe.host_agent.flows.live import wipe_flow
from vmwipe.host_agent.flows.target import AgentOptions
from vmwipe.host_agent.wipe.engine import run_wipe
from vmwipe.protocol import (
    HOST_FIELDS_SIZE,
    PAGE_SIZE,
    SLOTS_OFFSET,
    WIPE_GENERATION_OFFSET,
    build_region,
    encode_header,
    encode_slot,
    merge_ranges,
)

P = PAGE_SIZE
M = 1 << 20
DIMM = 64 * M

#: Slots on both sides of 4 GiB, next to the legacy hole, hugging the region,
#: at the very end of each RAM block, plus two that coalesce.
SLOTS = [
    (0x9F000, 1),
    (0x100000, 16),
    (0x110000, 2),  # adjacent to the previous slot: coalesces
    (0x1000000, 256),
    (REGION.base - P, 1),
    (REGION.base + REGION.size, 3),
    (512 * M - P, 1),
    (HIGH, 4),
    (HIGH + 0x10000, 1),
    (HIGH + DIMM - 2 * P, 2),
]


@pytest.fixture(scope="module", params=accel_params())
def vm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    accel = str(request.param)
    require_accel(accel)
    v = start_vm(tmp_path_factory.mktemp(f"wipe-{accel}"), SMALL_MACHINE, accel)
    yield v
    v.kill()


def host_fields_span() -> tuple[int, int]:
    return (REGION.base + WIPE_GENERATION_OFFSET, HOST_FIELDS_SIZE)


def plant_with_neighbours(vm: VM, slots: list[tuple[int, int]], image: bytes | None = None) -> None:
    """Listed pages get 0xa5; the page before and after each slot gets 0x5a (must survive)."""
    for gpa, n in slots:
        for g in (gpa - P, gpa + n * P):
            if vm.target().memmap.find(g) is not None and not (
                REGION.base <= g < REGION.base + REGION.size
            ):
                vm.write(g, b"\x5a" * P)
    vm.plant(slots, image=image)


def listed(slots: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return merge_ranges((g, n * P) for g, n in slots)


def assert_zero(vm: VM, spans: list[tuple[int, int]]) -> None:
    for gpa, size in spans:
        assert vm.pmemsave(gpa, size).count(0) == size, f"{gpa:#x}+{size:#x} not zero"


def test_wipe_exact_pages(vm: VM) -> None:
    plant_with_neighbours(vm, SLOTS)
    exclude = [*listed(SLOTS), host_fields_span()]
    before = vm.ram_digest(exclude)
    gen0, _ = vm.header_host_fields()

    rep = wipe_flow(vm.session(), AgentOptions(), do_resume=False)

    assert rep.wipe is not None
    w = rep.wipe
    pages = sum(n for _g, n in SLOTS)
    n = len(SLOTS)
    assert (w.status, w.slots_used, w.slots_valid, w.pages) == ("wiped", n, n, pages)
    assert w.bytes == pages * P and w.backend == "process_vm"
    assert w.spans == len(listed(SLOTS))
    assert {"read", "validate", "zero", "verify", "commit"} <= set(w.timings_ms)
    assert rep.region_source.startswith("acpitable:")
    assert_zero(vm, listed(SLOTS))
    assert vm.ram_digest(exclude) == before
    assert vm.header_host_fields() == (gen0 + 1, pages)
    assert vm.status() == "prelaunch"


def test_expect_zero_reads_first_and_writes_only_what_is_not_zero(vm: VM) -> None:
    """A template clone's wipe (`expect_zero`): pages that read zero are not written; a
    listed page that is not zero still gets the full zero-and-verify."""
    plant_with_neighbours(vm, SLOTS)  # listed pages hold 0xa5
    exclude = [*listed(SLOTS), host_fields_span()]
    before = vm.ram_digest(exclude)
    gen0, _ = vm.header_host_fields()
    t = vm.target()
    try:
        first = run_wipe(t.backend, t.region, expect_zero=True)
        assert first.status == "wiped" and not first.already_zero
        assert "zero" in first.timings_ms
        assert_zero(vm, listed(SLOTS))
        second = run_wipe(t.backend, t.region, expect_zero=True)
    finally:
        t.close()
    assert second.status == "wiped" and second.already_zero
    assert "zero" not in second.timings_ms and "verify" in second.timings_ms
    assert second.pages == first.pages == sum(n for _g, n in SLOTS)
    assert vm.ram_digest(exclude) == before
    assert vm.header_host_fields() == (gen0 + 2, first.pages)


def test_generation_counts_up_and_empty_table(vm: VM) -> None:
    vm.plant([], image=build_region(REGION.size, [(0x200000, 1)]))
    wipe_flow(vm.session(), AgentOptions(), do_resume=False)
    first = vm.header_host_fields()
    rep = wipe_flow(vm.session(), AgentOptions(), do_resume=False)
    assert rep.wipe is not None and rep.wipe.pages == 1
    assert vm.header_host_fields() == (first[0] + 1, 1)
    # a header with no slots: wiped zero pages, generation still advances
    vm.plant([], image=encode_header(REGION.size, wipe_generation=7) + bytes(REGION.size - P))
    rep = wipe_flow(vm.session(), AgentOptions(), do_resume=False)
    assert rep.wipe is not None and (rep.wipe.status, rep.wipe.pages) == ("wiped", 0)
    assert vm.header_host_fields() == (8, 0)


def test_nothing_registered_writes_nothing(vm: VM) -> None:
    vm.write(REGION.base, bytes(REGION.size))
    vm.write(0x300000, b"\x77" * P)
    before = vm.ram_digest()
    rep = wipe_flow(vm.session(), AgentOptions(), do_resume=False)
    assert rep.wipe is not None and rep.wipe.status == "nothing-registered"
    assert vm.ram_digest() == before


def forged(*slots: bytes, header: bytes | None = None) -> bytes:
    image = bytearray(build_region(REGION.size, []))
    if header is not None:
        image[: len(header)] = header
    for i, raw in enumerate(slots):
        image[SLOTS_OFFSET + 16 * i : SLOTS_OFFSET + 16 * (i + 1)] = raw
    return bytes(image)


def _bad_crc() -> bytes:
    h = bytearray(encode_header(REGION.size))
    h[0x38] ^= 1
    return bytes(h)


GOOD = encode_slot(0x400000, 2)
INVALID_TABLES = {
    "bad-magic": (forged(GOOD, header=b"VMWIPEv9"), "magic"),
    "bad-crc": (forged(GOOD, header=_bad_crc()), "header_crc32"),
    "wrong-region-size": (forged(GOOD, header=encode_header(2 * REGION.size)), "region_size"),
    "low-bits": (forged(GOOD, encode_slot(0x500000, 1, low_bits=0x4)), "slot 1"),
    "reserved": (forged(GOOD, encode_slot(0x500000, 1, reserved=1)), "slot 1"),
    "npages-0": (forged(GOOD, encode_slot(0x500000, 0)), "slot 1"),
    "in-legacy-rom": (forged(GOOD, encode_slot(0xC0000, 1)), "slot 1"),
    "past-ram-end": (forged(GOOD, encode_slot(512 * M - P, 2)), "slot 1"),
    "past-dimm-end": (forged(GOOD, encode_slot(HIGH + DIMM - P, 2)), "slot 1"),
    "in-pci-hole": (forged(GOOD, encode_slot(0xE0000000, 1)), "slot 1"),
    "overlaps-region": (forged(GOOD, encode_slot(REGION.base - P, 2)), "slot 1"),
    "overflow": (forged(GOOD, encode_slot((1 << 64) - P, 2)), "slot 1"),
    "duplicate": (forged(GOOD, encode_slot(0x401000, 1)), "slot"),
}


@pytest.mark.parametrize("case", sorted(INVALID_TABLES))
def test_invalid_table_keeps_vm_paused(vm: VM, case: str) -> None:
    image, needle = INVALID_TABLES[case]
    vm.write(0x400000, b"\xa5" * 2 * P)
    vm.write(0x500000, b"\xa5" * P)
    vm.write(REGION.base, image)
    fields = vm.header_host_fields()
    vm.disconnect()
    r = run_cli("wipe", "--qmp", vm.qmp)
    assert r.returncode == 6, r.stderr
    line = r.stderr.strip()
    assert line.startswith("vmwipe: error: invalid") and "\n" not in line and needle in line
    assert vm.status() == "prelaunch"
    assert vm.pmemsave(0x400000, 2 * P) == b"\xa5" * 2 * P
    assert vm.pmemsave(0x500000, P) == b"\xa5" * P
    assert vm.header_host_fields() == fields


def test_on_invalid_skip_wipes_valid_slots_only(vm: VM) -> None:
    image = forged(encode_slot(0x400000, 2), encode_slot(0xC0000, 1), encode_slot(HIGH, 1))
    vm.write(0x400000, b"\xa5" * 2 * P)
    vm.write(HIGH, b"\xa5" * P)
    vm.write(REGION.base, image)
    vm.disconnect()
    r = run_cli("wipe", "--paused", "--qmp", vm.qmp, "--on-invalid", "skip", "--json")
    assert r.returncode == 0, r.stderr
    w = json.loads(r.stdout)["wipe"]
    assert w["status"] == "wiped-skipping-invalid" and w["pages"] == 3
    assert len(w["invalid"]) == 1 and "slot 1" in w["invalid"][0]
    assert_zero(vm, [(0x400000, 2 * P), (HIGH, P)])


def test_cli_wipe_report_and_json(vm: VM) -> None:
    vm.plant([(0x600000, 3), (HIGH + 0x100000, 5)])
    vm.disconnect()
    r = run_cli("wipe", "--paused", "--qmp", vm.qmp, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["command"] == "wipe" and rep["pid"] == vm.pid and rep["resumed"] is False
    assert rep["wipe"]["pages"] == 8 and rep["state_after"] == "prelaunch"
    vm.plant([(0x600000, 3)])
    r = run_cli("wipe", "--paused", "--qmp", vm.qmp)
    assert r.returncode == 0 and "3 pages" in r.stdout and "VM left paused" in r.stdout
    r = run_cli("inspect", "--qmp", vm.qmp, "--json")
    info = json.loads(r.stdout)["extra"]
    assert info["registered"] and info["header"]["wipe_pages"] == 3
    assert info["slots"] == [{"index": 0, "gpa": 0x600000, "npages": 3}]


def test_region_override_and_unreadable_region(vm: VM) -> None:
    vm.plant([(0x700000, 1)])
    vm.disconnect()
    r = run_cli("wipe", "--paused", "--qmp", vm.qmp, "--region", f"{REGION.base:#x}:1M", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["region_source"] == "--region"
    # a region outside guest RAM cannot be read: one-line error, VM untouched
    r = run_cli("wipe", "--paused", "--qmp", vm.qmp, "--region", "0xe0000000:1M",
                "--no-reset-guard")
    assert r.returncode == 5 and "not readable guest RAM" in r.stderr
    r = run_cli("wipe", "--paused", "--qmp", vm.qmp, "--region", "0x1234:1M")
    assert r.returncode == 2 and "base 0x1234 is not 4 KiB aligned" in r.stderr


def test_system_reset_clears_the_header(vm: VM, tmp_path: Path) -> None:
    """The reset guard's premise: -device loader rewrites the header page on reset."""
    vm.plant([(0x800000, 1)])
    assert vm.pmemsave(REGION.base, 8) == b"VMWIPEv2"
    vm.session().cmd("system_reset")
    assert vm.pmemsave(REGION.base, P).count(0) == P
    assert vm.status() == "prelaunch"
