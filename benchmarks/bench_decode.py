"""Benchmark 3: decode and validate a full 1 MiB region (65,280 slots).

Baseline: a bare `struct.iter_unpack` over the same bytes, which only splits the
slots and checks nothing; the ratio is the price of validation.
"""

from __future__ import annotations

import random
import struct

from vmwipe.protocol import Region, build_region, decode_table, slot_count_for

from .harness import Row, side_by_side, verdict

REGION = Region(0x1F00_0000, 1 << 20)
RAM = [(0, 0xA0000), (0x10_0000, 0x1F00_0000 - 0x10_0000), (0x1F10_0000, 0xE0_0000),
       (1 << 32, 1 << 30)]


def run(quick: bool = False) -> list[Row]:
    n = slot_count_for(REGION.size)
    rows = []
    for case, order in (("65,280 slots, ascending", list(range(n))),
                        ("65,280 slots, shuffled", random.Random(1).sample(range(n), n)),
                        ("empty table", [])):
        image = build_region(REGION.size, [((1 << 32) + i * 8192, 1) for i in order])

        def subject(image: bytes = image) -> object:
            return decode_table(image, REGION, RAM)

        def baseline(image: bytes = image) -> object:
            return sum(1 for w, _n, _r in struct.iter_unpack("<QII", image[4096:]) if w)

        a, b = side_by_side(subject, baseline, repeat=5 if quick else 15)
        rows.append(Row("decode+validate", case, a, b, "struct.iter_unpack", "< 20 ms",
                        verdict=verdict(a.median_ms < 20.0)))
    return rows
