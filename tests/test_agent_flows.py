"""End-to-end agent flows on real QEMU (TCG): state handling, save/restore/clone/loadvm,
signals mid-wipe, reset guard, and the two memory backends giving identical results."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    BIG_MACHINE,
    HIGH,
    QEMU,
    REGION,
    SHARED_MACHINE,
    SMALL_MACHINE,
    VM,
    qemu_available,
    run_cli,
    start_vm,
)

from vmwipe.host_agent.errors import MemoryAccessError, MigrationError, QMPCommandError, QMPFailure
from vmwipe.host_agent.flows.fleet import CloneSet, run_fleet
from vmwipe.host_agent.flows.live import wipe_flow
from vmwipe.host_agent.flows.report import FlowReport
from vmwipe.host_agent.flows.target import AgentOptions, open_target
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.host_agent.wipe.memmap import parse_gpa2hva
from vmwipe.protocol import PAGE_SIZE, Region, build_region

P = PAGE_SIZE
G = 1 << 30
SLOTS = [(0x200000, 4), (0x1000000, 16), (HIGH + 0x3000, 2)]
LOW_SLOTS = SLOTS[:2]  # for a machine without the pc-dimm above 4 GiB
SPANS = [(g, n * P) for g, n in SLOTS]

pytestmark = pytest.mark.skipif(not qemu_available(), reason=f"{QEMU} not installed")


@pytest.fixture
def vms() -> Iterator[list[VM]]:
    started: list[VM] = []
    yield started
    for v in started:
        v.kill()


def new_vm(vms: list[VM], d: Path, machine: list[str] = SMALL_MACHINE, **kw: object) -> VM:
    v = start_vm(d, machine, "tcg", **kw)  # type: ignore[arg-type]
    vms.append(v)
    return v


def plant_marked(vm: VM) -> None:
    """Listed pages 0xa5, a marker page that must survive 0x5a."""
    vm.plant(SLOTS)
    vm.write(0x300000, b"\x5a" * P)


def assert_wiped(vm: VM, generation: int = 1) -> None:
    for g, n in SPANS:
        assert vm.pmemsave(g, n).count(0) == n
    assert vm.pmemsave(0x300000, P) == b"\x5a" * P
    assert vm.header_host_fields() == (generation, sum(n for _g, n in SLOTS))


def qemu_argv(vm: VM) -> list[str]:
    """The VM's QEMU command line without the test monitor (for clones)."""
    argv = list(vm.argv)
    i = argv.index("-qmp")
    return argv[:i] + argv[i + 2 :]


def test_refuses_running_vm_and_resume_only_when_asked(vms: list[VM], tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path)
    plant_marked(vm)
    vm.session().cmd("cont")
    r = run_cli("wipe", "--qmp", vm.qmp)
    assert r.returncode == 4 and "running" in r.stderr
    vm.session().cmd("stop")
    plant_marked(vm)  # firmware ran meanwhile; plant again while paused
    r = run_cli("wipe", "--paused", "--qmp", vm.qmp, "--json")
    assert r.returncode == 0, r.stderr
    assert vm.status() == "paused" and json.loads(r.stdout)["resumed"] is False
    assert_wiped(vm)
    plant_marked(vm)
    r = run_cli("wipe", "--qmp", vm.qmp, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["resumed"] is True
    assert vm.status() == "running"


def test_nothing_registered_resumes(vms: list[VM], tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path)
    r = run_cli("wipe", "--qmp", vm.qmp, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["wipe"]["status"] == "nothing-registered" and rep["resumed"]
    assert vm.status() == "running"


def test_reset_guard(vms: list[VM], tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path, guard=False)
    plant_marked(vm)
    r = run_cli("wipe", "--qmp", vm.qmp)
    assert r.returncode == 5 and "stale table" in r.stderr and r.stderr.count("\n") == 1
    assert vm.status() == "prelaunch"
    r = run_cli("wipe", "--paused", "--qmp", vm.qmp, "--no-reset-guard", "--json")
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and "reset guard" in json.loads(r.stdout)["warnings"][0]
    assert_wiped(vm)


def test_incoming_states(vms: list[VM], tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path, incoming=True)
    r = run_cli("wipe", "--paused", "--qmp", vm.qmp, "--timeout", "0.5")
    assert r.returncode == 4 and "has not started" in r.stderr
    plain = new_vm(vms, tmp_path / "plain")
    r = run_cli("restore", "--qmp", plain.qmp, "--from", str(tmp_path / "plain" / "vm.log"))
    assert r.returncode == 4 and "-incoming defer" in r.stderr
    r = run_cli("restore", "--qmp", vm.qmp, "--from", str(tmp_path / "missing"))
    assert r.returncode == 2 and f"--from {tmp_path}/missing: no such file" in r.stderr


def save(vm: VM, path: Path, *extra: str) -> dict[str, object]:
    r = run_cli("save", "--paused", "--qmp", vm.qmp, "--to", str(path), "--json", *extra)
    assert r.returncode == 0, r.stderr
    rep: dict[str, object] = json.loads(r.stdout)
    return rep


def test_save_then_restore_wipes_before_running(vms: list[VM], tmp_path: Path) -> None:
    src = new_vm(vms, tmp_path / "src")
    plant_marked(src)
    snap = tmp_path / "snap.bin"
    rep = save(src, snap)
    assert rep["state_after"] == "postmigrate" and snap.stat().st_size > 0
    # QEMU refuses a second migration of a postmigrate source: one-line state error
    r = run_cli("save", "--paused", "--qmp", src.qmp, "--to", str(tmp_path / "again.bin"))
    assert r.returncode == 4 and "postmigrate" in r.stderr

    dst = new_vm(vms, tmp_path / "dst", incoming=True)
    r = run_cli("restore", "--qmp", dst.qmp, "--from", str(snap), "--paused", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["wipe"]["pages"] == 22 and not out["resumed"]
    # the source never ran, so the loaded state is prelaunch (a running source gives paused)
    assert out["state_after"] in ("paused", "prelaunch") and out["state_after"] == dst.status()
    major, minor = (int(x) for x in out["qemu_version"].split(".")[:2])
    expect = "file:" if (major, minor) >= (8, 2) else "exec:cat "  # 7.2 rejects file:
    assert out["extra"]["uri"].startswith(expect)
    # QEMU >= 9 saves with mapped-ram, and the restore enables it on the destination
    extra = rep["extra"]
    assert isinstance(extra, dict)
    assert extra["mapped_ram"] is (major >= 9) and out["extra"]["mapped_ram"] is (major >= 9)
    assert {"load", "read", "zero", "verify", "commit"} <= set(out["timings_ms"])
    assert_wiped(dst)

    dst2 = new_vm(vms, tmp_path / "dst2", incoming=True)
    r = run_cli("restore", "--qmp", dst2.qmp, "--from", str(snap), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed"] and dst2.status() == "running"

    # the source can be resumed after a save, if it was running before it
    src2 = new_vm(vms, tmp_path / "src2")
    src2.session().cmd("cont")
    r = run_cli("save", "--qmp", src2.qmp, "--to", str(tmp_path / "snap2.bin"))
    assert r.returncode == 0 and src2.status() == "running"
    # ... and resuming never starts one that was paused before the save
    src3 = new_vm(vms, tmp_path / "src3")
    r = run_cli("save", "--qmp", src3.qmp, "--to", str(tmp_path / "snap3.bin"))
    assert r.returncode == 0 and "not resumed" in r.stdout + r.stderr, r.stdout + r.stderr
    assert src3.status() == "postmigrate"


def test_restore_into_qemu_without_S_never_autostarts(vms: list[VM], tmp_path: Path) -> None:
    """A stream saved from a running VM autostarts a `-incoming defer` QEMU that lacks -S as
    soon as it is loaded; the agent must keep it paused until the wipe is verified."""
    # one RAM block: QEMU 10.0's TCG trips an assertion (tlb_reset_dirty_range_all) when it
    # live-migrates a running VM with a pc-dimm
    machine = ["-M", "pc", "-m", "512M"]
    src = new_vm(vms, tmp_path / "src", machine)
    src.plant(LOW_SLOTS)
    s = src.session()
    s.cmd("cont")  # SeaBIOS runs
    snap = tmp_path / "running.bin"
    # a plain migrate of the running VM, as other tools save: the stream says "running"
    s.cmd("migrate", {"uri": f"exec:cat > {snap}"})
    deadline = time.monotonic() + 60
    while s.cmd("query-migrate").get("status") != "completed":
        assert time.monotonic() < deadline, s.cmd("query-migrate")
        time.sleep(0.05)
    dst = new_vm(vms, tmp_path / "dst", machine, incoming=True, paused=False)
    r = run_cli("restore", "--qmp", dst.qmp, "--from", str(snap), "--paused", "--json")
    assert r.returncode == 0, r.stderr
    assert dst.status() == "paused"
    for g, n in LOW_SLOTS:
        assert dst.pmemsave(g, n * P).count(0) == n * P


def test_wipe_waits_for_incoming_migration(vms: list[VM], tmp_path: Path) -> None:
    src = new_vm(vms, tmp_path / "src")
    plant_marked(src)
    snap = tmp_path / "snap.bin"
    save(src, snap, "--no-mapped-ram")  # a sequential stream: it goes through a pipe below
    dst = new_vm(vms, tmp_path / "dst", incoming=True)
    # a slow reader keeps QEMU inmigrate for a while; the agent must wait, not cont
    dst.session().cmd("migrate-incoming", {"uri": f"exec:sleep 1; cat {snap}"})
    t = time.monotonic()
    r = run_cli("wipe", "--qmp", dst.qmp, "--json")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t > 0.8
    assert json.loads(r.stdout)["wipe"]["pages"] == 22
    assert dst.status() == "running"


def test_invalid_table_in_snapshot_keeps_restored_vm_paused(vms: list[VM], tmp_path: Path) -> None:
    src = new_vm(vms, tmp_path / "src")
    src.plant([], image=build_region(REGION.size, [(0xC0000, 1)]))  # slot in the BIOS area
    snap = tmp_path / "bad.bin"
    save(src, snap)
    dst = new_vm(vms, tmp_path / "dst", incoming=True)
    r = run_cli("restore", "--qmp", dst.qmp, "--from", str(snap))
    assert r.returncode == 6 and "invalid slot 0" in r.stderr
    assert dst.status() in ("paused", "prelaunch")


def test_restore_refuses_unreachable_ram_before_loading(vms: list[VM], tmp_path: Path) -> None:
    """Everything a load cannot change is checked before it starts: a backend that
    cannot reach guest RAM fails the restore with nothing loaded."""
    src = new_vm(vms, tmp_path / "src")
    plant_marked(src)
    snap = tmp_path / "snap.bin"
    save(src, snap)
    dst = new_vm(vms, tmp_path / "dst", incoming=True)  # private RAM: no shared backend
    r = run_cli("restore", "--qmp", dst.qmp, "--from", str(snap), "--backend", "shared")
    assert r.returncode == 7 and "is not shared" in r.stderr, r.stderr
    assert dst.status() == "inmigrate"
    assert dst.session().cmd("query-migrate").get("status", "none") == "none"


def test_clone(vms: list[VM], tmp_path: Path) -> None:
    src = new_vm(vms, tmp_path / "src")
    plant_marked(src)
    snap = tmp_path / "snap.bin"
    save(src, snap)
    d = tmp_path / "clones"
    r = run_cli("clone", str(snap), "-n", "2", "--dir", str(d), "--paused", "--json", "--",
                *qemu_argv(src))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    pids = [c["pid"] for c in res["clones"]]
    try:
        assert len(set(pids)) == 2 and "clone 2/2" in r.stderr
        for c in res["clones"]:
            assert c["report"]["wipe"]["pages"] == 22
            with QMPSession(c["qmp"]) as s:
                assert s.pid == c["pid"] and s.status() in ("paused", "prelaunch")
                for g, n in SPANS:
                    path = d / "check.bin"
                    s.cmd("pmemsave", {"val": g, "size": n, "filename": str(path)})
                    assert path.read_bytes().count(0) == n
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    # human table
    r = run_cli("clone", str(snap), "-n", "1", "--dir", str(d / "t"), "--",
                *qemu_argv(src))
    assert r.returncode == 0, r.stderr
    row = r.stdout.splitlines()[1].split()
    try:
        assert row[2] == "22" and row[3] == "running"
    finally:
        os.kill(int(row[1]), signal.SIGKILL)


def _qemu_pids_using(directory: Path) -> list[int]:
    """PIDs whose command line mentions `directory` (read-only check, kills nothing)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if str(directory).encode() in cmd and b"qemu" in cmd:
                found.append(int(name))
    return found


def test_clone_failure_cleans_up(vms: list[VM], tmp_path: Path) -> None:
    src = new_vm(vms, tmp_path / "src")
    src.plant([], image=build_region(REGION.size, [(0xC0000, 1)]))
    snap = tmp_path / "bad.bin"
    save(src, snap)
    d = tmp_path / "clones"
    r = run_cli("clone", "--paused", str(snap), "-n", "2", "--dir", str(d), "--", *qemu_argv(src))
    assert r.returncode == 6 and "cleanup: killing clone QEMU pid" in r.stderr
    time.sleep(0.2)
    assert _qemu_pids_using(d) == []


def test_loadvm(vms: list[VM], tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    vm = new_vm(vms, tmp_path, extra=["-drive", f"file={disk},if=none,id=d0",
                                      "-device", "virtio-blk-pci,drive=d0"])
    plant_marked(vm)
    assert vm.session().hmp("savevm snap1") == ""
    for g, n in SPANS:  # the live VM moves on; the snapshot still holds the 0xa5 pages
        vm.write(g, b"\x11" * n)
    r = run_cli("loadvm", "--qmp", vm.qmp, "snap1", "--paused", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["wipe"]["pages"] == 22
    assert_wiped(vm)
    r = run_cli("loadvm", "--qmp", vm.qmp, "nope")
    assert r.returncode == 9 and "nope" in r.stderr
    vm.session().cmd("cont")
    r = run_cli("loadvm", "--qmp", vm.qmp, "snap1", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["state_before"] == "running" and rep["resumed"] and vm.status() == "running"


def test_backends_identical(vms: list[VM], tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path, SHARED_MACHINE)
    digests = {}
    for backend in ("process_vm", "shared"):
        vm.plant(SLOTS, image=build_region(REGION.size, SLOTS))
        vm.write(0x300000, b"\x5a" * P)
        rep = wipe_flow(vm.session(), AgentOptions(backend=backend), do_resume=False)
        assert rep.wipe is not None and rep.wipe.backend == backend
        digests[backend] = vm.ram_digest()
        assert_wiped(vm)
    assert digests["process_vm"] == digests["shared"]
    # the shared backend also plants (its own write path) identically
    vm.plant(SLOTS, backend="shared")
    t = vm.target("shared")
    try:
        assert t.backend.read(SLOTS[2][0], 4) == b"\xa5" * 4
    finally:
        t.close()


def test_shared_backend_refused_on_private_ram(vms: list[VM], tmp_path: Path) -> None:
    vm = new_vm(vms, tmp_path)
    with pytest.raises(MemoryAccessError, match="'hi' is not shared"):
        s = vm.session()
        open_target(s, s.pid, AgentOptions(backend="shared", region=REGION), guard=False)
    assert vm.target().backend.name == "process_vm"


@pytest.fixture
def big_vm(vms: list[VM], tmp_path: Path) -> VM:
    """5 GiB pc: pc.ram continues above 4 GiB (sparse: only touched pages cost memory)."""
    return new_vm(vms, tmp_path, BIG_MACHINE)


#: A full table (65,280 slots) of single pages in never-touched RAM, below and above
#: 4 GiB: QEMU allocates each page on first write, so the wipe takes long enough
#: (about a second here) to be interrupted, yet costs only 255 MiB.
BIG_SLOTS = [
    *((0x40000000 + 2 * i * P, 1) for i in range(32640)),
    *((HIGH + 2 * i * P, 1) for i in range(32639)),
    (HIGH + 2 * G - P, 1),
]


def _start_big_wipe(vm: VM) -> subprocess.Popen[str]:
    vm.plant([(HIGH + 2 * G - P, 1)], image=build_region(REGION.size, BIG_SLOTS))
    p = subprocess.Popen(
        [sys.executable, "-m", "vmwipe.host_agent.cli", "-v", "wipe", "--qmp", vm.qmp],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert p.stderr is not None
    for line in p.stderr:
        if "zeroing" in line:
            break
    time.sleep(0.05)
    assert p.poll() is None, "the wipe finished before the signal; make it larger"
    return p


@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["KILL", "TERM", "INT"]
)
def test_signal_mid_wipe_leaves_vm_paused(big_vm: VM, sig: signal.Signals) -> None:
    p = _start_big_wipe(big_vm)
    p.send_signal(sig)
    _out, err = p.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
    else:
        assert p.returncode == 130 and "interrupted" in err
    assert big_vm.status() == "prelaunch"
    assert big_vm.header_host_fields() == (0, 0)  # never committed
    assert big_vm.pmemsave(HIGH + 2 * G - P, P) == b"\xa5" * P  # last span not reached


def test_big_vm_high_ram_wipe(big_vm: VM) -> None:
    """RAM above 4 GiB in pc.ram (block offset 3 GiB): exact pages, neighbours intact."""
    slots = [(0xBFFFF000, 1), (HIGH, 1), (HIGH + G, 3), (HIGH + 2 * G - P, 1)]
    # the map asks gpa2hva once per block; QEMU must agree at both ends of every range
    memmap = big_vm.target().memmap
    assert len(memmap.ranges) >= 3 and len(memmap.blocks()) == 1
    for r in memmap.ranges:
        assert r.hva is not None
        for gpa in (r.gpa, r.end - P):
            answer = big_vm.session().hmp(f"gpa2hva {gpa:#x}")
            assert parse_gpa2hva(answer) == r.hva + (gpa - r.gpa), r
    for g in (0xBFFFE000, HIGH + P, HIGH + G - P, HIGH + G + 3 * P, HIGH + 2 * G - 2 * P):
        big_vm.write(g, b"\x5a" * P)
    big_vm.plant(slots)
    rep = wipe_flow(big_vm.session(), AgentOptions(), do_resume=False)
    assert rep.wipe is not None and rep.wipe.pages == 6
    for g, n in slots:
        assert big_vm.pmemsave(g, n * P).count(0) == n * P
    for g in (0xBFFFE000, HIGH + P, HIGH + G - P, HIGH + G + 3 * P, HIGH + 2 * G - 2 * P):
        assert big_vm.pmemsave(g, P) == b"\x5a" * P


def test_restore_with_prefetched_shared_mapping(vms: list[VM], tmp_path: Path) -> None:
    """--populate maps shared RAM while QEMU loads; the wipe then goes through it."""
    src = new_vm(vms, tmp_path / "src", SHARED_MACHINE)
    plant_marked(src)
    snap = tmp_path / "snap.bin"
    save(src, snap)
    dst = new_vm(vms, tmp_path / "dst", SHARED_MACHINE, incoming=True)
    r = run_cli("-v", "restore", "--qmp", dst.qmp, "--from", str(snap), "--populate",
                "--paused", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["wipe"]["backend"] == "shared" and rep["wipe"]["pages"] == 22
    assert "prefetch unavailable" not in r.stderr and "layout changed" not in r.stderr
    assert_wiped(dst)
    # private RAM: the prefetch fails quietly and auto falls back to process_vm
    src2 = new_vm(vms, tmp_path / "src2")
    plant_marked(src2)
    save(src2, tmp_path / "snap2.bin")
    dst2 = new_vm(vms, tmp_path / "dst2", incoming=True)
    r = run_cli("-v", "restore", "--qmp", dst2.qmp, "--from", str(tmp_path / "snap2.bin"),
                "--populate", "--paused", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["wipe"]["backend"] == "process_vm"
    assert "prefetch unavailable" in r.stderr
    assert_wiped(dst2)


def test_libvirt_wipe_refuses_metadata_ssdt_mismatch(vms: list[VM], tmp_path: Path) -> None:
    """The hook's wipe core must not pick one of two disagreeing regions: the wrong one
    reads as "nothing registered" and would let an unwiped guest run."""
    from vmwipe.host_agent.errors import RegionError
    from vmwipe.host_agent.libvirt.flows import wipe_paused
    from vmwipe.protocol import Region

    vm = new_vm(vms, tmp_path)
    plant_marked(vm)
    with pytest.raises(RegionError, match="refusing to guess"):
        wipe_paused(vm.session(), vm.pid, AgentOptions(), Region(0x2000_0000, 1 << 20))
    for g, n in SPANS:
        assert vm.pmemsave(g, n) == b"\xa5" * n
    assert vm.status() == "prelaunch"


def _process_with_pid(pid: int) -> subprocess.Popen[bytes] | None:
    """A `sleep` that got `pid` (root: ns_last_pid names the PID handed out next), or None."""
    last = Path("/proc/sys/kernel/ns_last_pid")
    for _ in range(50):
        try:
            last.write_text(str(pid - 1))
        except OSError:
            return None
        child = subprocess.Popen(["sleep", "60"])
        if child.pid == pid:
            return child
        child.kill()
        child.wait()
    return None


def test_writes_stop_when_qemu_exits_and_its_pid_is_reused(vms: list[VM], tmp_path: Path) -> None:
    """The agent holds QEMU by a pidfd: once QEMU has exited and its PID names another
    process, nothing is written through that PID."""
    vm = new_vm(vms, tmp_path)
    target = vm.target("process_vm")
    pid = vm.pid
    vm.kill()  # SIGKILLed and reaped: the PID is free
    other = _process_with_pid(pid)
    if other is None:
        pytest.skip(f"could not hand PID {pid} to a new process here")
    try:
        with pytest.raises(MemoryAccessError, match="exited"):
            target.backend.zero([(0x200000, P)])
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
        target.close()


def test_qmp_batch_answers_in_order_with_errors_in_place(vms: list[VM], tmp_path: Path) -> None:
    """`QMPSession.batch`: one round trip, answers in the order asked, a refused command's
    error in its place while the commands after it still ran."""
    vm = new_vm(vms, tmp_path)
    s = vm.session()
    status, bad, name, again = s.batch([
        ("query-status", None),
        ("qom-get", {"path": "/machine", "property": "no-such-property"}),
        ("query-name", None),
        ("query-status", None),
    ])
    assert status["status"] == again["status"] == "prelaunch"
    assert isinstance(bad, QMPCommandError) and bad.command == "qom-get"
    assert name == {}
    assert s.batch([]) == []


def test_parallel_clone_failure_kills_every_clone(vms: list[VM], tmp_path: Path) -> None:
    """`-j 2`: while clones 0 and 1 are being restored in two threads, clone 2's QEMU
    cannot start (its log directory is missing); every clone is killed, none is left
    running or paused, and the error says which clone failed."""
    src = new_vm(vms, tmp_path / "src")
    plant_marked(src)
    snap = tmp_path / "vm.state"
    save(src, snap)
    d = tmp_path / "clones"
    for i in (0, 1):
        (tmp_path / f"serial{i}").mkdir()
    argv = [*qemu_argv(src), "-serial", f"file:{tmp_path}/serial{{i}}/out"]
    r = run_cli("clone", str(snap), "-n", "3", "-j", "2", "--dir", str(d), "--",
                *argv)
    assert r.returncode == 10, r.stderr
    assert re.search(r"clone 3/3 \(pid \d+\) failed: QEMU exited", r.stderr), r.stderr
    assert len(re.findall(r"cleanup: killing clone QEMU pid", r.stderr)) == 3
    time.sleep(0.2)
    assert _qemu_pids_using(d) == []


def test_fleet_kills_at_the_first_failure_without_waiting_for_earlier_clones(
        tmp_path: Path) -> None:
    """Clone 1 fails while clone 0 is still being prepared: every QEMU is killed at once,
    so clone 0's preparation sees its QEMU die instead of the fleet waiting for it."""
    started = threading.Event()
    seen: dict[str, bool] = {}

    def prepare(i: int, session: QMPSession) -> FlowReport:
        if i == 1:
            assert started.wait(30)
            raise MigrationError("clone 1 failed")
        started.set()
        deadline = time.monotonic() + 30  # old behaviour: nobody kills it; give up then
        while time.monotonic() < deadline:
            try:
                session.status()
            except QMPFailure:
                seen["killed while loading"] = True
                break
            time.sleep(0.05)
        raise MigrationError("clone 0 gave up")

    argv = [QEMU, "-nodefaults", "-display", "none", "-M", "pc", "-m", "64M"]
    result = CloneSet(str(tmp_path))
    with pytest.raises(MigrationError, match="clone 1 failed"):
        run_fleet(result, argv, 2, prepare, lambda _m: None, 10.0, jobs=2)
    assert seen.get("killed while loading"), "the fleet waited for clone 0 before killing"


def test_restore_and_clone_refuse_a_region_other_than_the_sidecars(vms: list[VM],
                                                                  tmp_path: Path) -> None:
    """A save's sidecar records the region of the VM that was saved.  A QEMU whose SSDT
    names another one (e.g. `qemu-args` run again) would read zeros there, "nothing
    registered", and resume an unwiped guest: restore and clone refuse it before loading."""
    src = new_vm(vms, tmp_path / "src")
    plant_marked(src)
    snap = tmp_path / "snap.bin"
    save(src, snap)
    moved = Region(REGION.base - (16 << 20), REGION.size)
    dst = new_vm(vms, tmp_path / "dst", incoming=True, region=moved)
    r = run_cli("restore", "--qmp", dst.qmp, "--from", str(snap), "--no-resume")
    assert r.returncode == 5 and "sidecar" in r.stderr, r.stderr
    assert dst.status() == "inmigrate"  # refused before the load
    r = run_cli("restore", "--qmp", dst.qmp, "--from", str(snap), "--region",
                f"{REGION.base:#x}:1M", "--no-reset-guard", "--no-resume")
    assert r.returncode == 0, r.stderr  # the sidecar's region, given by hand, is accepted
    r = run_cli("clone", str(snap), "-n", "2", "--dir", str(tmp_path / "clones"), "--",
                *qemu_argv(dst))
    assert r.returncode == 5 and "sidecar" in r.stderr, r.stderr
    assert len(re.findall(r"cleanup: killing clone QEMU pid", r.stderr)) == 2
