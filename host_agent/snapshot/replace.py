"""Put a scrubbed copy of a file in place of the file, so a kill never leaves half of it.

The file itself is never written: a copy in the same directory is made
(FICLONE on a reflink filesystem such as XFS or btrfs, so the copy shares every
block and costs nothing until the listed pages are rewritten; else
copy_file_range, holes kept), checked against the original (inode, size,
mtime), zeroed and bumped, fsynced, read back, given the original's owner,
group, mode and extended attributes, renamed over the original, and the
directory fsynced.  Then the listed pages of the replaced inode are zeroed too
(best effort), so that a filesystem that overwrites in place does not keep the
secrets in freed blocks.  Any error removes the copy; one left by a SIGKILL is
removed by the next run (`remove_stale_temps`).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import stat
import tempfile
from collections.abc import Sequence

from vmwipe.protocol import PAGE_SIZE

from ..atomic import fsync_dir
from ..errors import ReplaceError, StreamError

log = logging.getLogger(__name__)


#: `.FILE` + this + 8 random characters (tempfile.mkstemp): the scrubbed copy being made.
TEMP_TAG = ".vmwipe-scrub."
_TEMP_RANDOM = re.compile(r"[a-z0-9_]{8}")


def remove_stale_temps(path: str) -> int:
    """Remove copies that killed scrubs of `path` left behind; returns how many.

    A running scrub holds an exclusive flock on its copy until the rename, and the
    kernel drops it when the process dies, SIGKILL included: a copy whose lock can be
    taken is stale.  Only regular files of the exact name pattern are touched.  Such a
    copy can hold the unscrubbed data, so it must not linger.
    """
    d, base = os.path.split(path)
    prefix = f".{base}{TEMP_TAG}"
    removed = 0
    try:
        names = os.listdir(d or ".")
    except OSError:
        return 0
    for name in names:
        if not name.startswith(prefix) or not _TEMP_RANDOM.fullmatch(name[len(prefix):]):
            continue
        full = os.path.join(d, name)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live scrub's copy
            now = os.stat(full, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(full)
                removed += 1
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


#: The copy goes in pieces this big, each one's writeback started as soon as it is copied.
COPY_PIECE = 32 << 20
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _start_writeback(fd: int, off: int, n: int) -> None:
    """Start writing [off, off+n) of `fd` to disk now, without waiting for it.

    Copying first and fsyncing after (what `cp` plus fsync does) leaves the disk
    idle during the copy and the CPU idle during the fsync; started piece by
    piece, the writeback runs under the copy and the final fsync only waits for
    the tail.  Best effort: that fsync is still what makes the copy durable.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE)


def _copy_range(src: int, dst: int, off: int, n: int) -> None:
    """Copy [off, off+n) from src to dst at the same offset, in the kernel."""
    end = off + n
    use_cfr = hasattr(os, "copy_file_range")
    while off < end:
        done = 0
        if use_cfr:
            try:
                done = os.copy_file_range(src, dst, min(end - off, COPY_PIECE), off, off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_cfr = False
                continue
        else:
            os.lseek(dst, off, os.SEEK_SET)
            done = os.sendfile(dst, src, off, min(end - off, COPY_PIECE))
        if done <= 0:
            raise StreamError("the file got shorter while it was copied; nothing replaced")
        _start_writeback(dst, off, done)
        off += done


#: ioctl(dst, FICLONE, src): share all of src's blocks (linux/fs.h _IOW(0x94, 9, int)).
FICLONE = 0x40049409


def _reflink(src: int, dst: int) -> bool:
    """Clone the whole file by sharing its blocks; False where the filesystem cannot.

    Rewriting a listed page of the clone then allocates a new block for that page
    only (copy-on-write), so the scrub's writes, not the file size, set its cost.
    """
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return True
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                       errno.EPERM, errno.EBADF):
            return False
        raise


def _copy_file(src: int, dst: int, size: int) -> bool:
    """Copy `size` bytes, keeping holes (a mapped-ram save is sparse); True if reflinked."""
    if _reflink(src, dst):
        if os.fstat(dst).st_size != size:
            raise StreamError("the file changed size while it was cloned; nothing replaced")
        return True
    pos = 0
    while pos < size:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
            hole = os.lseek(src, data, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break  # only a hole from pos to the end
            data, hole = pos, size  # no SEEK_DATA on this filesystem: copy everything
        hole = min(hole, size)
        if hole <= data:
            break
        _copy_range(src, dst, data, hole - data)
        pos = hole
    os.ftruncate(dst, size)
    return False


def _copy_metadata(src: int, dst: int, st: os.stat_result, path: str) -> None:
    """Owner, group, mode and extended attributes (SELinux label, ACLs) of the original.

    A libvirt save image belongs to root or to the QEMU user (libvirt-qemu, qemu) and
    may carry an svirt label; the replacement must keep them or a restore cannot read
    it.  The modification time is not kept: the content changed, and a backup tool that
    trusts size and mtime must see that.
    """
    mine = os.fstat(dst)
    if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
        try:
            os.fchown(dst, st.st_uid, st.st_gid)
        except PermissionError:
            raise ReplaceError(f"cannot give the scrubbed copy of {path} its owner "
                               f"{st.st_uid}:{st.st_gid} (run as root or as the owner); "
                               "nothing replaced") from None
    os.fchmod(dst, stat.S_IMODE(st.st_mode))  # after fchown, which may clear set-id bits
    try:
        names = os.listxattr(src)
    except OSError:
        return
    for name in names:
        try:
            os.setxattr(dst, name, os.getxattr(src, name))
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.ENODATA,
                               errno.EINVAL):
                raise
            log.warning("%s: extended attribute %s not copied to the scrubbed file: %s",
                        path, name, e.strerror)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size,
                                                              b.st_mtime_ns)


#: Filesystem block size assumed for whole-block writes (4 KiB on ext4, XFS, btrfs here).
BLOCK = 4096
#: Largest buffer `_write_blocks` reads and writes at once.
SPAN_MAX = 4 << 20
#: Edited blocks this close together are written as one run, the unchanged blocks
#: between them included: one sequential write costs less than many small ones
#: (4,096 pages listed every other page: ~200 ms of scattered 4 KiB writes at the
#: fsync, against ~20 ms for the 32 MiB they span).
GAP_MERGE = 32 << 10


def _block_spans(edits: Sequence[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """(start, end) runs of whole blocks covering the sorted (start, end) edits, merged
    across gaps of up to GAP_MERGE bytes and cut into pieces of at most SPAN_MAX bytes
    at block boundaries."""
    spans: list[tuple[int, int]] = []
    for pos, stop in edits:
        lo, hi = pos - pos % BLOCK, min(size, -(-stop // BLOCK) * BLOCK)
        if spans and lo <= spans[-1][1] + GAP_MERGE:
            spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
        else:
            spans.append((lo, hi))
    return [(c, min(c + SPAN_MAX, hi)) for lo, hi in spans for c in range(lo, hi, SPAN_MAX)]


def _apply(buf: bytearray, lo: int, edits: Sequence[tuple[int, int, bytes | None]],
           starts: Sequence[int], longest: int) -> None:
    """Write the parts of `edits` (start, end, bytes or None for zeros; sorted by start,
    `starts` their starts) that fall in buf, which holds the file from `lo`."""
    hi = lo + len(buf)
    for i in range(bisect.bisect_left(starts, lo - longest), bisect.bisect_left(starts, hi)):
        pos, stop, data = edits[i]
        a, b = max(pos, lo), min(stop, hi)
        if a < b:
            buf[a - lo:b - lo] = bytes(b - a) if data is None else data[a - pos:b - pos]


def _write_blocks(src: int, dst: int, size: int, writes: Sequence[tuple[int, int]],
                  patches: Sequence[tuple[int, bytes]]) -> None:
    """Zero `writes`, then apply `patches`, in `dst` (a copy of `src`), in whole blocks.

    A page record's data starts 8 or more bytes into a block, so writing just
    those 4096 bytes touches two blocks partly, and on a reflinked copy the
    filesystem must first read both from disk to copy them on write: two
    synchronous reads per listed page.  Whole blocks, taken from the original's
    page cache (the walk has just read them), edited here and written at once,
    need no read, and neighbouring listed pages become one write.  `src` may be
    `dst` (the replaced file, zeroed in place).
    """
    zeros: list[tuple[int, int, bytes | None]] = sorted((p, p + n, None) for p, n in writes)
    data = sorted(((p, p + len(d), d) for p, d in patches), key=lambda e: e[0])
    zstarts, dstarts = [e[0] for e in zeros], [e[0] for e in data]
    zlong = max((e[1] - e[0] for e in zeros), default=0)
    dlong = max((e[1] - e[0] for e in data), default=0)
    for lo, hi in _block_spans(sorted((e[0], e[1]) for e in zeros + data), size):
        buf = bytearray(os.pread(src, hi - lo, lo))
        if len(buf) != hi - lo:
            raise StreamError("the file got shorter while it was scrubbed; nothing replaced")
        _apply(buf, lo, zeros, zstarts, zlong)
        _apply(buf, lo, data, dstarts, dlong)  # after the zeros, as a patch wins
        if os.pwrite(dst, buf, lo) != hi - lo:
            raise OSError(errno.EIO, f"short write at {lo:#x}")


def _write_and_verify(src: int, fd: int, size: int, writes: Sequence[tuple[int, int]],
                      patches: Sequence[tuple[int, bytes]]) -> int:
    """Scrub the copy `fd` of `src`, fsync it and read every edit back; bytes edited."""
    zero = bytes(PAGE_SIZE)
    _write_blocks(src, fd, size, writes, patches)
    total = sum(n for _, n in writes) + sum(len(d) for _, d in patches)
    os.fsync(fd)
    for pos, n in writes:
        if os.pread(fd, n, pos) != zero[:n]:
            raise StreamError(f"read-back after scrub is not zero at offset {pos:#x}; "
                              "nothing replaced")
    for pos, data in patches:
        if os.pread(fd, len(data), pos) != data:
            raise StreamError(f"read-back of the header or a fill range at offset {pos:#x} "
                              "failed; nothing replaced")
    return total


def _check_room(path: str, before: os.stat_result, d: str) -> None:
    """Refuse, before writing anything, a file with other names or a directory too full."""
    if before.st_nlink > 1:
        raise ReplaceError(f"{path} has {before.st_nlink} hard links: the other names would "
                           "keep the unscrubbed data; nothing written")
    need = before.st_blocks * 512  # what a copy that keeps the holes allocates
    try:
        vfs = os.statvfs(d)
    except OSError as e:
        raise ReplaceError(f"cannot check free space in {d}: {e.strerror}") from None
    free = vfs.f_bavail * vfs.f_frsize
    if free < need:
        raise ReplaceError(f"not enough free space in {d} for the scrubbed copy of {path}: "
                           f"needs {need >> 20} MiB, {free >> 20} MiB free; nothing written")


def _zero_replaced(old: int, writes: Sequence[tuple[int, int]], path: str) -> bool:
    """Zero the listed pages of the replaced inode, then close it; whether that worked.

    The replaced inode has no name left but still holds the secrets in its blocks.
    Zeroing them too means that on a filesystem that overwrites in place the freed
    blocks do not keep them (best effort: nothing depends on it any more).
    """
    try:
        # the same whole-block runs as in the copy, so that on a reflink filesystem they
        # are the blocks the copy no longer shares: overwritten in place, not copied
        _write_blocks(old, old, os.fstat(old).st_size, writes, ())
        os.fdatasync(old)
        return True
    except OSError as e:
        log.warning("%s: could not zero the replaced file's old copy: %s", path,
                    e.strerror or e)
        return False
    finally:
        os.close(old)


def replace_scrubbed(path: str, src: int, before: os.stat_result,
                     writes: Sequence[tuple[int, int]],
                     patches: Sequence[tuple[int, bytes]]) -> tuple[int, bool, bool]:
    """Scrub a copy of `path` (open as `src`) and rename it over `path`.

    Returns (bytes written into the copy, whether the replaced file's listed pages were
    zeroed too, whether the copy was a reflink).  Raises with the original untouched
    and the copy removed.
    """
    d = os.path.dirname(path) or "."
    _check_room(path, before, d)
    # the original again, writable if we may, to zero its listed pages once it is replaced
    old: int | None = None
    try:
        old = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        old = None
    tmp = ""
    tfd = -1
    renamed = synced = False
    try:
        if old is not None and not _same(os.fstat(old), before):
            raise StreamError(f"{path} changed while it was being checked; nothing written")
        if not _same(os.stat(path), before):
            raise StreamError(f"{path} changed while it was being checked; nothing written")
        tfd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{TEMP_TAG}", dir=d)
        fcntl.flock(tfd, fcntl.LOCK_EX)  # "in use" for remove_stale_temps of other runs
        reflinked = _copy_file(src, tfd, before.st_size)
        if not _same(os.fstat(src), before):
            raise StreamError(f"{path} changed while it was being copied; nothing replaced")
        total = _write_and_verify(src, tfd, before.st_size, writes, patches)
        _copy_metadata(src, tfd, before, path)
        os.fsync(tfd)
        if not _same(os.stat(path), before):
            raise StreamError(f"{path} changed while it was being scrubbed; nothing replaced")
        os.replace(tmp, path)
        renamed = True
        fsync_dir(d)
        synced = True
    except OSError as e:
        why = e.strerror or str(e)
        if renamed:
            raise ReplaceError(f"{path} was replaced by its scrubbed copy, but syncing the "
                               f"directory failed: {why}") from None
        raise ReplaceError(f"cannot make the scrubbed copy of {path}: {why}; "
                           "nothing replaced") from None
    finally:
        if tfd >= 0:
            os.close(tfd)
        if tmp and not renamed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if not synced and old is not None:
            os.close(old)
    # here the rename and the sync succeeded, so `old` (if any) is still open
    return (total, _zero_replaced(old, writes, path) if old is not None else False,
            reflinked)
