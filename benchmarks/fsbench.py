"""Scrub against a full copy, on ext4 and on a loop-mounted reflink XFS (bench_scrub's rows).

The honest baseline on both is `cp --reflink=never` plus fsync of the copy: the
bytes a scrub would have to write if it could not share blocks, on disk.  The
scrub itself is the CLI in a fresh process, as an operator runs it, and its
in-process time (from its JSON report) is kept beside it.

The XFS image lives in the benchmark's temp directory, behind a loop device with
direct I/O (see `loop_xfs`); the mount and the loop device are the ones made
here, and both are undone in `finally`, as is the image.  Without root,
mkfs.xfs or a free loop device the XFS rows carry the reason instead of
numbers, and the rest of the table is unaffected.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: Sparse image size: the pristine stream, one working copy and the scrub's clone.
XFS_IMAGE_GIB = 4


class Unavailable(Exception):
    """The machine cannot give us a loop-mounted XFS; the message says why."""


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


@contextlib.contextmanager
def loop_xfs(workdir: Path) -> Iterator[Path]:
    """Mount a fresh reflink=1 XFS image under `workdir`; undo exactly what was done."""
    if os.geteuid() != 0:
        raise Unavailable("loop-mounting XFS needs root")
    for tool in ("mkfs.xfs", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} not installed (make setup installs xfsprogs)")
    img, mnt = workdir / "xfs.img", workdir / "xfs-mnt"
    mnt.mkdir()
    loop = ""
    mounted = False
    try:
        with open(img, "wb") as f:
            f.truncate(XFS_IMAGE_GIB << 30)
        r = _run("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(img))
        if r.returncode:
            raise Unavailable(f"mkfs.xfs failed: {r.stderr.strip()}")
        # direct I/O: an fsync on the XFS then means the disk, and no dirty pages of the
        # image are left in the root filesystem to be written back under the ext4 rounds
        r = _run("losetup", "-f", "--show", "--direct-io=on", str(img))
        if r.returncode:
            raise Unavailable(f"no loop device: {r.stderr.strip()}")
        loop = r.stdout.strip()
        r = _run("mount", loop, str(mnt))
        if r.returncode:
            raise Unavailable(f"cannot mount {loop}: {r.stderr.strip()}")
        mounted = True
        yield mnt
    finally:
        if mounted:
            _run("umount", str(mnt))
        if loop:
            _run("losetup", "-d", loop)
        img.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cp_fsync(src: Path, dst: Path) -> tuple[float, float]:
    """`cp --reflink=never` then fsync of the copy: (seconds of cp, seconds of the fsync)."""
    t = time.perf_counter()
    subprocess.run(["cp", "--reflink=never", str(src), str(dst)], check=True)
    t1 = time.perf_counter()
    fsync_path(dst)
    return t1 - t, time.perf_counter() - t1


def scrub_cli(path: Path) -> tuple[float, dict[str, object]]:
    """`vmwipe scrub FILE --json` in a fresh process: (wall seconds, its report)."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "vmwipe.host_agent.cli", "scrub", str(path),
                          "--json"], check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t, json.loads(out)


@dataclass
class FsSamples:
    """One filesystem's interleaved samples (seconds) and what the scrub reported."""

    cp: list[float] = field(default_factory=list)  # cp --reflink=never
    fsync: list[float] = field(default_factory=list)  # fsync of that copy
    scrub: list[float] = field(default_factory=list)  # the CLI, wall clock
    inproc: list[float] = field(default_factory=list)  # the report's own seconds
    reflinked: bool = False
    copies: int = 0

    @property
    def cp_fsync(self) -> list[float]:
        return [a + b for a, b in zip(self.cp, self.fsync, strict=True)]


def scrub_round(base: Path, work: Path, acc: FsSamples) -> None:
    """Copy `base` to `work` (the baseline), scrub that copy (the subject), delete it."""
    try:
        c, f = cp_fsync(base, work)
        acc.cp.append(c)
        acc.fsync.append(f)
        t, rep = scrub_cli(work)
        acc.scrub.append(t)
        acc.inproc.append(float(rep["seconds"]))  # type: ignore[arg-type]
        acc.reflinked = bool(rep["reflinked"])
        acc.copies = int(rep["scrubbed_copies"])  # type: ignore[call-overload]
    finally:
        work.unlink(missing_ok=True)
