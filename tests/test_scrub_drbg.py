"""End to end with a real guest: the example DRBG's key never survives in a saved VM.

A Linux guest (TCG) loads vmwipe.ko and runs `drbg_stream`, whose ChaCha20
key, counter and epoch live in a page registered in the vmwipe table.  Its
state page, read with pmemsave after the VM stopped, is the secret pattern:

- plain save, then `vmwipe scrub FILE` with no options (layout and region
  come from the stream itself);
- `save_scrubbed` (`vmwipe save --scrub`), where the page goes out as zeros.

In both cases the file holds no copy of the key, and a *plain* restore (no
agent, nothing but `migrate-incoming` and `cont`) runs: the DRBG finds its
page zeroed and continues with a new epoch from a fresh seed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmwipe.host_agent.cli import main as vmwipe_main
from vmwipe.host_agent.flows.save_scrub import save_scrubbed
from vmwipe.lab import Guest, GuestConfig, GuestError, GuestImage

pytestmark = pytest.mark.slow
PAGE = 4096


def sh(g: Guest, cmd: str, timeout: float = 60) -> str:
    assert g.console is not None
    return g.console.check(cmd, timeout)


def drbg_rows(g: Guest, at_least: int, timeout: float = 60) -> list[list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        out = sh(g, "cat /tmp/drbg.out")
        rows = [r.split() for r in out.splitlines()
                if re.fullmatch(r"[0-9a-f]{16} \d+ [0-9a-f]{16}", r.strip())]
        if len(rows) >= at_least:
            return rows
        if time.monotonic() > deadline:
            raise GuestError(f"drbg_stream printed only:\n{out}")
        time.sleep(0.2)


@pytest.fixture
def drbg_guest(image: GuestImage) -> Iterator[tuple[Guest, int]]:
    """A guest with vmwipe.ko and drbg_stream running; yields it and the DRBG page's GPA."""
    with Guest(GuestConfig(image)) as g:
        sh(g, "insmod /vmwipe.ko")
        sh(g, "drbg_stream -i 50 > /tmp/drbg.out 2>&1 &")
        drbg_rows(g, 3)
        table = g.table()
        assert len(table.slots) == 1 and table.slots[0].npages == 1
        yield g, table.slots[0].gpa


class LabMonitor:
    """`save_scrub.SaveMonitor` over the lab guest's own QMP connection (QMP takes one client)."""

    def __init__(self, g: Guest) -> None:
        self.g = g
        self.pid = g.pid
        self.version = (7, 2, 0)

    def cmd(self, name: str, args: dict[str, Any] | None = None,
            timeout: float | None = None) -> Any:
        return self.g.qmp(name, **(args or {}))

    def hmp(self, line: str, timeout: float | None = None) -> str:
        return self.g.hmp(line)

    def status(self) -> str:
        return str(self.g.qmp("query-status")["status"])

    def send_fd(self, fd: int, name: str) -> None:
        client: Any = self.g._qmp
        client.send_fd_scm(fd)
        self.g.qmp("getfd", fdname=name)


def secret_chunks(page: bytes) -> list[bytes]:
    """32-byte pieces of the state page that are not zero: the key and its neighbours."""
    chunks = [page[i:i + 32] for i in range(0, 256, 32)]
    found = [c for c in chunks if c.count(0) < 8]
    assert found, "DRBG state page is empty"
    return found


def check_plain_restore(image: GuestImage, path: Path, epoch_before: str) -> None:
    """No agent: load the file, cont, and watch the DRBG reseed with a new epoch."""
    with Guest(GuestConfig(image, incoming=path)) as clone:
        clone.qmp("cont")
        deadline = time.monotonic() + 60
        while True:
            rows = drbg_rows(clone, 1)
            epochs = [r[0] for r in rows]
            if epochs[-1] != epoch_before:
                break
            assert time.monotonic() < deadline, "the restored DRBG never reseeded"
            time.sleep(0.3)
        cut = epochs.index(epochs[-1])
        assert all(e == epoch_before for e in epochs[:cut])
        assert [int(r[1]) for r in rows[cut:]] == list(range(len(rows) - cut))
        header = clone.table().header
        assert header is not None  # the table itself survived the scrub
        assert header.wipe_generation == 1 and header.wipe_pages == 1  # counted as a wipe


def test_plain_save_then_scrub(drbg_guest: tuple[Guest, int], image: GuestImage,
                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g, gpa = drbg_guest
    path = tmp_path / "drbg.sav"
    g.save(path)  # stop + migrate exec:cat
    page = g.read_phys(gpa, PAGE)  # the VM is stopped: this is what was saved
    chunks = secret_chunks(page)
    blob = path.read_bytes()
    assert all(c in blob for c in chunks)
    rc = vmwipe_main(["scrub", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "zeroed 1 copies" in out
    blob = path.read_bytes()
    assert not any(c in blob for c in chunks)
    g.qmp("cont")
    epoch_before = drbg_rows(g, 1)[-1][0]
    check_plain_restore(image, path, epoch_before)


def test_save_scrub(drbg_guest: tuple[Guest, int], image: GuestImage, tmp_path: Path) -> None:
    g, gpa = drbg_guest
    path = tmp_path / "drbg-scrubbed.sav"
    rep = save_scrubbed(LabMonitor(g), str(path))
    assert rep.pages == 1 and rep.zeroed_copies == 1
    page = g.read_phys(gpa, PAGE)  # the VM is stopped: this is what was streamed
    chunks = secret_chunks(page)
    blob = path.read_bytes()
    assert not any(c in blob for c in chunks)
    g.qmp("cont")
    epoch_before = drbg_rows(g, 1)[-1][0]
    check_plain_restore(image, path, epoch_before)
