"""Files and directories that hold guest state: owner-only, and created, never taken over.

A save, a template's device state, a sidecar (where the secrets sit in a save):
QEMU creates the files it writes with its own umask, which made a full RAM image
0644 under the usual 022.  So vmwipe creates each such file itself, mode 0600,
before QEMU opens it (QEMU truncates it and keeps the mode), and each directory
it makes for them 0700.  A path that already exists is only reused where that
cannot hand it to someone else: a directory must be ours and, once closed to
group and others, empty; a temporary file always gets a new, unpredictable name
(`mkstemp`: O_EXCL), so a link planted at a guessable name is never followed.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import UsageError

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: str | os.PathLike[str], what: str = "directory") -> Path:
    """Create `path` mode 0700 (missing parents as usual) and return it.

    An existing `path` is used only if it is a real directory (not a link) owned by
    this user and, once made 0700, empty: another user's directory, or files already
    in it, could be read or have been planted by someone else.  UsageError otherwise.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        p.mkdir(mode=DIR_MODE)
    except FileExistsError:
        st = os.lstat(p)
        why = None
        if not stat.S_ISDIR(st.st_mode):
            why = "is not a directory"
        elif st.st_uid != os.geteuid():
            why = f"belongs to uid {st.st_uid}"
        else:
            os.chmod(p, DIR_MODE)  # closed first: nothing can be added after the check
            if any(p.iterdir()):
                why = "is not empty"
        if why:
            raise UsageError(f"{what} {p} exists and {why}; give a new directory (vmwipe "
                             "creates it, mode 0700)") from None
    else:
        os.chmod(p, DIR_MODE)  # mkdir's mode is masked by the umask
    return p


def private_output(path: str | os.PathLike[str], writer_pid: int | None = None) -> None:
    """Make `path` a regular file of mode 0600 before QEMU (`writer_pid`) writes into it.

    A new file is created 0600; an existing regular file (a save written again) is
    set to 0600.  When root runs the agent and QEMU runs as another user, that user
    gets the file, as QEMU would have created it.  A link at `path` is refused.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as e:
        raise UsageError(f"cannot create {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{path} is not a regular file")
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
        if writer_pid and os.geteuid() == 0:
            uid = os.stat(f"/proc/{writer_pid}").st_uid
            if uid != st.st_uid:
                os.fchown(fd, uid, -1)
    finally:
        os.close(fd)


def temp_beside(path: str | os.PathLike[str], suffix: str = "") -> tuple[int, str]:
    """(fd, name) of a new 0600 file in `path`'s directory, named `.NAME.XXXXXXXX[suffix]`."""
    d, name = os.path.split(os.path.abspath(path))
    return tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=d)
