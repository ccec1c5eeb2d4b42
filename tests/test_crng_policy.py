"""The kernel CRNG's registration in every report, and `--require-crng`, on crafted tables.

No QEMU here: the engine wipes a buffer of this process through the real
process_vm backend, the reports are rendered by the real formatters, and the
libvirt metadata by the real XML code.  The same outcomes against real guests
(the refresh active, and `crng_refresh=0`) are in test_kmod_crng.py (CLI) and
test_libvirt.py (the hook and the API flows).
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

import pytest

from vmwipe.host_agent.cli import build_parser
from vmwipe.host_agent.cli.agent import _fmt_report
from vmwipe.host_agent.cli.template import clone_table
from vmwipe.host_agent.errors import EXIT_CODES, CrngNotRegisteredError, ProtectError
from vmwipe.host_agent.flows.fleet import CloneResult
from vmwipe.host_agent.flows.report import FlowReport
from vmwipe.host_agent.libvirt.domain_xml import Protection, protect_xml, read_protection
from vmwipe.host_agent.libvirt.flows import DomainWipe
from vmwipe.host_agent.wipe.backends import ProcessVMBackend, buffer_address
from vmwipe.host_agent.wipe.crng import crng_report
from vmwipe.host_agent.wipe.engine import run_wipe
from vmwipe.host_agent.wipe.memmap import GuestMemoryMap, RamRange
from vmwipe.protocol import (
    CRNG_STATUS_ACTIVE,
    CRNG_STATUS_DISABLED,
    CRNG_STATUS_REFUSED,
    PAGE_SIZE,
    SLOTS_OFFSET,
    Region,
    build_region,
    decode_table,
    encode_fill,
)

P = PAGE_SIZE
RAM_BASE = 0x100000
REGION = Region(RAM_BASE + 8 * P, 2 * P)  # slots: 256
ZERO_PAGE = RAM_BASE + 20 * P
FILLS = [(RAM_BASE + 30 * P + 16, 32), (RAM_BASE + 31 * P, 8)]


def image(crng: tuple[int, int, bytes] | None, fills: list[tuple[int, int]] = FILLS,
          version: int = 2) -> bytes:
    return build_region(REGION.size, [(ZERO_PAGE, 1)], fills=fills if version == 2 else [],
                        crng=crng, version=version)


CASES = {
    "active": ((CRNG_STATUS_ACTIVE, 2, b""), True, "refreshed (2 ranges)"),
    "active, one of two fills": ((CRNG_STATUS_ACTIVE, 1, b""), True, "refreshed (1 range)"),
    "not reported": (None, False, "NOT registered (module did not report)"),
    "disabled": ((CRNG_STATUS_DISABLED, 0, b"crng_refresh=0"), False,
                 "NOT registered (disabled in the guest: crng_refresh=0)"),
    "refused": ((CRNG_STATUS_REFUSED, 0, b"IBT is enabled"), False,
                "NOT registered (refused by the guest module: IBT is enabled)"),
    "refused, no reason": ((CRNG_STATUS_REFUSED, 0, b""), False,
                           "NOT registered (refused by the guest module: no reason given)"),
    "active, no ranges": ((CRNG_STATUS_ACTIVE, 0, b""), False,
                          "NOT registered (module reported active with no fill ranges)"),
}


@pytest.mark.parametrize("case", CASES)
def test_report_of_each_status(case: str) -> None:
    crng, registered, summary = CASES[case]
    rep = crng_report(decode_table(image(crng), REGION))
    assert (rep.registered, rep.summary) == (registered, summary)
    assert rep.line() == f"kernel CRNG: {summary}"
    want_status = {None: "not_reported", 1: "active", 2: "disabled", 3: "refused"}
    assert rep.status == want_status[crng[0] if crng else None]


def test_report_without_a_table_and_of_a_v1_table() -> None:
    rep = crng_report(decode_table(bytes(REGION.size), REGION))
    assert (rep.status, rep.registered) == ("no_table", False)
    assert rep.summary == "NOT registered (no vmwipe table in the region)"
    rep = crng_report(decode_table(image(None, version=1), REGION))
    assert rep.summary == "NOT registered (v1 table: module did not report)"


def test_active_is_not_registered_when_a_fill_range_was_skipped() -> None:
    """--on-invalid skip drops invalid fill ranges: the CRNG's may be among them."""
    raw = bytearray(image((CRNG_STATUS_ACTIVE, 1, b"")))
    bad = encode_fill(REGION.base + 8, 8)  # inside the region: refused
    raw[SLOTS_OFFSET + 3 * 16 : SLOTS_OFFSET + 4 * 16] = bad
    table = decode_table(bytes(raw), REGION, strict=False)
    assert len(table.fills) == 2 and table.fill_slots == 3
    rep = crng_report(table)
    assert not rep.registered and "1 of 3 fill ranges invalid and skipped" in rep.summary


class _Guest:
    """A buffer of this process standing in for guest RAM, reached via process_vm."""

    def __init__(self, region_image: bytes) -> None:
        self.ram = bytearray(b"\xee" * (64 * P))
        off = REGION.base - RAM_BASE
        self.ram[off : off + REGION.size] = region_image
        hva = buffer_address(memoryview(self.ram))
        self.backend = ProcessVMBackend(
            GuestMemoryMap([RamRange(RAM_BASE, 64 * P, "pc.ram", 0, hva=hva)]), os.getpid())


@pytest.mark.parametrize("case", CASES)
def test_require_crng_refuses_before_anything_is_written(case: str) -> None:
    crng, registered, summary = CASES[case]
    guest = _Guest(image(crng))
    before = bytes(guest.ram)
    if registered:
        rep = run_wipe(guest.backend, REGION, require_crng_refresh=True)
        assert rep.status == "wiped" and rep.crng is not None and rep.crng.summary == summary
        off = ZERO_PAGE - RAM_BASE
        assert guest.ram[off : off + P] == bytes(P)
        return
    with pytest.raises(CrngNotRegisteredError, match=r"--require-crng: kernel CRNG: NOT "):
        run_wipe(guest.backend, REGION, require_crng_refresh=True)
    assert bytes(guest.ram) == before  # no page zeroed, no fill, no header bump
    # without the policy the same table is wiped as always, and the report says so
    rep = run_wipe(guest.backend, REGION)
    assert rep.status == "wiped" and rep.crng is not None and rep.crng.summary == summary


def test_require_crng_refuses_a_region_without_a_table() -> None:
    guest = _Guest(bytes(REGION.size))
    with pytest.raises(CrngNotRegisteredError, match="no vmwipe table"):
        run_wipe(guest.backend, REGION, require_crng_refresh=True)
    assert run_wipe(guest.backend, REGION).status == "nothing-registered"


def test_the_policy_has_its_own_exit_code() -> None:
    assert CrngNotRegisteredError.exit_code not in (1, 2, 6)
    assert EXIT_CODES[CrngNotRegisteredError.exit_code].startswith("--require-crng")


# --- the text reports ------------------------------------------------------------------


def _wiped(crng: tuple[int, int, bytes] | None) -> FlowReport:
    guest = _Guest(image(crng))
    rep = FlowReport("restore", "/run/q.sock", 42, "7.2.0", "inmigrate", "running", True)
    rep.wipe = run_wipe(guest.backend, REGION)
    return rep


def test_cli_text_report_names_the_crng() -> None:
    assert "\nkernel CRNG: refreshed (2 ranges)\n" in _fmt_report(_wiped(CASES["active"][0]))
    text = _fmt_report(_wiped(CASES["disabled"][0]))
    assert "\nkernel CRNG: NOT registered (disabled in the guest: crng_refresh=0)\n" in text


def test_json_report_carries_the_crng() -> None:
    d = _wiped(CASES["refused"][0]).to_dict()["wipe"]["crng"]
    assert d == {"status": "refused", "ranges": 0, "reason": "IBT is enabled",
                 "registered": False, "summary": CASES["refused"][2]}


def test_clone_table_has_a_crng_column() -> None:
    clones = [CloneResult(i, 100 + i, f"/d/{i}.qmp", "", _wiped(CASES[c][0]))
              for i, c in enumerate(("active", "not reported"))]
    rows = clone_table(clones).splitlines()
    assert "kernel CRNG" in rows[0]
    assert "refreshed (2 ranges)" in rows[1] and rows[1].endswith("/d/0.qmp")
    assert "NOT registered (module did not report)" in rows[2]
    assert rows[1].split()[:4] == ["0", "100", "1", "running"]  # the columns before stay put


def test_libvirt_summary_is_the_hook_log_line() -> None:
    w = _wiped(CASES["active"][0]).wipe
    res = DomainWipe("g", 42, "wiped", "restored from a saved state", "paused", wipe=w)
    assert "wiped and verified, generation 0 -> 1; kernel CRNG: refreshed (2 ranges)" in \
        res.summary()


# --- the option and the stored policy --------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["wipe", "--qmp", "s"], ["restore", "--qmp", "s", "--from", "f"], ["loadvm", "--qmp", "s", "t"],
    ["clone", "snap"], ["clone", "--template", "d"], ["template", "--qmp", "s", "--dir", "d"],
    ["libvirt", "restore", "f"], ["libvirt", "start", "d"], ["libvirt", "revert", "d", "s"],
    ["libvirt", "protect", "d"],
])
def test_require_crng_is_an_option_of(argv: list[str]) -> None:
    args = build_parser().parse_args([*argv, "--require-crng"])
    assert args.require_crng is True
    assert build_parser().parse_args(argv).require_crng is False


DOMAIN = textwrap.dedent("""\
    <domain type='qemu'>
      <name>g</name><uuid>6a1f2b3c-0000-4000-8000-00000000abce</uuid>
      <memory unit='KiB'>524288</memory>
      <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/k</kernel></os>
      <devices/>
    </domain>""")


def test_protect_stores_the_policy_as_metadata_version_2() -> None:
    state = Path(tempfile.mkdtemp(prefix="vw-"))
    plain = protect_xml(DOMAIN, state)
    strict = protect_xml(plain.xml, state, require_crng=True)
    assert strict.changed and any("require-crng" in a for a in strict.added)
    prot = read_protection(strict.xml)
    assert prot is not None and prot.require_crng and prot.to_attrib()["version"] == "2"
    assert not protect_xml(strict.xml, state, require_crng=True).changed
    back = protect_xml(strict.xml, state)  # protecting again without the flag drops it
    assert back.changed and back.xml == plain.xml
    p1 = read_protection(plain.xml)
    assert p1 is not None and not p1.require_crng and p1.to_attrib()["version"] == "1"


@pytest.mark.parametrize(("version", "value"), [("1", "yes"), ("2", "no"), ("2", "maybe"),
                                                 ("3", "yes")])
def test_metadata_policy_that_does_not_fit_is_refused(version: str, value: str) -> None:
    import xml.etree.ElementTree as ET

    attrib = Protection(0x1F00_0000, 1 << 20, "memmap", "/m", "/s", "/z").to_attrib()
    attrib.update({"version": version, "require-crng": value})
    with pytest.raises(ProtectError):
        Protection.from_element(ET.Element("protect", attrib))
