"""Template clones of a real Linux guest running vmwipe.ko (one boot for the module).

The lab guest boots with its RAM in a share=on file, maps 4 vmwipe pages plus a
poller's page, and the test plants a secret in the 4 pages.  `vmwipe template`
must leave the secret nowhere in the RAM file; `vmwipe clone --template -n 2`
clones (resumed by default) must each wake with their page zeroed; a file written inside
one clone must not show up in the other clone's RAM or in the template file;
and a template file edited after it was made is refused before any clone starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import run_cli

from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.host_agent.wipe.backends import ProcessVMBackend
from vmwipe.host_agent.wipe.memmap import load_memory_map
from vmwipe.lab import GuestConfig, GuestImage
from vmwipe.lab.agent import AgentGuest, attach_console, register_holder, shm_ram, without_ram
from vmwipe.lab.shell import sh, wait_output

pytestmark = pytest.mark.slow
P = 4096
SECRET = os.urandom(16).hex().encode()


class Tpl(NamedTuple):
    directory: Path
    ram: Path
    clone_argv: list[str]


@pytest.fixture(scope="module")
def tpl(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tpl]:
    """The guest's secret pages scrubbed into a template, and its clone command line."""
    d = tmp_path_factory.mktemp("tplguest")
    with shm_ram(512) as (ram, backend):
        g = AgentGuest(GuestConfig(image, extra_args=backend))
        with g:
            assert g.console is not None
            pfns = register_holder(g, 4)
            assert len(pfns) == 4
            g.qmp("stop")
            for pfn in pfns:
                g.write_phys(pfn * P, SECRET * (P // len(SECRET)))
            assert SECRET in ram.read_bytes()
            r = run_cli("template", "--qmp", g.agent_qmp, "--dir", str(d / "t"), "--json")
            assert r.returncode == 0, r.stderr
            rep = json.loads(r.stdout)["report"]
            assert rep["wipe"]["status"] == "wiped" and rep["wipe"]["pages"] == 5
            yield Tpl(d, ram, without_ram(g.clone_args(str(d / "con-{i}.sock"))))


def test_secret_absent_from_template_file(tpl: Tpl) -> None:
    ram = tpl.ram
    assert SECRET not in ram.read_bytes()


def guest_ram(qmp: str) -> bytes:
    with QMPSession(qmp) as s:
        be = ProcessVMBackend(load_memory_map(s.hmp, {"ram0"}), s.pid)
        try:
            return b"".join(be.read(r.gpa, r.size) for r in be.memmap.ranges)
        finally:
            be.close()


def test_clones_start_wiped_and_stay_private(tpl: Tpl,
                                             tmp_path: Path) -> None:
    d, ram, argv = tpl
    cd = d / "clones"
    r = run_cli("clone", "--template", str(d / "t"), "-n", "2", "--dir", str(cd),
                "--json", "--", *argv, timeout=300)
    assert r.returncode == 0, r.stderr
    clones = json.loads(r.stdout)["clones"]
    socks = []
    try:
        consoles = []
        for c in clones:
            assert c["report"]["wipe"]["pages"] == 5 and c["report"]["resumed"]
            con, sock = attach_console(str(d / f"con-{c['index']}.sock"),
                                       tmp_path / f"console-{c['index']}.log")
            socks.append(sock)
            consoles.append(con)
            out = wait_output(con, "poll", r"^POLL (OK|FAIL)$", timeout=60)
            assert "POLL OK" in out and re.search(r"POLL WOKE gen=\d+ zero=1", out), out
        tag = os.urandom(8).hex()
        sh(consoles[0], f"printf 'VMW%sMARK' {tag} > /tmp/mark")
        mark = f"VMW{tag}MARK".encode()
        with QMPSession(clones[0]["qmp"]) as s0, QMPSession(clones[1]["qmp"]) as s1:
            s0.cmd("stop")
            s1.cmd("stop")
        assert mark in guest_ram(clones[0]["qmp"])  # the write is there to be found...
        assert mark not in guest_ram(clones[1]["qmp"])  # ...but only in its own clone
        assert mark not in ram.read_bytes()
        assert SECRET not in guest_ram(clones[1]["qmp"])
    finally:
        for s in socks:
            s.close()
        for c in clones:
            os.kill(c["pid"], signal.SIGKILL)


def test_tampered_template_refused(tpl: Tpl, tmp_path: Path) -> None:
    d, ram, argv = tpl
    t2 = tmp_path / "t"
    shutil.copytree(d / "t", t2)
    manifest = json.loads((t2 / "manifest.json").read_text())
    copy = ram.parent / "tampered"
    shutil.copyfile(ram, copy)
    st = os.stat(copy)
    with open(copy, "r+b") as f:  # the secret put back into the first listed page
        os.pwrite(f.fileno(), SECRET, 0x0100_0000)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    st = os.stat(copy)
    manifest["ram_path"] = str(copy)
    manifest["ram_identity"] = {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                                "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    (t2 / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli("clone", "--template", str(t2), "-n", "1", "--dir", str(tmp_path / "c"),
                "--", *argv)
    assert r.returncode == 2 and "digest" in r.stderr, r.stderr
    assert "pid" not in r.stderr  # refused before any clone QEMU started
    copy.unlink()
