"""A lab guest driven by the host agent: the boot-and-register steps the agent tests share.

The agent's guest tests (restore, clone, template, template CRNG) all boot the
lab guest with a second QMP monitor for the agent, load vmwipe.ko, and most
make it hold a few pages plus a `poll()` waiter; the template tests also put
its RAM in a `share=on` file on /dev/shm.  Written once here so the tests
differ only in what they check.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .guest import Console, Guest, GuestError
from .shell import sh, wait_output

PAGE = 4096


class AgentGuest(Guest):
    """A lab guest with a second QMP monitor for the agent (the lab keeps the first)."""

    @property
    def agent_qmp(self) -> str:
        return str(self._tmp / "agent.qmp")

    def qemu_args(self) -> list[str]:
        return [*super().qemu_args(), "-qmp", f"unix:{self.agent_qmp},server=on,wait=off"]

    def clone_args(self, console_sock: str) -> list[str]:
        """This guest's QEMU command line for a clone: serial on a socket, no lab monitors."""
        args = Guest.qemu_args(self)
        out: list[str] = []
        i = 0
        while i < len(args):
            if args[i] == "-qmp":
                i += 2
                continue
            if args[i] == "-chardev" and args[i + 1].startswith("stdio,id=con"):
                out += ["-chardev", f"socket,id=con,path={console_sock},server=on,wait=off"]
                i += 2
                continue
            out.append(args[i])
            i += 1
        return out


def attach_console(path: str, log: Path) -> tuple[Console, socket.socket]:
    """A clone's serial console, connected over its socket chardev (the lab's stdio is gone)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return Console(s.makefile("rb"), s.makefile("wb"), log), s


def register_holder(g: Guest, pages: int = 4) -> list[int]:
    """insmod vmwipe.ko, hold `pages` pages and start a `poll()` waiter; the held PFNs.

    The waiter (`vmwipe_test poll`, output in /tmp/poll.out) is what a clone checks
    to see its wipe arrive; the holder's pages are what the wipe must zero.
    """
    sh(g, "insmod /vmwipe.ko")
    sh(g, f"vmwipe_test hold {pages} > /tmp/hold.out 2>&1 &")
    sh(g, "vmwipe_test poll 120000 > /tmp/poll.out 2>&1 &")
    hold = wait_output(g, "hold", r"^HOLD READY$")
    wait_output(g, "poll", r"^POLL WAIT gen=0$")
    pfns = [int(m, 16) for m in re.findall(r"^PFN \d+ (0x[0-9a-f]+)$", hold, re.MULTILINE)]
    if len(pfns) != pages:
        raise GuestError(f"vmwipe_test hold {pages} reported {len(pfns)} PFNs:\n{hold}")
    return pfns


@contextlib.contextmanager
def shm_ram(size_mib: int = 512,
            backend_id: str = "ram0") -> Iterator[tuple[Path, tuple[str, ...]]]:
    """A RAM file on /dev/shm and the QEMU arguments that make it the guest's shared RAM.

    tmpfs, as docs/templates.md tells template users: a scrub in place there leaves no old
    blocks behind.  The file's directory is removed on exit, whatever happened.
    """
    d = Path(tempfile.mkdtemp(prefix="vmwipe-tpl-", dir="/dev/shm"))
    ram = d / "ram"
    try:
        fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # owner-only: guest RAM
        try:
            os.ftruncate(fd, size_mib << 20)
        finally:
            os.close(fd)
        yield ram, ("-object", f"memory-backend-file,id={backend_id},size={size_mib}M,"
                    f"mem-path={ram},share=on", "-machine", f"memory-backend={backend_id}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def without_ram(args: Sequence[str]) -> list[str]:
    """A clone command line minus the template's memory backend (`vmwipe clone --template`
    adds its own, private, mapping of the template file)."""
    out: list[str] = []
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        nxt = args[i + 1] if i + 1 < len(args) else ""
        if (a == "-object" and nxt.startswith("memory-backend")) or (
                a == "-machine" and nxt.startswith("memory-backend=")):
            skip = True
            continue
        out.append(a)
    return out
