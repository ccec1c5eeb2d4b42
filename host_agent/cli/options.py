"""Argument types and options the `vmwipe` subcommands share, so each is parsed one way.

Sizes follow QEMU: `--mem` is read like `-m` (a bare number is MiB, K/M/G/T
suffixes are binary), while region sizes and addresses are bytes unless a
suffix says otherwise, like QEMU's `size=` and `addr=` properties.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from vmwipe.protocol import Region, parse_size

from ..errors import AgentError, CrngNotRegisteredError, UsageError
from ..qemu.region import parse_region_arg, region_problem

_MIB = 1 << 20

REQUIRE_CRNG_HELP = (
    "refuse a guest whose vmwipe table does not register its kernel CRNG (module not "
    "reporting, crng_refresh=0, or the module refused): checked before anything is written; "
    "the VM is not resumed (clones: all killed) and the exit code is "
    f"{CrngNotRegisteredError.exit_code}")


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line like every other vmwipe error.

    Subparsers are made of the same class, so `vmwipe CMD` errors alike.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def common() -> argparse.ArgumentParser:
    """`--json`, `-v` and `-q`, which every subcommand takes (as a parent parser).

    The subcommand's `-v`/`-q` defaults are suppressed so that `vmwipe -v CMD`
    (the top-level flag) is not overwritten by the subcommand's own default.
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="log progress to stderr (-vv for QMP traffic)")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress output (the report and errors still print)")
    return p


def region_type(text: str) -> Region:
    """argparse `type=` for `--region BASE:SIZE` (argparse names the option)."""
    try:
        return parse_region_arg(text)
    except AgentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """argparse `type=` for counts that must be at least 1 (`--jobs`, `-n`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def mem_size(text: str) -> int:
    """argparse `type=` for `--mem`, read as QEMU reads `-m`: bare numbers are MiB.

    `512` and `512M` are both 512 MiB; `1G`, `2048K` and `536870912B` name their
    unit.  A size that is not a whole number of MiB is refused, as QEMU does.
    """
    s = text.strip()
    try:
        value = parse_size(s + "M" if s[-1:].isdigit() else s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a size: {text} (a number of MiB as for QEMU's -m, or 512M, 4G)") from None
    if value <= 0 or value % _MIB:
        raise argparse.ArgumentTypeError(f"{text} is not a whole, positive number of MiB")
    return value


def byte_size(text: str) -> int:
    """argparse `type=` for sizes and addresses in bytes (`--size 1M`, `--base 0x1f000000`)."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a size: {text} (use e.g. 4096, 0x100000, 1M, 2G)") from None


def check_region(base: int, size: int, flags: str = "--base/--size") -> Region:
    """A region given by two flags, refused in the flags' own words (not the header's)."""
    region = Region(base, size)
    if (problem := region_problem(region)) is not None:
        raise UsageError(f"{flags}: {problem}")
    return region
