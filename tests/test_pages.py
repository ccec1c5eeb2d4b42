"""The shared backend's C loops (host_agent/wipe/_pages.c): their effect and a clean build."""

from __future__ import annotations

from array import array

import pytest

from vmwipe.host_agent.wipe import _pages
from vmwipe.host_agent.wipe.backends import buffer_address


def _columns(buf: bytearray, spans: list[tuple[int, int]]) -> tuple[array[int], array[int]]:
    base = buffer_address(memoryview(buf))
    return array("Q", [base + off for off, _n in spans]), array("Q", [n for _o, n in spans])


def test_zero_touches_exactly_the_spans() -> None:
    buf = bytearray(b"\xab" * (1 << 20))
    spans = [(4096, 4096), (65536, 200_000), (1_000_000, 1)]
    _pages.zero(*_columns(buf, spans))
    want = bytearray(b"\xab" * (1 << 20))
    for off, n in spans:
        want[off : off + n] = bytes(n)
    assert buf == want


def test_first_nonzero_finds_the_first_dirty_span() -> None:
    buf = bytearray(1 << 20)
    spans = [(0, 4096), (8192, 300_000), (500_000, 4096)]
    assert _pages.first_nonzero(*_columns(buf, spans)) == -1
    buf[8192 + 250_000] = 1  # past the C loop's first 64 KiB comparison chunk
    buf[500_000] = 1
    assert _pages.first_nonzero(*_columns(buf, spans)) == 1
    assert _pages.first_nonzero(*_columns(buf, spans[2:])) == 0
    assert _pages.first_nonzero(array("Q"), array("Q")) == -1


def test_columns_must_match() -> None:
    buf = bytearray(8192)
    addrs, lens = _columns(buf, [(0, 4096), (4096, 4096)])
    with pytest.raises(ValueError, match="one length"):
        _pages.zero(addrs, lens[:1])
    with pytest.raises(ValueError, match="uint64"):
        _pages.first_nonzero(array("B", b"1234567"), array("B", b"1234567"))
    assert buf == bytearray(8192)
