"""Migration stream walker on streams written by real QEMU 7.2 (and 10.0 when present).

Streams come from `-S` VMs (no guest code runs) saved with `migrate exec:cat >
FILE`; untouched RAM goes out as 9-byte ZERO records, so even a 5 GiB guest
saves in about 12 MB.  Every QEMU started here is killed by its own PID in
teardown.  The `Vm` helper is shared with test_scrub.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwipe.host_agent import errors
from vmwipe.host_agent.errors import QMPFailure
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.host_agent.snapshot import migstream as ms

QEMU72 = os.environ.get("VMWIPE_TEST_QEMU", "qemu-system-x86_64")


def have(binary: str) -> bool:
    return shutil.which(binary) is not None or os.access(binary, os.X_OK)


def _qemu_major(binary: str) -> int:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=20, check=False).stdout
    except OSError:
        return 0
    m = re.search(r"version (\d+)\.", out)
    return int(m.group(1)) if m else 0


REPO_QEMU10 = str(Path(__file__).resolve().parent.parent / "build" / "qemu10" / "qemu10")


def _find_qemu10() -> str:
    """A QEMU >= 9.0 (mapped-ram): $VMWIPE_TEST_QEMU10, the system QEMU (Debian 13), or
    bookworm-backports' 10.0 unpacked with `apt-get download` + `dpkg -x` behind a wrapper
    that passes -L for its data dir: build/qemu10/qemu10, which `make setup` writes
    (scripts/fetch-qemu10.sh), or an older hand-made one under /tmp."""
    for cand in (os.environ.get("VMWIPE_TEST_QEMU10", ""), QEMU72, REPO_QEMU10,
                 "/tmp/scrub/q10/qemu10", "/tmp/q10/qemu10"):
        if cand and have(cand) and _qemu_major(cand) >= 9:
            return cand
    return ""


QEMU10 = _find_qemu10()
needs_qemu = pytest.mark.skipif(not have(QEMU72), reason=f"{QEMU72} not installed")
needs_qemu10 = pytest.mark.skipif(
    not QEMU10, reason="no QEMU >= 9.0: run scripts/fetch-qemu10.sh as root (Debian 12; "
    "`make setup` does) or set VMWIPE_TEST_QEMU10 to one")


class Vm:
    """One QEMU process with a QMP socket, started paused; killed by PID in `kill()`."""

    def __init__(self, workdir: Path, args: list[str], qemu: str = QEMU72,
                 incoming: bool = False) -> None:
        self.workdir = workdir
        n = len(list(workdir.glob("qmp*.sock")))
        self.sock = str(workdir / f"qmp{n}.sock")
        cmd = [qemu, "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
               "-qmp", f"unix:{self.sock},server=on,wait=off", *args]
        if incoming:
            cmd += ["-incoming", "defer"]
        self.log = open(workdir / f"qemu{n}.log", "wb")  # noqa: SIM115 (closed in kill)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        session: QMPSession | None = None
        while session is None:
            # the socket file appears at bind(), before listen(): retry a refused connect
            if os.path.exists(self.sock):
                attempt = QMPSession(self.sock, timeout=30)
                try:
                    session = attempt.connect()
                    break
                except QMPFailure:
                    attempt.close()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"QEMU did not start: {(workdir / f'qemu{n}.log').read_text()}")
            time.sleep(0.02)
        self.qmp = session

    @property
    def pid(self) -> int:
        return self.proc.pid

    def hva(self, gpa: int) -> int:
        out = self.qmp.hmp(f"gpa2hva {gpa:#x}")
        m = re.search(r" is (0x[0-9a-f]+)", out)
        assert m, out
        return int(m.group(1), 16)

    def write(self, gpa: int, data: bytes) -> None:
        """Write guest RAM through /proc/PID/mem (no QMP command writes RAM); page-wise."""
        fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR)
        try:
            pos = 0
            while pos < len(data):
                n = min(len(data) - pos, 4096 - (gpa + pos) % 4096)
                assert os.pwrite(fd, data[pos:pos + n], self.hva(gpa + pos)) == n
                pos += n
        finally:
            os.close(fd)

    def read(self, gpa: int, size: int) -> bytes:
        out = self.workdir / "pmem.bin"
        self.qmp.cmd("pmemsave", {"val": gpa, "size": size, "filename": str(out)})
        data = out.read_bytes()
        out.unlink()
        return data

    def wait_migration(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            st = str(self.qmp.cmd("query-migrate").get("status", ""))
            if st in ("completed", "failed", "cancelled"):
                return st
            if time.monotonic() > deadline:
                return st
            time.sleep(0.02)

    def save(self, path: Path) -> None:
        self.qmp.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        self.qmp.cmd("migrate", {"uri": f"exec:cat > {path}"})
        assert self.wait_migration() == "completed"

    def kill(self) -> None:
        try:
            if getattr(self, "qmp", None) is not None:
                self.qmp.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


def restore(workdir: Path, args: list[str], path: Path, qemu: str = QEMU72,
            offset: int = 0) -> Vm:
    """A fresh `-S -incoming defer` QEMU loading `path` (from byte `offset`)."""
    vm = Vm(workdir, args, qemu=qemu, incoming=True)
    try:
        src = f"cat {path}" if offset == 0 else f"tail -c +{offset + 1} {path}"
        vm.qmp.cmd("migrate-incoming", {"uri": f"exec:{src}"})
        assert vm.wait_migration() == "completed", (workdir / "qemu0.log").read_text()
        assert vm.qmp.status() in ("paused", "prelaunch")  # a -S source never ran
    except BaseException:
        vm.kill()
        raise
    return vm


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[list[Vm]]:
    """Collects every Vm a test starts and kills each by its PID afterwards."""
    started: list[Vm] = []
    yield started
    for vm in started:
        vm.kill()


def save_stream(tmp_path: Path, vms: list[Vm], args: list[str], qemu: str = QEMU72,
                plant: dict[int, bytes] | None = None) -> Path:
    vm = Vm(tmp_path, args, qemu=qemu)
    vms.append(vm)
    for gpa, data in (plant or {}).items():
        vm.write(gpa, data)
    out = tmp_path / f"save{len(vms)}.bin"
    vm.save(out)
    return out


def walk(path: Path) -> ms.StreamIndex:
    fd, mm = ms.open_mapped(str(path))
    try:
        return ms.index_stream(mm)
    finally:
        os.close(fd)


CASES = [
    ("pc-256M", ["-M", "pc", "-m", "256M"], {"pc.ram": 256 << 20}),
    ("q35-512M-devices", ["-M", "q35", "-m", "512M", "-vga", "std", "-nic",
                          "user,model=e1000e", "-device", "qemu-xhci", "-device", "usb-tablet"],
     {"pc.ram": 512 << 20}),
    ("pc-5G", ["-M", "pc", "-m", "5G", "-device", "virtio-balloon"], {"pc.ram": 5 << 30}),
    ("q35-dimm", ["-M", "q35", "-m", "512M,slots=2,maxmem=2G", "-object",
                  "memory-backend-ram,id=wm,size=2M", "-device",
                  "pc-dimm,memdev=wm,addr=0x100000000"], {"pc.ram": 512 << 20, "wm": 2 << 20}),
    ("pc-numa", ["-M", "pc", "-m", "512M", "-object", "memory-backend-ram,id=m0,size=256M",
                 "-object", "memory-backend-ram,id=m1,size=256M", "-numa", "node,memdev=m0",
                 "-numa", "node,memdev=m1"], {"m0": 256 << 20, "m1": 256 << 20}),
]


def _check_walk(path: Path, blocks: dict[str, int], planted: dict[int, bytes], ram0: str) -> None:
    idx = walk(path)
    got = {b.name: b.length for b in idx.blocks}
    for name, length in blocks.items():
        assert got[name] == length
    assert idx.ram_done and idx.vmdesc is not None
    assert idx.end == path.stat().st_size
    kinds = [s.kind for s in idx.sections]
    assert kinds[0] == ms.SECTION_START and ms.SECTION_END in kinds and ms.SECTION_FULL in kinds
    # the planted page is a PAGE record whose bytes are in the file at `pos`
    bi = idx.block_index(ram0)
    assert bi is not None
    data = path.read_bytes()
    for gpa, blob in planted.items():
        recs = [(pos, k) for b, p, pos, k in ms.copies(idx, {(bi, gpa // 4096)})]
        assert recs and recs[-1][1] == ms.KIND_PAGE
        assert data[recs[-1][0]:recs[-1][0] + 4096] == blob


@needs_qemu
@pytest.mark.parametrize(("name", "args", "blocks"), CASES, ids=[c[0] for c in CASES])
def test_walk_real_72(tmp_path: Path, vms: list[Vm], name: str, args: list[str],
                      blocks: dict[str, int]) -> None:
    blob = os.urandom(4096)
    path = save_stream(tmp_path, vms, args, plant={0x200000: blob})
    _check_walk(path, blocks, {0x200000: blob}, "m0" if "numa" in name else "pc.ram")


@needs_qemu10
@pytest.mark.parametrize(("name", "args", "blocks"), CASES[:2] + CASES[3:4],
                         ids=[c[0] for c in CASES[:2] + CASES[3:4]])
def test_walk_real_10(tmp_path: Path, vms: list[Vm], name: str, args: list[str],
                      blocks: dict[str, int]) -> None:
    blob = os.urandom(4096)
    path = save_stream(tmp_path, vms, args, qemu=QEMU10, plant={0x200000: blob})
    _check_walk(path, blocks, {0x200000: blob}, "pc.ram")
    assert not walk(path).machine.endswith("7.2")


# --- corrupt, truncated and refused inputs -------------------------------------------


@pytest.fixture(scope="module")
def small_stream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bytes]:
    if not have(QEMU72):
        pytest.skip(f"{QEMU72} not installed")
    d = tmp_path_factory.mktemp("small")
    started: list[Vm] = []
    try:
        path = save_stream(d, started, ["-M", "pc", "-m", "64M"],
                           plant={0x100000: b"\xaa" * 4096})
        yield path.read_bytes()
    finally:
        for vm in started:
            vm.kill()


def _fails(data: bytes, match: str) -> None:
    with pytest.raises(errors.StreamError, match=match):
        ms.index_stream(data)


def test_truncated_everywhere(small_stream: bytes) -> None:
    n = len(small_stream)
    for cut in (0, 3, 8, 40, 200, n // 3, n // 2, n - 5000, n - 100, n - 1):
        with pytest.raises(errors.StreamError):
            ms.index_stream(small_stream[:cut])


def test_foreign_and_corrupt(small_stream: bytes) -> None:
    _fails(b"\x7fELF" + small_stream[4:], "not a QEMU migration stream")
    _fails(small_stream[:4] + b"\0\0\0\2" + small_stream[8:], "version 2")
    # flip the first section footer marker
    i = small_stream.index(b"\x7e\x00\x00\x00")
    _fails(small_stream[:i] + b"\x7d" + small_stream[i + 1:], "footer")
    # damage the VM description length
    idx = ms.index_stream(small_stream)
    j = idx.vmdesc_offset
    bad = small_stream[:j + 1] + struct.pack(">I", 7) + small_stream[j + 5:]
    _fails(bad, "no VM description")
    # trailing garbage after a complete stream
    _fails(small_stream + b"junk", "no VM description")


def _first_page_record(data: bytes) -> int:
    idx = ms.index_stream(data)
    i = next(i for i, k in enumerate(idx.records.kind) if k == ms.KIND_PAGE)
    pos = idx.records.pos[i]
    # the record header precedes the data: be64 word (+ u8 len + idstr without CONTINUE)
    for hdr in range(pos - 8, pos - 8 - 257, -1):
        (word,) = struct.unpack_from(">Q", data, hdr)
        if word & 0xFFF & ms.RAM_PAGE and (word & ~0xFFF) // 4096 == idx.records.page[i]:
            return hdr
    raise AssertionError("record header not found")


@pytest.mark.parametrize(("flag", "match"), [(ms.RAM_XBZRLE, "XBZRLE"),
                                             (ms.RAM_COMPRESS_PAGE, "compress"),
                                             (ms.RAM_HOOK, "RDMA"),
                                             (0x400, "unknown RAM flags")])
def test_refused_page_encodings(small_stream: bytes, flag: int, match: str) -> None:
    hdr = _first_page_record(small_stream)
    (word,) = struct.unpack_from(">Q", small_stream, hdr)
    bad = small_stream[:hdr] + struct.pack(">Q", (word & ~ms.RAM_PAGE) | flag) + \
        small_stream[hdr + 8:]
    with pytest.raises(errors.StreamError, match=match):
        ms.index_stream(bad)


def test_bulk_runs_index_exactly_like_record_by_record(tmp_path: Path, vms: list[Vm]) -> None:
    """The walk consumes runs of PAGE and ZERO records in bulk; a listed page ends a
    run, so with every page listed each PAGE record is read one by one.  Both must
    index every record identically, on a stream where runs of data pages, single
    data pages and zero pages alternate."""
    rnd = random.Random(5)
    plant = {0x200000: rnd.randbytes(3 << 20)}  # a run of ~768 data pages
    plant.update({0x800000 + 2 * i * 4096: rnd.randbytes(4096) for i in range(300)})
    path = save_stream(tmp_path, vms, ["-M", "pc", "-m", "64M"], plant=plant)
    data = path.read_bytes()
    bulk = ms.index_stream(data)
    one_by_one = ms.StreamIndex(start=0)
    one_by_one.vmdesc_offset, one_by_one.vmdesc = ms.find_vmdesc(data, 0, len(data)) or (0, None)
    walker = ms.StreamWalker(ms.FileSource(data, 0, one_by_one.vmdesc_offset), one_by_one,
                             zero_page=lambda block, offset: True)
    walker.walk_header()
    assert walker.walk()
    a, b = bulk.records, one_by_one.records
    assert len(a) > 1000 and (a.block, a.page, a.pos, a.kind) == (b.block, b.page, b.pos, b.kind)
    assert bulk.page_count >= 768 + 300
    assert one_by_one.zeroed_pages == bulk.page_count  # every PAGE record went one by one


def test_filter_stream_matches_file_walk(small_stream: bytes, tmp_path: Path) -> None:
    """The pipe rewriter zeroes exactly the chosen page and copies everything else."""
    r, w = os.pipe()
    out = tmp_path / "filtered.bin"
    import threading

    def feed() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(small_stream)

    t = threading.Thread(target=feed)
    t.start()
    with open(out, "wb") as sink:
        idx = ms.filter_stream(r, sink, lambda block, off: block == "pc.ram" and off == 0x100000)
    t.join()
    os.close(r)
    got = out.read_bytes()
    assert idx.zeroed_pages == 1 and len(got) == len(small_stream)
    diff = [i for i in range(0, len(got), 4096) if got[i:i + 4096] != small_stream[i:i + 4096]]
    assert len(diff) <= 2  # one page of data, possibly straddling two 4 KiB windows
    assert b"\xaa" * 4096 in small_stream and b"\xaa" * 4096 not in got
    ms.index_stream(got)  # still a valid stream


# --- fuzz: damaged streams give StreamError, never another exception -----------------


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutations(small_stream: bytes, data: st.DataObject) -> None:
    blob = bytearray(small_stream)
    n = len(blob)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "tail"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, n - 1))] = data.draw(st.integers(0, 255))
    elif kind == "tail":  # damage the device state / description area
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(max(0, n - 40000), n - 1))] = data.draw(
                st.integers(0, 255))
    elif kind == "truncate":
        del blob[data.draw(st.integers(0, n - 1)):]
    elif kind == "insert":
        blob.insert(data.draw(st.integers(0, n)), data.draw(st.integers(0, 255)))
    else:
        del blob[data.draw(st.integers(0, n - 1))]
    try:
        ms.index_stream(bytes(blob))
    except errors.StreamError as e:
        assert "\n" not in str(e)


def test_stream_capabilities(small_stream: bytes, tmp_path: Path) -> None:
    p = tmp_path / "s.bin"
    p.write_bytes(small_stream)
    machine, caps = ms.stream_capabilities(str(p))
    assert machine.startswith("pc-i440fx-") and caps == []


def _nested_empty_arrays_stream(depth: int, count: int) -> bytes:
    """A ~1 KB stream whose one device is `depth` nested arrays of `count` empty structs."""
    inner: dict[str, object] = {"fields": [{"name": "z", "type": "uint8", "size": 0,
                                            "array_len": count}]}
    for i in range(depth):
        inner = {"fields": [{"name": f"a{i}", "type": "struct", "array_len": count,
                             "struct": inner}]}
    desc = {"page_size": 4096, "devices": [
        {"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1, **inner}]}
    body = (b"QEVM" + struct.pack(">I", 3) + b"\x04" + struct.pack(">I", 1) + b"\x03dev"
            + struct.pack(">II", 0, 1) + b"\x7e" + struct.pack(">I", 1) + b"\x00")
    js = json.dumps(desc, separators=(",", ":")).encode()
    return body + b"\x06" + struct.pack(">I", len(js)) + js


def test_nested_empty_arrays_are_walked_in_bounded_time(tmp_path: Path) -> None:
    """1000**6 empty elements used to keep the walker busy for hours; now it is one skip."""
    data = _nested_empty_arrays_stream(6, 1000)
    assert len(data) < 2048
    path = tmp_path / "crafted.bin"
    path.write_bytes(data)
    code = ("import sys; from vmwipe.host_agent.snapshot import migstream as ms\n"
            "from vmwipe.host_agent.errors import StreamError\n"
            "try:\n    ms.index_stream(open(sys.argv[1], 'rb').read())\n"
            "except StreamError as e:\n    print('StreamError', e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 0 and "StreamError" in r.stdout, r.stdout + r.stderr
    assert "ram` section never ended" in r.stdout, r.stdout
