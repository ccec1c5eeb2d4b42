"""Property tests on every reader of untrusted input, and on the wipe engine itself.

Untrusted input here is: the guest's table (through the real engine, `run_wipe`,
over an in-memory guest), QEMU's `info mtree -f` and `gpa2hva` text, migration
streams and libvirt save images (through the scrubber's planner too).  For
arbitrary input the only outcomes allowed are a result or a typed error
(`AgentError` / `ProtocolError`), and for arbitrary tables and RAM layouts the
engine zeroes only listed whole pages of guest RAM outside the region, writes
only the 16 host-field bytes besides, and writes nothing at all when it refuses.

Budget: HYPOTHESIS_PROFILE=ci (default) for `make test`, =long for `make fuzz`.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vmwipe.host_agent import errors
from vmwipe.host_agent.errors import AgentError
from vmwipe.host_agent.snapshot import migstream as ms
from vmwipe.host_agent.snapshot import saveimage
from vmwipe.host_agent.snapshot.scrub import plan_scrub
from vmwipe.host_agent.wipe.backends import MemoryBackend, Pieces
from vmwipe.host_agent.wipe.engine import run_wipe
from vmwipe.host_agent.wipe.memmap import (
    GuestMemoryMap,
    RamRange,
    load_memory_map,
    parse_flatviews,
    parse_gpa2hva,
    ram_ranges,
    system_view,
)
from vmwipe.protocol import (
    HOST_FIELDS_SIZE,
    PAGE_SIZE,
    SLOTS_OFFSET,
    WIPE_GENERATION_OFFSET,
    Region,
    build_region,
    encode_header,
    encode_slot,
    merge_ranges,
)

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
#: Tests that take an example in milliseconds run more of them.
FAST = settings(PROFILE, max_examples=PROFILE.max_examples * 2)

P = PAGE_SIZE
M = 1 << 20
MTREE = Path(__file__).parent / "data" / "mtree"


# --- the engine over an in-memory guest ----------------------------------------------


class FakeGuest(MemoryBackend):
    """Guest RAM as a model: 0xa5 everywhere, the region image, and the spans zeroed.

    Every zero and write is logged with its guest address, so a test can check
    exactly what the engine touched.  Host addresses are fake (gpa + 1 TiB).
    """

    name = "fake"

    def __init__(self, memmap: GuestMemoryMap, region: Region, image: bytes) -> None:
        super().__init__(memmap)
        self.region = region
        self.image = bytearray(image)
        self.zeroed: list[tuple[int, int]] = []
        self.written: list[tuple[int, bytes]] = []
        self.events: list[str] = []

    def _bytes(self, gpa: int, n: int) -> bytes:
        buf = bytearray(b"\xa5" * n)
        rb, re_ = self.region.base, self.region.end
        lo, hi = max(gpa, rb), min(gpa + n, re_)
        if lo < hi:
            buf[lo - gpa : hi - gpa] = self.image[lo - rb : hi - rb]
        for zg, zn in self.zeroed:
            lo, hi = max(gpa, zg), min(gpa + n, zg + zn)
            if lo < hi:
                buf[lo - gpa : hi - gpa] = bytes(hi - lo)
        for wg, data in self.written:
            lo, hi = max(gpa, wg), min(gpa + n, wg + len(data))
            if lo < hi:
                buf[lo - gpa : hi - gpa] = data[lo - wg : hi - wg]
        return bytes(buf)

    def _check(self, pieces: Pieces) -> None:
        for gpa, n, hva in pieces:
            r = self.memmap.find(gpa)
            assert r is not None and gpa + n <= r.end, f"piece {gpa:#x}+{n:#x} leaves RAM"
            assert r.hva is not None and hva == r.hva + (gpa - r.gpa)

    def _read_pieces(self, pieces: Pieces, dst: int) -> None:
        self._check(pieces)
        off = 0
        for gpa, n, _hva in pieces:
            data = self._bytes(gpa, n)
            ctypes.memmove(dst + off, data, n)
            off += n

    def _write_pieces(self, pieces: Pieces, src: int) -> None:
        self._check(pieces)
        off = 0
        for gpa, n, _hva in pieces:
            self.written.append((gpa, ctypes.string_at(src + off, n)))
            self.events.append("write")
            off += n

    def _zero_pieces(self, pieces: Pieces) -> None:
        self._check(pieces)
        for gpa, n, _hva in pieces:
            self.zeroed.append((gpa, n))
            self.events.append("zero")


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[RamRange], Region]:
    """RAM ranges with holes (sometimes not page aligned, sometimes two pieces of one
    block back to back), and a region inside RAM (usually) or not."""
    ranges: list[RamRange] = []
    pos = draw(st.sampled_from([0, P, 0x100000, 1 << 32]))
    for i in range(draw(st.integers(1, 4))):
        gran = draw(st.sampled_from([P, P, P, 512]))
        pos += draw(st.integers(0, 64)) * gran
        size = draw(st.integers(1, 2048)) * gran
        ranges.append(RamRange(pos, size, f"b{i % 2}", pos, hva=(1 << 40) + pos))
        pos += size
    big = max(ranges, key=lambda r: r.size)
    pages = draw(st.integers(2, 16))
    if draw(st.integers(0, 9)) and big.size >= (pages + 2) * P:
        base = ((big.gpa + P - 1) // P + draw(st.integers(0, big.size // P - pages - 1))) * P
        base = min(base, (big.end - pages * P) // P * P)
    else:
        base = draw(st.integers(0, (1 << 33) // P)) * P
    return ranges, Region(base, pages * P)


def _interesting_addresses(ranges: list[RamRange], region: Region) -> list[int]:
    out = [0, region.base, region.end, region.base - P, region.end - P, (1 << 64) - P]
    for r in ranges:
        for a in (r.gpa, r.end, r.gpa - P, r.end - P, r.gpa + P):
            out.append(a)
    return [a & ~0xFFF & ((1 << 64) - 1) for a in out if a >= 0]


@st.composite
def wipe_cases(draw: st.DrawFn) -> tuple[GuestMemoryMap, Region, bytes, list[bytes]]:
    ranges, region = draw(layouts())
    memmap = GuestMemoryMap(ranges)
    addrs = _interesting_addresses(ranges, region)
    slot = st.builds(
        encode_slot,
        st.one_of(st.sampled_from(addrs), st.sampled_from(addrs).map(lambda a: a + 2 * P),
                  st.integers(0, (1 << 64) - 1).map(lambda a: a & ~0xFFF)),
        st.one_of(st.integers(1, 4), st.sampled_from([0, 1, 2, 0xFFFF_FFFF]),
                  st.integers(0, 0xFFFF_FFFF)),
        valid=st.booleans(),
        low_bits=st.sampled_from([0] * 8 + [2, 0x800]),
        reserved=st.sampled_from([0] * 8 + [1]),
    )
    raw = draw(st.lists(slot, max_size=24))
    image = bytearray(build_region(region.size, []))
    for i, s in enumerate(raw):
        image[SLOTS_OFFSET + 16 * i : SLOTS_OFFSET + 16 * (i + 1)] = s
    if draw(st.integers(0, 19)) == 0:  # now and then a damaged or absent header
        kind = draw(st.sampled_from(["zero", "flip", "size"]))
        if kind == "zero":
            image[:8] = bytes(8)
        elif kind == "flip":
            image[draw(st.integers(0, 0x4F))] ^= 1 << draw(st.integers(0, 7))
        else:
            image[:P] = encode_header(region.size + P)
    return memmap, region, bytes(image), raw


def _listed(raw: list[bytes], region: Region) -> list[tuple[int, int]]:
    out = []
    for s in raw:
        word, npages, _res = struct.unpack("<QII", s)
        if word & 3 == 1:  # a zero range (word & 2: a v2 fill range)
            out.append((word & ~0xFFF, npages * P))
    return out


def _inside(spans: list[tuple[int, int]], g: int, n: int) -> bool:
    return any(a <= g and g + n <= a + s for a, s in spans)


@FAST
@given(wipe_cases(), st.sampled_from(["fail", "skip"]))
def test_fuzz_engine_wipes_only_listed_ram_outside_region(
    case: tuple[GuestMemoryMap, Region, bytes, list[bytes]], on_invalid: str
) -> None:
    memmap, region, image, raw = case
    guest = FakeGuest(memmap, region, image)
    try:
        rep = run_wipe(guest, region, on_invalid)
    except AgentError as e:
        assert "\n" not in str(e)
        assert guest.written == [], "a refused wipe wrote"
        assert guest.zeroed == [] or type(e).__name__ == "VerifyError"
        return
    host = (region.base + WIPE_GENERATION_OFFSET, HOST_FIELDS_SIZE)
    if rep.status == "nothing-registered":
        assert guest.zeroed == [] and guest.written == []
        return
    # only whole listed pages of guest RAM outside the region were zeroed...
    listed = merge_ranges(_listed(raw, region))
    ram = [(r.gpa, r.size) for r in memmap.ranges]
    for g, n in guest.zeroed:
        assert g % P == 0 and n % P == 0 and n > 0
        assert _inside(listed, g, n), f"zeroed {g:#x}+{n:#x} is not a listed page"
        assert any(a <= g and g + n <= a + s for a, s in ram)
        assert g + n <= region.base or g >= region.end
    # ...exactly the valid slots (every page of them) when the engine said so
    assert merge_ranges(guest.zeroed) == merge_ranges(
        (gpa, size) for gpa, size in merge_ranges(_valid_spans(image, region, memmap, rep.invalid))
    )
    # ...the v2 fill ranges, each inside one page of RAM outside the region, with bytes
    # that are not all zero, after every zero...
    fills = _valid_fills(image, region, memmap)
    written = [(g, len(d)) for g, d in guest.written[:-1]]
    assert merge_ranges(written) == merge_ranges(fills)
    for g, n in fills:
        assert g // P == (g + n - 1) // P and any(a <= g and g + n <= a + s for a, s in ram)
        assert g + n <= region.base or g >= region.end
    filled = b"".join(d for _g, d in guest.written[:-1])
    assert len(filled) < 8 or filled.count(0) < len(filled), "a fill range was zeroed"
    assert "zero" not in guest.events[len(guest.events) - len(guest.written):]
    # ...and the last write is the host fields (the commit)
    assert (guest.written[-1][0], len(guest.written[-1][1])) == host
    assert guest.events[-1] == "write"
    assert rep.pages == sum(n for _g, n in guest.zeroed) // P
    assert (rep.fill_ranges, rep.fill_bytes) == (len(fills), sum(n for _g, n in fills))


def _valid_fills(image: bytes, region: Region, memmap: GuestMemoryMap) -> list[tuple[int, int]]:
    from vmwipe.protocol import decode_table

    return [(f.gpa, f.length) for f in decode_table(image, region, memmap.pairs(),
                                                    strict=False).fills]


def _valid_spans(image: bytes, region: Region, memmap: GuestMemoryMap,
                 invalid: list[str]) -> list[tuple[int, int]]:
    from vmwipe.protocol import decode_table  # the validator the engine uses

    table = decode_table(image, region, memmap.pairs(), strict=False)
    assert [str(e) for e in table.errors] == invalid
    return table.ranges()


@FAST
@given(layouts(), st.data())
def test_fuzz_bulk_pieces_match_pieces(layout: tuple[list[RamRange], Region],
                                       data: st.DataObject) -> None:
    """`pieces_of_sorted` resolves every span exactly as `pieces` does, or fails as it does."""
    ranges, _region = layout
    guest = FakeGuest(GuestMemoryMap(ranges), _region, b"")
    addrs = sorted(set(_interesting_addresses(ranges, _region)))
    raw = data.draw(st.lists(st.tuples(st.sampled_from(addrs),
                                       st.sampled_from([P, 2 * P, 5 * P, 300 * P])),
                             max_size=20))
    merged = merge_ranges(raw)
    starts, sizes = [g for g, _n in merged], [n for _g, n in merged]
    chunk = data.draw(st.sampled_from([P, 4 * P, 1 << 20]))
    try:
        want = list(guest.pieces(zip(starts, sizes, strict=True), chunk))
    except AgentError as e:
        with pytest.raises(type(e)):
            guest.pieces_of_sorted(starts, sizes, chunk)
        return
    assert list(guest.pieces_of_sorted(starts, sizes, chunk)) == want


# --- `info mtree -f` and gpa2hva --------------------------------------------------------

CAPTURES = sorted(MTREE.glob("*.mtree.txt"))


def _fake_hmp(mtree: str, gpa2hva: str | None) -> Callable[[str], str]:
    def hmp(cmd: str) -> str:
        if cmd == "info mtree -f":
            return mtree
        assert cmd.startswith("gpa2hva ")
        if gpa2hva is not None:
            return gpa2hva
        gpa = int(cmd.split()[1], 16)
        return f"Host virtual address for {gpa:#x} (blk) is {0x7F0000000000 + gpa:#x}\n"

    return hmp


def _check_map(text: str, blocks: set[str] | None, gpa2hva: str | None = None) -> None:
    try:
        views = parse_flatviews(text)
        for v in views:
            for fr in v.ranges:
                assert fr.start < fr.end
        memmap = load_memory_map(_fake_hmp(text, gpa2hva), blocks)
    except AgentError as e:
        assert "\n" not in str(e)
        return
    ends = [(r.gpa, r.end) for r in memmap.ranges]
    for (_a0, a1), (b0, _b1) in itertools.pairwise(ends):
        assert a1 <= b0, "overlapping RAM ranges accepted"
    for r in memmap.ranges:
        assert r.size > 0, f"empty or negative RAM range {r}"
        assert r.hva is not None
        assert memmap.find(r.gpa) == r and memmap.find(r.end - 1) == r


@PROFILE
@given(st.text(max_size=2000), st.one_of(st.none(), st.just({"pc.ram"})))
def test_fuzz_mtree_arbitrary_text(text: str, blocks: set[str] | None) -> None:
    _check_map(text, blocks)


_hexnum = st.integers(0, (1 << 64) - 1).map(lambda v: f"{v:016x}")
_line = st.builds(
    lambda s, e, prio, kind, name, off: f"    {s}-{e} (prio {prio}, {kind}): {name}{off}",
    _hexnum, _hexnum, st.integers(-5, 5), st.sampled_from(["ram", "rom", "i/o", "romd", "ramd"]),
    st.sampled_from(["pc.ram", "pc.ram @x", "m0", "vga.vram", "", "pc.bios"]),
    st.one_of(st.just(""), _hexnum.map(lambda h: f" @{h}"), st.just(" KVM")),
)


@PROFILE
@given(st.lists(_line, max_size=12), st.one_of(st.none(), st.just({"pc.ram", "m0"})))
def test_fuzz_mtree_forged_ranges(lines: list[str], blocks: set[str] | None) -> None:
    text = "FlatView #0\n AS \"memory\", root: system\n Root memory region: system\n"
    _check_map(text + "\n".join(lines) + "\n", blocks)


@PROFILE
@given(st.sampled_from(CAPTURES), st.data())
def test_fuzz_mtree_mutated_captures(path: Path, data: st.DataObject) -> None:
    lines = path.read_text().splitlines()
    for _ in range(data.draw(st.integers(1, 6))):
        if not lines:
            break
        i = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["drop", "dup", "char", "swap"]))
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = data.draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif lines[i]:
            k = data.draw(st.integers(0, len(lines[i]) - 1))
            c = data.draw(st.sampled_from("0123456789abcdefF-@ ():,x\"\n"))
            lines[i] = lines[i][:k] + c + lines[i][k + 1 :]
    gpa2hva = data.draw(st.one_of(st.none(), st.text(max_size=80)))
    _check_map("\n".join(lines) + "\n", data.draw(st.one_of(st.none(), st.just({"pc.ram"}))),
               gpa2hva)


@PROFILE
@given(st.text(max_size=200))
def test_fuzz_gpa2hva(text: str) -> None:
    try:
        hva = parse_gpa2hva(text)
    except AgentError:
        return
    assert hva >= 0


def test_fuzz_captures_still_parse() -> None:
    """The mutation corpus is real: each capture yields guest RAM unmutated."""
    assert CAPTURES
    for path in CAPTURES:
        assert ram_ranges(system_view(path.read_text()), None)


# --- migration streams, libvirt save images, and the scrubber's planner --------------------

QEVM = b"QEVM\x00\x00\x00\x03"


def _section_bytes() -> st.SearchStrategy[bytes]:
    """Plausible pieces of a stream: section headers, RAM records, a description."""
    idstr = st.sampled_from([b"ram", b"pc.ram", b"apic", b"", b"x" * 255])
    u8s = st.integers(0, 255).map(lambda v: bytes([v]))
    be32 = st.integers(0, (1 << 32) - 1).map(lambda v: struct.pack(">I", v))
    be64 = st.one_of(
        st.integers(0, (1 << 64) - 1),
        st.builds(lambda off, fl: (off << 12) | fl, st.integers(0, 1 << 20),
                  st.sampled_from([0x02, 0x04, 0x08, 0x10, 0x20, 0x22, 0x28, 0x40, 0x200])),
    ).map(lambda v: struct.pack(">Q", v))
    start = st.builds(lambda sid, name, inst, ver: b"\x01" + sid + bytes([len(name)]) + name
                      + inst + ver, be32, idstr, be32, be32)
    desc = st.builds(lambda j: b"\x00\x06" + struct.pack(">I", len(j)) + j,
                     st.sampled_from([b"{}", b'{"devices": []}', b"[", b'{"page_size": 4096}',
                                      b'{"devices": [{"name": "ram"}]}']))
    return st.one_of(u8s, be32, be64, start, desc, st.binary(max_size=40),
                     st.just(b"\x7e"), st.just(b"\x00" * 4096))


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    head = draw(st.sampled_from([QEVM, QEVM, b"QEVM\x00\x00\x00\x02", b"QEV"]))
    return head + b"".join(draw(st.lists(_section_bytes(), max_size=30)))


def _scrub_plan(blob: bytes) -> None:
    try:
        plan_scrub(blob, machine="pc", mem=512 * M, region=Region(0x1F000000, M))
    except AgentError as e:
        assert "\n" not in str(e)


@PROFILE
@given(st.one_of(st.binary(max_size=600), streams()))
def test_fuzz_migstream_index(blob: bytes) -> None:
    try:
        idx = ms.index_stream(blob)
    except errors.StreamError as e:
        assert "\n" not in str(e)
        return
    assert idx.end <= len(blob)


@PROFILE
@given(st.one_of(st.binary(max_size=600), streams()))
def test_fuzz_scrub_plan_on_arbitrary_files(blob: bytes) -> None:
    _scrub_plan(blob)


@PROFILE
@given(st.binary(max_size=200), st.one_of(st.none(), st.integers(0, 1 << 40)))
def test_fuzz_saveimage_arbitrary(data: bytes, size: int | None) -> None:
    try:
        hdr = saveimage.parse_header(data, size)
    except errors.StreamError as e:
        assert "\n" not in str(e)
        return
    assert hdr.stream_offset >= saveimage.HEADER_SIZE
    saveimage.domain_xml(data, hdr)


@PROFILE
@given(st.integers(0, (1 << 32) - 1), st.integers(0, 7), st.integers(0, (1 << 32) - 1),
       st.sampled_from([0, 1, 2, 3, 0xFFFF_FFFF]), st.booleans(), st.binary(max_size=300),
       st.one_of(st.just(b""), streams()))
def test_fuzz_saveimage_forged_headers(data_len: int, fmt: int, cookie: int, version: int,
                                       running: bool, body: bytes, stream: bytes) -> None:
    head = saveimage.build_header(data_len, was_running=running, fmt=fmt, cookie_offset=cookie,
                                  version=version)
    blob = head + body + stream
    try:
        hdr = saveimage.parse_header(blob, len(blob))
    except errors.StreamError:
        pass
    else:
        assert hdr.stream_offset + 8 <= len(blob)
        saveimage.domain_xml(blob, hdr)
    _scrub_plan(blob)


class Blob(bytes):
    """bytes with a short repr (hypothesis prints the arguments of a failing example)."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def real_stream(tmp_path_factory: pytest.TempPathFactory) -> Blob:
    """A real QEMU save of a -S VM holding a valid table (three listed pages)."""
    from conftest import REGION, VM, qemu_available, start_vm

    if not qemu_available():
        pytest.skip("QEMU not installed")
    d = tmp_path_factory.mktemp("fuzz-stream")
    vm: VM = start_vm(d, ["-M", "pc", "-m", "512M"])
    try:
        vm.plant([(0x200000, 2), (0x300000, 1)])
        assert REGION.base == 0x1F000000
        s = vm.session()
        s.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        s.cmd("migrate", {"uri": f"exec:cat > {d / 'snap'}"})
        s.wait_until(lambda: s.cmd("query-migrate").get("status") == "completed" or None,
                     60, "the save")
    finally:
        vm.kill()
    return Blob((d / "snap").read_bytes())


@settings(PROFILE, suppress_health_check=[HealthCheck.too_slow,
                                          HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_scrub_plan_on_damaged_real_save(real_stream: Blob, data: st.DataObject) -> None:
    """A real save, damaged anywhere: the planner returns a plan or a typed error; a plan
    never lists a write outside the file or one that is not a whole page record's data."""
    blob = bytearray(real_stream)
    wrap = data.draw(st.booleans())
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "table", "truncate", "insert"]))
        if not blob:
            break
        if kind == "flip":
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        elif kind == "table":  # damage a copy of the vmwipe table inside the stream
            at = blob.find(b"VMWIPEv2")
            if at >= 0:
                blob[at + data.draw(st.integers(0, 2 * P))] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            del blob[data.draw(st.integers(0, len(blob) - 1)):]
        else:
            blob.insert(data.draw(st.integers(0, len(blob))), data.draw(st.integers(0, 255)))
    if wrap:
        xml = b"<domain/>\0"
        blob = bytearray(saveimage.build_header(len(xml)) + xml) + blob
    assume(len(blob) > 8)
    try:
        plan = plan_scrub(bytes(blob), machine="pc", mem=512 * M, region=Region(0x1F000000, M))
    except AgentError as e:
        assert "\n" not in str(e)
        return
    for pos, size in plan.writes:
        assert pos >= 0 and pos + size <= len(blob) and 0 < size <= P
