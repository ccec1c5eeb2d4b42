"""Which of the guest kernel's other per-boot secrets its table registers, for every report.

Besides its CRNG (`wipe.crng`), the guest module lists the kernel's TCP
sequence-number and timestamp keys, its SYN-cookie keys and the `%p` hashing
key as fill ranges once the kernel has drawn them (`guest_kmod/ksecrets.c`),
and says which in the header's `ksecrets` mask (SPEC.md 4.1).  The host
refills whatever the slots list either way; this only names, for the
operator, which secrets a clone does not share with its siblings.  Like the
CRNG fields, the mask is an untrusted guest's report: the decoder has checked
it against the spec, and here it counts only when the table's fill ranges are
all valid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vmwipe.protocol import KSECRET_NAMES, KSECRETS_REPORTED, Table


@dataclass(frozen=True)
class KsecretsReport:
    """`names`: the secrets registered (KSECRET_NAMES values, in bit order); `summary`:
    what every report prints after "kernel secrets: "."""

    reported: bool
    names: tuple[str, ...]
    ranges: int
    summary: str

    def line(self) -> str:
        return f"kernel secrets: {self.summary}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ksecrets_report(table: Table) -> KsecretsReport:
    """What `table` (decoded and validated) says about the kernel's other secrets."""
    hdr = table.header
    if hdr is None:
        return KsecretsReport(False, (), 0, "none (no vmwipe table in the region)")
    if not hdr.ksecrets & KSECRETS_REPORTED:
        return KsecretsReport(False, (), 0, "none (not reported by the guest module)")
    names = tuple(name for bit, name in KSECRET_NAMES.items() if hdr.ksecrets & bit)
    if not names:
        return KsecretsReport(True, (), 0, "none registered (the guest's sysfs "
                              "kernel_secrets says why)")
    if len(table.fills) < table.fill_slots:
        dropped = table.fill_slots - len(table.fills)
        return KsecretsReport(True, (), hdr.ksecrets_ranges, f"NOT registered ({dropped} of "
                              f"{table.fill_slots} fill ranges invalid and skipped)")
    plural = "range" if hdr.ksecrets_ranges == 1 else "ranges"
    return KsecretsReport(True, names, hdr.ksecrets_ranges,
                          f"{', '.join(names)} ({hdr.ksecrets_ranges} {plural})")
