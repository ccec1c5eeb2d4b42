"""Find the vmwipe region and apply the reset guard, from QEMU's own command line.

The guest learns the region from the SSDT QEMU was given with `-acpitable
file=...`; decoding that same file means the host cannot disagree with the
guest about base and size.  `--region BASE:SIZE` overrides it (for hosts whose
QEMU got the table some other way).

Reset guard: QEMU does not clear RAM on a system reset, so after a guest
reboot the old table (VALID slots naming the previous kernel's pages) would
sit in the region until the module loads again; a snapshot taken in that
window would make the host wipe live pages of the new kernel.  The defence is
`-device loader,file=ZEROPAGE,addr=BASE,force-raw=on`, which QEMU re-applies
on every reset and so clears the magic.  Without it the agent refuses.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from vmwipe.protocol import (
    PAGE_SIZE,
    Region,
    SsdtError,
    decode_ssdt,
    parse_size,
    validate_region,
)

from ..errors import RegionError, UsageError

log = logging.getLogger(__name__)


def read_cmdline(pid: int) -> list[str]:
    """QEMU's argv from /proc/PID/cmdline."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError as e:
        raise RegionError(f"cannot read /proc/{pid}/cmdline: {e.strerror}") from None
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")[:-1]]


def split_qemu_opts(text: str) -> dict[str, str]:
    """Parse QEMU's `key=val,key=val` option syntax (`,,` escapes a comma).

    A leading bare word (e.g. the driver in `-device loader,...`) is returned
    under the key "" .
    """
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    out: dict[str, str] = {}
    for n, p in enumerate(parts):
        if "=" in p:
            k, v = p.split("=", 1)
            out[k] = v
        elif n == 0 and p:
            out[""] = p
    return out


def option_values(argv: Sequence[str], option: str) -> list[str]:
    """Values of `-option VALUE`, `--option VALUE` and `-option=VALUE` in argv."""
    vals: list[str] = []
    names = {f"-{option}", f"--{option}"}
    for i, a in enumerate(argv):
        if a in names and i + 1 < len(argv):
            vals.append(argv[i + 1])
        else:
            for n in names:
                if a.startswith(n + "="):
                    vals.append(a[len(n) + 1 :])
    return vals


def _device_opts(value: str) -> dict[str, str]:
    """-device in either classic or JSON syntax (libvirt uses JSON)."""
    if value.lstrip().startswith("{"):
        try:
            obj = json.loads(value)
        except ValueError:
            return {}
        if not isinstance(obj, dict):
            return {}
        out = {k: str(v) for k, v in obj.items() if k != "driver"}
        out[""] = str(obj.get("driver", ""))
        return out
    opts = split_qemu_opts(value)
    if "driver" in opts and "" not in opts:
        opts[""] = opts["driver"]
    return opts


def _resolve(pid: int, path: str) -> str:
    """QEMU resolves relative paths against its own cwd."""
    if os.path.isabs(path):
        return path
    return os.path.join(f"/proc/{pid}/cwd", path)


@dataclass(frozen=True)
class RegionSource:
    region: Region
    source: str  # "acpitable:PATH" or "--region"


def region_problem(region: Region) -> str | None:
    """Why `region` cannot hold a table, in a user's words (None when it can).

    The same rules as `validate_region`, phrased for a command-line flag rather
    than as a header field.
    """
    if region.base % PAGE_SIZE:
        return f"the region base {region.base:#x} is not 4 KiB aligned"
    if region.size < 2 * PAGE_SIZE or region.size % PAGE_SIZE:
        return (f"the region size {region.size:#x} is not a multiple of 4 KiB of at "
                "least 8 KiB")
    if region.base + region.size > 1 << 64:
        return "the region does not end below 2^64"
    return None


def parse_region_arg(text: str) -> Region:
    """`BASE:SIZE` as given to --region, e.g. 0x1f000000:1M."""
    base_s, sep, size_s = text.partition(":")
    try:
        if not sep:
            raise ValueError("no colon")
        region = Region(parse_size(base_s), parse_size(size_s))
    except ValueError:
        raise UsageError(f"{text}: expected BASE:SIZE, e.g. 0x1f000000:1M") from None
    if (problem := region_problem(region)) is not None:
        raise UsageError(f"{text}: {problem}")
    validate_region(region)  # the protocol's own rules, which region_problem mirrors
    return region


def discover_region(pid: int, argv: Sequence[str]) -> RegionSource:
    """Region from the vmwipe SSDT among QEMU's `-acpitable file=` arguments."""
    found: dict[Region, str] = {}
    problems: list[str] = []
    for value in option_values(argv, "acpitable"):
        opts = split_qemu_opts(value)
        for path in opts.get("file", "").split(":") if opts.get("file") else []:
            real = _resolve(pid, path)
            try:
                with open(real, "rb") as f:
                    data = f.read()
            except OSError as e:
                problems.append(f"{path}: {e.strerror}")
                continue
            try:
                found.setdefault(decode_ssdt(data), path)
            except SsdtError as e:
                log.debug("-acpitable %s is not a vmwipe SSDT: %s", path, e)
    if len(found) == 1:
        region, path = next(iter(found.items()))
        return RegionSource(region, f"acpitable:{path}")
    if len(found) > 1:
        listed = ", ".join(f"{p} ({r.base:#x}+{r.size:#x})" for r, p in found.items())
        raise RegionError(f"several vmwipe SSDTs on QEMU's command line: {listed}; pass --region")
    extra = f" (unreadable: {'; '.join(problems)})" if problems else ""
    raise RegionError(
        f"no vmwipe SSDT (-acpitable file=...) on the command line of QEMU pid {pid}{extra}; "
        "pass --region BASE:SIZE"
    )


@dataclass(frozen=True)
class GuardProblem:
    """Why the reset guard refuses a QEMU: no zero-page loader at `base` that counts.

    `seen` lists the loaders found and why each does not count.  `finding` is the
    problem alone (what a warning says when the guard is overridden); `str()` adds
    the advice (what the refusal says).
    """

    base: int
    seen: tuple[str, ...] = ()

    advice = "add it, e.g. via `vmwipe qemu-args`, or pass --no-reset-guard"

    @property
    def finding(self) -> str:
        detail = f" ({'; '.join(self.seen)})" if self.seen else ""
        return (f"QEMU lacks -device loader,file=ZEROPAGE,addr={self.base:#x},force-raw=on"
                f"{detail}: after a guest reboot a stale table could make the host wipe live "
                "guest memory")

    def __str__(self) -> str:
        return f"{self.finding} ({self.advice})"


def reset_guard_problem(pid: int, argv: Sequence[str], region: Region) -> GuardProblem | None:
    """None if a 4 KiB zero page is loaded at the region base on every reset, else why not."""
    seen: list[str] = []
    for value in option_values(argv, "device"):
        opts = _device_opts(value)
        if opts.get("") != "loader" or "file" not in opts or "addr" not in opts:
            continue
        try:
            addr = parse_size(opts["addr"])
        except ValueError:
            continue
        if addr != region.base:
            seen.append(f"loader at {addr:#x}")
            continue
        if opts.get("force-raw", "off").lower() not in ("on", "yes", "true"):
            # Without it QEMU first tries the file as ELF, U-Boot and Intel HEX images:
            # a file that parses as one loads elsewhere, and the header stays stale.
            seen.append("loader without force-raw=on")
            continue
        path = _resolve(pid, opts["file"])
        try:
            with open(path, "rb") as f:
                head = f.read(PAGE_SIZE)
        except OSError as e:
            seen.append(f"loader file {opts['file']}: {e.strerror}")
            continue
        if len(head) < PAGE_SIZE or head.count(0) != PAGE_SIZE:
            seen.append(f"loader file {opts['file']} is not 4096 zero bytes")
            continue
        return None
    return GuardProblem(region.base, tuple(seen))
