"""The `vmwipe` command line behaves as virsh and qemu-img users expect (issue 24 item 5).

Each test is one habit: sizes read as QEMU reads them, the same -v/-q/--json on every
command, usage errors on one line that name the flag or file, nothing written or created
when a command refuses.  They run the real parser and the real commands (no guest).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmwipe.host_agent.cli import build_parser
from vmwipe.protocol import Region, decode_ssdt

VMWIPE = [sys.executable, "-m", "vmwipe.host_agent.cli"]


def vmwipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VMWIPE, *args], capture_output=True, text=True, timeout=60)


def leaf_commands(parser: argparse.ArgumentParser,
                  path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                argparse.ArgumentParser]]:
    """Every runnable (sub)command: `inspect`, ..., `libvirt status`."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaf_commands(sub, (*path, name))


LEAVES = dict(leaf_commands(build_parser()))


# --- sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "mib"), [("512", 512), ("512M", 512), ("512m", 512),
                                           ("1G", 1024), ("524288K", 512), ("2048k", 2),
                                           ("536870912B", 512)])
def test_mem_is_read_as_qemu_reads_m(text: str, mib: int) -> None:
    for cmd in (["qemu-args", "--mem", text], ["scrub", "f", "--machine", "pc", "--mem", text]):
        assert build_parser().parse_args(cmd).mem == mib << 20, cmd


@pytest.mark.parametrize("text", ["lots", "0", "1.5K", "-1"])
def test_bad_mem_is_a_one_line_usage_error(text: str) -> None:
    run = vmwipe("qemu-args", "--mem", text, "--dir", "/nonexistent")
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "argument --mem" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and f"'{text}'" not in run.stderr


def test_qemu_args_mem_512_is_512_mib(tmp_path: Path) -> None:
    run = vmwipe("qemu-args", "--mem", "512", "--dir", str(tmp_path), "--json")
    assert run.returncode == 0, run.stderr
    cfg = json.loads(run.stdout)
    assert (cfg["base"], cfg["kernel_param"]) == (0x1F00_0000, "memmap=0x100000$0x1f000000")


# --- the same options everywhere ----------------------------------------------------------


@pytest.mark.parametrize("command", sorted(" ".join(p) for p in LEAVES))
def test_every_command_takes_v_q_json(command: str) -> None:
    opts = LEAVES[tuple(command.split())]._option_string_actions
    for flag in ("-v", "--verbose", "-q", "--quiet", "--json", "-h"):
        assert flag in opts, f"vmwipe {command} lacks {flag}"


def test_subcommand_v_does_not_reset_the_top_level_one() -> None:
    args = build_parser().parse_args(["-v", "ssdt"])
    assert (args.verbose, args.quiet) == (1, False)
    args = build_parser().parse_args(["ssdt", "-vv", "-q"])
    assert (args.verbose, args.quiet) == (2, True)


# --- one-line errors that name what is wrong ----------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (["ssdt", "--size", "3K"], "--base/--size: the region size 0xc00 is not a multiple of 4 KiB"),
    (["inspect", "--qmp", "s", "--region", "nonsense"],
     "nonsense: expected BASE:SIZE, e.g. 0x1f000000:1M"),
    (["inspect", "--qmp", "s", "--region", "0x1000:4K"], "region size 0x1000 is not"),
    (["clone", "snap", "-n", "0"], "argument -n: must be at least 1, not 0"),
])
def test_flag_errors_speak_of_flags(tmp_path: Path, args: list[str], needle: str) -> None:
    run = vmwipe(*args)
    assert run.returncode == 2 and needle in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1
    for internal in ("region_size=", "unpack", "Errno", "b'", "Traceback"):
        assert internal not in run.stderr


def test_ssdt_output_into_a_missing_directory_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "a.aml"
    run = vmwipe("ssdt", "-o", str(target))
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert f"directory {target.parent} does not exist" in run.stderr
    assert not (tmp_path / "no").exists()
    ok = tmp_path / "a.aml"
    assert vmwipe("ssdt", "-o", str(ok), "-q").returncode == 0
    assert decode_ssdt(ok.read_bytes()) == Region(0x1F00_0000, 1 << 20)
