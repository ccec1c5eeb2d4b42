"""Argument types and options the `vmwipe` subcommands share, so each is parsed one way.

Sizes follow QEMU: `--mem` is read like `-m` (a bare number is MiB, K/M/G/T
suffixes are binary), while region sizes and addresses are bytes unless a
suffix says otherwise, like QEMU's `size=` and `addr=` properties.
"""

from __future__ import annotations

import argparse
import os
import stat
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


#: The one resume rule of every command that loads or wipes a VM, said in each --help.
RESUME_RULE = ("Like virsh (restore, start, snapshot-revert), the VM runs when the command "
               "succeeds: it is resumed (cont) after a verified wipe; --paused leaves it "
               "paused. It is never resumed after a failure.")


def add_resume(p: argparse.ArgumentParser, what: str = "the VM") -> None:
    """`--paused` (and the pre-0.2 spellings, hidden) on a command that loads or wipes a VM.

    One rule for restore, loadvm, wipe, save, clone and libvirt restore|start|revert:
    resume by default, as virsh does, because the wipe is what makes resuming safe and a
    paused VM after a successful command is the surprise; `--paused` is virsh's flag.
    """
    g = p.add_mutually_exclusive_group()
    g.add_argument("--paused", action="store_true",
                   help=f"leave {what} paused when the command succeeds (default: {what} runs)")
    g.add_argument("--no-resume", dest="paused", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--resume", dest="paused", action="store_false", help=argparse.SUPPRESS)


def _reason(e: OSError) -> str:
    """`No such file or directory` as `no such file or directory`, without `[Errno 2]`."""
    return (e.strerror or type(e).__name__).lower()


def input_file(path: str, what: str, *, write: bool = False) -> str:
    """`path` must be an existing non-directory this user may read (and write): else a
    usage error that names it, before any VM or file is touched."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"{what} {path}: {_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {path} is a directory, not a file")
    if not os.access(path, os.R_OK | (os.W_OK if write else 0)):
        need = "read and write" if write else "read"
        raise UsageError(f"{what} {path}: permission denied (this user may not {need} it)")
    return path


def input_dir(path: str, what: str) -> str:
    """`path` must be an existing directory this user may read."""
    if not os.path.isdir(path):
        reason = "not a directory" if os.path.exists(path) else "no such directory"
        raise UsageError(f"{what} {path}: {reason}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"{what} {path}: permission denied")
    return path


def output_file(path: str, what: str) -> str:
    """`path` will be written: its directory must exist (nothing is created for it) and
    it must not be a directory."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{what} {path}: directory {parent} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a directory, not a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: permission denied (cannot create files in {parent})")
    return path


def os_error(e: OSError) -> UsageError:
    """An OSError that escaped a command, as the one-line usage error it usually is
    (a file the user named is missing or not accessible)."""
    what = f"{e.filename}: " if e.filename else ""
    if isinstance(e, PermissionError):
        return UsageError(f"{what}permission denied (run as a user who may access it)")
    return UsageError(f"{what}{_reason(e)}")
