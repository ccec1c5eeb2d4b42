"""Start and stop QEMU processes with their own QMP socket (for `clone` and the tests).

Each process gets `-qmp unix:SOCK,server=on,wait=off` and, as asked, `-S` and
`-incoming defer`, so it never runs guest code before the agent lets it.
Processes are stopped by the PID this module started, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import LaunchError


@dataclass
class QemuProcess:
    """A QEMU we started: its Popen, QMP socket path and log file."""

    proc: subprocess.Popen[bytes]
    qmp_path: str
    log_path: str | None
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-lines:])
        except OSError:
            return ""

    def exit_error(self, grace: float) -> LaunchError | None:
        """A LaunchError saying why, if QEMU has exited or exits within `grace` seconds;
        None while it runs."""
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return None
        tail = self.log_tail() or "no output"
        return LaunchError(f"QEMU exited with status {self.proc.returncode}: {tail}")

    def wait_for_qmp(self, timeout: float = 20.0) -> None:
        """Block until the QMP socket accepts connections; LaunchError if QEMU dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (err := self.exit_error(0)) is not None:
                raise err
            if os.path.exists(self.qmp_path):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(self.qmp_path)
                    return
                except OSError:
                    pass
                finally:
                    s.close()
            # QEMU opens the socket ~30-50 ms after exec; a clone fleet's first clone
            # waits for it, so poll finely (a stat and, once it exists, a connect)
            time.sleep(0.002)
        raise LaunchError(f"QEMU pid {self.pid} did not open {self.qmp_path} within {timeout:g} s")

    def kill(self) -> None:
        """SIGKILL this QEMU (by its PID) and reap it."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_path)


def start_qemu(
    argv: Sequence[str],
    qmp_path: str,
    *,
    log_path: str | None = None,
    paused: bool = True,
    incoming_defer: bool = False,
    detach: bool = False,
    wait: float | None = 20.0,
) -> QemuProcess:
    """Start `argv` (binary first) with a QMP socket; wait until the socket answers.

    `detach` puts QEMU in its own session so it outlives the agent (clones).
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(qmp_path)
    full = [*argv, "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    if paused:
        full.append("-S")
    if incoming_defer:
        full += ["-incoming", "defer"]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )
    except OSError as e:
        raise LaunchError(f"cannot start {argv[0]}: {e.strerror}") from None
    finally:
        if log_path and not isinstance(out, int):
            out.close()
    qp = QemuProcess(proc, qmp_path, log_path, full)
    if wait is not None:
        try:
            qp.wait_for_qmp(wait)
        except BaseException:
            qp.kill()
            raise
    return qp
