"""What vmwipe writes to disk for guest state is owner-only and never lands on a planted path.

Real QEMU, `-S` VMs (no guest), the CLI under the usual umask 022: a save and its
sidecar, a template's directory, device state and manifest come out 0600/0700;
a template RAM file others could read is refused before the VM is touched; a
directory given with --dir is used only when it is new, or ours and empty (it is
made 0700 first); `save --scrub` writes to a new, unpredictable temp name, so a
link planted at the old `PATH.partial` is never followed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import qemu_available, run_cli, start_vm

pytestmark = pytest.mark.skipif(not qemu_available(), reason="QEMU not installed")

MACHINE = ["-M", "pc", "-m", "512M"]


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_save_and_sidecar_are_owner_only(tmp_path: Path) -> None:
    vm = start_vm(tmp_path / "vm", MACHINE)
    try:
        out = tmp_path / "vm.state"
        r = run_cli("save", "--qmp", vm.qmp, "--to", str(out))
        assert r.returncode == 0, r.stderr
        assert mode(out) == 0o600 and mode(Path(f"{out}.vmwipe.json")) == 0o600
    finally:
        vm.kill()


def test_save_scrub_never_follows_a_planted_partial(tmp_path: Path) -> None:
    vm = start_vm(tmp_path / "vm", MACHINE)
    try:
        victim = tmp_path / "victim"
        victim.write_bytes(b"not yours")
        out = tmp_path / "vm.state"
        Path(f"{out}.partial").symlink_to(victim)
        r = run_cli("save", "--qmp", vm.qmp, "--to", str(out), "--scrub")
        assert r.returncode == 0, r.stderr
        assert victim.read_bytes() == b"not yours"
        assert stat.S_ISREG(os.lstat(out).st_mode) and mode(out) == 0o600
        assert mode(Path(f"{out}.vmwipe.json")) == 0o600
        assert not list(tmp_path.glob(".vm.state.*"))
    finally:
        vm.kill()


def test_template_files_and_ram_file_mode(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    fd = os.open(ram, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 512 << 20)
    os.close(fd)
    vm = start_vm(tmp_path / "vm", [*MACHINE, "-object",
                                    f"memory-backend-file,id=ram0,size=512M,mem-path={ram},"
                                    "share=on", "-machine", "memory-backend=ram0"])
    try:
        t = tmp_path / "t"
        r = run_cli("template", "--qmp", vm.qmp, "--dir", str(t))
        assert r.returncode == 2 and "chmod go=" in r.stderr, r.stderr
        assert vm.status() == "prelaunch" and not t.exists()  # refused before anything
        os.chmod(ram, 0o600)
        t.mkdir(mode=0o700)
        (t / "devstate").symlink_to(tmp_path / "elsewhere")
        r = run_cli("template", "--qmp", vm.qmp, "--dir", str(t))
        assert r.returncode == 2 and "is not empty" in r.stderr, r.stderr
        assert not (tmp_path / "elsewhere").exists()
        (t / "devstate").unlink()
        t.chmod(0o755)  # an empty directory of ours is fine: it is closed to others first
        r = run_cli("template", "--qmp", vm.qmp, "--dir", str(t))
        assert r.returncode == 0, r.stderr
        assert mode(t) == 0o700
        assert mode(t / "devstate") == 0o600
        assert mode(t / "manifest.json") == 0o600
    finally:
        vm.kill()


def test_clone_dir_must_be_new_or_private(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.write_bytes(b"")
    shared = tmp_path / "shared"  # another user's (a shared /tmp-like directory)
    shared.mkdir()
    shared.chmod(0o1777)
    os.chown(shared, 65534, 65534)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "private")
    (tmp_path / "private").mkdir(mode=0o700)
    for d, why in ((shared, "belongs to uid 65534"), (link, "is not a directory")):
        r = run_cli("clone", str(snap), "-n", "1", "--dir", str(d), "--", "-M", "pc")
        assert r.returncode == 2 and why in r.stderr, r.stderr
        assert "starting" not in r.stderr
