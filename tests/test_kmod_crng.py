"""vmwipe.ko's kernel-CRNG fill ranges and user-space fill pages, in a real guest.

The module finds base_crng, input_pool and (6.11+) the vDSO RNG data, checks
them with one forced reseed, and lists them as fill ranges, with a seed buffer of
its own that it mixes into the pool before each post-wipe reseed.  The host proves the
ranges are what they claim: it writes random bytes there (as a wipe does)
and bumps the generation; the module then forces a reseed, which must turn the
generation the host wrote into exactly that value + 1 and replace the key and
the pool's chaining value.  One guest boot serves the whole file.
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Iterator

import pytest
from conftest import run_cli

from vmwipe.lab import Guest, GuestConfig, GuestImage
from vmwipe.lab.shell import sh, start, stop, wait_output
from vmwipe.protocol import KSECRETS_REPORTED, PAGE_SIZE, Table

pytestmark = pytest.mark.slow

SYSFS = "/sys/class/misc/vmwipe"
CRNG_SYMBOLS = ("base_crng", "input_pool", "_vdso_rng_data", "vdso_k_rng_data")
KSECRET_SYMBOLS = ("net_secret", "ts_secret", "syncookie_secret", "syncookie6_secret", "ptr_key")


@pytest.fixture(scope="module")
def cli_qmp(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second QMP socket of the guest, for the `vmwipe` CLI (the lab holds the first)."""
    return str(tmp_path_factory.mktemp("crng") / "cli.qmp")


@pytest.fixture(scope="module")
def guest(image: GuestImage, cli_qmp: str) -> Iterator[Guest]:
    extra = ("-cpu", "qemu64", "-qmp", f"unix:{cli_qmp},server=on,wait=off")
    with Guest(GuestConfig(image, extra_args=extra)) as g:
        assert g.console is not None
        g.console.check("insmod /vmwipe.ko")
        yield g


def vdso(g: Guest) -> bool:
    """vDSO getrandom: _vdso_rng_data (6.11-6.12), vdso_k_rng_data (6.15 on)."""
    return "rng_data" in sh(g, "grep -wE '_vdso_rng_data|vdso_k_rng_data' /proc/kallsyms || true")


def crng_fills(g: Guest) -> Table:
    table = g.table()
    assert table.header is not None and table.header.version == 2
    return table


def test_registered_as_fill_ranges(guest: Guest) -> None:
    g = guest
    assert sh(g, f"cat {SYSFS}/crng_refresh").strip() == "active"
    line = sh(g, "dmesg | grep 'kernel CRNG'")
    assert "kernel CRNG registered: base_crng key+generation, input_pool" in line
    table = crng_fills(g)
    # key, generation, pool h, vDSO generation, the module's seed, then (not the CRNG's)
    # the witness that shows any wipe, S3 included (test_kmod.py), then the kernel's
    # other secrets drawn so far (ksecrets.c: 16 or 32 bytes each)
    want = [32, 8, 32] + ([8] if vdso(g) else []) + [32, 32]
    hdr = table.header
    assert hdr is not None
    lengths = [f.length for f in table.fills]
    # (>=: a key the kernel draws meanwhile is published before ksecrets_ranges counts it)
    assert lengths[: len(want)] == want and len(lengths) >= len(want) + hdr.ksecrets_ranges
    assert set(lengths[len(want) :]) <= {16, 32}
    assert (hdr.crng_status, hdr.crng_ranges, hdr.crng_reason) == (
        1, len(want) - 1, "")  # active, one slot each (none crosses a page)
    key, gen = table.fills[0], table.fills[1]
    assert gen.gpa - key.gpa in (32, 40)  # 6.1 keeps `birth` between them, 6.2+ does not
    assert table.ranges() == []
    for _ in range(len(KSECRET_SYMBOLS) + 1):  # the same race: settles once all are drawn
        if int(sh(g, f"cat {SYSFS}/used")) == len(crng_fills(g).fills):
            break
    else:
        raise AssertionError("sysfs used never matched the table's fill ranges")


def test_host_fill_then_module_reseed_hits_the_real_objects(guest: Guest) -> None:
    """Write the fill ranges as a wipe does; the module's post-wipe reseed must act on
    exactly those bytes: generation = what the host wrote + 1, new key, new pool h."""
    g = guest
    table = crng_fills(g)
    # paused, as a restore's wipe is: the module must not reseed before `written` is read
    # (read after `cont`, a fast reseed would already have replaced the host's bytes)
    g.qmp("stop")
    try:
        g.wipe()
        written = {f.index: g.read_phys(f.gpa, f.length) for f in table.fills}
    finally:
        g.qmp("cont")
    assert table.header is not None
    key, gen, pool = table.fills[0], table.fills[1], table.fills[2]
    seed = table.fills[table.header.crng_ranges - 1]
    host_gen = struct.unpack("<Q", written[gen.index])[0]
    deadline = time.monotonic() + 10
    while struct.unpack("<Q", g.read_phys(gen.gpa, 8))[0] == host_gen:
        assert time.monotonic() < deadline, "the module did not reseed after the wipe"
        time.sleep(0.05)
    after = struct.unpack("<Q", g.read_phys(gen.gpa, 8))[0]
    assert after == (host_gen + 1) % (1 << 64) or after == (host_gen + 2) % (1 << 64)
    assert g.read_phys(key.gpa, 32) != written[key.index]
    assert g.read_phys(pool.gpa, 32) != written[pool.index]
    if vdso(g):  # the vDSO generation follows base_crng's + 1 (read paused: the kernel
        g.qmp("stop")  # reseeds on its own too, every uptime/2 s in its first 2 minutes)
        try:
            now, vgen = (struct.unpack("<Q", g.read_phys(f.gpa, 8))[0]
                         for f in (gen, table.fills[3]))
        finally:
            g.qmp("cont")
        assert vgen == (now + 1) % (1 << 64)
    # the host's seed went into the pool before that reseed, and is gone from the guest
    assert written[seed.index] != bytes(32) and g.read_phys(seed.gpa, 32) == bytes(32)
    # the guest's CRNG still works, and draws differ
    a, b = (sh(g, "cat /proc/sys/kernel/random/uuid").strip() for _ in range(2))
    assert a != b and re.fullmatch(r"[0-9a-f-]{36}", a)


def test_user_fill_pages(guest: Guest) -> None:
    """mmap at VMWIPE_MMAP_FILL: each page is one whole-page fill range; the host's bytes
    are what the program reads, and unmapping unlists them."""
    g = guest
    # page-sized fill ranges only: ksecrets.c may list a key the kernel draws meanwhile
    before = sum(f.length == PAGE_SIZE for f in crng_fills(g).fills)
    start(g, "hf", "vmwipe_test holdfill 2")
    out = wait_output(g, "hf", r"^HOLD READY$")
    frames = [int(m, 16) for m in re.findall(r"^PFN \d+ (0x[0-9a-f]+)$", out, re.MULTILINE)]
    table = crng_fills(g)
    user = [f for f in table.fills if f.length == PAGE_SIZE]
    assert sorted(f.gpa for f in user) == sorted(f << 12 for f in frames)
    assert table.ranges() == []
    g.wipe()
    host = [g.read_phys(f << 12, 16).hex() for f in frames]
    assert all(h != "5a" * 16 and h != "00" * 16 for h in host)
    sh(g, "kill -USR1 $(cat /tmp/hf.pid)")
    out = wait_output(g, "hf", r"^UNMAPPED$")
    assert re.findall(r"^DATA \d+ ([0-9a-f]{32})$", out, re.MULTILINE) == host
    assert sum(f.length == PAGE_SIZE for f in crng_fills(g).fills) == before
    stop(g, "hf")


def test_parameter_turns_it_off(guest: Guest) -> None:
    g = guest
    sh(g, "rmmod vmwipe && insmod /vmwipe.ko crng_refresh=0")
    assert sh(g, f"cat {SYSFS}/crng_refresh").strip() == "unavailable: disabled (crng_refresh=0)"
    fills = crng_fills(g).fills  # the witness alone
    assert [f.length for f in fills] == [32] and sh(g, f"cat {SYSFS}/used").strip() == "1"
    hdr = crng_fills(g).header
    assert hdr is not None and (hdr.crng_status, hdr.crng_ranges, hdr.crng_reason) == (
        2, 0, "crng_refresh=0")  # disabled
    assert (hdr.ksecrets, hdr.ksecrets_ranges) == (KSECRETS_REPORTED, 0)  # none, and said so
    assert sh(g, f"cat {SYSFS}/kernel_secrets").count(
        ": not registered: disabled (crng_refresh=0)\n") == 5
    sh(g, "rmmod vmwipe && insmod /vmwipe.ko")
    assert sh(g, f"cat {SYSFS}/crng_refresh").strip() == "active"


def test_lookup_finds_exactly_what_kallsyms_names(guest: Guest) -> None:
    """The module's only lookup (register_kprobe() on the data symbol's name, which fills
    kp.addr before refusing non-text; sprint_symbol() must then say name+0x0) finds
    exactly the addresses the guest's /proc/kallsyms gives those names (the CRNG's and
    ksecrets.c's), and nothing else.
    It calls no looked-up function, so IBT on or off (TCG has none) takes this same path."""
    g = guest
    sh(g, "rmmod vmwipe && dmesg -c >/dev/null && insmod /vmwipe.ko dyndbg=+p")
    try:
        assert sh(g, f"cat {SYSFS}/crng_refresh").strip() == "active"
        log = sh(g, "dmesg")
        found = dict(re.findall(r"vmwipe \S+: (\w+) at ([0-9a-f]{16}) \(\1\+0x0/0x[0-9a-f]+\)$",
                                log, re.MULTILINE))
        names = "|".join(CRNG_SYMBOLS + KSECRET_SYMBOLS)
        named = {}
        for line in sh(g, f"grep -wE '{names}' /proc/kallsyms").splitlines():
            addr, _kind, name = line.split()[:3]
            named[name] = addr
        assert {"base_crng", "input_pool", "net_secret", "ptr_key"} <= set(found), log
        assert not re.search(r"WARNING|Call Trace|BUG", log), log  # kprobes took it quietly
        assert found == named, (found, named)
        if vdso(g):
            assert {"_vdso_rng_data", "vdso_k_rng_data"} & set(found)
    finally:
        sh(g, "rmmod vmwipe && insmod /vmwipe.ko")


def test_kernel_secrets_registered_once_drawn(guest: Guest) -> None:
    """ksecrets.c lists a key only once the kernel has drawn it (not all zero), and looks
    again every poll_ms: net_secret is drawn by the first TCP connection."""
    g = guest
    sh(g, "rmmod vmwipe && insmod /vmwipe.ko")
    lines = sh(g, f"cat {SYSFS}/kernel_secrets").splitlines()
    assert [ln.split(":")[0] for ln in lines] == [
        "net_secret", "ts_secret", "syncookie", "syncookie6", "ptr_key"]
    # the first TCP connection draws net_secret, the first %p (here %pK in
    # /proc/net/netlink) ptr_key, if the kernel has not drawn them yet
    sh(g, "ip link set lo up && tcp_keys sample 5500 5501 1")
    deadline = time.monotonic() + 10
    while True:
        now = sh(g, f"cat /proc/net/netlink >/dev/null; cat {SYSFS}/kernel_secrets")
        if "net_secret: registered" in now and "ptr_key: registered" in now:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    table = crng_fills(g)
    hdr = table.header
    assert hdr is not None and hdr.ksecrets & 0b10001 == 0b10001  # net_secret, ptr_key
    assert hdr.ksecrets & KSECRETS_REPORTED
    listed = len(table.fills) - hdr.crng_ranges - 1  # less the CRNG's and the witness
    assert listed >= hdr.ksecrets_ranges >= bin(hdr.ksecrets & 0x1F).count("1")


def _cli_wipe(g: Guest, sock: str, *flags: str) -> tuple[int, str, bytes, str]:
    """`vmwipe wipe --resume FLAGS` on the paused guest: (exit code, output, the region
    as it was left, run state); the guest runs again afterwards either way."""
    g.qmp("stop")
    try:
        r = run_cli("wipe", "--qmp", sock, "--resume", *flags)
        state = g.qmp("query-status")["status"]
        return r.returncode, r.stdout + r.stderr, g.read_region(), state
    finally:
        if g.qmp("query-status")["status"] != "running":
            g.qmp("cont")


def test_cli_reports_the_crng_and_require_crng_passes(guest: Guest, cli_qmp: str) -> None:
    """The module registers the CRNG (status active): inspect and wipe say so, and
    `--require-crng` wipes and resumes as without it."""
    g = guest
    hdr = crng_fills(g).header
    assert hdr is not None and hdr.crng_status == 1 and hdr.crng_reason == ""
    n = hdr.crng_ranges
    assert 1 <= n <= len(crng_fills(g).fills)  # the module has a fill range of its own too
    r = run_cli("inspect", "--qmp", cli_qmp)
    assert r.returncode == 0 and f"\nkernel CRNG: refreshed ({n} ranges)\n" in r.stdout, r.stdout
    assert re.search(r"\nkernel secrets: (net_secret, )?.*ptr_key \(\d+ ranges?\)\n", r.stdout)
    code, out, _region, state = _cli_wipe(g, cli_qmp, "--require-crng")
    assert code == 0 and f"kernel CRNG: refreshed ({n} ranges)" in out, out
    assert "resumed" in out and state == "running"


def test_cli_require_crng_refuses_crng_refresh_0(guest: Guest, cli_qmp: str) -> None:
    """crng_refresh=0: every report says NOT registered with the guest's reason;
    `--require-crng` exits 15 before writing anything and the guest stays paused."""
    g = guest
    sh(g, "rmmod vmwipe && insmod /vmwipe.ko crng_refresh=0")
    try:
        r = run_cli("inspect", "--qmp", cli_qmp, "--json")
        crng = json.loads(r.stdout)["extra"]["crng"]
        assert crng["status"] == "disabled" and not crng["registered"], crng
        assert crng["summary"].startswith("NOT registered (disabled in the guest: "), crng
        before = g.read_region()
        code, out, region, state = _cli_wipe(g, cli_qmp, "--require-crng")
        assert code == 15 and out.count("\n") == 1, out
        assert f"kernel CRNG: {crng['summary']}" in out and "not resumed" in out, out
        assert state == "paused" and region == before  # nothing written: no generation bump
        code, out, region, state = _cli_wipe(g, cli_qmp)  # without the policy: wiped as ever
        assert code == 0 and f"kernel CRNG: {crng['summary']}" in out and state == "running", out
        assert region != before
    finally:
        sh(g, "rmmod vmwipe && insmod /vmwipe.ko")
