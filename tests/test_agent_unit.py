"""Agent pieces that need no QEMU: option parsing, reset guard, coalescing, transfers, CLI."""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from vmwipe.host_agent.cli import build_parser, main
from vmwipe.host_agent.errors import EXIT_CODES, MemoryAccessError, RegionError, UsageError
from vmwipe.host_agent.qemu.region import (
    discover_region,
    option_values,
    parse_region_arg,
    reset_guard_problem,
    split_qemu_opts,
)
from vmwipe.host_agent.wipe import backends
from vmwipe.host_agent.wipe.backends import ProcessVMBackend, buffer_address, read_proc_maps
from vmwipe.host_agent.wipe.engine import read_region_early, run_wipe
from vmwipe.host_agent.wipe.memmap import GuestMemoryMap, RamRange
from vmwipe.protocol import PAGE_SIZE, Region, build_region, encode_ssdt, merge_ranges

P = PAGE_SIZE
REGION = Region(0x1F00_0000, 1 << 20)


# --- QEMU command-line parsing --------------------------------------------------------


def test_split_qemu_opts() -> None:
    assert split_qemu_opts("loader,file=/a,,b,addr=0x10,force-raw=on") == {
        "": "loader", "file": "/a,b", "addr": "0x10", "force-raw": "on"}
    assert split_qemu_opts("file=x.aml") == {"file": "x.aml"}


def test_option_values() -> None:
    argv = ["qemu", "-acpitable", "file=a", "--acpitable", "file=b", "-acpitable=file=c"]
    assert option_values(argv, "acpitable") == ["file=a", "file=b", "file=c"]
    assert option_values(argv, "device") == []


def _files(tmp_path: Path) -> tuple[Path, Path]:
    ssdt = tmp_path / "t.aml"
    ssdt.write_bytes(encode_ssdt(REGION.base, REGION.size))
    zero = tmp_path / "zero.bin"
    zero.write_bytes(bytes(P))
    return ssdt, zero


def test_discover_region(tmp_path: Path) -> None:
    ssdt, _ = _files(tmp_path)
    other = tmp_path / "other.aml"
    other.write_bytes(b"SSDT" + bytes(60))
    pid = os.getpid()
    found = discover_region(pid, ["q", "-acpitable", f"file={other}", "-acpitable", f"file={ssdt}"])
    assert found.region == REGION and found.source == f"acpitable:{ssdt}"
    # colon-separated file lists are QEMU syntax too
    assert discover_region(pid, ["q", "-acpitable", f"file={other}:{ssdt}"]).region == REGION
    with pytest.raises(RegionError, match="--region"):
        discover_region(pid, ["q", "-acpitable", f"file={other}"])
    with pytest.raises(RegionError, match="unreadable"):
        discover_region(pid, ["q", "-acpitable", f"file={tmp_path}/missing.aml"])
    second = tmp_path / "second.aml"
    second.write_bytes(encode_ssdt(0x2000_0000, 1 << 20))
    with pytest.raises(RegionError, match="several"):
        discover_region(pid, ["q", "-acpitable", f"file={ssdt}", "-acpitable", f"file={second}"])


def test_reset_guard(tmp_path: Path) -> None:
    _, zero = _files(tmp_path)
    pid = os.getpid()
    ok = ["q", "-device", f"loader,file={zero},addr={REGION.base:#x},force-raw=on"]
    assert reset_guard_problem(pid, ok, REGION) is None
    as_json = ["q", "-device", json.dumps(
        {"driver": "loader", "file": str(zero), "addr": REGION.base, "force-raw": True})]
    assert reset_guard_problem(pid, as_json, REGION) is None
    missing = reset_guard_problem(pid, ["q"], REGION)
    assert missing is not None and "stale table" in str(missing) and "\n" not in str(missing)
    assert missing.base == REGION.base and missing.seen == ()
    assert str(missing) == f"{missing.finding} ({missing.advice})"
    wrong = reset_guard_problem(
        pid, ["q", "-device", f"loader,file={zero},addr=0x1000000"], REGION)
    assert wrong is not None and "loader at 0x1000000" in str(wrong)
    assert wrong.seen == ("loader at 0x1000000",)
    dirty = tmp_path / "dirty.bin"
    dirty.write_bytes(b"\1" + bytes(P - 1))
    bad = reset_guard_problem(
        pid, ["q", "-device", f"loader,file={dirty},addr={REGION.base:#x},force-raw=on"], REGION)
    assert bad is not None and "not 4096 zero bytes" in str(bad)
    # QEMU tries a file without force-raw=on as ELF, U-Boot and HEX images first
    for raw in ("", ",force-raw=off"):
        unforced = reset_guard_problem(
            pid, ["q", "-device", f"loader,file={zero},addr={REGION.base:#x}{raw}"], REGION)
        assert unforced is not None and "without force-raw=on" in str(unforced)


def test_parse_region_arg() -> None:
    assert parse_region_arg("0x1f000000:1M") == REGION
    for bad in ("0x1f000000", "0x1f000001:1M", "0x1f000000:4K", "x:y"):
        with pytest.raises(UsageError):
            parse_region_arg(bad)


# --- planning ---------------------------------------------------------------------------


def test_merge_ranges() -> None:
    assert merge_ranges([(0x3000, P), (0x1000, P), (0x2000, P), (0x8000, 2 * P), (0x9000, P)]) == [
        (0x1000, 3 * P), (0x8000, 2 * P)]
    assert merge_ranges([]) == []
    assert merge_ranges([(0, 0)]) == []


# --- process_vm on our own process: batching and partial transfers ------------------------


@pytest.fixture
def own_memory() -> Iterator[tuple[ProcessVMBackend, bytearray]]:
    """A fake guest: 'RAM' at gpa 0x100000 is a bytearray in this very process."""
    buf = bytearray(b"\xee" * (64 * P))
    base = buffer_address(memoryview(buf))
    mm = GuestMemoryMap([RamRange(0x100000, 32 * P, "a", 0, hva=base),
                         RamRange(0x100000 + 32 * P, 32 * P, "b", 0, hva=base + 32 * P)])
    yield ProcessVMBackend(mm, os.getpid()), buf


def test_process_vm_zero_and_read(own_memory: tuple[ProcessVMBackend, bytearray]) -> None:
    be, buf = own_memory
    be.zero([(0x100000 + P, 2 * P), (0x100000 + 31 * P, 2 * P)])  # crosses the two blocks
    assert buf[P : 3 * P] == bytes(2 * P) and buf[31 * P : 33 * P] == bytes(2 * P)
    assert buf[:P] == b"\xee" * P and buf[3 * P : 31 * P] == b"\xee" * (28 * P)
    assert buf[33 * P :] == b"\xee" * (31 * P)
    assert be.first_nonzero([(0x100000 + P, 2 * P)]) is None
    assert be.first_nonzero([(0x100000 + 2 * P, 2 * P)]) == 0x100000 + 3 * P
    be.write(0x100000 + 5, b"hello")
    assert be.read(0x100000, 10) == b"\x00" * 0 + b"\xee" * 5 + b"hello"


def test_process_vm_batches_by_iov_max(own_memory: tuple[ProcessVMBackend, bytearray],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    be, buf = own_memory
    monkeypatch.setattr(backends, "IOV_MAX", 4)
    be.calls = 0
    be.zero([(0x100000 + 2 * i * P, P) for i in range(10)])  # 10 scattered pages
    assert be.calls == 3
    assert all(buf[2 * i * P : (2 * i + 1) * P] == bytes(P) for i in range(10))
    assert all(buf[(2 * i + 1) * P : (2 * i + 2) * P] == b"\xee" * P for i in range(10))


def test_process_vm_partial_transfers(own_memory: tuple[ProcessVMBackend, bytearray],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A syscall that moves fewer bytes than asked (even mid-iovec) is resumed exactly."""
    be, buf = own_memory
    real = backends._process_vm_writev
    calls: list[int] = []

    def stingy(pid: int, local: Any, nl: int, remote: Any, nr: int, flags: int) -> int:
        # move at most 1000 bytes per call, which splits iovecs at odd offsets
        left = 1000
        n_local = 0
        while n_local < nl and left > 0:
            take = min(int(local[n_local].iov_len), left)
            local[n_local].iov_len = take
            remote[n_local].iov_len = take
            left -= take
            n_local += 1
        got = int(real(pid, local, n_local, remote, n_local, flags))
        calls.append(got)
        return got

    monkeypatch.setattr(backends, "_process_vm_writev", stingy)
    data = bytes(range(256)) * 40  # 10240 bytes
    be.write(0x100000 + 100, data)
    assert bytes(buf[100 : 100 + len(data)]) == data
    end = 100 + len(data)
    assert buf[:100] == b"\xee" * 100 and buf[end : end + 10] == b"\xee" * 10
    assert len(calls) == 11 and sum(calls) == len(data)


def test_process_vm_errors(own_memory: tuple[ProcessVMBackend, bytearray],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    be, _ = own_memory
    monkeypatch.setattr(backends, "_process_vm_writev", lambda *a: 0)
    with pytest.raises(MemoryAccessError, match="not mapped"):
        be.zero([(0x100000, P)])

    def eperm(*a: object) -> int:
        ctypes.set_errno(1)
        return -1

    monkeypatch.setattr(backends, "_process_vm_writev", eperm)
    with pytest.raises(MemoryAccessError, match="not permitted"):
        be.zero([(0x100000, P)])
    with pytest.raises(MemoryAccessError, match="not in guest RAM"):
        be.zero([(0x100000 + 63 * P, 2 * P)])
    with pytest.raises(MemoryAccessError):  # no such PID: refused when opened
        ProcessVMBackend(be.memmap, 2**22 + 12345).probe()


def test_early_region_used_only_on_an_identical_map() -> None:
    """A region read before the post-load map was known is used only if that map
    equals the one it was read through; otherwise the engine reads it again."""
    small = Region(0x100000 + 8 * P, 2 * P)
    ram = bytearray(b"\xee" * (64 * P))
    base = buffer_address(memoryview(ram))
    ram[8 * P : 10 * P] = build_region(small.size, [(0x100000 + 20 * P, 1)])
    mm = GuestMemoryMap([RamRange(0x100000, 64 * P, "a", 0, hva=base)])
    be = ProcessVMBackend(mm, os.getpid())
    early = read_region_early(be, small)
    assert early is not None and bytes(early.data) == bytes(ram[8 * P : 10 * P])
    # the guest's table changes (in a real flow it cannot: the VM is paused) ...
    ram[8 * P : 10 * P] = build_region(small.size, [(0x100000 + 30 * P, 1)])
    rep = run_wipe(be, small, early=early)  # ... same map: the early copy is used
    assert rep.pages == 1 and ram[20 * P : 21 * P] == bytes(P)
    assert ram[30 * P : 31 * P] == b"\xee" * P
    moved = GuestMemoryMap([RamRange(0x100000, 63 * P, "a", 0, hva=base)])
    rep = run_wipe(ProcessVMBackend(moved, os.getpid()), small, early=early)
    assert rep.pages == 1 and ram[30 * P : 31 * P] == bytes(P)  # different map: read again
    bad = Region(0x100000 + 100 * P, 2 * P)  # outside RAM: no early copy, no exception
    assert read_region_early(be, bad) is None


@pytest.mark.parametrize("runs", [
    ([0x100000 + 4 * P], [5 * P]),  # reaches into the region from below
    ([0x100000 + 9 * P], [P]),  # inside it
    ([0x100000, 0x100000 + 9 * P], [P, 4 * P]),  # the last run that starts below its end
    ([0x100000 + 20 * P + 1], [P]),  # not page aligned
])
def test_engine_refuses_runs_a_broken_decoder_would_hand_it(
    runs: tuple[list[int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Belt and braces: even if the validator let such runs through, nothing is zeroed."""
    from vmwipe.host_agent.errors import InvalidTableError
    from vmwipe.host_agent.wipe import engine as wipe
    from vmwipe.protocol import decode_table

    small = Region(0x100000 + 8 * P, 2 * P)
    ram = bytearray(b"\xee" * (64 * P))
    ram[8 * P : 10 * P] = build_region(small.size, [(0x100000 + 20 * P, 1)])
    be = ProcessVMBackend(GuestMemoryMap([RamRange(0x100000, 64 * P, "a", 0,
                                                   hva=buffer_address(memoryview(ram)))]),
                          os.getpid())
    before = bytes(ram)

    def broken(data: bytes | bytearray, region: Region, memmap: GuestMemoryMap,
               strict: bool) -> object:
        table = decode_table(data, region, memmap.pairs(), strict=strict)
        table.sorted_runs = runs
        return table

    monkeypatch.setattr(wipe, "decode", broken)
    with pytest.raises(InvalidTableError, match=r"overlaps the region|not page aligned"):
        run_wipe(be, small)
    assert bytes(ram) == before


def test_read_proc_maps() -> None:
    maps = read_proc_maps(os.getpid())
    assert maps and all(m.start < m.end for m in maps)
    with pytest.raises(MemoryAccessError):
        read_proc_maps(2**22 + 12345)


# --- CLI ------------------------------------------------------------------------------------

COMMANDS = ["inspect", "wipe", "restore", "loadvm", "save", "clone", "ssdt", "qemu-args"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_everywhere(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: vmwipe" in capsys.readouterr().out


def test_top_level_help_lists_exit_codes() -> None:
    text = build_parser().format_help()
    for code in EXIT_CODES:
        assert f"{code:3d}  " in text


def test_internal_errors_are_one_line(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from vmwipe.host_agent.cli import agent as cli

    def boom(args: object) -> int:
        raise KeyError("bug")

    monkeypatch.setattr(cli, "_cmd_inspect", boom)
    assert main(["inspect", "--qmp", "x"]) == 1
    err = capsys.readouterr().err
    assert err == "vmwipe: error: internal error: KeyError: 'bug' (run with -v for a traceback)\n"


def test_one_line_errors(tmp_path: Path) -> None:
    r = run_cli("wipe", "--qmp", str(tmp_path / "nope.sock"))
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vmwipe: error: cannot connect")
    r = run_cli("restore", "--qmp", str(tmp_path / "nope.sock"))
    assert r.returncode == 2  # argparse: --from is required
    r = run_cli("inspect", "--qmp", str(tmp_path / "nope.sock"), "--json")
    assert r.returncode == 3
    assert json.loads(r.stdout) == {
        "error": f"cannot connect to QMP socket {tmp_path}/nope.sock: No such file or directory",
        "exit_code": 3, "kind": "QMPFailure"}
    r = run_cli("clone", str(tmp_path / "snap"), "-n", "1")
    assert r.returncode == 2 and "QEMU arguments after --" in r.stderr
    r = run_cli("wipe", "--qmp", "x", "--", "extra")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_engine_refuses_a_ram_map_that_splits_a_page() -> None:
    """QEMU maps RAM in whole pages; a sub-page range boundary means a misparsed map."""
    from vmwipe.host_agent.wipe.engine import run_wipe
    from vmwipe.protocol import build_region

    region = Region(0x10000, 0x2000)
    buf = bytearray(0x20000)
    buf[0x10000:0x12000] = build_region(0x2000, [(0x4000, 1)])
    base = buffer_address(memoryview(buf))
    mm = GuestMemoryMap([RamRange(0, 0x4200, "a", 0, hva=base),
                         RamRange(0x4200, 0x1BE00, "b", 0, hva=base + 0x4200)])
    before = bytes(buf)
    with pytest.raises(MemoryAccessError, match="splits page 0x4000"):
        run_wipe(ProcessVMBackend(mm, os.getpid()), region)
    assert bytes(buf) == before
