"""Stale tables across a guest reboot, on a real Linux guest with vmwipe.ko (TCG).

QEMU does not clear RAM at a system reset.  A guest that registered pages and
then reboots abruptly (sysrq b: no `.shutdown`, so the module never clears its
table) leaves VALID slots naming pages that the next kernel, which does not
load the module, uses for anything at all.

- With the reset-time zero page (`-device loader`, SPEC.md section 7), the
  reset removes the magic: a snapshot of the rebooted guest restored through
  the agent wipes nothing, guest RAM is bit-for-bit the saved RAM, and the
  guest's shell answers afterwards.
- Without it, the stale table is indistinguishable from a live one (`vmwipe
  inspect` reports it registered and valid).  The agent refuses such a VM by
  default (reset guard: exit 5, nothing written, VM paused) on `wipe` and on
  `restore`; with `--no-reset-guard` it would zero the new kernel's pages,
  which is the hazard SECURITY.md describes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli

from vmwipe.host_agent.qemu.launcher import QemuProcess, start_qemu
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.host_agent.wipe.memmap import load_memory_map
from vmwipe.lab import GuestConfig, GuestImage
from vmwipe.lab.agent import AgentGuest, attach_console
from vmwipe.lab.shell import sh, wait_output

pytestmark = pytest.mark.slow
P = 4096


def register_then_crash_reboot(g: AgentGuest) -> list[int]:
    """insmod, map 3 pages, then reboot at once (no .shutdown); wait for the new boot."""
    assert g.console is not None
    # crng_refresh=0: the stale zero ranges are the hazard shown here (a stale table's
    # fill ranges would name the old kernel's CRNG: the same hazard, the same guard)
    sh(g.console, "insmod /vmwipe.ko crng_refresh=0")
    sh(g.console, "vmwipe_test hold 3 > /tmp/hold.out 2>&1 &")
    hold = wait_output(g.console, "hold", r"^HOLD READY$")
    pfns = [int(m, 16) for m in re.findall(r"^PFN \d+ (0x[0-9a-f]+)$", hold, re.MULTILINE)]
    assert len(pfns) == 3
    r = run_cli("inspect", "--qmp", g.agent_qmp, "--json")
    info = json.loads(r.stdout)["extra"]
    assert info["registered"] and info["slots_valid"] == 3
    g.console.mark()
    g.console.send("0 echo 1 > /proc/sys/kernel/sysrq; echo b > /proc/sysrq-trigger")
    g.wait_ready()  # the same kernel command line; this boot never loads vmwipe.ko
    assert "vmwipe" not in sh(g.console, "cat /proc/modules")
    return pfns


def _page_hashes(path: Path, out: list[bytes]) -> None:
    with open(path, "rb") as f:
        while page := f.read(P):
            out.append(hashlib.blake2b(page, digest_size=16).digest())


def ram_pages(qmp: str, directory: Path) -> dict[int, bytes]:
    """A hash of every 4 KiB page of guest RAM by address, read with pmemsave via a FIFO."""
    pages: dict[int, bytes] = {}
    with QMPSession(qmp) as s:
        memdevs = {str(m["id"]) for m in s.cmd("query-memdev")}
        for r in load_memory_map(s.hmp, memdevs).ranges:
            fifo = directory / "ram.fifo"
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo)
            got: list[bytes] = []
            t = threading.Thread(target=_page_hashes, args=(fifo, got))
            t.start()
            s.cmd("pmemsave", {"val": r.gpa, "size": r.size, "filename": str(fifo)}, timeout=120)
            t.join(60)
            fifo.unlink()
            assert len(got) == r.size // P
            pages.update((r.gpa + i * P, h) for i, h in enumerate(got))
    return pages


def changed_pages(a: dict[int, bytes], b: dict[int, bytes]) -> list[int]:
    assert a.keys() == b.keys()
    return sorted(g for g in a if a[g] != b[g])


def vmgenid_page(qmp: str, gpas: list[int]) -> bool:
    """True if the one page in `gpas` holds this QEMU's new vmgenid GUID (QEMU writes it
    into guest RAM when an incoming migration ends; it is not the agent's doing)."""
    with QMPSession(qmp) as s:
        guid = uuid.UUID(str(s.cmd("query-vm-generation-id")["guid"])).bytes_le
        if len(gpas) != 1:
            return False
        page = Path(qmp).with_suffix(".page")
        s.cmd("pmemsave", {"val": gpas[0], "size": P, "filename": str(page)})
        data = page.read_bytes()
        page.unlink()
    return guid in data


@pytest.fixture
def qemus() -> Iterator[list[QemuProcess]]:
    started: list[QemuProcess] = []
    yield started
    for q in started:
        q.kill()


def test_stale_table_after_reboot_wipes_nothing(image: GuestImage, tmp_path: Path,
                                                qemus: list[QemuProcess]) -> None:
    g = AgentGuest(GuestConfig(image))
    with g:
        register_then_crash_reboot(g)
        r = run_cli("inspect", "--qmp", g.agent_qmp, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["extra"]["registered"] is False  # the loader cleared it
        snap = tmp_path / "rebooted.state"
        r = run_cli("save", "--paused", "--qmp", g.agent_qmp, "--to", str(snap))
        assert r.returncode == 0, r.stderr
        saved = ram_pages(g.agent_qmp, tmp_path)

        con = str(tmp_path / "con.sock")
        qp = start_qemu(g.clone_args(con), str(tmp_path / "qmp"),
                        log_path=str(tmp_path / "qemu.log"), incoming_defer=True)
        qemus.append(qp)
        r = run_cli("restore", "--qmp", qp.qmp_path, "--from", str(snap), "--paused",
                    "--json")
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["wipe"]["status"] == "nothing-registered" and rep["wipe"]["pages"] == 0
        assert rep["state_after"] == "paused"
        # not one byte written by the agent; QEMU itself put the new vmgenid GUID in one page
        diff = changed_pages(saved, ram_pages(qp.qmp_path, tmp_path))
        assert diff == [] or vmgenid_page(qp.qmp_path, diff), [hex(g) for g in diff]
        with QMPSession(qp.qmp_path) as s:
            s.cmd("cont")
        console, sock = attach_console(con, tmp_path / "console.log")
        try:
            assert "still alive" in sh(console, "echo still alive")
            assert "vmwipe" not in sh(console, "cat /proc/modules")
        finally:
            sock.close()


def test_reset_guard_refuses_a_vm_without_the_zero_page(image: GuestImage, tmp_path: Path,
                                                        qemus: list[QemuProcess]) -> None:
    g = AgentGuest(GuestConfig(image, loader=False))
    with g:
        pfns = register_then_crash_reboot(g)
        # the previous boot's table survived the reset and looks live
        r = run_cli("inspect", "--qmp", g.agent_qmp, "--json")
        info = json.loads(r.stdout)["extra"]
        assert info["registered"] and info["slots_valid"] == 3 and info["errors"] == []
        assert {s["gpa"] for s in info["slots"]} == {p * P for p in pfns}
        # the module's own seed range is a fill range even with crng_refresh=0
        fill_pages = {f["gpa"] // P * P for f in info["fill_ranges"]}
        assert all(f["length"] <= P - f["gpa"] % P for f in info["fill_ranges"])
        assert any("reset guard" in w for w in json.loads(r.stdout)["warnings"])

        g.qmp("stop")
        before = ram_pages(g.agent_qmp, tmp_path)
        r = run_cli("wipe", "--qmp", g.agent_qmp)
        assert r.returncode == 5, r.stderr
        line = r.stderr.strip()
        assert "\n" not in line and "lacks -device loader" in line and "stale table" in line
        assert g.qmp("query-status")["status"] == "paused"
        assert changed_pages(before, ram_pages(g.agent_qmp, tmp_path)) == []

        # restore refuses before loading anything
        snap = tmp_path / "rebooted.state"
        r = run_cli("save", "--paused", "--qmp", g.agent_qmp, "--to", str(snap))
        assert r.returncode == 0, r.stderr
        qp = start_qemu(g.clone_args(str(tmp_path / "con.sock")), str(tmp_path / "qmp"),
                        log_path=str(tmp_path / "qemu.log"), incoming_defer=True)
        qemus.append(qp)
        r = run_cli("restore", "--qmp", qp.qmp_path, "--from", str(snap))
        assert r.returncode == 5 and "lacks -device loader" in r.stderr, r.stderr
        with QMPSession(qp.qmp_path) as s:
            assert s.status() == "inmigrate"  # never loaded, never ran

        # the hazard itself: forced past the guard, the agent zeroes the new kernel's pages
        r = run_cli("wipe", "--paused", "--qmp", g.agent_qmp, "--no-reset-guard", "--json")
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["wipe"]["pages"] == 3 and any("reset guard" in w for w in rep["warnings"])
        # (the stale pages, whatever the new kernel keeps there now, the stale fill ranges
        # given random bytes, and the header bump)
        after = ram_pages(g.agent_qmp, tmp_path)
        diff = set(changed_pages(before, after))
        assert g.region.base in diff
        assert diff <= {p * P for p in pfns} | fill_pages | {g.region.base}
        # every stale page now reads as zero, whether or not the new kernel had already
        # cleared it (Debian kernels zero pages they allocate: init_on_alloc)
        zero = hashlib.blake2b(bytes(P), digest_size=16).digest()
        assert all(after[p * P] == zero for p in pfns)
