"""`vmwipe ssdt` and `vmwipe qemu-args`: their files, their errors, and a real QEMU using them."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import QEMU, qemu_available

from vmwipe.host_agent.libvirt.domain_xml import protect_xml
from vmwipe.host_agent.qemu.launcher import start_qemu
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.host_agent.qemu.vmconfig import choose_region
from vmwipe.host_agent.wipe.memmap import load_memory_map
from vmwipe.protocol import PAGE_SIZE, Region, decode_ssdt

VMWIPE = [sys.executable, "-m", "vmwipe.host_agent.cli"]


def vmwipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMWIPE, *args], capture_output=True, text=True, timeout=60)


def test_ssdt_writes_a_decodable_table(tmp_path: Path) -> None:
    out = tmp_path / "t.aml"
    run = vmwipe("ssdt", "--base", "0x1f000000", "--size", "1M", "-o", str(out), "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report == {"path": str(out), "base": 0x1F00_0000, "size": 1 << 20, "bytes": 140}
    assert decode_ssdt(out.read_bytes()) == Region(0x1F00_0000, 1 << 20)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--base", "0x1f000001"], "--base/--size: the region base 0x1f000001 is not 4 KiB"),
        (["--size", "4K"], "--base/--size: the region size 0x1000 is not a multiple of 4 KiB"),
        (["--size", "3K"], "the region size 0xc00 is not"),
        (["--size", "lots"], "not a size"),
    ],
)
def test_ssdt_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    out = tmp_path / "t.aml"
    run = vmwipe("ssdt", *args, "-o", str(out))
    assert run.returncode != 0
    assert needle in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert "Traceback" not in run.stderr
    assert not out.exists()


@pytest.mark.parametrize(("mem", "base"), [(1 << 30, 0x1F00_0000), (8 << 30, 0x1F00_0000),
                                           (512 << 20, 0x1BF0_0000), (256 << 20, 0x0BF0_0000),
                                           (128 << 20, 0x03F0_0000)])
def test_region_placement(mem: int, base: int) -> None:
    region = choose_region(mem)
    assert region == Region(base, 1 << 20)
    assert region.base + region.size + (64 << 20) <= mem


def _q35_low_ram_and_tseg(tmp_path: Path, mem: str, extra: list[str]) -> tuple[int, int]:
    """(top of q35 RAM below 4 GiB, TSEG bytes) as a real QEMU reports them."""
    qp = start_qemu([QEMU, "-nodefaults", "-display", "none", "-accel", "tcg",
                     "-M", "q35,smm=on", "-m", mem, *extra], str(tmp_path / "q35.qmp"))
    try:
        with QMPSession(qp.qmp_path) as s:
            mch = s.cmd("qom-get", {"path": "/machine/q35/mch",
                                    "property": "extended-tseg-mbytes"})
            memmap = load_memory_map(s.hmp, {str(m["id"]) for m in s.cmd("query-memdev")})
    finally:
        qp.kill()
    low_top = max(r.gpa + r.size for r in memmap.ranges if r.gpa < 1 << 32)
    return low_top, int(mch) << 20


@pytest.mark.skipif(not qemu_available(), reason=f"{QEMU} not installed")
@pytest.mark.parametrize(("mem", "extra"), [
    ("128M", []), ("256M", []), ("512M", []), ("768M", ["-global", "mch.extended-tseg-mbytes=48"]),
    ("2560M", []),
])
def test_default_region_never_in_q35_tseg(tmp_path: Path, mem: str, extra: list[str]) -> None:
    """With OVMF and SMM, TSEG is the top `extended-tseg-mbytes` of RAM below 4 GiB (16 MiB
    by default); the guest's writes there from outside SMM do not land, so a region there
    reads as an empty table.  `qemu-args` and `libvirt protect` (memmap) place it below."""
    low_top, tseg = _q35_low_ram_and_tseg(tmp_path, mem, extra)
    cfg = json.loads(vmwipe("qemu-args", "--mem", mem, "--dir", str(tmp_path), "--json").stdout)
    with tempfile.TemporaryDirectory(prefix="vw-") as state:  # a socket path fits
        prot = protect_xml(libvirt_domain(int(mem.rstrip("M"))), Path(state),
                           reservation="memmap").protection
    assert prot is not None
    for base, size in ((cfg["base"], cfg["size"]), (prot.base, prot.size)):
        assert base + size <= low_top - tseg, (f"region {base:#x}+{size:#x} reaches into TSEG "
                                               f"{low_top - tseg:#x}-{low_top:#x}")


def libvirt_domain(mem_mib: int) -> str:
    return (f"<domain type='qemu'><name>t</name><uuid>{'1' * 8}-1111-1111-1111-{'1' * 12}"
            f"</uuid><memory unit='MiB'>{mem_mib}</memory><os><type machine='q35'>hvm</type>"
            "<kernel>/boot/vmlinuz</kernel><cmdline>console=ttyS0</cmdline></os></domain>")


def test_region_placement_refuses_tiny_guests() -> None:
    with pytest.raises(ValueError, match="too small"):
        choose_region(32 << 20)


def test_qemu_args_text_and_json(tmp_path: Path) -> None:
    run = vmwipe("qemu-args", "--mem", "512M", "--dir", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "memmap=0x100000$0x1bf00000" in run.stdout
    run = vmwipe("qemu-args", "--mem", "512M", "--dir", str(tmp_path), "--json")
    cfg = json.loads(run.stdout)
    assert cfg["base"] == 0x1BF0_0000 and cfg["size"] == 1 << 20
    assert Path(cfg["zero_page_path"]).read_bytes() == bytes(PAGE_SIZE)
    assert decode_ssdt(Path(cfg["ssdt_path"]).read_bytes()) == Region(0x1BF0_0000, 1 << 20)
    assert cfg["qemu_args"] == [
        "-acpitable", f"file={cfg['ssdt_path']}",
        "-device", f"loader,file={cfg['zero_page_path']},addr=0x1bf00000,force-raw=on",
    ]
    assert cfg["kernel_param"] == "memmap=0x100000$0x1bf00000"


def test_qemu_args_refuses_a_region_outside_ram(tmp_path: Path) -> None:
    run = vmwipe("qemu-args", "--mem", "256M", "--base", "0x1f000000", "--dir", str(tmp_path))
    assert run.returncode != 0 and "does not fit" in run.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not qemu_available(), reason=f"{QEMU} not installed")
def test_real_qemu_accepts_the_args_and_the_agent_finds_the_region(tmp_path: Path) -> None:
    """What `qemu-args` prints is exactly what the agent's discovery and reset guard accept."""
    cfg = json.loads(vmwipe("qemu-args", "--mem", "512M", "--dir", str(tmp_path), "--json").stdout)
    qmp = str(tmp_path / "qmp.sock")
    qp = start_qemu([QEMU, "-nodefaults", "-display", "none", "-M", "pc", "-m", "512M",
                     "-accel", "tcg", *cfg["qemu_args"]], qmp, log_path=str(tmp_path / "log"))
    try:
        # A region that QEMU never wrote: the magic is absent, nothing is registered.
        run = vmwipe("inspect", "--qmp", qmp, "--json")
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report["extra"]["region"] == {"base": 0x1BF0_0000, "size": 1 << 20}, report
        assert report["region_source"] == f"acpitable:{cfg['ssdt_path']}", report
        assert report["extra"]["registered"] is False, report
        assert report["state_after"] == "prelaunch" and not report["resumed"], report
    finally:
        qp.kill()
    # Without the loader, inspect (read-only) warns and wipe refuses, naming the hazard.
    qp = start_qemu([QEMU, "-nodefaults", "-display", "none", "-M", "pc", "-m", "512M",
                     "-accel", "tcg", *cfg["qemu_args"][:2]], qmp,
                    log_path=str(tmp_path / "log"))
    try:
        run = vmwipe("inspect", "--qmp", qmp)
        assert run.returncode == 0 and "reset guard" in run.stdout + run.stderr
        run = vmwipe("wipe", "--qmp", qmp)
        assert run.returncode == 5, run.stdout + run.stderr
        assert "stale table" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    finally:
        qp.kill()
    assert shlex.split(shlex.join(cfg["qemu_args"])) == cfg["qemu_args"]
