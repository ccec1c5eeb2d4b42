"""`vmwipe scrub` on files saved by real QEMU: secrets gone, everything else intact.

Each test plants a v1 table and random secret pages into a `-S` VM (through
/proc/PID/mem at `gpa2hva` addresses), saves it with `migrate exec:cat`, scrubs
the file, and restores it into a fresh `-S -incoming defer` QEMU to read the
pages back with pmemsave.  The file is also compared byte for byte with the
original: only the data of the listed pages' PAGE records may differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_migstream import QEMU10, QEMU72, Vm, have, needs_qemu, needs_qemu10, restore

from vmwipe.host_agent import errors
from vmwipe.host_agent.cli import main as vmwipe_main
from vmwipe.host_agent.snapshot import migstream as ms
from vmwipe.host_agent.snapshot.machine import below_4g, machine_layout
from vmwipe.host_agent.snapshot.saveimage import build_header
from vmwipe.host_agent.snapshot.scrub import scrub_file
from vmwipe.host_agent.snapshot.sidecar import read_sidecar, sidecar_path, write_sidecar
from vmwipe.host_agent.wipe.memmap import load_memory_map
from vmwipe.protocol import (
    WIPE_GENERATION_OFFSET,
    Region,
    build_region,
    decode_header,
    encode_ssdt,
)

REGION = Region(0x1F00_0000, 1 << 20)
PAGE = 4096
HIGH = 1 << 32


@dataclass
class Saved:
    """A saved VM: the file, its QEMU arguments, and what was planted where."""

    path: Path
    args: list[str]
    qemu: str
    secrets: dict[int, bytes]  # listed pages with data (gpa -> bytes)
    listed_zero: list[int]  # listed pages never written (ZERO records)
    keep: dict[int, bytes]  # unlisted pages with data that must survive
    region_image: bytes


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plant_and_save(workdir: Path, vms: list[Vm], args: list[str], *, qemu: str = QEMU72,
                   high: bool = False, slots: list[tuple[int, int]] | None = None,
                   with_table: bool = True) -> Saved:
    ssdt = workdir / "vmwipe.aml"
    ssdt.write_bytes(encode_ssdt(REGION.base, REGION.size))
    full = [*args, "-acpitable", f"file={ssdt}"]
    vm = Vm(workdir, full, qemu=qemu)
    vms.append(vm)
    secrets = {0x200_0000: os.urandom(PAGE), 0x200_1000: os.urandom(PAGE),
               0x300_0000: os.urandom(PAGE)}
    if high:
        secrets[HIGH + 0x100_0000] = os.urandom(PAGE)
    zero_listed = [0x500_0000]
    keep = {0x400_0000: os.urandom(PAGE), 0x200_2000: os.urandom(PAGE)}
    if slots is None:
        slots = [(0x200_0000, 2), (0x300_0000, 1), (0x500_0000, 1)]
        if high:
            slots.append((HIGH + 0x100_0000, 1))
    image = build_region(REGION.size, slots) if with_table else bytes(REGION.size)
    vm.write(REGION.base, image)
    for gpa, data in {**secrets, **keep}.items():
        vm.write(gpa, data)
    path = workdir / f"vm{len(vms)}.sav"
    vm.save(path)
    return Saved(path, full, qemu, secrets, zero_listed, keep, image)


@pytest.fixture
def vms() -> Iterator[list[Vm]]:
    started: list[Vm] = []
    yield started
    for vm in started:
        vm.kill()


def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = vmwipe_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_region(got: bytes, image: bytes, generation: int, pages: int) -> None:
    """The restored region is the planted one, with the host fields a wipe stores."""
    assert got[:WIPE_GENERATION_OFFSET] == image[:WIPE_GENERATION_OFFSET]
    assert got[WIPE_GENERATION_OFFSET + 16:] == image[WIPE_GENERATION_OFFSET + 16:]
    header = decode_header(got[:PAGE], REGION)
    assert header is not None
    assert (header.wipe_generation, header.wipe_pages) == (generation, pages)


def check_restored(saved: Saved, workdir: Path, vms: list[Vm], offset: int = 0,
                   generation: int = 1) -> None:
    vm = restore(workdir, saved.args, saved.path, qemu=saved.qemu, offset=offset)
    vms.append(vm)
    for gpa in [*saved.secrets, *saved.listed_zero]:
        assert vm.read(gpa, PAGE) == bytes(PAGE), f"{gpa:#x} not scrubbed"
    for gpa, data in saved.keep.items():
        assert vm.read(gpa, PAGE) == data, f"{gpa:#x} damaged"
    assert_region(vm.read(REGION.base, REGION.size), saved.region_image, generation,
                  len(saved.secrets) + len(saved.listed_zero) if generation else 0)


def only_listed_changed(before: bytes, after: bytes, saved: Saved) -> None:
    assert len(before) == len(after)
    for secret in saved.secrets.values():
        assert secret in before and secret not in after
    for data in saved.keep.values():
        assert data in after
    # every differing byte lies inside one of the secrets' old positions
    spans = sorted((before.index(s), before.index(s) + PAGE) for s in saved.secrets.values())
    hdr = before.index(saved.region_image[:PAGE]) + WIPE_GENERATION_OFFSET
    spans.append((hdr, hdr + 16))  # wipe_generation and wipe_pages
    i = 0
    while True:
        j = next((k for k in range(i, len(before), 1 << 16)
                  if before[k:k + (1 << 16)] != after[k:k + (1 << 16)]), None)
        if j is None:
            break
        for k in range(j, min(j + (1 << 16), len(before))):
            if before[k] != after[k]:
                assert any(a <= k < b for a, b in spans), f"byte {k:#x} changed"
        i = j + (1 << 16)


MACHINES = [
    ("pc-512M", ["-M", "pc", "-m", "512M"], False),
    ("q35-5G", ["-M", "q35", "-m", "5G"], True),
]


@needs_qemu
@pytest.mark.parametrize(("name", "args", "high"), MACHINES, ids=[m[0] for m in MACHINES])
def test_scrub_restore_72(tmp_path: Path, vms: list[Vm], capsys: pytest.CaptureFixture[str],
                          name: str, args: list[str], high: bool) -> None:
    saved = plant_and_save(tmp_path, vms, args, high=high)
    before = saved.path.read_bytes()
    rc, out, err = run_cli("scrub", str(saved.path), "--json", capsys=capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["table"] == "valid" and rep["slots"] == (4 if high else 3)
    assert rep["pages"] == len(saved.secrets) + len(saved.listed_zero)
    assert rep["copies"] == len(saved.secrets) and rep["scrubbed_copies"] == len(saved.secrets)
    assert rep["bytes"] == PAGE * len(saved.secrets) + 16 and not rep["noop"]
    assert rep["generation"] == 1
    assert rep["zero_records"] >= 1
    assert "stream (" in rep["layout_source"]  # layout and region came from the stream itself
    only_listed_changed(before, saved.path.read_bytes(), saved)
    # second run: no-op, file unchanged
    digest = sha(saved.path)
    rc, out, _ = run_cli("scrub", str(saved.path), "--json", capsys=capsys)
    assert rc == 0 and json.loads(out)["noop"] and json.loads(out)["already_zero"] == len(
        saved.secrets)
    assert sha(saved.path) == digest
    check_restored(saved, tmp_path, vms)


@needs_qemu10
def test_scrub_restore_10(tmp_path: Path, vms: list[Vm]) -> None:
    saved = plant_and_save(tmp_path, vms, ["-M", "q35", "-m", "512M"], qemu=QEMU10)
    before = saved.path.read_bytes()
    rep = scrub_file(str(saved.path), machine="q35", mem=512 << 20)
    assert rep.scrubbed_copies == len(saved.secrets) and rep.machine.startswith("pc-q35-")
    only_listed_changed(before, saved.path.read_bytes(), saved)
    check_restored(saved, tmp_path, vms)


@needs_qemu
def test_sidecar_from_live_layout(tmp_path: Path, vms: list[Vm]) -> None:
    """A sidecar (as `vmwipe save` writes it) covers RAM split over several blocks."""
    args = ["-M", "pc", "-m", "512M,slots=2,maxmem=2G", "-object",
            "memory-backend-ram,id=hi,size=64M", "-device", "pc-dimm,memdev=hi,addr=0x100000000"]
    saved = plant_and_save(tmp_path, vms, args, high=True)
    layout = load_memory_map(vms[0].qmp.hmp, {"pc.ram", "hi"})
    assert {r.block for r in layout.ranges} == {"pc.ram", "hi"}
    write_sidecar(sidecar_path(saved.path), region=REGION, ram=layout.ranges,
                  qemu_version="7.2", machine="pc-i440fx-7.2", stream=saved.path)
    sc = read_sidecar(sidecar_path(saved.path))
    assert sc.region == REGION and sc.ram == [r.__class__(r.gpa, r.size, r.block, r.offset)
                                              for r in layout.ranges]
    rep = scrub_file(str(saved.path))  # picks FILE.vmwipe.json up by itself
    assert rep.layout_source == "sidecar" and rep.scrubbed_copies == len(saved.secrets)
    check_restored(saved, tmp_path, vms)


@needs_qemu
def test_no_table_is_noop(tmp_path: Path, vms: list[Vm],
                          capsys: pytest.CaptureFixture[str]) -> None:
    saved = plant_and_save(tmp_path, vms, ["-M", "pc", "-m", "512M"], with_table=False)
    digest = sha(saved.path)
    rc, out, _ = run_cli("scrub", str(saved.path), capsys=capsys)
    assert rc == 0 and "nothing registered" in out
    assert sha(saved.path) == digest


def _corrupt_footer(data: bytes, idx: ms.StreamIndex) -> bytes:
    section = next(sec for sec in idx.sections if sec.name != "ram")
    pos = section.end - 5  # FOOTER (0x7e) + be32 section id
    assert data[pos] == ms.FOOTER, section
    return data[:pos] + b"\x7d" + data[pos + 1 :]


@needs_qemu
def test_bad_inputs_untouched(tmp_path: Path, vms: list[Vm],
                              capsys: pytest.CaptureFixture[str]) -> None:
    saved = plant_and_save(tmp_path, vms, ["-M", "pc", "-m", "512M"])
    data = saved.path.read_bytes()
    idx = ms.index_stream(data)
    cases = {
        "truncated": data[: len(data) // 2],
        "truncated-tail": data[:-3],
        "foreign": b"\x1f\x8b\x08\x00" + data[4:],
        "empty": b"",
        # the footer marker of the first device section the walker found (not a byte
        # pattern search: that can match page data instead, as it does on QEMU 10)
        "footer": _corrupt_footer(data, idx),
        "desc-len": data[: idx.vmdesc_offset + 1] + struct.pack(">I", 99)
        + data[idx.vmdesc_offset + 5:],
    }
    for name, blob in cases.items():
        p = tmp_path / f"bad-{name}.sav"
        p.write_bytes(blob)
        digest = sha(p)
        rc, out, err = run_cli("scrub", str(p), "--region", "0x1f000000:1M", capsys=capsys)
        assert rc != 0, name
        assert err.startswith("vmwipe: error: ") and err.count("\n") == 1, (name, err)
        assert sha(p) == digest, name
        assert out == ""


@needs_qemu
def test_forged_table_refused_untouched(tmp_path: Path, vms: list[Vm],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # slot 1 points into the region itself: refused as at resume, nothing written
    saved = plant_and_save(tmp_path, vms, ["-M", "pc", "-m", "512M"],
                           slots=[(0x200_0000, 2), (REGION.base + 0x10000, 1)])
    digest = sha(saved.path)
    rc, _, err = run_cli("scrub", str(saved.path), capsys=capsys)
    assert rc == 6 and "slot 1" in err
    assert sha(saved.path) == digest
    # --on-invalid skip scrubs the valid slot only
    rc, out, _ = run_cli("scrub", str(saved.path), "--on-invalid", "skip", "--json",
                         capsys=capsys)
    rep = json.loads(out)
    assert rc == 0 and rep["pages"] == 2 and rep["invalid_slots"]


@needs_qemu
def test_q35_tseg_refused_without_sidecar(tmp_path: Path, vms: list[Vm],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Without a sidecar the scrubber cannot see whether the firmware enabled q35's TSEG (the
    top 16 MiB below 4 GiB), so a table naming a page there is refused as SMRAM would be."""
    tseg_page = (512 << 20) - (1 << 20)
    saved = plant_and_save(tmp_path, vms, ["-M", "q35", "-m", "512M"],
                           slots=[(0x200_0000, 2), (tseg_page, 1)])
    digest = sha(saved.path)
    rc, _, err = run_cli("scrub", str(saved.path), capsys=capsys)
    assert rc == 6 and "slot 1" in err, err
    assert sha(saved.path) == digest


@needs_qemu
def test_wrong_layout_refused(tmp_path: Path, vms: list[Vm],
                              capsys: pytest.CaptureFixture[str]) -> None:
    saved = plant_and_save(tmp_path, vms, ["-M", "pc", "-m", "512M"])
    digest = sha(saved.path)
    rc, _, err = run_cli("scrub", str(saved.path), "--machine", "pc", "--mem", "1G",
                         capsys=capsys)
    assert rc == 2 and "past the block's end" in err
    rc, _, err = run_cli("scrub", str(saved.path), "--machine", "q35", "--mem", "512M",
                         capsys=capsys)
    assert rc == 2 and "machine type" in err
    # --mem is read as QEMU reads -m: a bare 512 is 512 MiB, the layout this stream has
    rc, out, err = run_cli("scrub", str(saved.path), "--machine", "pc", "--mem", "512",
                           "--dry-run", "--json", capsys=capsys)
    assert rc == 0, err
    assert json.loads(out)["layout_source"] == "--machine pc --mem 512M"
    assert sha(saved.path) == digest


@needs_qemu
def test_libvirt_image(tmp_path: Path, vms: list[Vm]) -> None:
    """A raw libvirt save image: header + XML, then the stream at 92 + data_len."""
    saved = plant_and_save(tmp_path, vms, ["-M", "pc", "-m", "512M"])
    xml = b"<domain type='kvm'><name>t</name></domain>\0"
    xml += bytes(-len(xml) % 4096)  # libvirt pads the XML
    img = tmp_path / "vm.libvirt"
    img.write_bytes(build_header(len(xml)) + xml + saved.path.read_bytes())
    rep = scrub_file(str(img))
    assert rep.container == "libvirt" and rep.scrubbed_copies == len(saved.secrets)
    blob = img.read_bytes()
    assert all(s not in blob for s in saved.secrets.values())
    restored = Saved(img, saved.args, saved.qemu, saved.secrets, saved.listed_zero, saved.keep,
                     saved.region_image)
    check_restored(restored, tmp_path, vms, offset=92 + len(xml))
    # compressed images are refused by name, untouched
    gz = tmp_path / "vm.gz.libvirt"
    gz.write_bytes(build_header(len(xml), fmt=1) + xml + b"\x1f\x8b" + bytes(100))
    digest = sha(gz)
    with pytest.raises(errors.StreamError, match="gzip"):
        scrub_file(str(gz))
    assert sha(gz) == digest


def test_below_4g_rules() -> None:
    assert below_4g("pc", 512 << 20) == 512 << 20
    assert below_4g("pc", 0xDFFF_F000) == 0xDFFF_F000  # up to 3.5 GiB stays low on pc
    assert below_4g("pc-i440fx-7.2", 0xE000_0000) == 0xC000_0000
    assert below_4g("pc", 5 << 30) == 3 << 30
    assert below_4g("q35", 0xAFFF_F000) == 0xAFFF_F000
    assert below_4g("pc-q35-10.0", 0xB000_0000) == 2 << 30
    assert below_4g("q35", 5 << 30) == 2 << 30
    r = machine_layout("q35", 5 << 30)
    assert [(x.gpa, x.size, x.offset) for x in r] == [
        (0, 0xA0000, 0), (0x100000, (2 << 30) - 0x100000, 0x100000), (HIGH, 3 << 30, 2 << 30)]


LAYOUT_CASES = [("pc", "3584M"), ("pc", "5G"), ("q35", "2816M"), ("q35", "5G")]


def _layout_matches(tmp_path: Path, vms: list[Vm], machine: str, mem: str, qemu: str) -> None:
    vm = Vm(tmp_path, ["-M", machine, "-m", mem], qemu=qemu)
    vms.append(vm)
    live = load_memory_map(vm.qmp.hmp, {"pc.ram"}).ranges
    size = {"3584M": 3584 << 20, "5G": 5 << 30, "2816M": 2816 << 20}[mem]
    ours = machine_layout(machine, size)
    # live shows 0-0xc0000 as RAM (no VGA): ours stops at the legacy hole
    assert [(r.gpa, r.offset) for r in live[1:]] == [(r.gpa, r.offset) for r in ours[1:]]
    assert [r.size for r in live[1:]] == [r.size for r in ours[1:]]


@needs_qemu
@pytest.mark.parametrize(("machine", "mem"), LAYOUT_CASES)
def test_layout_matches_mtree(tmp_path: Path, vms: list[Vm], machine: str, mem: str) -> None:
    """machine_layout agrees with what QEMU 7.2 shows in `info mtree -f` (minus the hole)."""
    _layout_matches(tmp_path, vms, machine, mem, QEMU72)


@needs_qemu10
@pytest.mark.parametrize(("machine", "mem"), LAYOUT_CASES)
def test_layout_matches_mtree_10(tmp_path: Path, vms: list[Vm], machine: str, mem: str) -> None:
    """The same split rules hold in QEMU >= 9 (10.0 here)."""
    _layout_matches(tmp_path, vms, machine, mem, QEMU10)


def test_qemu_available_or_skip() -> None:
    if not have(QEMU72):
        pytest.skip("no QEMU")


#: A boot sector that loops `inc dword [0x70000]` forever (real mode, es=0x7000), so the
#: page at 0x70000 is dirtied continuously and a live migration sends it again and again.
BOOT_LOOP = bytes.fromhex("fa b8 00 70 8e c0 26 66 ff 06 00 00 eb f8")
DIRTY_GPA = 0x70000


def _boot_image(path: Path) -> Path:
    sector = BOOT_LOOP + bytes(510 - len(BOOT_LOOP)) + b"\x55\xaa"
    path.write_bytes(sector + bytes((1 << 20) - 512))
    return path


@needs_qemu
def test_live_save_repeated_copies(tmp_path: Path, vms: list[Vm],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A guest dirties a secret page during a live save; every copy of it is scrubbed."""
    disk = _boot_image(tmp_path / "boot.img")
    ssdt = tmp_path / "vmwipe.aml"
    ssdt.write_bytes(encode_ssdt(REGION.base, REGION.size))
    args = ["-M", "pc", "-m", "512M", "-acpitable", f"file={ssdt}",
            "-drive", f"file={disk},format=raw,if=ide"]
    vm = Vm(tmp_path, args)
    vms.append(vm)
    vm.qmp.cmd("cont")
    deadline = time.monotonic() + 30
    while vm.read(DIRTY_GPA, 4) == bytes(4):  # wait for SeaBIOS to boot the loop
        assert time.monotonic() < deadline, "boot sector never ran"
        time.sleep(0.1)
    secret = os.urandom(PAGE)
    vm.write(DIRTY_GPA + 4, secret[4:])  # the guest keeps incrementing the first dword
    image = build_region(REGION.size, [(DIRTY_GPA, 1), (0x200_0000, 1)])
    vm.write(REGION.base, image)
    vm.write(0x200_0000, secret)  # a second, static copy of the pattern
    keep = os.urandom(PAGE)
    vm.write(0x300_0000, keep)
    # slow enough that the first pass takes a while and the page is dirtied meanwhile
    vm.qmp.cmd("migrate-set-parameters", {"max-bandwidth": 2 << 20})
    path = tmp_path / "live.sav"
    vm.qmp.cmd("migrate", {"uri": f"exec:cat > {path}"})
    assert vm.wait_migration(120) == "completed"
    idx = ms.index_stream(path.read_bytes())
    bi = idx.block_index("pc.ram")
    assert bi is not None
    n_copies = sum(1 for _ in ms.copies(idx, {(bi, DIRTY_GPA // PAGE)}))
    assert n_copies >= 2, "the live save sent the dirtied page only once"
    assert path.read_bytes().count(secret[4:]) >= n_copies
    rc, out, err = run_cli("scrub", str(path), "--json", capsys=capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["copies"] == n_copies + 1 and rep["scrubbed_copies"] == n_copies + 1
    blob = path.read_bytes()
    assert secret[4:] not in blob and keep in blob
    rvm = restore(tmp_path, args, path)
    vms.append(rvm)
    assert rvm.read(DIRTY_GPA, PAGE) == bytes(PAGE)
    assert rvm.read(0x200_0000, PAGE) == bytes(PAGE)
    assert rvm.read(0x300_0000, PAGE) == keep


def _set_mapped_ram(vm: Vm) -> None:
    vm.qmp.cmd("migrate-set-capabilities",
               {"capabilities": [{"capability": "mapped-ram", "state": True}]})


@needs_qemu10
def test_mapped_ram_10(tmp_path: Path, vms: list[Vm]) -> None:
    """QEMU 10 `mapped-ram` + `file:`: every page has one fixed slot; scrub zeroes the slots."""
    ssdt = tmp_path / "vmwipe.aml"
    ssdt.write_bytes(encode_ssdt(REGION.base, REGION.size))
    args = ["-M", "q35", "-m", "512M", "-acpitable", f"file={ssdt}"]
    vm = Vm(tmp_path, args, qemu=QEMU10)
    vms.append(vm)
    secret, keep = os.urandom(PAGE), os.urandom(PAGE)
    image = build_region(REGION.size, [(0x200_0000, 1), (0x500_0000, 1)])
    vm.write(REGION.base, image)
    vm.write(0x200_0000, secret)
    vm.write(0x300_0000, keep)
    path = tmp_path / "mapped.sav"
    _set_mapped_ram(vm)
    vm.qmp.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 40})
    vm.qmp.cmd("migrate", {"uri": f"file:{path}"})
    assert vm.wait_migration() == "completed"
    fd, mm = ms.open_mapped(str(path))
    try:
        assert mm.find(secret) >= 0
    finally:
        os.close(fd)
    assert ms.stream_capabilities(str(path))[1] == ["mapped-ram"]  # what a restore must set
    rep = scrub_file(str(path))
    assert rep.container == "qemu-mapped-ram" and rep.pages == 2
    assert rep.scrubbed_copies == 1 and rep.bytes == PAGE + 16 and rep.generation == 1
    assert scrub_file(str(path)).noop
    fd, mm = ms.open_mapped(str(path))
    try:
        assert mm.find(secret) < 0 and mm.find(keep) >= 0
    finally:
        os.close(fd)
    rvm = Vm(tmp_path, args, qemu=QEMU10, incoming=True)
    vms.append(rvm)
    _set_mapped_ram(rvm)
    rvm.qmp.cmd("migrate-incoming", {"uri": f"file:{path}"})
    assert rvm.wait_migration() == "completed"
    assert rvm.read(0x200_0000, PAGE) == bytes(PAGE)
    assert rvm.read(0x300_0000, PAGE) == keep
    assert_region(rvm.read(REGION.base, REGION.size), image, 1, 2)


def _mapped_ram_state(vm: Vm) -> bool:
    caps = vm.qmp.cmd("query-migrate-capabilities")
    return any(c["capability"] == "mapped-ram" and c["state"] for c in caps)


@needs_qemu10
def test_cli_save_mapped_ram_restore_scrub_10(tmp_path: Path, vms: list[Vm],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`vmwipe save` on QEMU >= 9 writes a mapped-ram stream through `file:` (JSON and sidecar
    say so, the capability is off again afterwards); `vmwipe restore` loads it (mapped-ram
    on the destination only while loading) and wipes exactly the listed pages; `vmwipe
    scrub` zeroes their fixed slots, and a second `vmwipe restore` of that file works too."""
    ssdt = tmp_path / "vmwipe.aml"
    ssdt.write_bytes(encode_ssdt(REGION.base, REGION.size))
    args = ["-M", "q35", "-m", "512M", "-acpitable", f"file={ssdt}"]
    agent = str(tmp_path / "agent.sock")
    vm = Vm(tmp_path, [*args, "-qmp", f"unix:{agent},server=on,wait=off"], qemu=QEMU10)
    vms.append(vm)
    secrets = {0x200_0000: os.urandom(PAGE), 0x200_1000: os.urandom(PAGE),
               0x300_0000: os.urandom(PAGE)}
    keep = {0x400_0000: os.urandom(PAGE), 0x200_2000: os.urandom(PAGE)}
    image = build_region(REGION.size, [(0x200_0000, 2), (0x300_0000, 1), (0x500_0000, 1)])
    vm.write(REGION.base, image)
    for gpa, data in {**secrets, **keep}.items():
        vm.write(gpa, data)
    path = tmp_path / "cli-mapped.sav"
    rc, out, err = run_cli("save", "--paused", "--qmp", agent, "--to", str(path), "--json",
                           capsys=capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["extra"]["mapped_ram"] is True and rep["extra"]["uri"] == f"file:{path}"
    assert not _mapped_ram_state(vm), "save left mapped-ram switched on"
    assert ms.stream_capabilities(str(path))[1] == ["mapped-ram"]
    sidecar = read_sidecar(sidecar_path(path))
    assert sidecar.mapped_ram and sidecar.region == REGION
    blob = path.read_bytes()
    assert all(d in blob for d in [*secrets.values(), *keep.values()])

    def restore_cli(name: str) -> Vm:
        sock = str(tmp_path / f"{name}.sock")
        rvm = Vm(tmp_path, [*args, "-qmp", f"unix:{sock},server=on,wait=off"], qemu=QEMU10,
                 incoming=True)
        vms.append(rvm)
        rc, out, err = run_cli("restore", "--qmp", sock, "--from", str(path), "--paused",
                               "--no-reset-guard", "--json", capsys=capsys)
        assert rc == 0, err
        rrep = json.loads(out)
        assert rrep["extra"]["mapped_ram"] is True and rrep["extra"]["uri"] == f"file:{path}"
        assert rrep["wipe"]["pages"] == 4 and rrep["state_after"] in ("paused", "prelaunch")
        assert not _mapped_ram_state(rvm), "mapped-ram left on: a save --scrub would refuse"
        for gpa in [*secrets, 0x500_0000]:
            assert rvm.read(gpa, PAGE) == bytes(PAGE), hex(gpa)
        for gpa, data in keep.items():
            assert rvm.read(gpa, PAGE) == data, hex(gpa)
        return rvm

    # the agent's restore wipes the unscrubbed file's listed pages before the guest runs
    restore_cli("r1")
    # scrub zeroes the fixed slots; the file keeps its size and everything else
    size = path.stat().st_size
    rc, out, err = run_cli("scrub", str(path), "--json", capsys=capsys)
    assert rc == 0, err
    srep = json.loads(out)
    assert srep["container"] == "qemu-mapped-ram" and srep["pages"] == 4
    assert srep["scrubbed_copies"] == 3
    assert path.stat().st_size == size
    blob = path.read_bytes()
    assert not any(d in blob for d in secrets.values())
    assert all(d in blob for d in keep.values())
    rc, out, err = run_cli("scrub", str(path), "--json", capsys=capsys)
    assert rc == 0 and json.loads(out)["noop"], err
    restore_cli("r2")
    if have(QEMU72) and QEMU72 != QEMU10:  # a QEMU without mapped-ram refuses it, saying why
        sock = str(tmp_path / "old.sock")
        vms.append(Vm(tmp_path, [*args, "-qmp", f"unix:{sock},server=on,wait=off"],
                      incoming=True))
        rc, out, err = run_cli("restore", "--qmp", sock, "--from", str(path),
                               "--no-reset-guard", capsys=capsys)
        assert rc == 9 and "saved with mapped-ram" in err, err


@needs_qemu10
def test_cli_save_no_mapped_ram_10(tmp_path: Path, vms: list[Vm],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`--no-mapped-ram` writes a sequential stream, even where QEMU offers mapped-ram."""
    agent = str(tmp_path / "agent.sock")
    vm = Vm(tmp_path, ["-M", "q35", "-m", "128M", "-qmp", f"unix:{agent},server=on,wait=off"],
            qemu=QEMU10)
    vms.append(vm)
    path = tmp_path / "seq.sav"
    rc, out, err = run_cli("save", "--paused", "--qmp", agent, "--to", str(path), "--no-mapped-ram",
                           "--json", capsys=capsys)
    assert rc == 0, err
    assert json.loads(out)["extra"]["mapped_ram"] is False
    assert "mapped-ram" not in ms.stream_capabilities(str(path))[1]
    assert not _mapped_ram_state(vm)


def test_saveimage_header_variants() -> None:
    from vmwipe.host_agent.snapshot.saveimage import MAGIC_PARTIAL, domain_xml, parse_header

    xml = b"<domain/>\0" + bytes(22)
    raw = build_header(len(xml), was_running=True) + xml
    hdr = parse_header(raw, len(raw) + 100)
    assert (hdr.version, hdr.data_len, hdr.was_running, hdr.format_name) == (2, 32, True, "raw")
    assert hdr.stream_offset == 92 + 32 and domain_xml(raw, hdr) == "<domain/>"
    # an image written on a host of the other byte order is still understood
    swapped = raw[:16] + b"".join(raw[i:i + 4][::-1] for i in range(16, 92, 4)) + xml
    assert parse_header(swapped).endian != hdr.endian
    with pytest.raises(errors.StreamError, match="incomplete"):
        parse_header(MAGIC_PARTIAL + raw[16:])
    with pytest.raises(errors.StreamError, match="truncated"):
        parse_header(raw[:50])
    with pytest.raises(errors.StreamError, match="truncated"):
        parse_header(raw, 100)
    with pytest.raises(errors.StreamError, match="version"):
        parse_header(raw[:16] + struct.pack("<I", 9) + raw[20:])
    for fmt, name in [(1, "gzip"), (2, "bzip2"), (3, "xz"), (4, "lzop"), (5, "zstd")]:
        with pytest.raises(errors.UnsupportedStream, match=name):
            parse_header(build_header(32, fmt=fmt) + xml)


def test_sidecar_errors(tmp_path: Path) -> None:
    from vmwipe.host_agent.errors import LayoutError

    p = tmp_path / "x.vmwipe.json"
    p.write_text("{")
    with pytest.raises(LayoutError, match="cannot read"):
        read_sidecar(p)
    p.write_text(json.dumps({"format": "vmwipe-sidecar", "version": 7}))
    with pytest.raises(LayoutError, match="not a vmwipe sidecar"):
        read_sidecar(p)
    p.write_text(json.dumps({"format": "vmwipe-sidecar", "version": 1, "region": {}}))
    with pytest.raises(LayoutError, match="malformed"):
        read_sidecar(p)
    write_sidecar(p, region=REGION, ram=[(0, 0xA0000, "pc.ram", 0)], qemu_version=(10, 0, 2))
    sc = read_sidecar(p)
    assert sc.qemu_version == "10.0.2" and sc.ram[0].block == "pc.ram"


#: Real-mode guest: wait until the host sets the word at 0x60000, then unpublish page A
#: the way SPEC.md says (zero the page, then clear its slot word at 0x81000), then halt.
UNPUBLISH = bytes.fromhex(
    "fa b8 00 60 8e d8 b8 00 70 8e c0"  # cli; ds=0x6000 (flag); es=0x7000 (page A)
    "ff 06 02 00 83 3e 00 00 00 74 f5"  # wait: inc word [2]; cmp word [0], 0; je wait
    "31 ff 31 c0 b9 00 08 f3 ab"  # zero 4 KiB at es:0
    "b8 00 81 8e c0 31 ff 31 c0 b9 04 00 f3 ab"  # es=0x8100: clear slot 0's word
    "f4 eb fd")  # hlt forever
LOW_REGION = Region(0x80000, 0x2000)


@needs_qemu
def test_live_save_unpublished_page(tmp_path: Path, vms: list[Vm],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A page unpublished during a live save: its early copy is stale but secret, scrubbed."""
    sector = UNPUBLISH + bytes(510 - len(UNPUBLISH)) + b"\x55\xaa"
    disk = tmp_path / "unpublish.img"
    disk.write_bytes(sector + bytes((1 << 20) - 512))
    ssdt = tmp_path / "low.aml"
    ssdt.write_bytes(encode_ssdt(LOW_REGION.base, LOW_REGION.size))
    args = ["-M", "pc", "-m", "128M", "-acpitable", f"file={ssdt}",
            "-drive", f"file={disk},format=raw,if=ide"]
    vm = Vm(tmp_path, args)
    vms.append(vm)
    vm.qmp.cmd("cont")
    deadline = time.monotonic() + 30
    while "7c" not in vm.qmp.hmp("info registers").split("EIP=")[1][:8]:
        assert time.monotonic() < deadline, "boot sector never ran"
        time.sleep(0.1)
    secret_a, secret_b = os.urandom(PAGE), os.urandom(PAGE)
    vm.write(LOW_REGION.base, build_region(LOW_REGION.size, [(0x70000, 1), (0x50000, 1)]))
    vm.write(0x70000, secret_a)
    vm.write(0x50000, secret_b)
    # The waiting guest keeps dirtying its flag page, and at 1 MiB/s one page misses a
    # 1 ms downtime limit: the save cannot complete until the limit is raised below.
    vm.qmp.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 20, "downtime-limit": 1})
    path = tmp_path / "unpublish.sav"
    vm.qmp.cmd("migrate", {"uri": f"exec:cat > {path}"})
    deadline = time.monotonic() + 60
    while not (path.exists() and secret_a in path.read_bytes()):  # A went out once
        assert time.monotonic() < deadline, "page A never reached the stream"
        time.sleep(0.05)
    vm.write(0x60000, b"\x01\x00")  # guest: unpublish A
    while vm.read(LOW_REGION.base + PAGE, 8) != bytes(8):  # slot 0 cleared by the guest
        assert time.monotonic() < deadline, "the guest did not unpublish"
        time.sleep(0.02)
    vm.qmp.cmd("migrate-set-parameters", {"downtime-limit": 2000})
    assert vm.wait_migration(120) == "completed"
    blob = path.read_bytes()
    assert secret_a in blob and secret_b in blob
    rc, out, err = run_cli("scrub", str(path), "--json", capsys=capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["pages"] == 1 and rep["scrubbed_copies"] == 1  # B, listed at the end
    assert rep["stale_copies"] >= 1  # A's early copies
    blob = path.read_bytes()
    assert secret_a not in blob and secret_b not in blob
    rvm = restore(tmp_path, args, path)
    vms.append(rvm)
    assert rvm.read(0x70000, PAGE) == bytes(PAGE) and rvm.read(0x50000, PAGE) == bytes(PAGE)
