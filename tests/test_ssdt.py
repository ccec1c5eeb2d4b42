"""ACPI SSDT: encode, decode back, and cross-check with iasl when it is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmwipe.protocol import Region, SsdtError, decode_ssdt, encode_ssdt


@pytest.mark.parametrize(("base", "size"), [(0x1F00_0000, 1 << 20), (0x1_0000_0000, 8192),
                                            (0x7FFF_E000, 2 << 20), (0x40_0000_0000, 64 << 20)])
def test_round_trip(base: int, size: int) -> None:
    table = encode_ssdt(base, size)
    assert table[:4] == b"SSDT" and sum(table) % 256 == 0
    assert int.from_bytes(table[4:8], "little") == len(table)
    assert decode_ssdt(table) == Region(base, size)


def test_size_matches_iasl_layout() -> None:
    # iasl compiles the same ASL to 140 bytes (measured, see NOTES).
    assert len(encode_ssdt(0x1F00_0000, 1 << 20)) == 140


@pytest.mark.parametrize(("base", "size"), [(0x1F00_0001, 1 << 20), (0x1F00_0000, 4096),
                                            (0x1F00_0000, 10000)])
def test_encoder_refuses_unusable_regions(base: int, size: int) -> None:
    with pytest.raises(ValueError):
        encode_ssdt(base, size)


def test_decoder_rejects_bad_checksum_signature_and_length() -> None:
    good = bytearray(encode_ssdt(0x1F00_0000, 1 << 20))
    bad = bytearray(good)
    bad[60] ^= 1
    with pytest.raises(SsdtError, match="checksum"):
        decode_ssdt(bytes(bad))
    with pytest.raises(SsdtError, match="signature"):
        decode_ssdt(b"DSDT" + bytes(good[4:]))
    with pytest.raises(SsdtError, match="length"):
        decode_ssdt(bytes(good[:-1]))
    with pytest.raises(SsdtError, match="too short"):
        decode_ssdt(b"SSDT")


def test_decoder_never_raises_anything_but_ssdterror_on_truncated_aml() -> None:
    good = encode_ssdt(0x1F00_0000, 1 << 20)
    for cut in range(36, len(good)):
        body = bytearray(good[:cut])
        body[4:8] = len(body).to_bytes(4, "little")
        body[9] = 0
        body[9] = (-sum(body)) & 0xFF
        with pytest.raises(SsdtError):
            decode_ssdt(bytes(body))


@pytest.mark.skipif(shutil.which("iasl") is None, reason="acpica-tools (iasl) not installed")
def test_iasl_disassembles_the_range(tmp_path: Path) -> None:
    aml = tmp_path / "vmwipe.aml"
    aml.write_bytes(encode_ssdt(0x1F00_0000, 1 << 20))
    subprocess.run(["iasl", "-d", str(aml)], check=True, capture_output=True, cwd=tmp_path)
    dsl = (tmp_path / "vmwipe.dsl").read_text()
    assert 'Name (_HID, "VMWP0001")' in dsl
    assert "Return (0x0F)" in dsl
    assert "QWordMemory" in dsl
    assert "0x000000001F000000, // Range Minimum" in dsl
    assert "0x000000001F0FFFFF, // Range Maximum" in dsl
    assert "0x0000000000100000, // Length" in dsl
    # And iasl recompiles its own disassembly to the same bytes' meaning.
    subprocess.run(["iasl", "-p", str(tmp_path / "re"), str(tmp_path / "vmwipe.dsl")],
                   check=True, capture_output=True, cwd=tmp_path)
    assert decode_ssdt((tmp_path / "re.aml").read_bytes()) == Region(0x1F00_0000, 1 << 20)


def _nested_scopes(depth: int) -> bytes:
    """An SSDT of `depth` nested Scope() objects around our own device (valid AML)."""
    from vmwipe.protocol.ssdt import ACPI_HEADER, SCOPE_OP, _pkg

    good = encode_ssdt(0x1F00_0000, 1 << 20)
    aml = good[ACPI_HEADER.size:]
    for _ in range(depth):
        aml = _pkg(bytes([SCOPE_OP]), b"ABCD" + aml)
    table = bytearray(good[:ACPI_HEADER.size] + aml)
    table[4:8] = len(table).to_bytes(4, "little")
    table[9] = 0
    table[9] = (-sum(table)) & 0xFF
    return bytes(table)


def test_deep_nesting_is_a_typed_error_not_recursion() -> None:
    assert decode_ssdt(_nested_scopes(10)) == Region(0x1F00_0000, 1 << 20)
    with pytest.raises(SsdtError, match="nests deeper"):
        decode_ssdt(_nested_scopes(5000))  # ~30 KB; before, RecursionError
