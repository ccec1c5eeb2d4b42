"""`save --scrub` of a guest suspended to RAM (S3) on the system QEMU.

QEMU >= 9 stops a suspended guest (`tests/test_loadvm_suspended.py` covers that on
QEMU 10); QEMU 7.2 ignores `stop` there, and a wake-up during the save would let
the guest run after its table was read.  There the save is refused, nothing is
written and the guest stays as it was.  One real guest (the lab kernel), no module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU, qemu_available
from test_loadvm_suspended import WakeAtTableRead

from vmwipe.host_agent.errors import VMStateError
from vmwipe.host_agent.flows.save_scrub import save_scrubbed
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.lab import Guest, GuestConfig, GuestImage
from vmwipe.lab.shell import start

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not qemu_available(), reason=f"{QEMU} not installed")]


@pytest.fixture(scope="module")
def suspended(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Guest, Path]]:
    mon = tmp_path_factory.mktemp("s3") / "agent.qmp"
    cfg = GuestConfig(image, qemu=QEMU, extra_args=("-qmp", f"unix:{mon},server=on,wait=off"))
    with Guest(cfg) as g:
        start(g, "s3", "sh -c 'echo mem > /sys/power/state'")
        deadline = time.monotonic() + 60
        while g.qmp("query-status")["status"] != "suspended":
            assert time.monotonic() < deadline, "the guest did not reach S3"
            time.sleep(0.1)
        yield g, mon


def test_save_scrub_of_a_suspended_guest_never_lets_it_wake(
        suspended: tuple[Guest, Path], tmp_path: Path) -> None:
    g, mon = suspended
    out = tmp_path / "s3.state"
    with QMPSession(str(mon)) as s:
        spy = WakeAtTableRead(s)
        if s.version[0] >= 9:
            save_scrubbed(spy, str(out))
            assert spy.woke is False, "the guest could wake (and run) after its table was read"
            return
        with pytest.raises(VMStateError, match="does not stop it"):
            save_scrubbed(spy, str(out))
    assert spy.woke is None  # refused before the table was read
    assert g.qmp("query-status")["status"] == "suspended"
    assert not out.exists() and not list(tmp_path.iterdir())
