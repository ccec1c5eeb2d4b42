"""`vmwipe loadvm` on a guest suspended to RAM (S3), on QEMU >= 9.

QEMU >= 9 counts `suspended` as a live run state, and `loadvm` starts the vCPUs again after
loading when the VM was live before it: the restored guest would run before any wipe.  The agent
stops such a VM first, so the load ends paused.  One real guest (the lab kernel with vmwipe.ko
and a page of `vmwipe_test hold`), a qcow2 disk for the internal snapshot.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from test_migstream import QEMU10, needs_qemu10

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
    r = run_cli("loadvm", "--qmp", str(mon), "s1", "--no-resume", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["state_before"] == "suspended" and not rep["resumed"]
    assert g.qmp("query-status")["status"] == "paused"
    assert rep["wipe"]["pages"] >= 1
    assert g.read_phys(gpa, 4096) == bytes(4096)
