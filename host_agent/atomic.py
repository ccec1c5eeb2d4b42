"""Replace a file in one step, so no reader (QEMU, libvirtd) ever sees half of it.

`fsync_dir` is the last step of such a replacement when it must survive a crash:
the rename itself is durable only once the directory is synced.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to a temp file beside `path` and rename it over `path`.

    A file that already holds exactly `data` (and has `mode`) is left alone, so
    repeated setup runs do not touch files a running VM has open.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_bytes() == data and path.stat().st_mode & 0o7777 == mode:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def fsync_dir(directory: str) -> None:
    """fsync a directory, so a rename into it survives a crash."""
    dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
