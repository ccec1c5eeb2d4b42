"""`vmwipe scrub FILE` replaces FILE by a scrubbed copy: what that promises besides atomicity
(the kills themselves are in test_faults_scrub.py).

- a file that needs nothing, a dry run and a refused file create nothing and write nothing;
- the replacement keeps owner, group, mode and extended attributes, the old inode's listed
  pages are zeroed too, and no copy is left;
- no room for a second copy, a hard-linked file, or an error or interrupt halfway: one-line
  refusal, FILE untouched, no copy left;
- copies left by killed runs are removed by the next one, a live run's copy is not;
- the copy keeps a sparse file's holes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_migstream import Vm, needs_qemu
from test_scrub import PAGE, plant_and_save

from vmwipe.host_agent.cli import main as vmwipe_main
from vmwipe.host_agent.errors import ReplaceError, StreamError
from vmwipe.host_agent.snapshot import replace
from vmwipe.host_agent.snapshot.scrub import scrub_file


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def temps(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.vmwipe-scrub.*"))


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[bytes]]]:
    """One real save with a table listing three data pages; the secrets planted."""
    d = tmp_path_factory.mktemp("scrub-replace")
    vms: list[Vm] = []
    try:
        saved = plant_and_save(d, vms, ["-M", "pc", "-m", "512M"])
    finally:
        for vm in vms:
            vm.kill()
    yield saved.path, list(saved.secrets.values())


@pytest.fixture
def work(original: tuple[Path, list[bytes]], tmp_path: Path) -> Path:
    d = tmp_path / "dir"
    d.mkdir()
    p = d / "vm.sav"
    shutil.copyfile(original[0], p)
    return p


def cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = vmwipe_main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@needs_qemu
def test_replaced_keeps_metadata(work: Path, original: tuple[Path, list[bytes]]) -> None:
    os.chmod(work, 0o640)
    if os.geteuid() == 0:
        os.chown(work, 4242, 4343)  # e.g. libvirt-qemu's uid
    xattr = True
    try:
        os.setxattr(work, "user.vmwipe-test", b"label")
    except OSError:
        xattr = False
    before = os.stat(work)
    names = listing(work.parent)
    rep = scrub_file(str(work))
    assert rep.replaced and rep.old_copy_zeroed and rep.scrubbed_copies == 3
    assert rep.to_dict()["replaced"] is True and rep.generation == 1
    after = os.stat(work)
    assert after.st_ino != before.st_ino
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid,
                                                           before.st_mode)
    if xattr:
        assert os.getxattr(work, "user.vmwipe-test") == b"label"
    assert listing(work.parent) == names  # the copy became the file: nothing else left
    blob = work.read_bytes()
    assert all(s not in blob for s in original[1])
    # a second run has nothing to do: it writes nothing and creates nothing
    rep2 = scrub_file(str(work))
    assert rep2.noop and not rep2.replaced
    again = os.stat(work)
    assert (again.st_ino, again.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert listing(work.parent) == names


@needs_qemu
def test_dry_run_and_bad_file_create_nothing(work: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    names, digest = listing(work.parent), sha(work)
    rep = scrub_file(str(work), dry_run=True)
    assert rep.dry_run and not rep.replaced and rep.scrubbed_copies == 3
    assert listing(work.parent) == names and sha(work) == digest
    bad = work.parent / "bad.sav"
    bad.write_bytes(work.read_bytes()[: work.stat().st_size // 2])
    names, digest = listing(work.parent), sha(bad)
    rc, out, err = cli("scrub", str(bad), capsys=capsys)
    assert rc == 11 and err.count("\n") == 1 and out == ""
    assert listing(work.parent) == names and sha(bad) == digest


@needs_qemu
def test_no_room_for_the_copy(work: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    class Full:
        def __init__(self, st: os.statvfs_result) -> None:
            self.f_frsize = st.f_frsize
            self.f_bavail = 1

    monkeypatch.setattr(os, "statvfs", lambda p: Full(real(p)))
    names, digest = listing(work.parent), sha(work)
    rc, out, err = cli("scrub", str(work), capsys=capsys)
    assert rc == ReplaceError.exit_code == 13 and out == ""
    assert err.startswith("vmwipe: error: not enough free space") and err.count("\n") == 1
    assert listing(work.parent) == names and sha(work) == digest


@needs_qemu
def test_hard_link_refused(work: Path) -> None:
    os.link(work, work.parent / "other-name.sav")
    digest = sha(work)
    with pytest.raises(ReplaceError, match="hard links"):
        scrub_file(str(work))
    assert sha(work) == digest and not temps(work)


@needs_qemu
@pytest.mark.parametrize("fail", ["verify", "metadata", "interrupt", "changed"])
def test_failure_halfway_leaves_file_and_no_copy(work: Path, monkeypatch: pytest.MonkeyPatch,
                                                 fail: str) -> None:
    digest, names = sha(work), listing(work.parent)
    if fail == "verify":
        def bad_verify(*a: object) -> int:
            raise StreamError("read-back after scrub is not zero (simulated)")
        monkeypatch.setattr(replace, "_write_and_verify", bad_verify)
        exc: type[BaseException] = StreamError
    elif fail == "metadata":
        def bad_meta(*a: object) -> None:
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(replace, "_copy_metadata", bad_meta)
        exc = ReplaceError
    elif fail == "interrupt":
        real_copy = replace._copy_file

        def copy_then_sigint(src: int, dst: int, size: int) -> None:
            real_copy(src, dst, size)
            assert temps(work)  # the copy exists at this point
            raise KeyboardInterrupt
        monkeypatch.setattr(replace, "_copy_file", copy_then_sigint)
        exc = KeyboardInterrupt
    else:
        real_copy = replace._copy_file

        def copy_and_touch(src: int, dst: int, size: int) -> None:
            real_copy(src, dst, size)
            os.utime(work, ns=(0, 1))  # someone changed FILE meanwhile
        monkeypatch.setattr(replace, "_copy_file", copy_and_touch)
        exc = StreamError
    with pytest.raises(exc):
        scrub_file(str(work))
    assert sha(work) == digest
    assert listing(work.parent) == names


@needs_qemu
def test_stale_copies_removed_live_one_kept(work: Path) -> None:
    prefix = f".{work.name}.vmwipe-scrub."
    stale = work.parent / f"{prefix}abc_1234"
    stale.write_bytes(b"unscrubbed data of a killed run")
    live = work.parent / f"{prefix}live0001"
    live.write_bytes(b"a running scrub's copy")
    other = work.parent / f"{prefix}not-ours-name"  # not the exact pattern
    other.write_bytes(b"x")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        rep = scrub_file(str(work), dry_run=True)  # a dry run touches nothing
        assert rep.stale_temps_removed == 0 and stale.exists()
        rep = scrub_file(str(work))
        assert rep.replaced and rep.stale_temps_removed == 1
        assert not stale.exists() and live.exists() and other.exists()
    rep = scrub_file(str(work))  # nothing to do, but the now unlocked copy is stale
    assert rep.noop and rep.stale_temps_removed == 1 and not live.exists()
    assert other.exists()


@needs_qemu
def test_symlink_target_replaced(work: Path) -> None:
    link = work.parent / "link.sav"
    link.symlink_to(work.name)
    rep = scrub_file(str(link))
    assert rep.replaced and link.is_symlink()
    assert not temps(work) and not temps(link)
    assert scrub_file(str(work)).noop


def test_copy_keeps_holes(tmp_path: Path) -> None:
    src = tmp_path / "sparse"
    with open(src, "wb") as f:
        f.write(os.urandom(PAGE))
        f.seek(64 << 20)
        f.write(os.urandom(3 * PAGE))
        f.seek(128 << 20)
        f.write(os.urandom(100))
        f.truncate((160 << 20) + 7)  # ends in a hole
    dst = tmp_path / "copy"
    with open(src, "rb") as s, open(dst, "wb") as d:
        replace._copy_file(s.fileno(), d.fileno(), os.fstat(s.fileno()).st_size)
    assert sha(dst) == sha(src) and dst.stat().st_size == src.stat().st_size
    if src.stat().st_blocks * 512 < 8 << 20:  # the filesystem keeps holes at all
        assert dst.stat().st_blocks * 512 < 8 << 20


def test_remove_stale_temps_ignores_non_files(tmp_path: Path) -> None:
    target = tmp_path / "f.sav"
    (tmp_path / f".f.sav{replace.TEMP_TAG}dir_0001").mkdir()
    (tmp_path / f".f.sav{replace.TEMP_TAG}lnk_0001").symlink_to(target)
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    assert replace.remove_stale_temps(str(target)) == 0
    assert len(list(tmp_path.iterdir())) == 2


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(1, 40_000), data=st.data(), span=st.sampled_from([4096, 8192, 1 << 22]))
def test_whole_block_writes_edit_exactly_the_listed_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, data: st.DataObject,
        span: int) -> None:
    """`_write_blocks` rewrites whole blocks read from the original; the result must be
    the original with the zero writes, then the patches, applied byte for byte, also
    where edits share a block, overlap, or cross a SPAN_MAX cut."""
    monkeypatch.setattr(replace, "SPAN_MAX", span)
    orig = bytes(random.Random(size).randbytes(size))
    edit = st.tuples(st.integers(0, size - 1), st.integers(1, 4200))
    writes = [(p, min(n, size - p)) for p, n in data.draw(st.lists(edit, max_size=12))]
    patches = [(p, bytes([7]) * min(n, size - p)) for p, n in data.draw(st.lists(edit,
                                                                                 max_size=3))]
    want = bytearray(orig)
    for p, n in writes:
        want[p:p + n] = bytes(n)
    for p, d in patches:
        want[p:p + len(d)] = d
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(orig)
    dst.write_bytes(orig)
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    try:
        replace._write_blocks(sfd, dfd, size, writes, patches)
    finally:
        os.close(sfd)
        os.close(dfd)
    assert dst.read_bytes() == bytes(want)
