"""Small helpers for driving a lab guest's shell from tests and scenarios.

Every guest test needs the same few moves: check the host can build and boot
a guest at all, run a command and insist it succeeds, start a program in the
background and wait for a line of its output.  They live here once.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Sequence

from .build import BUSYBOX, default_kernel
from .guest import Console, Guest, GuestError

TOOLS = ("qemu-system-x86_64", "gcc", "cpio", "make")


def missing_prerequisite(extra_tools: Sequence[str] = ()) -> str | None:
    """Why a lab guest cannot be built and booted here, or None (tests skip with it)."""
    if os.geteuid() != 0:
        return "needs root (pagemap PFNs, mknod for the initramfs, writes into QEMU)"
    for tool in (*TOOLS, *extra_tools):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    if not BUSYBOX.is_file():
        return f"{BUSYBOX} missing (busybox-static)"
    kernel = default_kernel()
    if kernel is None:
        return "no /boot/vmlinuz-* with matching /usr/src/linux-headers-*"
    if kernel.missing():
        return f"{kernel.release}: missing {', '.join(kernel.missing())}"
    return None


def _console(g: Guest | Console) -> Console:
    """A guest's console, or a console attached on its own (a clone's serial socket)."""
    if isinstance(g, Console):
        return g
    if g.console is None:
        raise GuestError("the guest has no console")
    return g.console


def sh(g: Guest | Console, cmd: str, timeout: float = 60) -> str:
    """Run `cmd` in the guest shell; its output, or GuestError if it exits non-zero."""
    return _console(g).check(cmd, timeout)


def rc(g: Guest | Console, cmd: str) -> int:
    """Run `cmd` in the guest shell and return its exit code."""
    return _console(g).run(cmd).rc


def start(g: Guest | Console, name: str, cmd: str) -> None:
    """Start `cmd` in the background, output in /tmp/NAME.out, PID in /tmp/NAME.pid."""
    sh(g, f"{cmd} > /tmp/{name}.out 2>&1 & echo $! > /tmp/{name}.pid")


def wait_output(g: Guest | Console, name: str, pattern: str, timeout: float = 60) -> str:
    """Poll a background command's output until `pattern` shows up."""
    deadline = time.monotonic() + timeout
    while True:
        # The background job opens its output file itself: on a loaded machine the first
        # look may come before it has run at all.
        out = sh(g, f"cat /tmp/{name}.out 2>/dev/null || true")
        if re.search(pattern, out, re.MULTILINE):
            return out
        if time.monotonic() > deadline:
            raise GuestError(f"{name}: no {pattern!r} in:\n{out}")
        time.sleep(0.1)


def stop(g: Guest | Console, name: str, signal: str = "TERM") -> None:
    """Signal a background command started with `start` and reap it."""
    sh(g, f"kill -{signal} $(cat /tmp/{name}.pid); wait $(cat /tmp/{name}.pid); true")
