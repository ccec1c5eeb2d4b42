"""The scrubbers killed mid-run: what each one claims about a kill, tested.

`vmwipe scrub FILE` claims (snapshot/scrub.py, `scrub --help`): everything is checked before
anything is written, and the pages are zeroed (and the header's wipe_generation
bumped) in a copy `.FILE.vmwipe-scrub.XXXXXXXX` that is fsynced, read back and
renamed over FILE.  So a kill at any moment leaves FILE either byte-for-byte the
original or byte-for-byte the fully scrubbed file, header bump included, never
anything in between.  A SIGKILL before the rename may leave the copy behind; the
next run removes it.  The test asserts, after a SIGKILL at random points:

- FILE is exactly the original or exactly the reference (an uninterrupted scrub);
- running the scrub again always ends at the reference, and leaves no copy behind.

`vmwipe save --scrub --to PATH` claims write-then-rename (.PATH.XXXXXXXX.partial, fsync,
full re-read, rename): after a SIGKILL, PATH is either the previous file,
untouched, or a complete scrubbed save, never anything in between.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import VM, qemu_available, run_cli, start_vm

from vmwipe.protocol import PAGE_SIZE, Region, build_region

pytestmark = pytest.mark.skipif(not qemu_available(), reason="QEMU not installed")

P = PAGE_SIZE
REGION = Region(0x1F00_0000, 1 << 20)
#: 12,000 single pages, every other page from 32 MiB: 47 MiB of page records to zero.
SLOTS = [(0x200_0000 + 2 * i * P, 1) for i in range(12_000)]


def _halting_bios(directory: Path) -> Path:
    rom = bytearray(b"\xff" * 0x10000)
    rom[0xFFF0:0xFFF3] = b"\xf4\xeb\xfd"  # hlt; jmp .-1 (interrupts are off at reset)
    path = directory / "hlt.bin"
    path.write_bytes(bytes(rom))
    return path


@dataclass
class Saved:
    vm: VM
    directory: Path
    orig: Path
    ref: Path
    scrub_seconds: float


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Saved]:
    d = tmp_path_factory.mktemp("faults-scrub")
    machine = ["-M", "pc", "-m", "512M", "-bios", str(_halting_bios(d))]
    vm = start_vm(d / "vm", machine, "tcg", region=REGION)
    try:
        t = vm.target("process_vm")
        try:
            t.backend.write(0x200_0000, b"\xa5" * 2 * len(SLOTS) * P)  # listed and neighbours
            t.backend.write(REGION.base, build_region(REGION.size, SLOTS))
        finally:
            t.close()
        vm.disconnect()
        orig = d / "orig.state"
        r = run_cli("save", "--paused", "--qmp", vm.qmp, "--to", str(orig))
        assert r.returncode == 0, r.stderr
        ref = d / "ref.state"
        shutil.copyfile(orig, ref)
        t0 = time.monotonic()
        r = run_cli("scrub", str(ref), "--machine", "pc", "--mem", "512M")
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        yield Saved(vm, d, orig, ref, took)
    finally:
        vm.kill()


def _kill_at(argv: list[str], delay: float) -> tuple[int, str]:
    p = subprocess.Popen([sys.executable, "-m", "vmwipe.host_agent.cli", *argv],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    _out, err = p.communicate(timeout=120)
    return p.returncode, err


def _temps(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.vmwipe-scrub.*"))


@pytest.mark.slow
def test_scrub_killed_mid_run(saved: Saved) -> None:
    o = saved.orig.read_bytes()
    r = saved.ref.read_bytes()
    assert len(o) == len(r) and o != r  # the scrub did zero the listed copies
    assert not _temps(saved.ref)
    work = saved.directory / "work.state"
    rng = random.Random(int(os.environ.get("VMWIPE_FAULT_SEED", "9")))
    outcomes = {"untouched": 0, "fully scrubbed": 0}
    strays = 0
    for i in range(10):
        shutil.copyfile(saved.orig, work)
        _kill_at(["scrub", str(work), "--machine", "pc", "--mem", "512M"],
                 rng.uniform(0.2, saved.scrub_seconds * 1.1))
        w = work.read_bytes()
        # never half: the original or the complete reference, header bump included
        if w == o:
            outcomes["untouched"] += 1
        else:
            assert w == r, f"kill {i}: the file is neither the original nor fully scrubbed"
            outcomes["fully scrubbed"] += 1
        strays += len(_temps(work))
        again = run_cli("scrub", str(work), "--machine", "pc", "--mem", "512M")
        assert again.returncode == 0, again.stderr
        assert work.read_bytes() == r, f"kill {i}: the rerun did not end at the reference"
        assert not _temps(work), f"kill {i}: a copy is left after a completed rerun"
    print(f"scrub SIGKILLed 10 times ({saved.scrub_seconds:.2f} s per run): {outcomes}; "
          f"{strays} kills left a copy behind, each removed by the rerun")


def _migration_settled(vm: VM) -> None:
    """Wait until QEMU has finished or failed a migration whose reader died."""
    s = vm.session()
    s.wait_until(lambda: s.cmd("query-migrate").get("status")
                 not in ("active", "setup", "device") or None, 60, "the orphaned migration")


def _savable(vm: VM) -> None:
    """Out of postmigrate (left by a completed save) into paused: cont, stop.  The halting
    firmware runs no code that writes RAM, so the saved pages stay as planted."""
    if vm.status() not in ("paused", "prelaunch"):
        vm.session().cmd("cont")
        vm.session().cmd("stop")
    vm.disconnect()


@pytest.mark.slow
def test_save_scrub_killed_mid_run(saved: Saved) -> None:
    vm = saved.vm
    path = saved.directory / "scrubbed.state"
    old = b"the previous save, which a failed save must not damage\n" * 100
    rng = random.Random(int(os.environ.get("VMWIPE_FAULT_SEED", "9")) + 1)
    listed = {("pc.ram", g) for g, _n in SLOTS}
    outcomes = {"previous file intact": 0, "complete scrubbed save": 0}
    strays = 0
    # one uninterrupted run: its duration, and proof that a complete save verifies
    _savable(vm)
    path.write_bytes(old)
    t0 = time.monotonic()
    r = run_cli("save", "--paused", "--qmp", vm.qmp, "--to", str(path), "--scrub")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    for i in range(6):
        _savable(vm)
        path.write_bytes(old)
        for stray in path.parent.glob(f".{path.name}.*.partial"):
            stray.unlink()
        _kill_at(["save", "--paused", "--qmp", vm.qmp, "--to", str(path), "--scrub"],
                 rng.uniform(0.1, took * 1.1))
        assert vm.status() != "running", f"kill {i}: a save left the VM running"
        data = path.read_bytes()
        if data == old:
            outcomes["previous file intact"] += 1
        else:
            from vmwipe.host_agent.flows.save_scrub import verify_scrubbed

            verify_scrubbed(str(path), listed)  # whole walk, every listed copy zero
            outcomes["complete scrubbed save"] += 1
        for stray in path.parent.glob(f".{path.name}.*.partial"):
            strays += 1
            stray.unlink()
        # let QEMU finish or fail the migration whose reader died before the next round
        _migration_settled(vm)
    print(f"save --scrub SIGKILLed 6 times ({took:.2f} s per run): {outcomes}; "
          f"{strays} left a .PATH.XXXXXXXX.partial behind")
