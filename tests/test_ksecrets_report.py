"""The kernel's other per-boot secrets in every report, on crafted tables (issue 26).

No QEMU here, as in test_crng_policy.py: the engine wipes a buffer of this
process through the real process_vm backend and the real formatters render
the reports.  The module's side, in a real guest, is test_ksecrets_clone.py.
"""

from __future__ import annotations

import os

import pytest

from vmwipe.host_agent.cli.agent import _fmt_report
from vmwipe.host_agent.cli.template import clone_table
from vmwipe.host_agent.flows.fleet import CloneResult
from vmwipe.host_agent.flows.report import FlowReport
from vmwipe.host_agent.libvirt.flows import DomainWipe
from vmwipe.host_agent.wipe.backends import ProcessVMBackend, buffer_address
from vmwipe.host_agent.wipe.engine import run_wipe
from vmwipe.host_agent.wipe.ksecrets import ksecrets_report
from vmwipe.host_agent.wipe.memmap import GuestMemoryMap, RamRange
from vmwipe.protocol import (
    CRNG_STATUS_ACTIVE,
    KSECRETS_REPORTED,
    PAGE_SIZE,
    SLOTS_OFFSET,
    Region,
    build_region,
    decode_table,
    encode_fill,
)

P = PAGE_SIZE
RAM_BASE = 0x100000
REGION = Region(RAM_BASE + 8 * P, 2 * P)
ZERO_PAGE = RAM_BASE + 20 * P
# the CRNG's one range, then three 16-byte keys
FILLS = [(RAM_BASE + 30 * P, 32), *((RAM_BASE + 31 * P + 16 * i, 16) for i in range(3))]
ALL = KSECRETS_REPORTED | 0b10011  # net_secret, ts_secret, ptr_key

CASES = {
    "three": ((ALL, 3), ("net_secret", "ts_secret", "ptr_key"),
              "net_secret, ts_secret, ptr_key (3 ranges)"),
    "reported, none": ((KSECRETS_REPORTED, 0), (),
                       "none registered (the guest's sysfs kernel_secrets says why)"),
    "not reported": (None, (), "none (not reported by the guest module)"),
}


def image(ksecrets: tuple[int, int] | None) -> bytes:
    return build_region(REGION.size, [(ZERO_PAGE, 1)], fills=FILLS,
                        crng=(CRNG_STATUS_ACTIVE, 1, b""), ksecrets=ksecrets)


@pytest.mark.parametrize("case", CASES)
def test_report_names_what_the_mask_and_the_valid_fills_say(case: str) -> None:
    ksecrets, names, summary = CASES[case]
    rep = ksecrets_report(decode_table(image(ksecrets), REGION))
    assert rep.names == names and rep.summary == summary
    assert rep.line() == f"kernel secrets: {summary}"


def test_no_table() -> None:
    rep = ksecrets_report(decode_table(bytes(REGION.size), REGION))
    assert not rep.reported and rep.summary == "none (no vmwipe table in the region)"


def test_a_skipped_fill_range_means_not_registered() -> None:
    """Lenient decoding skipped an invalid fill slot: the secrets may be the skipped one."""
    data = bytearray(image((ALL, 3)))
    bad = encode_fill(REGION.base + 16, 16)  # inside the region itself: invalid
    data[SLOTS_OFFSET + 16 * 5 : SLOTS_OFFSET + 16 * 6] = bad
    table = decode_table(bytes(data), REGION, strict=False)
    assert table.errors and len(table.fills) < table.fill_slots
    rep = ksecrets_report(table)
    assert rep.names == () and rep.summary.startswith("NOT registered (1 of 5 fill ranges")


class _Guest:
    """A buffer of this process standing in for guest RAM, reached via process_vm."""

    def __init__(self, region_image: bytes) -> None:
        self.ram = bytearray(b"\xee" * (64 * P))
        off = REGION.base - RAM_BASE
        self.ram[off : off + REGION.size] = region_image
        hva = buffer_address(memoryview(self.ram))
        self.backend = ProcessVMBackend(
            GuestMemoryMap([RamRange(RAM_BASE, 64 * P, "pc.ram", 0, hva=hva)]), os.getpid())


def _wiped(ksecrets: tuple[int, int] | None) -> FlowReport:
    guest = _Guest(image(ksecrets))
    rep = FlowReport("restore", "/run/q.sock", 42, "7.2.0", "inmigrate", "running", True)
    rep.wipe = run_wipe(guest.backend, REGION)
    # the keys were refilled as every fill range is
    for gpa, n in FILLS[1:]:
        assert guest.ram[gpa - RAM_BASE : gpa - RAM_BASE + n] != b"\xee" * n
    return rep


def test_text_json_clone_table_and_hook_line_name_them() -> None:
    rep = _wiped(CASES["three"][0])
    want = "kernel secrets: net_secret, ts_secret, ptr_key (3 ranges)"
    assert f"\n{want}\n" in _fmt_report(rep)
    assert rep.to_dict()["wipe"]["ksecrets"] == {
        "reported": True, "names": ("net_secret", "ts_secret", "ptr_key"), "ranges": 3,
        "summary": CASES["three"][2]}
    rows = clone_table([CloneResult(0, 100, "/d/0.qmp", "", rep)]).splitlines()
    assert "kernel secrets" in rows[0] and CASES["three"][2] in rows[1]
    assert rows[1].endswith("/d/0.qmp")
    assert rep.wipe is not None
    res = DomainWipe("g", 42, "wiped", "restored from a saved state", "paused", wipe=rep.wipe)
    assert f"kernel CRNG: refreshed (1 range); {want}" in res.summary()
