"""`save_scrubbed` (vmwipe save --scrub) against real QEMU: secrets never reach the file.

The VM carries a planted table and random secret pages; the saved file must
not contain a single copy of any secret, must restore with the listed pages
zero and everything else intact, and must come with a sidecar that a later
`vmwipe scrub` uses (and finds nothing left to do).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_migstream import QEMU10, QEMU72, Vm, _qemu_major, needs_qemu, needs_qemu10, restore
from test_scrub import PAGE, REGION, Saved, check_restored, plant_and_save, run_cli

from vmwipe.host_agent.errors import InvalidTableError, MigrationError, VMStateError
from vmwipe.host_agent.flows.save_scrub import save_scrubbed
from vmwipe.host_agent.snapshot.scrub import scrub_file
from vmwipe.host_agent.snapshot.sidecar import read_sidecar, sidecar_path
from vmwipe.protocol import build_region, encode_ssdt


@pytest.fixture
def vms() -> Iterator[list[Vm]]:
    started: list[Vm] = []
    yield started
    for vm in started:
        vm.kill()


def _save(saved: Saved, vm: Vm, out: Path, resume: bool = False) -> None:
    rep = save_scrubbed(vm.qmp, str(out), resume=resume)
    assert rep.table == "valid" and rep.pages == len(saved.secrets) + len(saved.listed_zero)
    assert rep.zeroed_copies == len(saved.secrets)
    blob = out.read_bytes()
    for secret in saved.secrets.values():
        assert secret not in blob
    for data in saved.keep.values():
        assert data in blob
    assert not list(out.parent.glob(f".{out.name}.*.partial"))
    sc = read_sidecar(sidecar_path(out))
    assert sc.region == REGION and sc.scrubbed and sc.scrubbed["copies"] == len(saved.secrets)


@needs_qemu
@pytest.mark.parametrize("high", [False, True], ids=["pc-512M", "pc-dimm-high"])
def test_save_scrub_72(tmp_path: Path, vms: list[Vm], capsys: pytest.CaptureFixture[str],
                       high: bool) -> None:
    args = ["-M", "pc", "-m", "512M"]
    if high:
        args = ["-M", "pc", "-m", "512M,slots=2,maxmem=2G", "-object",
                "memory-backend-ram,id=hi,size=64M", "-device",
                "pc-dimm,memdev=hi,addr=0x100000000"]
    saved = plant_and_save(tmp_path, vms, args, high=high)  # also a plain save (unused)
    vm = vms[0]
    vm.qmp.cmd("cont")  # the source migrated once; cont makes it savable again
    out = tmp_path / "scrubbed.sav"
    _save(saved, vm, out, resume=False)
    assert vm.qmp.status() in ("paused", "postmigrate")
    # a later scrub uses the sidecar and finds nothing left
    rc, o, _ = run_cli("scrub", str(out), "--json", capsys=capsys)
    rep = json.loads(o)
    assert rc == 0 and rep["noop"] and rep["layout_source"] == "sidecar"
    restored = Saved(out, saved.args, saved.qemu, saved.secrets, saved.listed_zero,
                     saved.keep, saved.region_image)
    check_restored(restored, tmp_path, vms)


@needs_qemu10
def test_save_scrub_10(tmp_path: Path, vms: list[Vm]) -> None:
    saved = plant_and_save(tmp_path, vms, ["-M", "q35", "-m", "512M"], qemu=QEMU10)
    vms[0].qmp.cmd("cont")
    out = tmp_path / "scrubbed10.sav"
    _save(saved, vms[0], out)
    assert scrub_file(str(out)).noop
    restored = Saved(out, saved.args, saved.qemu, saved.secrets, saved.listed_zero,
                     saved.keep, saved.region_image)
    check_restored(restored, tmp_path, vms)


@needs_qemu
def test_save_scrub_running_vm_resumes(tmp_path: Path, vms: list[Vm]) -> None:
    saved = plant_and_save(tmp_path, vms, ["-M", "pc", "-m", "512M"])
    vm = vms[0]
    vm.qmp.cmd("cont")
    assert vm.qmp.status() == "running"
    out = tmp_path / "live.sav"
    rep = save_scrubbed(vm.qmp, str(out), resume=True)
    assert rep.state_before == "running" and rep.state_after == "running"
    blob = out.read_bytes()
    assert all(s not in blob for s in saved.secrets.values())


@needs_qemu
def test_save_scrub_refusals(tmp_path: Path, vms: list[Vm]) -> None:
    saved = plant_and_save(tmp_path, vms, ["-M", "pc", "-m", "512M"],
                           slots=[(0x200_0000, 2), (REGION.base, 1)])
    vm = vms[0]
    vm.qmp.cmd("cont")
    out = tmp_path / "forged.sav"
    with pytest.raises(InvalidTableError, match="slot 1"):
        save_scrubbed(vm.qmp, str(out))
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*.partial"))
    vm.qmp.cmd("migrate-set-capabilities",
               {"capabilities": [{"capability": "xbzrle", "state": True}]})
    with pytest.raises(VMStateError, match="xbzrle"):
        save_scrubbed(vm.qmp, str(out), strict=False)
    assert not out.exists()
    del saved


@needs_qemu
def test_run_save_scrub_cli_body(tmp_path: Path, vms: list[Vm],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """What `vmwipe save --scrub --to FILE --json` runs, with the arguments cli.py parses."""
    import argparse

    from vmwipe.host_agent.cli.scrub import add_save_scrub_arguments, run_save_scrub

    saved = plant_and_save(tmp_path, vms, ["-M", "pc", "-m", "512M"])
    vms[0].qmp.cmd("cont")
    p = argparse.ArgumentParser()
    p.add_argument("--to")
    p.add_argument("--json", action="store_true")
    add_save_scrub_arguments(p)
    out = tmp_path / "cli.sav"
    args = p.parse_args(["--to", str(out), "--scrub", "--json"])
    assert run_save_scrub(args, vms[0].qmp) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["zeroed_copies"] == len(saved.secrets) and rep["generation"] == 1
    assert all(s not in out.read_bytes() for s in saved.secrets.values())


VIRTIO_MEM = ["-M", "pc", "-m", "512M,maxmem=2G",
              "-object", "memory-backend-ram,id=vmem0,size=128M",
              "-device", "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0"]


@pytest.mark.parametrize("qemu", [pytest.param(QEMU72, marks=needs_qemu, id="system"),
                                  pytest.param(QEMU10, marks=needs_qemu10, id="10")])
def test_save_scrub_virtio_mem(tmp_path: Path, vms: list[Vm], qemu: str) -> None:
    """virtio-mem's RAM is `vmem0` in the flat view but `<device path>/vmem0` in the stream:
    its listed pages must be matched to that block, not silently dropped (QEMU < 9).  QEMU >= 9
    sends virtio-mem's early device state before RAM, which the pipe walker cannot walk before
    the VM description (at the stream's end) has arrived: refused, no file left."""
    saved = plant_and_save(tmp_path, vms, VIRTIO_MEM, qemu=qemu, high=True)  # a vmem0 page
    vms[0].qmp.cmd("cont")
    out = tmp_path / "vmem.sav"
    if _qemu_major(qemu) >= 9:
        with pytest.raises(MigrationError, match="virtio-mem-device-early"):
            save_scrubbed(vms[0].qmp, str(out))
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.*.partial"))
        return
    rep = save_scrubbed(vms[0].qmp, str(out))
    assert rep.blocks["pc.ram"] == "pc.ram"
    assert rep.blocks["vmem0"].endswith("/vmem0"), rep.blocks
    blob = out.read_bytes()
    assert all(secret not in blob for secret in saved.secrets.values())


def test_listed_block_missing_from_qemu_is_refused() -> None:
    from vmwipe.host_agent.flows.save_scrub import stream_block_names

    assert stream_block_names({"pc.ram", "vmem0"}, ["pc.ram", "0000:00:02.0/vmem0"]) == {
        "pc.ram": "pc.ram", "vmem0": "0000:00:02.0/vmem0"}
    with pytest.raises(MigrationError, match="'hi' matches 0"):
        stream_block_names({"hi"}, ["pc.ram"])
    with pytest.raises(MigrationError, match="matches 2"):
        stream_block_names({"m"}, ["a/m", "b/m"])


@needs_qemu
def test_fill_ranges_get_random_bytes_never_zeros(tmp_path: Path, vms: list[Vm]) -> None:
    """Protocol v2: `vmwipe scrub` and `save --scrub` write fresh random bytes over every
    fill range (8 and 32 bytes inside a page, as the kernel CRNG's), never zeros; the
    rest of that page is kept, and two runs write different bytes."""
    args = ["-M", "pc", "-m", "512M"]
    ssdt = tmp_path / "vmwipe.aml"
    ssdt.write_bytes(encode_ssdt(REGION.base, REGION.size))
    full = [*args, "-acpitable", f"file={ssdt}"]
    vm = Vm(tmp_path, full)
    vms.append(vm)
    page, fills = 0x600_0000, [(0x600_0008, 8), (0x600_0020, 32)]
    vm.write(page, b"\xa5" * PAGE)
    vm.write(0x200_0000, os.urandom(PAGE))
    vm.write(REGION.base, build_region(REGION.size, [(0x200_0000, 1)], fills=fills))

    def filled(path: Path) -> bytes:
        got = restore(tmp_path, full, path)
        vms.append(got)
        data = got.read(page, PAGE)
        rest = bytearray(data)
        for g, n in fills:
            rest[g - page : g - page + n] = b"\xa5" * n
        assert bytes(rest) == b"\xa5" * PAGE, "bytes beside a fill range changed"
        assert got.read(0x200_0000, PAGE) == bytes(PAGE)
        out = b"".join(data[g - page : g - page + n] for g, n in fills)
        assert out.count(0) < 8 and out.count(0xA5) < 8, "fill range zeroed or kept"
        return out

    plain = tmp_path / "plain.sav"
    vm.save(plain)
    rep = scrub_file(str(plain))
    assert rep.fill_ranges == 2 and not rep.noop
    first = filled(plain)
    vm.qmp.cmd("cont")
    out = tmp_path / "scrubbed.sav"
    srep = save_scrubbed(vm.qmp, str(out))
    assert srep.fill_ranges == 2
    assert filled(out) != first
