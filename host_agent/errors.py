"""Typed agent errors, each with the process exit code the CLI returns.

The CLI prints `vmwipe: error: <message>` on one line and exits with the code
of the error class, so scripts and libvirt hooks can tell "the VM state is
wrong" from "the table is forged" without parsing text.  Whatever the error,
the VM is left paused: only a verified wipe leads to `cont`.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent reports; `exit_code` is the CLI exit status."""

    exit_code = 1


class UsageError(AgentError):
    """Bad arguments that argparse alone cannot catch."""

    exit_code = 2


class QMPFailure(AgentError):
    """QMP connection, protocol, timeout or command failure."""

    exit_code = 3


class VMStateError(AgentError):
    """The VM is in a state where wiping would be unsafe or pointless (e.g. running)."""

    exit_code = 4


class RegionError(AgentError):
    """The vmwipe region cannot be found, or the reset guard refused the VM."""

    exit_code = 5


class InvalidTableError(AgentError):
    """The guest table is present but breaks the spec; nothing was written."""

    exit_code = 6


class MemoryAccessError(AgentError):
    """No memory backend can read/write guest RAM, or a transfer failed."""

    exit_code = 7


class VerifyError(AgentError):
    """Pages read back non-zero after the wipe; the header was not updated."""

    exit_code = 8


class MigrationError(AgentError):
    """An incoming or outgoing migration failed or timed out."""

    exit_code = 9


class Interrupted(AgentError):
    """SIGINT or SIGTERM arrived mid-way; the VM stays paused."""

    exit_code = 130


EXIT_CODES: dict[int, str] = {
    0: "success (VM wiped or nothing registered; resumed only when asked)",
    1: "unexpected internal error",
    UsageError.exit_code: "usage error",
    QMPFailure.exit_code: "QMP connection or command failure",
    VMStateError.exit_code: "VM in a wrong state (running, not migrating, ...)",
    RegionError.exit_code: "region not found, or refused by the reset guard",
    InvalidTableError.exit_code: "guest table invalid (VM left paused)",
    MemoryAccessError.exit_code: "guest memory not accessible / transfer failed",
    VerifyError.exit_code: "wiped pages did not read back as zero",
    MigrationError.exit_code: "migration (save/restore) failed",
    10: "clone: a QEMU process failed to start (all clones killed)",
    11: "scrub: not a migration stream or save image that can be rewritten safely (untouched)",
    12: "scrub: the stream uses a feature vmwipe refuses (xbzrle, compression, ...; untouched)",
    13: "scrub: the scrubbed copy could not be made or put in place (space, owner, I/O; "
    "untouched)",
    Interrupted.exit_code: "interrupted by SIGINT/SIGTERM (VM left paused)",
}
