"""Template clones never share the guest kernel's CRNG, in a real guest (issue 17).

`tests/test_crng_clone.py` shows it for `vmwipe clone` of a saved state; this is
the same claim for `vmwipe template` + `vmwipe clone --template`, where every
clone maps one RAM file, so whatever the file holds, every clone starts from.

One boot for the module: the lab guest (`-cpu qemu64`: no RDRAND, so nothing
but the host makes clones diverge; no vmgenid device, so the kernel does not
reseed itself on resume) with its RAM in a `share=on` file on /dev/shm,
vmwipe.ko with `crng_refresh` active (protocol v2: base_crng key and
generation, input_pool's chaining value and, 6.11+, the vDSO generation as
fill ranges) and `crng_stream` printing getrandom() / random/uuid / vDSO
draws, and a reseed key whenever its vmwipe page reads zero, to a second
serial port.  The guest is stopped and `vmwipe template` turns it into a
template.  Then:

- the template file: at every fill range, neither the bytes the guest had nor
  zeros; the old key and pool chaining value nowhere in the file;
- `vmwipe clone --template -n 3` (paused, then `cont` by the test once each
  clone's serial socket is connected): each clone's fill ranges differ from
  each other's and from the file's before `cont`; after it, no reseed key and
  no draw made after resume is printed by two clones (`vmwipe.lab.crng.analyse`);
- the control, `clone_template_flow(wipe=False)` (the benchmark's "templated,
  no vmwipe" row): every clone's fill ranges are the file's bytes, so they all
  resume with one CRNG state and the v2 test's byte check would fail.  Their
  draws are collected and printed but not asserted (see the control's
  docstring: which ones repeat is a race with the kernel's reseeds).

Every QEMU started here is killed by its PID before the fixture returns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import run_cli

from vmwipe.host_agent.flows.target import AgentOptions
from vmwipe.host_agent.flows.template_clone import clone_template_flow
from vmwipe.host_agent.flows.template_manifest import Manifest
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.lab import GuestConfig, GuestImage
from vmwipe.lab.agent import AgentGuest, shm_ram, without_ram
from vmwipe.lab.crng import CPU, SYSFS, ModeResult, analyse, summary, wait_draws
from vmwipe.lab.e2e import SerialTap, _kill_pid, _prctl, clone_argv, read_gpa
from vmwipe.lab.shell import sh
from vmwipe.protocol import Fill

pytestmark = pytest.mark.slow

CLONES = 3
DRAWS = 100  # per v2 clone, after resume: ~300 values per kind compared
CONTROL_DRAWS = 20  # the control needs only the first iterations (the reseed key)
_PR_SET_CHILD_SUBREAPER = 36


def file_offset(manifest: Manifest, gpa: int) -> int:
    """Where guest-physical `gpa` lives in the template's RAM file (the manifest's layout)."""
    for r in manifest.ram_layout:
        g, s, o = int(r["gpa"]), int(r["size"]), int(r["offset"])
        if g <= gpa < g + s:
            return o + gpa - g
    raise AssertionError(f"{gpa:#x} is not in the template's RAM layout")


def read_file(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


@dataclass
class CloneRun:
    """One mode's clones: their fill-range bytes while paused, and the draws after `cont`."""

    fills: list[list[bytes]] = field(default_factory=list)  # per clone, per fill range
    result: ModeResult | None = None


@dataclass
class TemplateCrng:
    """The template made from the booted guest, and what the guest had before it was made."""

    dir: Path
    ram: Path
    argv: list[str]  # the clones' command line without RAM; {mode}, {i}: their sockets' names
    fills: list[Fill]
    before: list[bytes]  # each fill range's bytes in the paused guest, before `vmwipe template`
    report: dict[str, object]
    sysfs_state: str
    dmesg: str
    partial: str  # the serial line cut by the stop, glued to each clone's first line
    pids: list[int] = field(default_factory=list)
    taps: list[SerialTap] = field(default_factory=list)

    @property
    def manifest(self) -> Manifest:
        return Manifest.load(str(self.dir / "t"))

    def kill_clones(self) -> None:
        for tap in self.taps:
            tap.close()
        self.taps.clear()
        for pid in self.pids:
            _kill_pid(pid)
        self.pids.clear()

    def run(self, mode: str, qmps: Sequence[str], draws: int) -> CloneRun:
        """Read each paused clone's fill ranges, connect its serial port, `cont`, collect."""
        out = CloneRun()
        d = self.dir / mode
        for q in qmps:
            out.fills.append([read_gpa(q, f.gpa, f.length) for f in self.fills])
        taps = []
        for i in range(len(qmps)):
            tap = SerialTap(f"{d}/drbg-{i}.sock", prefix=self.partial, log=d / f"clone-{i}.ttyS1")
            self.taps.append(tap)
            taps.append(tap)
        conts = []
        for q in qmps:
            with QMPSession(q) as s:
                s.cmd("cont")
                conts.append(time.monotonic())
        for tap in taps:
            wait_draws(tap, draws, 180)
        out.result = analyse(mode, False, [t.snapshot()[0] for t in taps], conts)
        print(summary(out.result))
        self.kill_clones()
        return out


@pytest.fixture(scope="module")
def tc(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemplateCrng]:
    """Boot, start the draws, stop, template; the guest's QEMU has quit when this yields."""
    d = tmp_path_factory.mktemp("crngtpl")
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # `vmwipe clone`'s detached QEMUs become ours to reap
    try:
        with shm_ram(512) as (ram, backend):
            extra = (*backend, "-cpu", CPU,
                     "-chardev", f"socket,id=drbg,path={d}/drbg.sock,server=on,wait=off",
                     "-serial", "chardev:drbg")
            g = AgentGuest(GuestConfig(image, cpus=1, extra_args=extra, vmgenid=False,
                                       boot_timeout=300))
            with g:
                # the guest object stays open while clones run: its directory holds the
                # SSDT and loader page the clone command line names
                tap = SerialTap(f"{d}/drbg.sock", log=d / "original.ttyS1")
                try:
                    sh(g, "insmod /vmwipe.ko")
                    state = sh(g, f"cat {SYSFS}/crng_refresh").strip()
                    dmesg = sh(g, "dmesg | grep 'kernel CRNG' || true").strip()
                    sh(g, "stty -F /dev/ttyS1 raw -echo")
                    sh(g, "crng_stream -i 2 > /dev/ttyS1 2>/tmp/crng.err &")
                    wait_draws(tap, 50, 120)
                    g.qmp("stop")
                    time.sleep(0.3)  # what was on the wire when it stopped has arrived
                    _lines, partial = tap.snapshot()
                    fills = list(g.table().fills)
                    before = [g.read_phys(f.gpa, f.length) for f in fills]
                    # the file is the guest's RAM: the key is there to be found before...
                    in_file_before = ram.read_bytes()
                    assert before[0] in in_file_before and before[2] in in_file_before
                    del in_file_before
                    r = run_cli("template", "--qmp", g.agent_qmp, "--dir", str(d / "t"),
                                "--json", timeout=300)
                    assert r.returncode == 0, r.stderr
                    report = json.loads(r.stdout)["report"]
                finally:
                    tap.close()
                argv = without_ram(clone_argv(g.qemu_args(), d / "{mode}", "auto"))
                tc = TemplateCrng(d, ram, argv, fills, before, report, state, dmesg, partial)
                try:
                    yield tc
                finally:
                    tc.kill_clones()  # before the file and the guest's directory go
    finally:
        _prctl(_PR_SET_CHILD_SUBREAPER, 0)


def test_template_file_holds_no_crng_state_of_the_guest(tc: TemplateCrng) -> None:
    assert tc.sysfs_state == "active", tc.sysfs_state
    assert "kernel CRNG registered: base_crng key+generation, input_pool" in tc.dmesg
    assert [f.length for f in tc.fills][:3] == [32, 8, 32]  # key, generation, pool h
    wipe = tc.report["wipe"]
    assert isinstance(wipe, dict) and wipe["status"] == "wiped"
    assert wipe["fill_ranges"] == len(tc.fills)
    m = tc.manifest
    data = tc.ram.read_bytes()
    for f, old in zip(tc.fills, tc.before, strict=True):
        now = read_file(tc.ram, file_offset(m, f.gpa), f.length)
        assert now != old, f"fill range {f.gpa:#x} still holds the guest's bytes"
        assert now != bytes(f.length), f"fill range {f.gpa:#x} is zeros (a known key)"
    key, pool = tc.before[0], tc.before[2]
    assert key != bytes(32) and pool != bytes(32)
    # ...and gone after (the fixture found both in the file before): no other copy either
    assert key not in data and pool not in data


def distinct(rows: list[list[bytes]]) -> bool:
    """True when no fill range holds the same bytes in two of the rows."""
    return all(len({row[j] for row in rows}) == len(rows) for j in range(len(rows[0])))


def test_template_clones_never_share_the_kernel_crng(tc: TemplateCrng) -> None:
    d = tc.dir / "v2"
    argv = [a.replace("{mode}", "v2") for a in tc.argv]
    r = run_cli("clone", "--template", str(tc.dir / "t"), "-n", str(CLONES), "--dir", str(d),
                "--paused", "--json", "--", *argv, timeout=600)
    clones = json.loads(r.stdout)["clones"] if r.returncode == 0 else []
    tc.pids += [int(c["pid"]) for c in clones]
    assert r.returncode == 0, r.stderr[-2000:]
    for c in clones:
        wipe = c["report"]["wipe"]
        assert wipe["status"] == "wiped" and wipe["fill_ranges"] == len(tc.fills)
        assert not c["report"]["resumed"]
    m = tc.manifest
    in_file = [read_file(tc.ram, file_offset(m, f.gpa), f.length) for f in tc.fills]
    run = tc.run("v2", [c["qmp"] for c in clones], DRAWS)
    # before `cont`: every clone's CRNG state is its own, neither the file's nor the guest's
    assert distinct([*run.fills, in_file, tc.before]), "two clones were given one CRNG state"
    res = run.result
    assert res is not None
    assert res.draws.get("K", 0) >= CLONES, "every clone saw its page wiped and reseeded"
    assert res.draws.get("G", 0) >= CLONES * DRAWS * 0.9, summary(res)
    for kind in ("K", "G", "U", "V"):
        assert res.duplicated.get(kind, 0) == 0, (kind, summary(res))
    assert res.ok_v2
    if "_vdso_rng_data" in tc.dmesg:
        assert res.draws.get("V", 0) >= CLONES * DRAWS * 0.9, "vDSO draws were collected"


def test_control_without_the_clone_wipe_clones_share_it(tc: TemplateCrng) -> None:
    """`wipe=False`: the template's fill bytes (random, but one set) reach every clone.

    The control is on the bytes, not on the draws: with no per-clone fill every clone
    resumes holding the one CRNG state of the file (what the v2 test's `distinct` check
    refuses).  Whether they then print equal draws is a race: the module's post-wipe
    reseed (the template's generation bump looks like a wipe to each clone) and the
    kernel's own early-uptime reseeds both mix in the TSC, so the clones diverge within
    ~0.1 s, sometimes before the first draw.  Three runs here: 2, 3 and 3 of 3 clones
    printed the same reseed key; 0, 26 and 3 getrandom() draws repeated.  So the draws
    are only reported (with -s), not asserted.
    """
    d = tc.dir / "nowipe"
    argv = [a.replace("{mode}", "nowipe") for a in tc.argv]
    res = clone_template_flow(str(tc.dir / "t"), CLONES, argv, AgentOptions(), directory=str(d),
                              wipe=False, progress=lambda _m: None)
    tc.pids += [c.pid for c in res.clones]
    assert all(c.report.wipe is None for c in res.clones)
    m = tc.manifest
    in_file = [read_file(tc.ram, file_offset(m, f.gpa), f.length) for f in tc.fills]
    run = tc.run("nowipe", [c.qmp for c in res.clones], CONTROL_DRAWS)
    assert all(row == in_file for row in run.fills), "every clone holds the file's CRNG state"
    assert not distinct([*run.fills])  # the v2 test's check fails here
    out = run.result
    assert out is not None
    # the template's wipe zeroed crng_stream's page in the file: each clone sees it wiped
    assert out.draws.get("K", 0) == CLONES, summary(out)
