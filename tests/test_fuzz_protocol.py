"""Property tests: untrusted bytes give a result or a typed error, never anything else.

The budget is fixed for `make test`; `make fuzz` sets HYPOTHESIS_PROFILE=long.
"""

from __future__ import annotations

import contextlib
import itertools
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwipe.protocol import (
    PAGE_SIZE,
    SLOTS_OFFSET,
    ProtocolError,
    Region,
    SsdtError,
    build_region,
    decode_ssdt,
    decode_table,
    encode_slot,
    encode_ssdt,
)

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REGION = Region(0x1F00_0000, 16 * PAGE_SIZE)  # small region: 3,840 slots
RAM = [(0, 0xA0000), (0x10_0000, 0x1F00_0000 - 0x10_0000), (0x1F01_0000, 0x10_0000),
       (1 << 32, 1 << 28)]

addresses = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0, 0x9F000, 0xA0000, 0xFFFFF000, REGION.base, REGION.base - 4096,
                     REGION.end, 1 << 32, (1 << 32) + (1 << 28) - 4096, (1 << 64) - 4096]),
)
slots = st.builds(
    encode_slot,
    addresses.map(lambda a: a & ~0xFFF),
    st.one_of(st.integers(0, 0xFFFF_FFFF), st.sampled_from([0, 1, 2, 0xFFFF_FFFF])),
    valid=st.booleans(),
    low_bits=st.sampled_from([0, 0, 0, 2, 0x800]),
    reserved=st.sampled_from([0, 0, 0, 1]),
)


def _inside_ram(gpa: int, size: int) -> bool:
    return any(s <= gpa and gpa + size <= s + n for s, n in _merged(RAM))


def _merged(ram: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, n in sorted(ram):
        if out and s <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], s + n - out[-1][0])
        else:
            out.append([s, n])
    return [(s, n) for s, n in out]


@PROFILE
@given(st.lists(slots, max_size=40), st.booleans())
def test_wipe_set_always_inside_ram_outside_region(raw_slots: list[bytes], strict: bool) -> None:
    image = bytearray(build_region(REGION.size, []))
    for i, raw in enumerate(raw_slots):
        image[SLOTS_OFFSET + 16 * i : SLOTS_OFFSET + 16 * (i + 1)] = raw
    try:
        table = decode_table(bytes(image), REGION, RAM, strict=strict)
    except ProtocolError:
        return
    spans = sorted(table.ranges())
    for gpa, size in spans:
        assert size > 0 and gpa % PAGE_SIZE == 0
        assert _inside_ram(gpa, size)
        assert gpa + size <= REGION.base or gpa >= REGION.end
    for (a, asize), (b, _) in itertools.pairwise(spans):
        assert a + asize <= b, "overlapping ranges reached the wipe set"


@PROFILE
@given(st.binary(min_size=0, max_size=REGION.size + 64))
def test_arbitrary_region_bytes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_table(data, REGION, RAM)


@PROFILE
@given(st.binary(max_size=300))
def test_arbitrary_ssdt_bytes(data: bytes) -> None:
    with contextlib.suppress(SsdtError):
        decode_ssdt(data)


@PROFILE
@given(st.data())
def test_mutated_ssdt(data: st.DataObject) -> None:
    table = bytearray(encode_ssdt(0x1F00_0000, 1 << 20))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(36, len(table) - 1))
        table[pos] = data.draw(st.integers(0, 255))
    table[9] = 0
    table[9] = (-sum(table)) & 0xFF
    try:
        region = decode_ssdt(bytes(table))
    except SsdtError:
        return
    assert region.base % PAGE_SIZE == 0 and region.size >= 2 * PAGE_SIZE
