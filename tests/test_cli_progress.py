"""Progress of save, restore, template hashing and scrub: a bar on a terminal, plain lines
otherwise, nothing with -q (issue 24 item 5).

The bar is checked on a real pseudo-terminal with real QEMU processes (one save and one
restore of a 576 MiB machine, no guest); the plain lines and -q on pipes.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import QEMU, SMALL_MACHINE, VM, qemu_available, start_vm

from vmwipe.host_agent import progress
from vmwipe.host_agent.flows.template_manifest import sha256_file

VMWIPE = [sys.executable, "-m", "vmwipe.host_agent.cli"]
MIB = 1 << 20


@pytest.fixture
def mode() -> Iterator[None]:
    yield
    progress.configure("off")


def test_mode_follows_q_and_the_terminal() -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    assert progress.mode_for(quiet=True, stream=Tty()) == "off"
    assert progress.mode_for(quiet=False, stream=Tty()) == "bar"
    with open(os.devnull, "w") as f:
        assert progress.mode_for(quiet=False, stream=f) == "lines"


def test_plain_lines_at_each_quarter(mode: None, capsys: pytest.CaptureFixture[str]) -> None:
    progress.configure("lines")
    with progress.task("save") as t:
        for done in range(0, 513, 64):
            t.update(done * MIB, 512 * MIB)
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == ["vmwipe: save: 25% (128 of 512 MiB)", "vmwipe: save: 50% (256 of 512 MiB)",
                       "vmwipe: save: 75% (384 of 512 MiB)"]
    assert len(err) == 4 and err[3].startswith("vmwipe: save: 512 MiB in ")
    with progress.task("small", 16 * MIB) as t:  # ends before anyone could read a line
        t.update(16 * MIB)
    with pytest.raises(RuntimeError), progress.task("failed", 512 * MIB) as t:
        raise RuntimeError  # no "done" line for a step that failed
    progress.configure("off")
    with progress.task("quiet", 512 * MIB) as t:
        t.update(512 * MIB)
    assert capsys.readouterr().err == ""


def test_template_hashing_reports_progress(mode: None, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(os.urandom(MIB) * 40)
    monkeypatch.setattr(progress, "LINES_MIN", 0)
    progress.configure("lines")
    import hashlib

    assert sha256_file(ram) == hashlib.sha256(ram.read_bytes()).hexdigest()
    err = capsys.readouterr().err
    assert "vmwipe: sha256 ram: 25% (" in err and "vmwipe: sha256 ram: 40 MiB in " in err


def _on_a_terminal(*args: str) -> tuple[int, str, str]:
    """Run vmwipe with stderr on a pseudo-terminal; (exit code, stdout, terminal output)."""
    master, slave = pty.openpty()
    # a terminal of 100 columns (a fresh pty has 0, and a bar of 0 columns is empty)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    p = subprocess.Popen([*VMWIPE, *args], stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    tty = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            p.kill()
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        tty += chunk
    os.close(master)
    out = p.stdout.read() if p.stdout else ""
    return p.wait(60), out, tty.decode(errors="replace")


@pytest.mark.skipif(not qemu_available(), reason="QEMU not installed")
def test_save_and_restore_show_a_bar_on_a_terminal_and_lines_in_a_pipe(
        tmp_path: Path, vm_factory: list[VM]) -> None:
    src = start_vm(tmp_path / "src", SMALL_MACHINE)
    vm_factory.append(src)
    state = tmp_path / "vm.state"
    rc, _out, tty = _on_a_terminal("save", "--paused", "--qmp", src.qmp, "--to", str(state))
    assert rc == 0, tty
    assert "save:" in tty and "%|" in tty, tty  # tqdm's "save:  42%|████ ..."
    dst = start_vm(tmp_path / "dst", SMALL_MACHINE, incoming=True)
    vm_factory.append(dst)
    rc, _out, tty = _on_a_terminal("restore", "--qmp", dst.qmp, "--from", str(state),
                                   "--paused")
    assert rc == 0, tty
    assert "restore:" in tty and "B/s" in tty, tty  # tqdm's rate column

    # not a terminal: one line per quarter (each poll may see several at once) and the end
    again = tmp_path / "again.state"
    run = subprocess.run([*VMWIPE, "save", "--paused", "--qmp", dst.qmp, "--to", str(again)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "vmwipe: save: 576 MiB in " in run.stderr, run.stderr
    # -q: nothing on stderr at all
    quiet = tmp_path / "quiet.state"
    src2 = start_vm(tmp_path / "src2", SMALL_MACHINE)
    vm_factory.append(src2)
    run = subprocess.run([*VMWIPE, "save", "-q", "--paused", "--qmp", src2.qmp, "--to",
                          str(quiet)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    # scrub reads the whole file first: a bar on a terminal; in a pipe, lines only for
    # files of LINES_MIN and more
    rc, _out, tty = _on_a_terminal("scrub", str(again), "--dry-run")
    assert rc == 0 and "scrub: reading: 100%|" in tty, tty
    run = subprocess.run([*VMWIPE, "scrub", str(again), "--dry-run"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    if again.stat().st_size < progress.LINES_MIN:  # QEMU 7.2 saves this guest smaller
        assert run.stderr == "", run.stderr  # a small file: no lines
    else:  # QEMU 10 saved 583 MiB of it: lines, then the end
        assert run.stderr.startswith("vmwipe: scrub: reading: "), run.stderr
        assert run.stderr.splitlines()[-1].endswith(" s"), run.stderr
    # clone's per-clone progress lines go too with -q; the error stays, on one line
    bad = [QEMU, "-nodefaults", "-display", "none", "-no-such-option"]
    loud = subprocess.run([*VMWIPE, "clone", str(again), "-n", "2", "--dir",
                           str(tmp_path / "c1"), "--", *bad],
                          capture_output=True, text=True, timeout=120)
    assert loud.returncode == 10 and loud.stderr.count("\n") > 1, loud.stderr
    run = subprocess.run([*VMWIPE, "clone", "-q", str(again), "-n", "2", "--dir",
                          str(tmp_path / "c2"), "--", *bad],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 10 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("vmwipe: error: "), run.stderr
