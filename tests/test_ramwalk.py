"""The scrub's C record hop and listed-page lookup (host_agent/snapshot/_ramwalk.c).

They replace Python loops of the stream walker, so each is checked against the
Python it replaces: the same index on real QEMU streams (QEMU 7.2 and, when
present, 10.x), the same verdict on damaged and crafted streams, the same
copies of wanted pages, and a build without warnings.
"""

from __future__ import annotations

import random
import struct
from array import array
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_migstream import QEMU10, QEMU72, Vm, have, save_stream

from vmwipe.host_agent import errors
from vmwipe.host_agent.snapshot import _ramwalk
from vmwipe.host_agent.snapshot import migstream as ms

PAGE_CONT = ms.RAM_PAGE | ms.RAM_CONTINUE
ZERO_CONT = ms.RAM_ZERO | ms.RAM_CONTINUE


def _plant() -> dict[int, bytes]:
    """A run of ~768 data pages, then 300 single data pages between zero pages."""
    rnd = random.Random(7)
    plant = {0x200000: rnd.randbytes(3 << 20)}
    plant.update({0x800000 + 2 * i * 4096: rnd.randbytes(4096) for i in range(300)})
    return plant


STREAMS = [
    ("72-pc", QEMU72, ["-M", "pc", "-m", "64M"]),
    ("72-q35-dimm", QEMU72, ["-M", "q35", "-m", "256M,slots=2,maxmem=2G", "-object",
                             "memory-backend-ram,id=wm,size=2M", "-device",
                             "pc-dimm,memdev=wm,addr=0x100000000"]),
    ("10-pc", QEMU10, ["-M", "pc", "-m", "64M"]),
]


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, bytes]]:
    """Real saves (exec:cat, record format) from each QEMU that is installed."""
    out: dict[str, bytes] = {}
    started: list[Vm] = []
    try:
        for name, qemu, args in STREAMS:
            if qemu and have(qemu):
                d = tmp_path_factory.mktemp(name)
                out[name] = save_stream(d, started, args, qemu=qemu,
                                        plant=_plant()).read_bytes()
        yield out
    finally:
        for vm in started:
            vm.kill()


def _stream(streams: dict[str, bytes], name: str) -> bytes:
    if name not in streams:
        pytest.skip(f"no QEMU for {name}")
    return streams[name]


def _same_index(a: ms.StreamIndex, b: ms.StreamIndex) -> None:
    ra, rb = a.records, b.records
    assert (ra.block, ra.page, ra.pos, ra.kind) == (rb.block, rb.page, rb.pos, rb.kind)
    assert (a.blocks, a.sections, a.end, a.vmdesc_offset, a.machine) == \
        (b.blocks, b.sections, b.end, b.vmdesc_offset, b.machine)


@pytest.mark.parametrize("name", [s[0] for s in STREAMS])
def test_same_index_as_the_python_walker(streams: dict[str, bytes], name: str) -> None:
    data = _stream(streams, name)
    native, python = ms.index_stream(data), ms.index_stream(data, native=False)
    _same_index(native, python)
    assert native.page_count >= 768 + 300 and len(native.records) > 10_000


def test_hop_in_small_chunks(streams: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
                             ) -> None:
    """Each call of the hop stops at a byte bound (256 MiB); the record the bound cuts is
    read one by one.  With a bound of a few records the index must not change."""
    data = _stream(streams, "72-pc")
    want = ms.index_stream(data)
    monkeypatch.setattr(ms, "_HOP_CHUNK", 3 * 4104 + 5)
    _same_index(ms.index_stream(data), want)


@pytest.mark.parametrize("name", [s[0] for s in STREAMS])
def test_copies_match_a_plain_loop(streams: dict[str, bytes], name: str) -> None:
    data = _stream(streams, name)
    idx = ms.index_stream(data)
    r = idx.records
    rnd = random.Random(3)
    wanted = {(r.block[i], r.page[i]) for i in rnd.sample(range(len(r)), 500)}
    wanted |= {(0, (1 << 40) + 5), (len(idx.blocks), 0)}  # never in the stream
    want = [(r.block[i], r.page[i], r.pos[i], r.kind[i]) for i in range(len(r))
            if (r.block[i], r.page[i]) in wanted]
    assert list(ms.copies(idx, wanted)) == want
    assert list(ms.copies(idx, set())) == []


def _headers(data: bytes, idx: ms.StreamIndex, flags: int) -> list[int]:
    """File offsets of the 8-byte headers of CONTINUE records with exactly these flags."""
    out = []
    for pos in idx.records.pos:
        hdr = pos - 8
        if struct.unpack_from(">Q", data, hdr)[0] & 0xFFF == flags:
            out.append(hdr)
    return out


def _verdict(data: bytes, native: bool) -> object:
    try:
        idx = ms.index_stream(data, native=native)
    except errors.StreamError as e:
        assert "\n" not in str(e)
        return type(e)
    r = idx.records
    return (r.block, r.page, r.pos, r.kind, idx.sections)


def test_crafted_records_same_verdict(streams: dict[str, bytes]) -> None:
    """Records the hop must stop at: the Python code then reads and judges them."""
    data = _stream(streams, "72-pc")
    idx = ms.index_stream(data)
    pages = _headers(data, idx, PAGE_CONT)
    zeros = _headers(data, idx, ZERO_CONT)
    pc_ram = idx.blocks[0].length
    cases: list[bytes] = []
    for hdr in (pages[len(pages) // 2], zeros[len(zeros) // 2]):
        (word,) = struct.unpack_from(">Q", data, hdr)
        flags = word & 0xFFF
        for new in (pc_ram | flags, (pc_ram - 4096) | flags, word | ms.RAM_XBZRLE,
                    word & ~ms.RAM_CONTINUE, word | 0x400, word | ms.RAM_EOS):
            cases.append(data[:hdr] + struct.pack(">Q", new) + data[hdr + 8:])
    z = zeros[len(zeros) // 3]
    cases.append(data[:z + 8] + b"\x5a" + data[z + 9:])  # a non-zero fill byte: legal
    for blob in cases:
        assert _verdict(blob, True) == _verdict(blob, False)
    out_of_range = cases[0]
    with pytest.raises(errors.StreamError, match=r"beyond the end of pc\.ram"):
        ms.index_stream(out_of_range)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_same_verdict(streams: dict[str, bytes], data: st.DataObject) -> None:
    """Damage anywhere in the RAM records: the C hop and the Python walk agree."""
    blob = bytearray(_stream(streams, "72-pc"))
    n = len(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, n - 1))
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if kind == "flip":
            blob[at] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            blob.insert(at, data.draw(st.integers(0, 255)))
        elif kind == "delete":
            del blob[at]
        else:
            del blob[at:]
        n = len(blob)
        if n == 0:
            break
    assert _verdict(bytes(blob), True) == _verdict(bytes(blob), False)


def _rec(page: int, flags: int, body: bytes) -> bytes:
    return struct.pack(">Q", page * 4096 | flags) + body


def test_ram_run_on_crafted_bytes() -> None:
    page = b"\x11" * 4096
    buf = (_rec(1, PAGE_CONT, page) + _rec(2, ZERO_CONT, b"\0") + _rec(3, ZERO_CONT, b"\x07")
           + _rec(4, PAGE_CONT, page))
    end, pages, pos, kinds = _ramwalk.ram_run(buf, 0, len(buf), 16 * 4096)
    assert end == 4104 + 9  # stops at the ZERO record with a fill byte
    assert array("Q", pages).tolist() == [1, 2] and array("Q", pos).tolist() == [8, 4112]
    assert list(kinds) == [ms.KIND_PAGE, ms.KIND_ZERO]
    assert _ramwalk.ram_run(buf, 0, len(buf), 2 * 4096)[0] == 4104  # page 2 out of range
    assert _ramwalk.ram_run(buf, 0, 4103, 16 * 4096)[0] == 0  # truncated page
    assert _ramwalk.ram_run(buf, end, len(buf), 16 * 4096)[0] == end
    other = _rec(1, ms.RAM_PAGE, page)  # names its block: not the hop's
    assert _ramwalk.ram_run(other, 0, len(other), 16 * 4096)[3] == b""
    with pytest.raises(ValueError, match="lie in the buffer"):
        _ramwalk.ram_run(buf, 0, len(buf) + 1, 16 * 4096)
    with pytest.raises(ValueError, match="lie in the buffer"):
        _ramwalk.ram_run(buf, 9, 8, 16 * 4096)


def test_select_against_a_set() -> None:
    rnd = random.Random(11)
    blocks = array("H", [rnd.randrange(3) for _ in range(5000)])
    pages = array("Q", [rnd.randrange(2000) for _ in range(5000)])
    keys = sorted({rnd.randrange(3) << 52 | rnd.randrange(2000) for _ in range(300)})
    got = array("Q")
    got.frombytes(_ramwalk.select(blocks, pages, array("Q", keys)))
    want = [i for i in range(5000) if blocks[i] << 52 | pages[i] in set(keys)]
    assert got.tolist() == want
    with pytest.raises(ValueError, match="matching lengths"):
        _ramwalk.select(blocks[:-1], pages, array("Q", keys))


def test_vmdesc_search_widens(streams: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
                              ) -> None:
    """A description longer than the first window is still found, from a wider one."""
    data = _stream(streams, "72-pc")
    want = ms.find_vmdesc(data, 0, len(data))
    assert want is not None and len(data) - want[0] > 4096
    monkeypatch.setattr(ms, "_VMDESC_WINDOW", 512)
    assert ms.find_vmdesc(data, 0, len(data)) == want
    assert ms.find_vmdesc(data + b"junk", 0, len(data) + 4) is None
    _same_index(ms.index_stream(data), ms.index_stream(data, native=False))


@pytest.fixture(scope="module")
def mapped_stream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bytes]:
    """A QEMU >= 9 save with mapped-ram through `file:` (what `vmwipe save` writes there)."""
    if not QEMU10:
        pytest.skip("no QEMU >= 9.0 (mapped-ram)")
    d = tmp_path_factory.mktemp("mapped")
    vm = Vm(d, ["-M", "pc", "-m", "64M"], qemu=QEMU10)
    try:
        vm.write(0x200000, random.Random(9).randbytes(1 << 20))
        vm.qmp.cmd("migrate-set-capabilities",
                   {"capabilities": [{"capability": "mapped-ram", "state": True}]})
        vm.qmp.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        vm.qmp.cmd("migrate", {"uri": f"file:{d / 'mapped.sav'}"})
        assert vm.wait_migration() == "completed"
        yield (d / "mapped.sav").read_bytes()
    finally:
        vm.kill()


def test_mapped_ram_walk_does_not_depend_on_page_data(mapped_stream: bytes) -> None:
    """The walk of a mapped-ram stream jumps over every block's page area (the bulk of
    the file): with all of it overwritten, the index is the same."""
    idx = ms.index_stream(mapped_stream)
    assert idx.mapped_ram and len(idx.records) == 0
    blob = bytearray(mapped_stream)
    area = 0
    for bi, (_bitmap, pages) in idx.mapped.items():
        n = idx.blocks[bi].length if pages else 0
        blob[pages:pages + n] = b"\xff" * n
        area += n
    assert area > 0.9 * len(mapped_stream)
    other = ms.index_stream(bytes(blob))
    assert (other.mapped, other.blocks, other.sections, other.end) == \
        (idx.mapped, idx.blocks, idx.sections, idx.end)
