"""The one monitor protocol: what driving a QEMU needs from its monitor connection.

Two connections reach a QEMU: the agent's own `QMPSession`, and libvirt's
monitor (`libvirt.flows.LibvirtMonitor`, through `qemuMonitorCommand`) for
domains whose QMP socket libvirt holds.  Everything that finds and wipes a
target is written against this protocol, so both callers share one code path.
"""

from __future__ import annotations

from typing import Any, Protocol


class Monitor(Protocol):
    """QMP commands, HMP lines, and the run state of one QEMU."""

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Run a QMP command and return its `return` value; QMPFailure on error."""
        ...

    def hmp(self, line: str) -> str:
        """Run an HMP command line and return its text output."""
        ...

    def status(self) -> str:
        """The run state (`query-status`): running, paused, prelaunch, inmigrate, ..."""
        ...
