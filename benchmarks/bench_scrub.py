"""Benchmark 4: scrubbing a ~1 GiB saved VM, against copying the same file.

The stream is a real QEMU save: a paused 1 GiB pc guest whose RAM (all of it
but the first MiB and the region) was filled with random bytes through
process_vm_writev, with 4,096 scattered pages registered, saved by
`vmwipe save`.  Random data keeps QEMU from sending zero pages, so the file
is as large as the guest.

- `vmwipe scrub FILE` (the CLI, a fresh process, as an operator runs it)
  against `cp --reflink=never` of the same file, and against that cp plus
  fsync of the copy (the honest baseline: the scrub's copy is on disk when it
  returns).  Every round copies the pristine stream (the `cp` measurement),
  fsyncs it (timed apart, so the scrub's own fsync does not pay for the
  copy's writeback), then scrubs that copy.
- The same on a loop-mounted XFS image with reflink=1 (`fsbench`), where the
  scrub's copy is a FICLONE, in rounds interleaved with the ext4 ones.  Without
  root or a loop device that row says why instead of giving numbers.
- `save_scrubbed` (`vmwipe save --scrub`) against `save_flow` (plain
  `vmwipe save`) from two QEMUs restored from that stream, in alternating
  order; the ratio against `cp` is given beside it.

Files are deleted as soon as they are measured; at most four ~1 GiB files
exist at once on the root filesystem, and three (sharing blocks) on the XFS.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
from pathlib import Path

from vmwipe.host_agent.flows.save import save_flow
from vmwipe.host_agent.flows.save_scrub import save_scrubbed
from vmwipe.host_agent.flows.target import AgentOptions
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.host_agent.snapshot.migstream import stream_capabilities

from .fsbench import FsSamples, Unavailable, fsync_path, loop_xfs, scrub_round
from .harness import Row, Timing, timing, verdict
from .vmlib import REGION, Lab, free_disk_gib, scattered

MEM_MIB = 1024
FILL = [(1 << 20, REGION.base - (1 << 20)), (REGION.end, (MEM_MIB << 20) - REGION.end)]
PAGES = 4096
NEED_GIB = 6.0  # on the root filesystem
XFS_NEED_GIB = 3.0  # more, for the XFS image's blocks (else only its row is skipped)


def _unlink(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _fs_rounds(workdir: Path, base: Path, repeat: int, ext4: FsSamples, xfs: FsSamples
               ) -> str:
    """Copy-then-scrub rounds on the root filesystem and on a reflink XFS, interleaved
    (the order flips every round); returns why XFS was not measured, or ""."""
    with contextlib.ExitStack() as stack:
        try:
            # the XFS copies, plus the ext4 rounds' copy and its scrubbed copy (2 GiB)
            if free_disk_gib(workdir) < XFS_NEED_GIB + 2:
                raise Unavailable(f"less than {XFS_NEED_GIB + 2:g} GiB free in {workdir}")
            mnt = stack.enter_context(loop_xfs(workdir))
        except Unavailable as e:
            mnt, why = None, str(e)
        cases = [(base, workdir / "work.mig", ext4)]
        if mnt is not None:
            why = ""
            xbase = mnt / "base.mig"
            shutil.copyfile(base, xbase)
            fsync_path(xbase)
            cases.append((xbase, mnt / "work.mig", xfs))
        for i in range(repeat):
            for src, work, acc in cases[:: 1 - 2 * (i % 2)]:
                scrub_round(src, work, acc)
    return why


def _save_rounds(lab: Lab, argv: list[str], base: Path, repeat: int, save_s: list[float],
                 save_scrub_s: list[float], marks: list[dict[str, float]]) -> None:
    """`save --scrub` against a plain save from two QEMUs restored from `base`, the order
    flipping every round."""
    plain, scrubbed = lab.dir / "plain.mig", lab.dir / "scr.mig"
    for i in range(repeat):
        q1, q2 = lab.restored(argv, base), lab.restored(argv, base)
        try:
            with QMPSession(q1.qmp_path, timeout=60) as s1, \
                    QMPSession(q2.qmp_path, timeout=60) as s2:
                def plain_save(s: QMPSession = s1) -> None:
                    save_flow(s, AgentOptions(timeout=300), str(plain))

                def scrub_save(s: QMPSession = s2) -> None:
                    r = save_scrubbed(s, str(scrubbed), timeout=300)
                    assert r.zeroed_copies >= PAGES, r
                    marks.append(r.timings_ms)

                order = [(plain_save, save_s), (scrub_save, save_scrub_s)]
                for fn, acc in order[:: 1 - 2 * (i % 2)]:
                    t0 = time.perf_counter()
                    fn()
                    acc.append(time.perf_counter() - t0)
        finally:
            lab.kill(q1)
            lab.kill(q2)
            _unlink(plain, scrubbed, Path(str(scrubbed) + ".vmwipe.json"))


def _fs_rows(size_mib: float, container: str, ext4: FsSamples, xfs: FsSamples, why: str
             ) -> list[Row]:
    """The CLI scrub against cp, cp + fsync (ext4) and cp + fsync on the reflink XFS."""
    cp_t, cpf_t, scrub_t = timing(ext4.cp), timing(ext4.cp_fsync), timing(ext4.scrub)
    inproc = statistics.median(ext4.inproc) * 1000
    what = f"{size_mib:,.0f} MiB {container} stream, {PAGES:,} pages"
    rows = [
        Row("scrub", f"vmwipe scrub CLI, {what}", scrub_t, cp_t, "cp --reflink=never",
            "< 1.5x cp",
            f"{ext4.copies:,} copies zeroed; in-process scrub {inproc:.0f} ms "
            f"({inproc / cp_t.median_ms:.2f}x cp); {size_mib / scrub_t.median_ms * 1000:.0f} MiB/s",
            verdict(scrub_t.median_ms / cp_t.median_ms < 1.5)),
        Row("scrub", f"vmwipe scrub CLI on ext4 (root fs), {what}", scrub_t, cpf_t,
            "cp --reflink=never + fsync", "<= 1.2x cp+fsync",
            f"in-process {inproc:.0f} ms ({inproc / cpf_t.median_ms:.2f}x); cp "
            f"{cp_t.median_ms:.0f} + fsync {timing(ext4.fsync).median_ms:.0f} ms",
            verdict(scrub_t.median_ms / cpf_t.median_ms <= 1.2)),
    ]
    case = f"vmwipe scrub CLI on reflink XFS (loop), {what}"
    if why:
        none = Timing(0.0, 0.0, 0)
        return [*rows, Row("scrub", case, none, none, "cp --reflink=never + fsync",
                           "<= 0.2x cp+fsync", f"not run: {why}", "not run")]
    x_scrub, x_base = timing(xfs.scrub), timing(xfs.cp_fsync)
    x_in = statistics.median(xfs.inproc) * 1000
    rows.append(Row("scrub", case, x_scrub, x_base, "cp --reflink=never + fsync",
                    "<= 0.2x cp+fsync",
                    f"reflinked {xfs.reflinked}; in-process {x_in:.0f} ms "
                    f"({x_in / x_base.median_ms:.2f}x); cp {timing(xfs.cp).median_ms:.0f} + "
                    f"fsync {timing(xfs.fsync).median_ms:.0f} ms",
                    verdict(x_scrub.median_ms / x_base.median_ms <= 0.2)))
    return rows


def _save_row(save_scrub_s: list[float], save_s: list[float], cp_t: Timing,
              marks: list[dict[str, float]]) -> Row:
    ss, sp = timing(save_scrub_s), timing(save_s)
    phases = {k: statistics.median(m.get(k, 0.0) for m in marks) for k in ("table", "migrate",
                                                                          "verify", "done")}
    split = (f"phases: table read {phases['table']:.0f} ms, filtered migration "
             f"{phases['migrate'] - phases['table']:.0f} ms, re-read/verify "
             f"{phases['verify'] - phases['migrate']:.0f} ms, sidecar "
             f"{phases['done'] - phases['verify']:.0f} ms")
    return Row("scrub", f"save --scrub vs plain save, 1 GiB guest, {PAGES:,} pages",
               ss, sp, "vmwipe save (plain)", "< 1.5x plain save",
               f"vs cp {ss.median_ms / cp_t.median_ms:.2f}x; plain save vs cp "
               f"{sp.median_ms / cp_t.median_ms:.2f}x; {split}",
               verdict(ss.median_ms / sp.median_ms < 1.5))


def run(quick: bool = False, saves: bool = True) -> list[Row]:
    """`saves=False` measures only the file scrubs (`VMWIPE_BENCH_SCRUB_SAVES=0` too)."""
    repeat = 1 if quick else 3
    saves = saves and os.environ.get("VMWIPE_BENCH_SCRUB_SAVES", "1") != "0"
    ext4, xfs = FsSamples(), FsSamples()
    save_s: list[float] = []
    save_scrub_s: list[float] = []
    marks: list[dict[str, float]] = []  # save_scrubbed's cumulative phase marks
    with Lab("vmwipe-bench-scrub-", root=os.environ.get("VMWIPE_BENCH_TMP")) as lab:
        if free_disk_gib(lab.dir) < NEED_GIB:
            raise RuntimeError(f"bench_scrub needs {NEED_GIB:g} GiB free in {lab.dir}")
        base = lab.dir / "base.mig"
        argv = lab.machine(MEM_MIB, shared=False)
        lab.make_snapshot(base, MEM_MIB, False, FILL, scattered(PAGES))
        size_mib = base.stat().st_size / (1 << 20)
        fsync_path(base)
        container = "mapped-ram" if "mapped-ram" in stream_capabilities(str(base))[1] \
            else "record"
        why = _fs_rounds(lab.dir, base, repeat, ext4, xfs)
        if saves:
            _save_rounds(lab, argv, base, repeat, save_s, save_scrub_s, marks)
        _unlink(base)
    rows = _fs_rows(size_mib, container, ext4, xfs, why)
    if saves:
        rows.append(_save_row(save_scrub_s, save_s, timing(ext4.cp), marks))
    return rows
