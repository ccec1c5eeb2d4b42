"""Synchronous QMP/HMP session on top of the asyncio `qemu.qmp` client (pinned 0.0.6).

The CLI and the wipe engine are sequential, so the session owns a private event
loop and exposes blocking calls with timeouts.  It also:

- connects the unix socket itself, to read the QEMU PID from SO_PEERCRED before
  handing the socket to `QMPClient`;
- listens to every event from the first moment, so an event that arrives
  between two calls (MIGRATION "completed", STOP, ...) is never lost;
- turns every failure into `QMPFailure` with a one-line message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from ..errors import QMPCommandError, QMPFailure, QMPTimeout
from ._vendored import add_vendored_qmp

add_vendored_qmp()
from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError  # noqa: E402

log = logging.getLogger(__name__)
T = TypeVar("T")

Event = dict[str, Any]
_UCRED = struct.Struct("3i")


def peer_pid(sock: socket.socket) -> int:
    """PID of the process at the other end of a connected AF_UNIX socket (SO_PEERCRED).

    The user names only the socket; the memory backends need the PID.  Peer
    credentials come from the kernel, so they cannot be spoofed by a stale pidfile.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, _uid, _gid = _UCRED.unpack(raw)
    if pid <= 0:
        raise OSError("SO_PEERCRED returned no PID for the QMP socket")
    return int(pid)


class QMPSession:
    """One QMP connection.  Use as a context manager or call `close()`."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.pid = 0
        self.version: tuple[int, int, int] = (0, 0, 0)
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("vmwipe")
        self._events = EventListener()
        self._client.register_listener(self._events)
        self._connected = False

    # -- plumbing ------------------------------------------------------------------
    def _run(self, coro: Awaitable[T], timeout: float | None, what: str) -> T:
        limit = self.timeout if timeout is None else timeout
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, limit))
        except TimeoutError:
            raise QMPTimeout(f"{what}: no answer from QEMU within {limit:g} s") from None
        except ExecuteError as e:
            raise QMPCommandError(what, e.error_class, str(e)) from None
        except (QMPError, OSError, EOFError) as e:
            detail = str(e) or type(e).__name__
            raise QMPFailure(f"{what}: QMP connection to {self.path} failed: {detail}") from None

    def connect(self) -> QMPSession:
        """Connect, negotiate capabilities and learn PID and QEMU version."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            self.pid = peer_pid(sock)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise QMPFailure(
                f"cannot connect to QMP socket {self.path}: {e.strerror or e}"
            ) from None
        try:
            self._run(
                self._client.connect(sock), None, "QMP handshake (is another client attached?)"
            )
        except QMPFailure:
            sock.close()
            raise
        self._connected = True
        greeting = self._client.greeting
        if greeting is not None:
            v: dict[str, Any] = dict(greeting.QMP.version)["qemu"]  # type: ignore[assignment]
            self.version = (int(v["major"]), int(v["minor"]), int(v["micro"]))
        log.debug("QMP %s: QEMU %s pid %d", self.path, self.version, self.pid)
        return self

    def close(self) -> None:
        if self._connected:
            with contextlib.suppress(QMPFailure):
                self._run(self._client.disconnect(), 5.0, "QMP disconnect")
            self._connected = False
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> QMPSession:
        if not self._connected:
            try:
                self.connect()
            except BaseException:
                self.close()  # __exit__ will not run: release the event loop here
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ------------------------------------------------------------------
    def cmd(
        self, name: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run one QMP command and return its `return` value."""
        log.debug("QMP -> %s %s", name, args or "")
        res = self._run(self._client.execute(name, args), timeout, name)
        return res

    def batch(
        self, calls: Sequence[tuple[str, dict[str, Any] | None]], timeout: float | None = None
    ) -> list[Any]:
        """Send every command at once, then collect the answers: one round trip, not one
        per command.

        QEMU runs one monitor's commands in the order they arrive, so a batch is the
        same sequence as a `cmd` per entry, minus the wait between them: worth it in a
        clone's start-up, where a busy QEMU main loop makes every round trip slow.  A
        command QEMU refuses leaves its `QMPCommandError` in its place (the others
        still ran); a failed connection raises.
        """
        async def _all() -> list[Any]:
            return await asyncio.gather(
                *(self._client.execute(name, args) for name, args in calls),
                return_exceptions=True)

        what = "+".join(name for name, _args in calls)
        log.debug("QMP -> batch %s", what)
        out: list[Any] = []
        for (name, _args), res in zip(calls, self._run(_all(), timeout, what), strict=True):
            if isinstance(res, ExecuteError):
                out.append(QMPCommandError(name, res.error_class, str(res)))
            elif isinstance(res, BaseException):
                detail = str(res) or type(res).__name__
                raise QMPFailure(f"{name}: QMP connection to {self.path} failed: {detail}")
            else:
                out.append(res)
        return out

    def hmp(self, line: str, timeout: float | None = None) -> str:
        """Run one HMP command through `human-monitor-command`; returns its text output."""
        out = self.cmd("human-monitor-command", {"command-line": line}, timeout)
        return str(out)

    def status(self) -> str:
        """The run state from `query-status` (running, paused, prelaunch, inmigrate, ...)."""
        return str(self.cmd("query-status")["status"])

    def send_fd(self, fd: int, name: str) -> None:
        """Hand `fd` to QEMU under `name`: SCM_RIGHTS on the socket, then `getfd`.

        QEMU then opens nothing itself (`migrate fd:NAME`), whatever user it runs as.
        """
        self._client.send_fd_scm(fd)
        self.cmd("getfd", {"fdname": name})

    def at_least(self, major: int, minor: int) -> bool:
        return self.version[:2] >= (major, minor)

    # -- events --------------------------------------------------------------------
    def clear_events(self) -> None:
        """Forget events heard so far (call before starting the operation you wait on)."""
        self._events.clear()

    def wait_event(
        self,
        names: str | Iterable[str],
        timeout: float,
        predicate: Callable[[Event], bool] | None = None,
    ) -> Event | None:
        """Wait for the next event named `names` that satisfies `predicate`.

        Returns None on timeout (callers poll QEMU state as a fallback, so a
        timeout is not by itself a failure).
        """
        wanted = {names} if isinstance(names, str) else set(names)

        async def _next() -> Event:
            while True:
                msg = await self._events.get()
                ev: Event = dict(msg)
                log.debug("QMP <- event %s %s", ev.get("event"), ev.get("data", ""))
                if ev.get("event") in wanted and (predicate is None or predicate(ev)):
                    return ev

        try:
            return self._run(_next(), timeout, f"waiting for {sorted(wanted)}")
        except QMPTimeout:
            return None

    def wait_until(
        self, check: Callable[[], T | None], timeout: float, what: str, poll: float = 0.05
    ) -> T:
        """Poll `check` (e.g. a query) until it returns non-None, listening to events meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            got = check()
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPFailure(f"timed out after {timeout:g} s waiting for {what}")
            self._run(asyncio.sleep(min(poll, left)), left + 1.0, what)
