"""`vmwipe template` and `vmwipe clone --template` on real QEMU (7.2 and, if built, 10), no guest.

A `-S` template VM with its RAM in a share=on file gets a planted table whose
listed pages hold a secret; `vmwipe template` must leave no trace of it in the
file.  Clones then map the file privately: they start paused, wiped, with the
template's other bytes, and one clone's writes reach neither another clone nor
the file.  Every refusal leaves no clone QEMU behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REGION, VM, qemu_available, region_args, run_cli, start_vm

from vmwipe.host_agent.errors import TemplateError
from vmwipe.host_agent.flows.target import AgentOptions
from vmwipe.host_agent.flows.template_clone import check_argv, prepare_clone
from vmwipe.host_agent.flows.template_load import ram_size
from vmwipe.host_agent.flows.template_manifest import Manifest
from vmwipe.host_agent.qemu.launcher import start_qemu
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.host_agent.snapshot.sidecar import sidecar_path, write_sidecar
from vmwipe.host_agent.wipe.backends import ProcessVMBackend
from vmwipe.host_agent.wipe.memmap import load_memory_map
from vmwipe.protocol import PAGE_SIZE, WIPE_GENERATION_OFFSET

P = PAGE_SIZE
SIZE = 512 << 20
SLOTS = [(0x0100_0000, 4), (0x0200_0000, 1)]
SECRET = os.urandom(32)
OTHER = 0x0300_0000  # a page outside the table, with template data that clones must see
QEMU10 = Path(__file__).resolve().parent.parent / "build" / "qemu10" / "qemu10"
BINARIES = ["qemu-system-x86_64", *([str(QEMU10)] if QEMU10.exists() else [])]


def _qemu_major(qemu: str) -> int:
    """The major version `qemu --version` prints (Debian 13's system QEMU is 10 too)."""
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    m = re.search(r"version (\d+)\.", out)
    assert m, out
    return int(m.group(1))


def clone_args(qemu: str, d: Path) -> list[str]:
    """A clone's command line without its RAM: the clone command adds the backend."""
    return [qemu, "-nodefaults", "-display", "none", "-accel", "tcg", "-M", "pc",
            "-m", "512M", *region_args(d)]


@pytest.fixture(scope="module", params=BINARIES, ids=lambda q: Path(q).name)
def template(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, bytes]]:
    """(QEMU binary, template dir, the template's page at OTHER), made by `vmwipe template`."""
    qemu: str = request.param
    if not qemu_available():
        pytest.skip("qemu-system-x86_64 not installed")
    d = tmp_path_factory.mktemp("tpl")
    ram = d / "ram"
    fd = os.open(ram, os.O_RDWR | os.O_CREAT, 0o600)  # vmwipe template refuses wider modes
    os.ftruncate(fd, SIZE)
    os.close(fd)
    vm: VM = start_vm(d, ["-M", "pc", "-m", "512M", "-object",
                          f"memory-backend-file,id=ram0,size=512M,mem-path={ram},share=on",
                          "-machine", "memory-backend=ram0"], qemu=qemu)
    try:
        vm.plant(SLOTS, pattern=SECRET)
        other = os.urandom(P)
        vm.write(OTHER, other)
        vm.disconnect()
        assert SECRET in ram.read_bytes()
        r = run_cli("template", "--qmp", vm.qmp, "--dir", str(d / "t"), "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["report"]["wipe"]["pages"] == 5 and out["manifest"]["scrubbed_pages"] == 5
        vm.qemu.proc.wait(10)  # the template QEMU quit by itself
        yield qemu, d, other
    finally:
        vm.kill()


def test_template_file_is_scrubbed(template: tuple[str, Path, bytes]) -> None:
    _qemu, d, other = template
    data = (d / "ram").read_bytes()
    assert SECRET not in data
    for gpa, n in SLOTS:
        assert data[gpa:gpa + n * P] == bytes(n * P)
    assert data[OTHER:OTHER + P] == other
    m = Manifest.load(d / "t")
    assert m.header_generation == 1 and m.backend_id == "ram0" and m.ram_size == SIZE


def test_clones_wiped_and_private(template: tuple[str, Path, bytes]) -> None:
    qemu, d, other = template
    cd = d / "clones"
    r = run_cli("clone", "--template", str(d / "t"), "-n", "2", "--dir", str(cd), "--json",
                "--paused", "--", *clone_args(qemu, d))
    assert r.returncode == 0, r.stderr
    clones = json.loads(r.stdout)["clones"]
    sessions = [QMPSession(c["qmp"]).connect() for c in clones]
    try:
        for c, s in zip(clones, sessions, strict=True):
            assert c["report"]["wipe"]["status"] == "wiped" and c["report"]["wipe"]["pages"] == 5
            # the template file's listed pages are zero: the clone reads them, writes none
            assert c["report"]["wipe"]["already_zero"]
            assert c["report"]["extra"]["canary_pages"] >= 1
            assert s.status() in ("paused", "prelaunch")  # the -S template never ran
            gen = pmem(s, d, REGION.base + WIPE_GENERATION_OFFSET, 8)
            assert int.from_bytes(gen, "little") == 2  # template's commit, then the clone's
            assert pmem(s, d, OTHER, P) == other
        # clone 0 writes (it is a private copy); clone 1 and the file must not see it
        mark = os.urandom(P)
        path = d / "mark.bin"
        path.write_bytes(mark)
        s0 = sessions[0]
        be = ProcessVMBackend(load_memory_map(s0.hmp, {"ram0"}), s0.pid)
        try:
            be.write(OTHER, mark)
        finally:
            be.close()
        assert pmem(sessions[0], d, OTHER, P) == mark
        assert pmem(sessions[1], d, OTHER, P) == other
        assert (d / "ram").read_bytes()[OTHER:OTHER + P] == other
        Manifest.load(d / "t").check_digest(d / "t")  # the file is still the template
    finally:
        for c, s in zip(clones, sessions, strict=True):
            s.close()
            os.kill(c["pid"], 9)


def pmem(s: QMPSession, d: Path, gpa: int, size: int) -> bytes:
    path = d / "pmem.bin"
    s.cmd("pmemsave", {"val": gpa, "size": size, "filename": str(path)})
    return path.read_bytes()


def killed_pids(stderr: str) -> list[int]:
    return [int(p) for p in re.findall(r"killing clone QEMU pid (\d+)", stderr)]


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


#: Every static refusal of a clone command line, in the spellings QEMU accepts
#: (`driver=`, JSON, each boolean spelling), with why it is refused.
STATIC_REFUSALS = [
    (["-device", "virtio-balloon-pci"], "discards pages"),
    (["-device", "driver=virtio-balloon-pci"], "discards pages"),
    (["-device", '{"driver": "virtio-balloon-pci", "id": "b0"}'], "discards pages"),
    (["-device", "driver=virtio-mem-pci,memdev=m"], "discards pages"),
    (["-device", "virtio-mem-pci,memdev=m"], "discards pages"),
    (["-global", "migration.x-postcopy-ram=on"], "postcopy"),
    (["-global", "driver=migration,property=x-postcopy-ram,value=yes"], "postcopy"),
    (["-object", "memory-backend-file,id=x,size=1M,mem-path=/dev/null,share=on"], "share=on"),
    (["-object", "memory-backend-memfd,id=m,size=1G,share=on"], "share=on"),
    (["-object", "memory-backend-file,id=x,size=1M,mem-path=/dev/null,share=yes"], "share=on"),
    (["-object", '{"qom-type": "memory-backend-memfd", "id": "m", "size": 1048576, '
                 '"share": true}'], "share=on"),
    (["-object", "memory-backend-ram,id=p,size=1M,prealloc=on"], "copies all"),
    (["-object", "qom-type=memory-backend-ram,id=p,size=1M,prealloc=true"], "copies all"),
    (["-mem-prealloc"], "copies all"),
    (["-overcommit", "mem-lock=on"], "copies all"),
    (["-chardev", "socket,id=c0,path=/run/vfs.sock",
      "-device", "vhost-user-fs-pci,chardev=c0,tag=fs"], "vhost-user"),
    (["-netdev", "vhost-user,id=n0,chardev=c0"], "vhost-user"),
    (["-incoming", "defer"], "adds it"),
]


@pytest.mark.parametrize("extra, why", STATIC_REFUSALS[:4])
def test_static_refusals(template: tuple[str, Path, bytes], extra: list[str], why: str) -> None:
    qemu, d, _ = template
    r = run_cli("clone", "--paused", "--template", str(d / "t"), "-n", "1", "--dir", str(d / "bad"),
                "--", *clone_args(qemu, d), *extra)
    assert r.returncode == 2 and why in r.stderr, r.stderr
    assert not list((d / "bad").glob("clone-*.log")) if (d / "bad").exists() else True


def test_mismatched_machine_refused_and_killed(template: tuple[str, Path, bytes]) -> None:
    qemu, d, _ = template
    args = [a if a != "pc" else "q35" for a in clone_args(qemu, d)]
    r = run_cli("clone", "--paused", "--template", str(d / "t"), "-n", "2", "--dir", str(d / "q35"),
                "--", *args)
    assert r.returncode == 2 and "machine" in r.stderr, r.stderr
    pids = killed_pids(r.stderr)
    assert len(pids) == 2
    assert_gone(pids)


def test_changed_template_refused(template: tuple[str, Path, bytes], tmp_path: Path) -> None:
    qemu, d, other = template
    t2 = tmp_path / "t"
    shutil.copytree(d / "t", t2)
    ram = d / "ram"
    # replace by rename: same bytes, another inode
    m = Manifest.load(t2)
    copy = tmp_path / "ram"
    shutil.copyfile(ram, copy)
    m.ram_path = str(copy)
    m.write(t2)
    r = run_cli("clone", "--paused", "--template", str(t2), "-n", "1", "--", *clone_args(qemu, d))
    assert r.returncode == 2 and "changed since" in r.stderr, r.stderr
    # edited in place, timestamps put back: only the digest can tell
    m.ram_identity = type(m.ram_identity).of(copy)
    m.write(t2)
    st = os.stat(copy)
    with open(copy, "r+b") as f:
        os.pwrite(f.fileno(), bytes([other[0] ^ 0xFF]), OTHER)  # a byte it did not hold
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    m.ram_identity = type(m.ram_identity).of(copy)  # even with a matching stat
    m.write(t2)
    r = run_cli("clone", "--paused", "--template", str(t2), "-n", "1", "--", *clone_args(qemu, d))
    assert r.returncode == 2 and "digest" in r.stderr, r.stderr
    assert not killed_pids(r.stderr)  # refused before any clone started


PRIVATE = "memory-backend-file,id=ram0,size=512M,mem-path={ram},share=off"


@pytest.mark.parametrize("ram, extra, why", [
    ("memory-backend-ram,id=ram0,size=512M", [], "not a mapping of the template file"),
    ("memory-backend-file,id=ram0,size=512M,mem-path={ram},share=on", [], "share=on"),
    (PRIVATE, ["-device", "virtio-balloon-pci"], "balloon"),
    (PRIVATE, ["-object", "memory-backend-ram,id=vm0,size=128M",
               "-device", "virtio-mem-pci,memdev=vm0"], "virtio-mem"),
    (PRIVATE, ["-global", "migration.x-postcopy-ram=on"], "postcopy"),
    (PRIVATE, ["-object", "memory-backend-ram,id=p0,size=1M,prealloc=on"], "preallocated"),
], ids=["ram", "shared", "balloon", "virtio-mem", "postcopy", "prealloc"])
def test_runtime_refusals(template: tuple[str, Path, bytes], tmp_path: Path, ram: str,
                          extra: list[str], why: str) -> None:
    """What the static checks cannot see (a hand-made clone command line) QEMU itself shows:
    each case gets past `check_argv` here, and only its own runtime check stops it."""
    qemu, d, _ = template
    if why == "postcopy" and _qemu_major(qemu) >= 10:
        pytest.skip("QEMU 10 refuses postcopy itself (at start) for a RAM file not on tmpfs")
    args = [a if a != "512M" else "512M,maxmem=1G" for a in clone_args(qemu, d)]
    argv = [*args, "-object", ram.format(ram=d / "ram"), "-machine", "memory-backend=ram0",
            *extra]
    qp = start_qemu(argv, str(tmp_path / "q.qmp"), paused=True, incoming_defer=True)
    try:
        with QMPSession(qp.qmp_path) as s, pytest.raises(TemplateError, match=why):
            prepare_clone(s, Manifest.load(d / "t"), str(d / "t"), AgentOptions(), True)
        with QMPSession(qp.qmp_path) as s:
            assert s.status() == "inmigrate"  # never loaded, never ran
    finally:
        qp.kill()


def test_template_from_saved_state(template: tuple[str, Path, bytes], tmp_path: Path) -> None:
    """`vmwipe template --from STATE`: the state's secret never stays in the new RAM file."""
    qemu, d, _ = template
    vm = start_vm(tmp_path / "src", ["-M", "pc", "-m", "512M"], qemu=qemu)
    try:
        vm.plant(SLOTS, pattern=SECRET)
        other = os.urandom(P)
        vm.write(OTHER, other)
        vm.disconnect()
        r = run_cli("save", "--paused", "--qmp", vm.qmp, "--to", str(tmp_path / "state"))
        assert r.returncode == 0, r.stderr
    finally:
        vm.kill()
    ram = tmp_path / "tpl,ram"  # a comma in a path must not end QEMU's mem-path= option
    r = run_cli("template", "--from", str(tmp_path / "state"), "--ram", str(ram),
                "--dir", str(tmp_path / "t"), "--json", "--", *clone_args(qemu, d))
    assert r.returncode == 0, r.stderr
    data = ram.read_bytes()
    assert SECRET not in data and data[OTHER:OTHER + P] == other
    r = run_cli("clone", "--paused", "--template", str(tmp_path / "t"), "-n", "1", "--json",
                "--dir", str(tmp_path / "c"), "--", *clone_args(qemu, d))
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)["clones"][0]
    try:
        assert c["report"]["wipe"]["pages"] == 5
        with QMPSession(c["qmp"]) as s:
            assert pmem(s, tmp_path, OTHER, P) == other
            assert SECRET not in pmem(s, tmp_path, SLOTS[0][0], SLOTS[0][1] * P)
    finally:
        os.kill(c["pid"], 9)
    # an existing RAM file is never reused
    r = run_cli("template", "--from", str(tmp_path / "state"), "--ram", str(ram),
                "--dir", str(tmp_path / "t2"), "--", *clone_args(qemu, d))
    assert r.returncode != 0 and "exists" in r.stderr, r.stderr


@pytest.mark.parametrize("args, why", STATIC_REFUSALS)
def test_check_argv(args: list[str], why: str) -> None:
    with pytest.raises(TemplateError, match=why):
        check_argv(["-M", "pc", *args])


@pytest.mark.parametrize("args", [
    ["-device", "virtio-net-pci"],  # anything else is the user's
    ["-object", "memory-backend-ram,id=m,size=1M,share=off,prealloc=no"],
    ["-object", '{"qom-type": "memory-backend-memfd", "id": "m", "size": 1, "share": false}'],
    ["-global", "migration.x-postcopy-ram=off"],
    ["-overcommit", "mem-lock=off"],
])
def test_check_argv_lets_the_rest_through(args: list[str]) -> None:
    check_argv(["-M", "pc", *args])


@pytest.mark.parametrize("m, size", [("512M", 512 << 20), ("512", 512 << 20), ("2G", 2 << 30),
                                     ("size=1G,slots=2,maxmem=4G", 1 << 30)])
def test_ram_size(m: str, size: int) -> None:
    assert ram_size(["-M", "pc", "-m", m]) == size


def test_sigint_mid_fleet_kills_every_clone_none_ran(template: tuple[str, Path, bytes]) -> None:
    """SIGINT while a 12-clone fleet is being prepared two at a time: exit 130, every clone
    QEMU killed, and none was ever resumed (the fleet conts only once all are ready)."""
    qemu, d, _ = template
    cd = d / "sigint"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmwipe.host_agent.cli", "clone", "--template", str(d / "t"),
         "-n", "12", "-j", "2", "--dir", str(cd), "--", *clone_args(qemu, d)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if re.match(r"clone \d+/12: pid \d+, \d+ pages wiped, .*paused$", line):
                proc.send_signal(signal.SIGINT)
                break
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = "".join(lines) + rest
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "resumed 12 clone" not in stderr
    pids = killed_pids(stderr)
    assert len(pids) == 12, stderr
    assert_gone(pids)


def test_untrusted_names_never_reach_qemu(template: tuple[str, Path, bytes],
                                          tmp_path: Path) -> None:
    """A manifest's backend id and a sidecar's block name become QEMU ids: one that would
    add options of its own is refused before any QEMU starts (exit 2, one line)."""
    qemu, d, _ = template
    t2 = tmp_path / "t"
    shutil.copytree(d / "t", t2)
    doc = json.loads((t2 / "manifest.json").read_text())
    doc["backend_id"] = "pc.ram,prealloc=on,discard-data=on"
    (t2 / "manifest.json").write_text(json.dumps(doc))
    r = run_cli("clone", "--template", str(t2), "-n", "1", "--dir", str(tmp_path / "c"),
                "--", *clone_args(qemu, d))
    assert r.returncode == 2 and "not a valid QEMU id" in r.stderr, r.stderr
    assert not killed_pids(r.stderr) and not (tmp_path / "c").exists()
    state = tmp_path / "state"
    state.write_bytes(b"QEVM")
    write_sidecar(sidecar_path(state), region=REGION, ram=[(0, SIZE, "pc.ram,share=on", 0)])
    r = run_cli("template", "--from", str(state), "--ram", str(tmp_path / "ram"),
                "--dir", str(tmp_path / "t3"), "--", *clone_args(qemu, d))
    assert r.returncode == 2 and "not a valid QEMU id" in r.stderr, r.stderr
    assert not (tmp_path / "ram").exists()
