"""The report every flow returns, and the run state it ends with.

One shape for every command, so `--json` output and the exit-code rules read the
same whichever flow ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import QMPFailure
from ..qemu.qmp import QMPSession
from ..wipe.engine import WipeReport


@dataclass
class FlowReport:
    """A command's report: the wipe report plus flow-level facts."""

    command: str
    qmp: str
    pid: int
    qemu_version: str
    state_before: str = ""
    state_after: str = ""
    resumed: bool = False
    region_source: str = ""
    warnings: list[str] = field(default_factory=list)
    wipe: WipeReport | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # the nested WipeReport too


def new_report(command: str, session: QMPSession) -> FlowReport:
    return FlowReport(command, session.path, session.pid, ".".join(map(str, session.version)))


def state_after(session: QMPSession, rep: FlowReport) -> str:
    """The final run state.  Once `cont` went through, losing the monitor is no failure:
    an error exit must mean "the VM was left paused" (errors.py)."""
    try:
        return session.status()
    except QMPFailure as e:
        if not rep.resumed:
            raise
        rep.warnings.append(f"resumed after a verified wipe; run state unreadable: {e}")
        return "unknown"
