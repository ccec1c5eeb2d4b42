"""`vmwipe loadvm` on a guest suspended to RAM (S3), on QEMU >= 9.

QEMU >= 9 counts `suspended` as a live run state, and `loadvm` starts the vCPUs again after
loading when the VM was live before it: the restored guest would run before any wipe.  The agent
stops such a VM first, so the load ends paused.  `save --scrub` stops it too, before it reads
the table, so a wake-up during the save is refused.  One real guest (the lab kernel with vmwipe.ko
and a page of `vmwipe_test hold`), a qcow2 disk for the internal snapshot.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from test_migstream import QEMU10, needs_qemu10

from vmwipe.host_agent.errors import QMPCommandError
from vmwipe.host_agent.flows.save_scrub import save_scrubbed
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.lab import Guest, GuestConfig, GuestImage
from vmwipe.lab.shell import start, wait_output

pytestmark = [pytest.mark.slow, needs_qemu10]


@pytest.fixture(scope="module")
def suspended(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Guest, Path, int]]:
    """A guest with one registered page, saved as snapshot s1 while in S3."""
    work = tmp_path_factory.mktemp("loadvm-s3")
    disk = work / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    mon = work / "agent.qmp"
    cfg = GuestConfig(image, qemu=QEMU10, extra_args=(
        "-drive", f"file={disk},if=none,id=d0", "-device", "virtio-blk-pci,drive=d0",
        "-qmp", f"unix:{mon},server=on,wait=off"))
    with Guest(cfg) as g:
        assert g.console is not None
        g.console.check("insmod /vmwipe.ko crng_refresh=0")
        start(g, "hold", "vmwipe_test hold 1")
        out = wait_output(g, "hold", r"^HOLD READY$")
        pfn = int(out.split("PFN 0 ")[1].split()[0], 16)
        start(g, "s3", "sh -c 'echo mem > /sys/power/state'")
        deadline = time.monotonic() + 60
        while g.qmp("query-status")["status"] != "suspended":
            assert time.monotonic() < deadline, "the guest did not reach S3"
            time.sleep(0.1)
        assert g.hmp("savevm s1").strip() == ""
        assert g.qmp("query-status")["status"] == "suspended"
        yield g, mon, pfn << 12


def test_loadvm_of_a_suspended_vm_ends_paused_and_wiped(suspended: tuple[Guest, Path, int]
                                                        ) -> None:
    g, mon, gpa = suspended
    assert g.read_phys(gpa, 4096) == b"\x5a" * 4096
    r = run_cli("loadvm", "--qmp", str(mon), "s1", "--paused", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["state_before"] == "suspended" and not rep["resumed"]
    assert g.qmp("query-status")["status"] == "paused"
    assert rep["wipe"]["pages"] >= 1
    assert g.read_phys(gpa, 4096) == bytes(4096)


class WakeAtTableRead:
    """The agent's own QMP session, plus the event `save --scrub` must survive: a wake-up
    (the guest's RTC alarm, an input event) the moment the table is read."""

    def __init__(self, session: QMPSession) -> None:
        self.session = session
        self.pid, self.version = session.pid, session.version
        self.woke: bool | None = None

    def cmd(self, name: str, args: dict[str, Any] | None = None,
            timeout: float | None = None) -> Any:
        if name == "pmemsave" and self.woke is None:
            try:
                self.session.cmd("system_wakeup")
                self.woke = True
            except QMPCommandError:
                self.woke = False
        return self.session.cmd(name, args, timeout=timeout)

    def hmp(self, line: str, timeout: float | None = None) -> str:
        return self.session.hmp(line, timeout)

    def status(self) -> str:
        return self.session.status()

    def send_fd(self, fd: int, name: str) -> None:
        self.session.send_fd(fd, name)


def test_save_scrub_stops_a_suspended_vm(suspended: tuple[Guest, Path, int],
                                         tmp_path: Path) -> None:
    """`save --scrub` of a guest in S3: stopped before its table is read, so a wake-up during
    the save is refused and the guest cannot list pages the save would carry unscrubbed."""
    g, mon, _gpa = suspended
    if g.qmp("query-status")["status"] != "suspended":  # after the loadvm test: S3 again
        g.qmp("cont")
        deadline = time.monotonic() + 30
        while g.qmp("query-status")["status"] != "suspended":
            assert time.monotonic() < deadline, "the guest did not go back to S3"
            time.sleep(0.1)
    with QMPSession(str(mon)) as s:
        spy = WakeAtTableRead(s)
        rep = save_scrubbed(spy, str(tmp_path / "s3.state"))
    assert rep.state_before == "suspended"
    assert spy.woke is False, "the guest could wake (and run) after its table was read"
