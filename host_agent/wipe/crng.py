"""Whether a guest registers its kernel CRNG, as its table says, and `--require-crng`.

The guest module writes `crng_status`, `crng_ranges` and `crng_reason` into the
table header (SPEC.md 4.1).  Without a registration the host still wipes
every listed page, but a clone's kernel CRNG (getrandom(), /dev/urandom,
the vDSO) keeps drawing from the state it shares with every other clone of
the image.  So every report says which it is, in one line, and
`--require-crng` refuses a guest that does not register it before anything is
written: it is never resumed (SECURITY.md).

The fields are a report from an untrusted guest.  The decoder has already
checked them against the spec; here "registered" also needs the table's fill
ranges to be there and valid, so a guest cannot claim the refresh while the
host fills nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vmwipe.protocol import (
    CRNG_STATUS_ACTIVE,
    CRNG_STATUS_DISABLED,
    CRNG_STATUS_NAMES,
    CRNG_STATUS_NOT_REPORTED,
    Table,
)

from ..errors import CrngNotRegisteredError

#: `status` when the region holds no table at all (no module, or a fresh boot).
NO_TABLE = "no_table"


@dataclass(frozen=True)
class CrngReport:
    """The kernel CRNG's registration: `status` is a CRNG_STATUS_NAMES value or NO_TABLE,
    `reason` the guest's own text, `summary` what every report prints after "kernel CRNG: "."""

    status: str
    ranges: int
    reason: str
    registered: bool
    summary: str

    def line(self) -> str:
        return f"kernel CRNG: {self.summary}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _not_registered(status: str, ranges: int, reason: str, why: str) -> CrngReport:
    return CrngReport(status, ranges, reason, False, f"NOT registered ({why})")


def crng_report(table: Table) -> CrngReport:
    """What `table` says about the kernel CRNG (a decoded, validated table)."""
    hdr = table.header
    if hdr is None:
        return _not_registered(NO_TABLE, 0, "", "no vmwipe table in the region")
    name = CRNG_STATUS_NAMES[hdr.crng_status]
    ranges, reason = hdr.crng_ranges, hdr.crng_reason
    if hdr.crng_status == CRNG_STATUS_NOT_REPORTED:
        why = "module did not report" if hdr.version > 1 else "v1 table: module did not report"
        return _not_registered(name, ranges, reason, why)
    if hdr.crng_status == CRNG_STATUS_DISABLED:
        return _not_registered(name, ranges, reason, "disabled in the guest: "
                               + (reason or "crng_refresh=0"))
    if hdr.crng_status != CRNG_STATUS_ACTIVE:
        return _not_registered(name, ranges, reason, "refused by the guest module: "
                               + (reason or "no reason given"))
    if ranges == 0 or not table.fills:
        return _not_registered(name, ranges, reason, "module reported active with no fill ranges")
    if len(table.fills) < table.fill_slots:
        dropped = table.fill_slots - len(table.fills)
        return _not_registered(name, ranges, reason, f"{dropped} of {table.fill_slots} fill "
                               "ranges invalid and skipped; the CRNG's may be among them")
    plural = "range" if ranges == 1 else "ranges"
    return CrngReport(name, ranges, reason, True, f"refreshed ({ranges} {plural})")


def require_crng(crng: CrngReport) -> None:
    """`--require-crng`: refuse a guest whose kernel CRNG the wipe would not refresh."""
    if not crng.registered:
        raise CrngNotRegisteredError(
            f"--require-crng: {crng.line()}; nothing written, the VM is not resumed")
