"""Every error the agent reports, each with the process exit code the CLI returns.

The CLI prints `vmwipe: error: <message>` on one line and exits with the code
of the error class, so scripts and libvirt hooks can tell "the VM state is
wrong" from "the table is forged" without parsing text.  Whatever the error,
the VM is left paused: only a verified wipe leads to `cont`.

One code has one meaning: a class that introduces a code says what it means
(`meaning`), subclasses that only refine the message inherit both.
`EXIT_CODES` is built from the classes; `vmwipe --help`, README.md and
SECURITY.md are rendered from it or tested against it (`exit_code_table`).
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent reports; `exit_code` is the CLI exit status."""

    exit_code = 1
    meaning = "unexpected internal error"


class UsageError(AgentError):
    """Bad arguments that argparse alone cannot catch."""

    exit_code = 2
    meaning = "usage error"


class LayoutError(UsageError):
    """The guest RAM layout of a saved VM cannot be determined, or disagrees with the stream."""


class TemplateError(UsageError):
    """A VM template is missing, malformed, no longer what was made, or a clone
    command line would corrupt or leak it (exit code 2, like any refused usage)."""


class QMPFailure(AgentError):
    """QMP connection, protocol, timeout or command failure."""

    exit_code = 3
    meaning = "QMP connection or command failure"


class QMPCommandError(QMPFailure):
    """QEMU answered a command with an error; `error_class` is QEMU's class name."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command} failed: {desc}")


class QMPTimeout(QMPFailure):
    """QEMU did not answer (or the awaited event did not come) in time."""


class VMStateError(AgentError):
    """The VM is in a state where wiping would be unsafe or pointless (e.g. running)."""

    exit_code = 4
    meaning = "VM in a wrong state (running, not migrating, ...)"


class RegionError(AgentError):
    """The vmwipe region cannot be found, or the reset guard refused the VM."""

    exit_code = 5
    meaning = "region not found, or refused by the reset guard"


class InvalidTableError(AgentError):
    """The guest table is present but breaks the spec; nothing was written."""

    exit_code = 6
    meaning = "guest table invalid (VM left paused)"


class MemoryAccessError(AgentError):
    """No memory backend can read/write guest RAM, or a transfer failed."""

    exit_code = 7
    meaning = "guest memory not accessible / transfer failed"


class VerifyError(AgentError):
    """Pages read back non-zero after the wipe; the header was not updated."""

    exit_code = 8
    meaning = "wiped pages did not read back as zero"


class MigrationError(AgentError):
    """An incoming or outgoing migration failed or timed out."""

    exit_code = 9
    meaning = "migration (save/restore) failed"


class LaunchError(AgentError):
    """QEMU exited or never opened its QMP socket."""

    exit_code = 10
    meaning = "clone: a QEMU process failed to start (all clones killed)"


class StreamError(AgentError):
    """The file or pipe is not a migration stream we can rewrite safely; nothing was written."""

    exit_code = 11
    meaning = ("scrub: not a migration stream or save image that can be rewritten safely "
               "(untouched)")


class UnsupportedStream(StreamError):
    """A valid stream that uses a feature we refuse (XBZRLE, compression, ...)."""

    exit_code = 12
    meaning = ("scrub: the stream uses a feature vmwipe refuses (xbzrle, compression, ...; "
               "untouched)")


class ReplaceError(AgentError):
    """The scrubbed copy could not be made or put in place (space, ownership, I/O).

    The original file is untouched and the temporary copy is removed.
    """

    exit_code = 13
    meaning = ("scrub: the scrubbed copy could not be made or put in place (space, owner, I/O; "
               "untouched)")


class LibvirtFailure(AgentError):
    """libvirt refused an operation (connect, lookup, define, restore, revert, start, resume)."""

    exit_code = 14
    meaning = "libvirt refused an operation (the domain is left paused or as it was)"


class CrngNotRegisteredError(AgentError):
    """`--require-crng`: the guest's table does not register its kernel CRNG (status not
    active, no CRNG ranges, or its fill ranges missing); checked before anything is
    written, so the VM is left paused (libvirt: killed) exactly as it was loaded."""

    exit_code = 15
    meaning = ("--require-crng: the guest does not register its kernel CRNG (nothing written, "
               "VM left paused)")


class Interrupted(AgentError):
    """SIGINT or SIGTERM arrived mid-way; the VM stays paused."""

    exit_code = 130
    meaning = "interrupted by SIGINT/SIGTERM (VM left paused)"


class ProtectError(ValueError):
    """A domain XML cannot be protected as asked; the message says why.

    Not an AgentError: it is pure XML work, and each caller turns it into its
    own failure (`LibvirtFailure` in the CLI, a refused start in the hook).
    """


SUCCESS = "success (VM wiped or nothing registered; resumed unless --paused)"


def _codes() -> dict[int, str]:
    """Code -> meaning, from the classes that introduce a code; refuses a code used twice."""
    table: dict[int, str] = {0: SUCCESS}
    owner: dict[int, str] = {}
    todo: list[type[AgentError]] = [AgentError]
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        if "exit_code" not in vars(cls):
            continue
        code = cls.exit_code
        if code in owner:
            raise AssertionError(f"exit code {code} used by {owner[code]} and {cls.__name__}")
        owner[code] = cls.__name__
        table[code] = cls.meaning
    return dict(sorted(table.items()))


EXIT_CODES: dict[int, str] = _codes()


def exit_code_help() -> str:
    """The `exit codes:` epilog of `vmwipe --help`."""
    return "exit codes:\n" + "\n".join(f"  {c:3d}  {t}" for c, t in EXIT_CODES.items())


def exit_code_table() -> str:
    """The Markdown table README.md and SECURITY.md carry (tests/test_layout.py checks them)."""
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| {c} | {t} |" for c, t in EXIT_CODES.items()]
    return "\n".join(rows) + "\n"
