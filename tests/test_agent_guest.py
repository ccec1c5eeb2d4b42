"""The agent's save, restore and clone flows on a real Linux guest running vmwipe.ko.

The guest (vmwipe.lab: Debian kernel, busybox initramfs, vmwipe.ko, TCG) maps
pages through /dev/vmwipe, then `vmwipe save` stops and saves it.  `vmwipe
restore` and `vmwipe clone` load that state into new QEMU processes, wipe the
listed pages before any guest instruction runs, and resume.  Inside each
clone, `vmwipe_test poll` must then see the generation bump and read its page
back as zero; on the host, the pages named by the guest's PFNs are zero.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli

from vmwipe.host_agent.qemu.launcher import QemuProcess, start_qemu
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.lab import GuestConfig, GuestImage
from vmwipe.lab.agent import AgentGuest, attach_console, register_holder
from vmwipe.lab.shell import sh, wait_output

pytestmark = pytest.mark.slow
P = 4096


@pytest.fixture(scope="module")
def saved(image: GuestImage, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[AgentGuest, Path, list[int]]]:
    """A booted guest holding 4 pages plus a poller's page, saved by `vmwipe save`."""
    d = tmp_path_factory.mktemp("guest")
    g = AgentGuest(GuestConfig(image))
    with g:
        assert g.console is not None
        pfns = register_holder(g, 4)
        assert len(pfns) == 4

        r = run_cli("inspect", "--qmp", g.agent_qmp, "--json")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)["extra"]
        # 4 held pages, the poll waiter's page, and the kernel CRNG's fill ranges
        fills = info["fill_ranges"]
        assert [f["length"] for f in fills][:3] == [32, 8, 32]
        assert info["registered"] and info["slots_used"] == 5 + len(fills)
        assert info["errors"] == []
        assert {p * P for p in pfns} <= {s["gpa"] for s in info["slots"]}

        snap = d / "guest.state"
        r = run_cli("save", "--paused", "--qmp", g.agent_qmp, "--to", str(snap), "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["state_after"] == "postmigrate"
        yield g, snap, pfns


def check_clone(qmp: str, console_sock: str, log: Path, pfns: list[int]) -> None:
    with QMPSession(qmp) as s:
        assert s.status() == "running"
    console, sock = attach_console(console_sock, log)
    try:
        out = wait_output(console, "poll", r"^POLL (OK|FAIL)$", timeout=60)
        assert "POLL OK" in out and "POLL WOKE gen=1 zero=1" in out, out
        # the holder's pages were wiped under it: it reads zeros where it wrote 0x5a
        sh(console, "kill -TERM $(pidof vmwipe_test) 2>/dev/null; true")
    finally:
        sock.close()


def test_restore_real_guest(saved: tuple[AgentGuest, Path, list[int]], tmp_path: Path) -> None:
    g, snap, pfns = saved
    con = str(tmp_path / "con.sock")
    qp: QemuProcess = start_qemu(g.clone_args(con), str(tmp_path / "qmp"),
                                 log_path=str(tmp_path / "qemu.log"), incoming_defer=True)
    try:
        r = run_cli("restore", "--qmp", qp.qmp_path, "--from", str(snap), "--paused", "--json")
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["wipe"]["status"] == "wiped" and rep["wipe"]["pages"] == 5
        assert rep["wipe"]["fill_ranges"] >= 3  # the kernel CRNG, refilled
        assert rep["wipe"]["generation_after"] == 1 and rep["state_after"] == "paused"
        with QMPSession(qp.qmp_path) as s:
            for pfn in pfns:
                path = tmp_path / "page.bin"
                s.cmd("pmemsave", {"val": pfn * P, "size": P, "filename": str(path)})
                assert path.read_bytes() == bytes(P)
            s.cmd("cont")
        check_clone(qp.qmp_path, con, tmp_path / "console.log", pfns)
    finally:
        qp.kill()


def test_clone_real_guest(saved: tuple[AgentGuest, Path, list[int]], tmp_path: Path) -> None:
    g, snap, pfns = saved
    d = tmp_path / "clones"
    r = run_cli("clone", str(snap), "-n", "2", "--dir", str(d), "--json", "--",
                *g.clone_args(str(d / "con-{i}.sock")), timeout=300)
    assert r.returncode == 0, r.stderr
    clones = json.loads(r.stdout)["clones"]
    try:
        assert len(clones) == 2
        for c in clones:
            assert c["report"]["wipe"]["pages"] == 5 and c["report"]["resumed"]
            check_clone(c["qmp"], str(d / f"con-{c['index']}.sock"),
                        tmp_path / f"console-{c['index']}.log", pfns)
    finally:
        for c in clones:
            os.kill(c["pid"], signal.SIGKILL)
    # the original guest is untouched and can run on
    g.qmp("cont")
    assert g.console is not None
    assert "POLL WAIT gen=0" in sh(g.console, "cat /tmp/poll.out")
    assert "POLL OK" not in sh(g.console, "cat /tmp/poll.out")
