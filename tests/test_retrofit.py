"""VMWIPE_IOC_REGISTER and libvmwipe-preload.so in a real guest kernel (no mocks).

Existing private anonymous pages of a process are registered with
/dev/vmwipe; the host reads the region with QMP `pmemsave` and decodes it
with `vmwipe.protocol`, as the host agent does, and after every change
(register, munmap, mremap, MADV_DONTNEED, fork, exit, unregister) the table
must hold exactly the pages that are still registered: the PFNs that
/proc/self/pagemap reports in the guest.

Retiring a page is asynchronous (the MMU notifier queues a work item that
looks once the page tables have changed), so the host polls the table for
a moment instead of expecting the change at once.

The shim tests run an unchanged dynamically linked program under
LD_PRELOAD=libvmwipe-preload.so; the proof with a real library runs
Debian's android-libboringssl (if installed) under `vmwipe clone`.

One guest boots with the production layout (plus `-cpu qemu64,+rdrand` and a
second serial port, as in the end-to-end scenario) and serves every test in
file order; clones are separate QEMUs. The last test unloads the module to
show the shim stays silent. VMWIPE_TEST_KERNEL picks the kernel (default:
the newest installed).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.lab import (
    Guest,
    GuestConfig,
    GuestImage,
    build_dynamic,
    build_initramfs,
    build_module,
    build_programs,
)
from vmwipe.lab.build import BORINGSSL, boringssl_files, default_kernel
from vmwipe.lab.e2e import Analysis, Output, SerialTap, analyse, clone_argv, parse_lines, run_cli
from vmwipe.lab.shell import missing_prerequisite, rc, sh, start, stop, wait_output
from vmwipe.protocol import Table

pytestmark = pytest.mark.slow

FILL = b"\x5a" * 4096  # what retrofit_test writes into its pages
SHIM = "LD_PRELOAD=/lib/libvmwipe-preload.so"
OWN = 1  # the module's witness slot (a 32-byte fill range), there with crng_refresh=0 too


def sysfs(g: Guest, name: str) -> int:
    return int(sh(g, f"cat /sys/class/misc/vmwipe/{name}"))


# As in the end-to-end scenario: real x86 CPUs have RDRAND, TCG's default model
# lacks it, and without it the kernel CRNG a reseed draws from is itself
# duplicated in every clone until vmgenid is handled.
CPU = "qemu64,+rdrand"


@pytest.fixture(scope="module")
def image() -> GuestImage:
    reason = missing_prerequisite(("ldd",))
    if reason:
        pytest.skip(reason)
    kernel = default_kernel()
    assert kernel is not None
    module = build_module(kernel)
    # The default image plus BoringSSL's libcrypto when the host has it.
    return GuestImage(kernel, module, build_initramfs(
        module, build_programs(), {**build_dynamic(), **boringssl_files()}))


@pytest.fixture(scope="module")
def movable_guest(image: GuestImage) -> Iterator[Guest]:
    """A guest whose anonymous pages come from ZONE_MOVABLE (movablecore=)."""
    with Guest(GuestConfig(image, cmdline=("movablecore=320M",))) as g:
        assert g.console is not None
        g.console.check("insmod /vmwipe.ko crng_refresh=0")  # counts below: user slots + OWN
        yield g


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("retrofit")


def config(image: GuestImage, port: Path, incoming: Path | None = None) -> GuestConfig:
    """The lab guest with RDRAND and a second serial port (ttyS1) on a socket."""
    return GuestConfig(image, incoming=incoming, extra_args=(
        "-cpu", CPU, "-chardev", f"socket,id=drbg,path={port},server=on,wait=off",
        "-serial", "chardev:drbg"))


@pytest.fixture(scope="module")
def guest(image: GuestImage, workdir: Path) -> Iterator[Guest]:
    with Guest(config(image, workdir / "drbg.sock")) as g:
        assert g.console is not None
        g.console.check("insmod /vmwipe.ko crng_refresh=0")  # counts below: user slots + OWN
        yield g


@pytest.fixture(scope="module")
def tap(guest: Guest, workdir: Path) -> Iterator[SerialTap]:
    """The guest's ttyS1, each line timestamped on arrival."""
    t = SerialTap(str(workdir / "drbg.sock"))
    sh(guest, "stty -F /dev/ttyS1 raw -echo")
    yield t
    t.close()


def table(g: Guest) -> Table:
    t = g.table()
    assert t.header is not None, "magic missing"
    return t


def wait_table(g: Guest, want: set[int], timeout: float = 15) -> Table:
    """Poll until the table lists exactly the pages with these PFNs, one page per slot."""
    deadline = time.monotonic() + timeout
    while True:
        t = table(g)
        got = {gpa >> 12 for gpa in t.gpas}
        if got == want and len(t.gpas) == len(want) and all(n == 1 for n in t.npages):
            return t
        if time.monotonic() > deadline:
            raise AssertionError(f"table lists {sorted(map(hex, got))}, "
                                 f"want {sorted(map(hex, want))}")
        time.sleep(0.2)


class Probe:
    """A `retrofit_test serve` process in the guest, driven through a FIFO."""

    def __init__(self, g: Guest, name: str = "probe") -> None:
        self.g, self.name, self.seq = g, name, 0
        sh(g, f"rm -f /tmp/{name}.fifo; mkfifo /tmp/{name}.fifo")
        start(g, name, f"retrofit_test serve /tmp/{name}.fifo")
        wait_output(g, name, r"^SERVE READY$")

    def __call__(self, line: str) -> str:
        """Run one command, return its answer (the lines before its END)."""
        self.seq += 1
        sh(self.g, f"echo '{line}' > /tmp/{self.name}.fifo")
        out = wait_output(self.g, self.name, rf"^END {self.seq}$")
        before = out.split(f"END {self.seq - 1}\n", 1)[-1] if self.seq > 1 else out
        return before.split(f"END {self.seq}\n", 1)[0]

    def ok(self, line: str) -> str:
        out = self(line)
        assert "RC 0" in out, f"{line}: {out}"
        return out

    def pfns(self) -> list[int]:
        return [int(m, 16) for m in re.findall(r"^PFN \d+ (0x[0-9a-f]+)$", self("pfns"), re.M)]

    def zeros(self) -> list[bool]:
        return [m == "1" for m in re.findall(r"^ZERO \d+ ([01])$", self("zeros"), re.M)]

    def exit(self) -> None:
        self.seq += 1
        sh(self.g, f"echo exit > /tmp/{self.name}.fifo; wait $(cat /tmp/{self.name}.pid); true")


@pytest.fixture
def probe(guest: Guest) -> Iterator[Probe]:
    p = Probe(guest)
    yield p
    stop(guest, "probe", "KILL")
    wait_table(guest, set())  # nothing outlives the process
    assert sysfs(guest, "used") == OWN


def test_register_lists_pagemap_pfns_and_host_wipe_zeroes_them(guest: Guest, probe: Probe) -> None:
    g = guest
    probe("map 6")
    probe.ok("reg 1 4")
    frames = probe.pfns()
    assert len(frames) == 6 and all(frames)
    wait_table(g, set(frames[1:5]))
    assert sysfs(g, "used") == OWN + 4
    for f in frames[1:5]:  # the listed pages are the program's own
        assert g.read_phys(f << 12, 4096) == FILL

    gen = sysfs(g, "generation")
    assert g.wipe() == gen + 1  # what a restore's wipe does, done live here
    assert probe.zeros() == [False, True, True, True, True, False]
    assert probe.pfns() == frames  # same pages, still registered
    wait_table(g, set(frames[1:5]))


def test_dontneed_munmap_and_exit_unlist(guest: Guest, probe: Probe) -> None:
    g = guest
    probe("map 4")
    probe.ok("reg 0 4")
    frames = probe.pfns()
    wait_table(g, set(frames))

    probe.ok("dontneed 1 1")
    assert probe.pfns()[1] == 0
    wait_table(g, {frames[0], frames[2], frames[3]})
    assert g.read_phys(frames[1] << 12, 4096) != FILL  # zeroed before it was freed

    probe.ok("munmap 2 1")
    wait_table(g, {frames[0], frames[3]})
    assert g.read_phys(frames[2] << 12, 4096) != FILL

    probe("fill 1 1")  # a page faulted in later at a registered address is not listed
    assert probe.pfns()[1] != 0  # (it may even be the freed frame, reused)
    wait_table(g, {frames[0], frames[3]})
    assert sysfs(g, "used") == OWN + 2

    probe.exit()
    wait_table(g, set())
    assert sysfs(g, "used") == OWN
    for f in (frames[0], frames[3]):
        assert g.read_phys(f << 12, 4096) != FILL


def test_kill_unlists(guest: Guest, probe: Probe) -> None:
    probe("map 3")
    probe.ok("reg 0 3")
    wait_table(guest, set(probe.pfns()))
    # the fixture kills it with SIGKILL and waits for an empty table


def test_mremap_unlists_moved_pages_and_keeps_their_data(guest: Guest, probe: Probe) -> None:
    g = guest
    probe("map 3")
    probe.ok("reg 0 3")
    frames = probe.pfns()
    wait_table(g, set(frames))
    probe.ok("mremap")
    assert probe.pfns() == frames  # the same pages, now at another address...
    wait_table(g, set())  # ...no longer registered...
    assert probe.zeros() == [False] * 3  # ...and not zeroed: they are still in use
    probe.ok("reg 0 3")  # registering the new address lists them again
    wait_table(g, set(frames))


def test_thp_pages_retired_one_by_one(guest: Guest, probe: Probe) -> None:
    """Pages of a transparent huge page: only the 4 KiB pages that left are unlisted.

    MADV_DONTNEED of one page leaves the rest of the huge page mapped: the
    retired page must still be zeroed (its own mapcount, not the folio's).
    """
    g = guest
    # Off by default below 512 MiB of RAM; MADV_HUGEPAGE is enough with "madvise".
    sh(g, "cd /sys/kernel/mm/transparent_hugepage && echo madvise > enabled && "
          "echo madvise > defrag")
    probe("maphuge 512")
    assert re.search(r"^THP (\d+)$", probe("thp"), re.M).group(1) == "2048"  # type: ignore[union-attr]
    probe.ok("reg 0 512")
    frames = probe.pfns()
    assert frames == list(range(frames[0], frames[0] + 512)) and frames[0] % 512 == 0
    wait_table(g, set(frames))
    probe.ok("dontneed 100 1")
    wait_table(g, set(frames) - {frames[100]})
    assert g.read_phys(frames[100] << 12, 4096) != FILL  # zeroed, though its THP lives on
    probe.ok("mremap")  # moves the rest, split into 4 KiB mappings, data kept
    moved = probe.pfns()
    assert moved[:100] == frames[:100] and moved[101:] == frames[101:]
    wait_table(g, set())
    zeros = probe.zeros()
    assert zeros[100] and not any(zeros[:100] + zeros[101:])


def test_fork_parent_stays_registered_child_gets_nothing(guest: Guest, probe: Probe) -> None:
    """The child's copies are unlisted; a MADV_WIPEONFORK page is empty there anyway.

    A pinned page is never shared copy-on-write (fork copies it for the
    child at once), so writes on either side leave the parent's pages as
    they were: the parent's table entries stay exact.
    """
    g = guest
    probe("map 2")
    probe.ok("reg 0 2")
    probe.ok("wof 1 1")
    frames = probe.pfns()
    wait_table(g, set(frames))

    out = probe.ok("fork")
    child = re.findall(r"^CHILD PFN (\d) (0x[0-9a-f]+) zero=([01])$", out, re.M)
    assert [(i, z) for i, _, z in child] == [("0", "0"), ("1", "1")], out
    wrote = [int(m, 16) for m in re.findall(r"^CHILD WROTE \d (0x[0-9a-f]+)$", out, re.M)]
    assert len(wrote) == 2 and not set(wrote) & set(frames)
    wait_table(g, set(frames))

    probe("fill 0 2")  # the parent writes after the fork: no COW, same pages
    assert probe.pfns() == frames
    probe.ok("unfork")
    wait_table(g, set(frames))
    assert sysfs(g, "used") == OWN + 2


def test_unregister_keeps_data_and_releases(guest: Guest, probe: Probe) -> None:
    g = guest
    probe("map 2")
    probe.ok("reg 0 2")
    frames = probe.pfns()
    wait_table(g, set(frames))
    assert rc(g, "rmmod vmwipe") != 0  # a registration holds the module
    probe.ok("unreg 0 2")
    wait_table(g, set())
    assert sysfs(g, "used") == OWN
    assert probe.zeros() == [False, False]
    assert probe.pfns() == frames
    probe.ok("reg 0 2")
    wait_table(g, set(frames))


def test_refused_ranges(guest: Guest) -> None:
    # unaligned, empty, wrapping, holes, MAP_SHARED, files, read-only,
    # /dev/vmwipe's own pages, overlaps, unknown ranges and ioctls
    assert "ERRORS OK" in sh(guest, "retrofit_test errors")
    wait_table(guest, set())


def test_enospc_lists_nothing(guest: Guest) -> None:
    out = sh(guest, "retrofit_test enospc", timeout=300)
    assert "ENOSPC OK" in out, out
    wait_table(guest, set())


def test_memlock_charged_with_mmap(guest: Guest) -> None:
    out = sh(guest, "retrofit_test memlock")
    assert "MEMLOCK OK" in out, out
    wait_table(guest, set())


def _pins_and_kernel_kib(g: Guest) -> tuple[int, int]:
    """Pinned pages system wide, and unreclaimable slab + vmalloc in KiB (exact after
    stat_refresh): what the module allocates per registration. MemFree is too noisy."""
    out = sh(g, "echo 1 > /proc/sys/vm/stat_refresh; "
                "grep nr_foll_pin /proc/vmstat; grep -E 'SUnreclaim|VmallocUsed' /proc/meminfo")
    values = dict(line.split()[:2] for line in out.splitlines())
    pins = int(values["nr_foll_pin_acquired"]) - int(values["nr_foll_pin_released"])
    return pins, int(values["SUnreclaim:"]) + int(values["VmallocUsed:"])


def test_10000_cycles_leak_no_slot_pin_or_charge(guest: Guest) -> None:
    g = guest
    pins, kib = _pins_and_kernel_kib(g)
    t0 = time.monotonic()
    # as nobody with RLIMIT_MEMLOCK of 4 pages: a leaked charge fails the next cycle
    out = sh(g, "retrofit_test cycles 10000", timeout=600)
    print(f"10000 cycles: {time.monotonic() - t0:.1f} s")
    assert "CYCLES 10000" in out and "CYCLES OK" in out, out
    pins2, kib2 = _pins_and_kernel_kib(g)
    assert pins2 == pins, f"pins {pins} -> {pins2}"
    # A registration allocates >= 200 bytes: 10000 leaked ones would be 2 MB.
    assert kib2 - kib < 512, f"unreclaimable slab + vmalloc {kib} -> {kib2} kB"
    assert sysfs(g, "used") == OWN
    wait_table(g, set())


def test_race_table_stays_valid_and_nothing_leaks(guest: Guest) -> None:
    """Threads register, unregister, map, unmap, DONTNEED, mprotect, mremap, fork at random.

    While it runs, every table the host reads must decode (no page listed
    twice, no slot outside RAM); afterwards nothing may be left: no slot,
    no pin, no warning in the kernel log.
    """
    g = guest
    pins, _ = _pins_and_kernel_kib(g)
    start(g, "race", "retrofit_test race 20")
    reads = 0
    deadline = time.monotonic() + 120
    while "RACE" not in sh(g, "cat /tmp/race.out"):
        table(g)  # strict decode: raises on a duplicated or overlapping slot
        reads += 1
        assert rc(g, "kill -0 $(cat /tmp/race.pid)") == 0 or "RACE" in sh(
            g, "cat /tmp/race.out"), "retrofit_test race died: " + sh(g, "dmesg | tail -5")
        assert time.monotonic() < deadline, "race did not finish"
    out = wait_output(g, "race", r"^RACE (OK|FAIL)$")
    print(f"race: {out.splitlines()[0]}, {reads} table reads")
    assert "RACE OK" in out, out
    sh(g, "wait $(cat /tmp/race.pid)")
    wait_table(g, set())
    assert sysfs(g, "used") == OWN
    assert _pins_and_kernel_kib(g)[0] == pins
    log = sh(g, "dmesg")
    assert not re.search(r"WARNING|BUG|Oops|Call Trace", log), log[-3000:]


def test_shim_sentinel_registered_and_zero_in_a_clone(
        guest: Guest, image: GuestImage, tmp_path: Path) -> None:
    """An unchanged program's MADV_WIPEONFORK sentinel is zero when a clone first runs."""
    g = guest
    start(g, "wof", f"{SHIM} wof_probe sentinel")
    out = wait_output(g, "wof", r"^SENTINEL READY$")
    assert "FORK zero=1" in out  # the kernel's own MADV_WIPEONFORK still works
    (frame,) = [int(m, 16) for m in re.findall(r"^PFN (0x[0-9a-f]+)$", out, re.M)]
    wait_table(g, {frame})
    one = (1).to_bytes(8, "little")
    assert g.read_phys(frame << 12, 8) == one
    state = tmp_path / "state"
    g.save(state)
    with Guest(config(image, tmp_path / "drbg.sock", state)) as clone:  # paused, as restored
        assert clone.read_phys(frame << 12, 8) == one
        clone.wipe()  # what `vmwipe clone` does before the first guest instruction
        assert clone.read_phys(frame << 12, 4096) == bytes(4096)
        clone.qmp("cont")
        wait_output(clone, "wof", r"^SENTINEL ZERO$")  # what BoringSSL reads as "reseed"
    g.qmp("cont")  # the original runs on with its sentinel intact
    time.sleep(0.3)
    assert "SENTINEL ZERO" not in sh(g, "cat /tmp/wof.out")
    assert g.read_phys(frame << 12, 8) == one
    stop(g, "wof")
    wait_table(g, set())


def test_without_shim_sentinel_is_not_registered(guest: Guest) -> None:
    g = guest
    start(g, "wof", "wof_probe sentinel")
    out = wait_output(g, "wof", r"^SENTINEL READY$")
    assert "FORK zero=1" in out
    time.sleep(0.5)
    assert table(g).used == OWN
    stop(g, "wof")


def test_shim_keeponfork_unregisters(guest: Guest) -> None:
    out = sh(guest, f"{SHIM} wof_probe keep")
    own, two = str(OWN), str(OWN + 2)
    assert out.split() == ["USED", own, "USED", two, "USED", own], out


def test_shim_leaves_madvise_results_and_errno_alone(guest: Guest) -> None:
    out = sh(guest, f"{SHIM} wof_probe advice 2>&1", timeout=120)
    assert re.search(r"^ADVICE \d+ calls OK$", out, re.M), out
    wait_table(guest, set())  # the WIPEONFORK ranges went with their munmap


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _clone_round(g: Guest, tap: SerialTap, workdir: Path, shim: bool, n: int,
                 k: int) -> tuple[Analysis, list[list[Output]], list[int]]:
    """Run bssl_stream (under the shim or not), save, `vmwipe clone` N copies, collect K each.

    Returns the per-epoch analysis of the clones' first K outputs after
    resume, those outputs, and the pages each clone's wipe zeroed.
    """
    tag = "shim" if shim else "plain"
    first = len(tap.snapshot()[0])
    sh(g, f"{SHIM if shim else ''} bssl_stream -i 1 > /dev/ttyS1 2>/tmp/bssl.err & "
          "echo $! > /tmp/bssl.pid")
    tap.wait_outputs(200, 60, after=first)
    state = workdir / f"{tag}.state"
    g.save(state)  # stopped: the clones and the original share everything up to here
    time.sleep(0.3)  # what QEMU wrote before the stop reaches the tap
    lines, partial = tap.snapshot()
    pre_epochs = {o.epoch for o in parse_lines(lines[first:]).outputs}
    d = workdir / tag
    d.mkdir()
    argv = clone_argv(g.qemu_args(), d, "auto")
    r = run_cli("clone", str(state), "-n", str(n), "--dir", str(d), "--paused", "--json", "--",
                *argv)
    clones = json.loads(r.stdout)["clones"] if r.returncode == 0 else []
    pids = [int(c["pid"]) for c in clones]
    outs: list[list[Output]] = []
    try:
        assert r.returncode == 0, r.stderr
        taps = [SerialTap(f"{d}/drbg-{c['index']}.sock", prefix=partial) for c in clones]
        for c in clones:  # each loaded, wiped, verified, paused: now run
            with QMPSession(c["qmp"]) as s:
                s.cmd("cont")
        for t in taps:
            t.wait_outputs(k, 120)
            outs.append(parse_lines(t.snapshot()[0]).outputs[:k])
            t.close()
    finally:
        for pid in pids:  # `vmwipe clone` started them; kill each by its PID
            _kill(pid)
    g.qmp("cont")
    sh(g, "kill $(cat /tmp/bssl.pid); wait $(cat /tmp/bssl.pid); true")
    wiped = [int(c["report"]["wipe"]["pages"]) for c in clones]
    return analyse(pre_epochs, outs), outs, wiped


@pytest.fixture(scope="module")
def boringssl_rounds(guest: Guest, tap: SerialTap, workdir: Path
                     ) -> dict[str, tuple[Analysis, list[list[Output]], list[int]]]:
    """Debian's android-libboringssl, cloned three times each with and without the shim."""
    if not BORINGSSL.is_file():
        pytest.skip(f"{BORINGSSL} missing (apt-get install android-libboringssl); "
                    "wof_probe's reimplementation of the sentinel is tested above")
    return {name: _clone_round(guest, tap, workdir, shim=name == "shim", n=3, k=300)
            for name in ("shim", "plain")}


def test_boringssl_notices_the_clone_only_with_the_shim(
        boringssl_rounds: dict[str, tuple[Analysis, list[list[Output]], list[int]]]) -> None:
    """A real library through its own API: BoringSSL's RAND_bytes() under the shim.

    bssl_stream prints `GENERATION COUNTER VALUE` per RAND_bytes() call,
    GENERATION being BoringSSL's own fork-detection epoch. Each run is cloned
    three times with `vmwipe clone` and the end-to-end per-epoch measure is
    applied to each clone's first 300 outputs after resume.

    Not claimed: that the reseeded values differ between clones. BoringSSL reseeds
    from getrandom(), and the guest kernel's CRNG is part of the snapshot until the
    kernel handles vmgenid, which can come after the first post-resume reseed (see
    SECURITY.md). The count is printed for the record.
    """
    a, outs, wiped = boringssl_rounds["shim"]
    print(f"shim: pages wiped {wiped}, new epochs {[c.new_epochs for c in a.clones]}, "
          f"old-epoch outputs {[c.old_epoch_outputs for c in a.clones]}, "
          f"{a.shared_new_values} post-resume values shared")
    assert all(len(o) == 300 for o in outs)
    assert all(w >= 1 for w in wiped)  # the sentinel, registered by the shim
    assert a.max_old_epoch_outputs <= 1  # at most the one in flight at the snapshot
    for c, o in zip(a.clones, outs, strict=True):  # its first look found the sentinel zero
        assert c.new_epochs and c.first_new_index is not None
        assert o[c.first_new_index].counter == 0

    a, outs, wiped = boringssl_rounds["plain"]
    print(f"plain: {a.shared_values} values emitted by 2+ clones "
          f"({a.duplicate_outputs} duplicate outputs)")
    assert all(len(o) == 300 for o in outs)
    assert all(not c.new_epochs for c in a.clones)  # BoringSSL never noticed
    assert a.shared_values > 0  # the clones repeat each other's random bytes


def test_shim_silent_without_device(guest: Guest) -> None:
    g = guest
    sh(g, "rmmod vmwipe")
    try:
        assert rc(g, "test -e /dev/vmwipe") != 0
        out = sh(g, f"{SHIM} wof_probe advice 2>&1", timeout=120)
        assert re.fullmatch(r"ADVICE \d+ calls OK\n", out), out
        start(g, "wof", f"{SHIM} wof_probe sentinel")
        wait_output(g, "wof", r"^SENTINEL READY$")
        stop(g, "wof")
        lines = sh(g, "cat /tmp/wof.out").splitlines()
        assert [line for line in lines if not line.startswith("PFN ")] == \
            ["FORK zero=1", "SENTINEL READY"]
    finally:
        sh(g, "insmod /vmwipe.ko crng_refresh=0")


def test_movable_pages_refused_so_no_copy_is_left(movable_guest: Guest) -> None:
    """A FOLL_LONGTERM pin would migrate a ZONE_MOVABLE page and free the old copy unzeroed,
    leaving the secret in free RAM: the module refuses such pages with EXDEV instead."""
    g = movable_guest
    zones = sh(g, "cat /proc/zoneinfo")
    movable = re.search(r"zone\s+Movable\n(?:.*\n)*?\s+start_pfn:\s+(\d+)", zones)
    assert movable, "no ZONE_MOVABLE in the guest"
    p = Probe(g)
    p("map 4")
    frames = p.pfns()
    assert all(f >= int(movable.group(1)) for f in frames), (frames, movable.group(1))
    assert "RC -18" in p("reg 0 4")  # -EXDEV
    assert table(g).used == OWN and p.pfns() == frames
    ram = b"".join(g.read_phys(start, size) for start, size in g.ram_ranges())
    copies = sum(1 for off in range(0, len(ram), 4096) if ram[off:off + 4096] == FILL)
    assert copies == 4, f"{copies} pages hold the program's 4 pages of data"
    p.exit()
