"""`vmwipe scrub` on a reflink filesystem: the copy is a FICLONE, so only listed pages cost.

A 320 MiB XFS image (reflink=1) is loop-mounted for this module; it needs root,
`mkfs.xfs` (xfsprogs; `scripts/setup-system.sh` installs it) and a free loop
device, and skips with the reason otherwise.  The scrubbed file must be correct
(secrets gone, other pages kept), reported as reflinked, and share all but the
rewritten blocks with a clone of the original made before the scrub.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_migstream import Vm, needs_qemu
from test_scrub import plant_and_save

from vmwipe.host_agent.snapshot.replace import FICLONE
from vmwipe.host_agent.snapshot.scrub import scrub_file


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A mounted reflink XFS; the loop device is the one losetup gave us, detached at the end."""
    if os.geteuid() != 0:
        pytest.skip("loop-mounting XFS needs root")
    if shutil.which("mkfs.xfs") is None or shutil.which("losetup") is None:
        pytest.skip("mkfs.xfs (xfsprogs) or losetup not installed")
    d = tmp_path_factory.mktemp("xfs")
    img, mnt = d / "xfs.img", d / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(320 << 20)
    r = _run("mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(img))
    if r.returncode:
        pytest.skip(f"mkfs.xfs failed: {r.stderr.strip()}")
    r = _run("losetup", "-f", "--show", str(img))
    if r.returncode:
        pytest.skip(f"no loop device here: {r.stderr.strip()}")
    loop = r.stdout.strip()
    try:
        r = _run("mount", loop, str(mnt))
        if r.returncode:
            pytest.skip(f"cannot mount a loop device here: {r.stderr.strip()}")
        try:
            yield mnt
        finally:
            _run("umount", str(mnt))
    finally:
        _run("losetup", "-d", loop)


def shared_extents(path: Path) -> int:
    """Extents of `path` that filefrag reports as shared with another file."""
    out = _run("filefrag", "-v", str(path)).stdout
    return sum(1 for line in out.splitlines() if "shared" in line)


@needs_qemu
def test_scrub_on_xfs_reflinks(xfs: Path, tmp_path: Path) -> None:
    vms: list[Vm] = []
    try:
        saved = plant_and_save(tmp_path, vms, ["-M", "pc", "-m", "512M"])
    finally:
        for vm in vms:
            vm.kill()
    work = xfs / "vm.sav"
    shutil.copyfile(saved.path, work)
    keep = xfs / "before.sav"  # a clone of the original, so its blocks stay shared
    with open(work, "rb") as src, open(keep, "wb") as dst:
        fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
    rep = scrub_file(str(work))
    assert rep.replaced and rep.reflinked and rep.scrubbed_copies == 3
    blob = work.read_bytes()
    for secret in saved.secrets.values():
        assert secret not in blob
    for data in saved.keep.values():
        assert data in blob
    if shutil.which("filefrag"):
        assert shared_extents(work) > 0  # only the rewritten pages got blocks of their own
    keep.unlink()
    work.unlink()
