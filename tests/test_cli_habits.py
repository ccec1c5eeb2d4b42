"""The `vmwipe` command line behaves as virsh and qemu-img users expect (issue 24 item 5).

Each test is one habit: sizes read as QEMU reads them, the same -v/-q/--json on every
command, usage errors on one line that name the flag or file, nothing written or created
when a command refuses.  They run the real parser and the real commands (no guest).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
    assert (cfg["base"], cfg["kernel_param"]) == (0x1BF0_0000, "memmap=0x100000$0x1bf00000")


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


# --- one resume rule ----------------------------------------------------------------------

LOAD_COMMANDS = [["restore", "--qmp", "s", "--from", "f"], ["loadvm", "--qmp", "s", "tag"],
                 ["wipe", "--qmp", "s"], ["save", "--qmp", "s", "--to", "f"],
                 ["clone", "snap"], ["libvirt", "restore", "f"],
                 ["libvirt", "start", "dom"], ["libvirt", "revert", "dom", "snap"]]


@pytest.mark.parametrize("argv", LOAD_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_load_command_resumes_unless_paused(argv: list[str]) -> None:
    """virsh's rule everywhere: the VM runs after success, `--paused` keeps it paused.

    The commands pass `not args.paused` as their flows' resume flag; the guest tests
    (test_agent_flows, test_agent_guest, test_libvirt) check the resulting run states."""
    parser = build_parser()
    assert parser.parse_args(argv).paused is False
    assert parser.parse_args([*argv, "--paused"]).paused is True
    # the spellings before the rule was one still parse (hidden from --help)
    assert parser.parse_args([*argv, "--no-resume"]).paused is True
    assert parser.parse_args([*argv, "--resume"]).paused is False
    path = tuple(argv[:2]) if argv[0] == "libvirt" else (argv[0],)
    helptext = LEAVES[path].format_help()
    assert "--paused" in helptext and "--no-resume" not in helptext
    assert "--resume " not in helptext and "virsh" in helptext


def test_paused_and_resume_conflict() -> None:
    run = vmwipe("wipe", "--qmp", "s", "--paused", "--resume")
    assert run.returncode == 2 and "not allowed with" in run.stderr


def test_clone_help_says_the_fleet_conts_all_at_once() -> None:
    text = " ".join(LEAVES[("clone",)].format_help().split())
    assert "once every clone is wiped and verified, cont them all together" in text
    assert "cont each clone after its wipe" not in text


# --- files: a missing or unreadable one is a usage error that names it ----------------------


def _one_usage_line(run: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert run.stderr.startswith("vmwipe: error: ") and run.stderr.count("\n") == 1, run.stderr
    for needle in needles:
        assert needle in run.stderr, run.stderr
    for internal in ("Errno", "internal error", "No such device", "Traceback", "[", "'"):
        assert internal not in run.stderr, run.stderr


M = "{missing}"


@pytest.mark.parametrize(("argv", "named"), [
    (["scrub", M], M),
    (["scrub", M, "--dry-run", "--json"], M),
    (["scrub", "{tmp}/f", "--sidecar", M], M),
    (["restore", "--qmp", "{tmp}/qmp", "--from", M], M),
    (["clone", M, "-n", "2", "--", "-m", "512"], M),
    (["clone", "--template", M, "-n", "2", "--", "-m", "512"], M),
    (["clone", "--template", "{tmp}", "--", "-m", "512"], "{tmp}/manifest.json"),
    (["template", "--from", M, "--ram", "{tmp}/ram", "--dir", "{tmp}/t", "--", "-m", "512"], M),
    (["libvirt", "restore", M], M),
    (["libvirt", "restore", "{tmp}/f", "--xml", M], M),
], ids=lambda a: " ".join(a[:2]) if isinstance(a, list) else "")
def test_missing_files_are_usage_errors_naming_them(tmp_path: Path, argv: list[str],
                                                    named: str) -> None:
    """Before: exit 11 (scrub), 9 "migration failed" (clone), [Errno 2] (clone --template),
    14 "libvirt refused" (libvirt restore).  Now: exit 2, the file's name, and nothing
    left behind (no vmwipe-clone-* directory)."""
    (tmp_path / "f").write_bytes(b"QEVM")
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    names = {"missing": tmp_path / "no" / "such-file", "tmp": tmp_path}
    args = [a.format(**names) for a in argv]
    run = subprocess.run([*VMWIPE, *args], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TMPDIR": str(temp)})
    _one_usage_line(run, named.format(**names))
    assert not list(temp.iterdir())  # clone made no directory for clones it never started
    if "--json" in args:
        assert json.loads(run.stdout)["exit_code"] == 2


def test_a_directory_is_not_a_saved_vm(tmp_path: Path) -> None:
    _one_usage_line(vmwipe("scrub", str(tmp_path)), f"{tmp_path} is a directory, not a file")


def test_clone_dash_n_0_leaves_nothing(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.write_bytes(b"QEVM")
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    run = subprocess.run([*VMWIPE, "clone", str(snap), "-n", "0", "--", "-m", "512"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TMPDIR": str(temp)})
    assert run.returncode == 2 and "-n: must be at least 1" in run.stderr
    assert not list(temp.iterdir())


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run the CLI as another user")
def test_permission_errors_say_so(tmp_path: Path) -> None:
    """As an unprivileged user: a root-only saved VM, and a --dir nobody may create."""
    tmp_path.chmod(0o755)
    secret = tmp_path / "vm.state"
    secret.write_bytes(b"QEVM")
    secret.chmod(0o600)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

    def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*nobody, *VMWIPE, *args], capture_output=True, text=True,
                              timeout=60, cwd="/")

    probe = subprocess.run([*nobody, sys.executable, "-c", "import vmwipe.host_agent.cli"],
                           capture_output=True, text=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"this interpreter cannot run as nobody: {probe.stderr.strip()[-200:]}")

    _one_usage_line(as_nobody("scrub", str(secret)), str(secret), "permission denied")
    _one_usage_line(as_nobody("scrub", str(secret), "--dry-run"), "permission denied")
    # an OSError from deep inside a command (writing the files), not a pre-check
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    _one_usage_line(as_nobody("qemu-args", "--mem", "512", "--dir", str(locked / "d")),
                    "permission denied")


# --- libvirt: one line, the real reason ---------------------------------------------------


@pytest.mark.parametrize("argv", [["protect", "nosuchdom", "--dry-run"],
                                  ["unprotect", "nosuchdom"], ["start", "nosuchdom"],
                                  ["revert", "nosuchdom", "s1"],
                                  ["protect", "6695eb01-f6a4-8304-79aa-000000000000"]],
                         ids=lambda a: a[0])
def test_libvirt_errors_are_one_line_with_the_real_reason(argv: list[str]) -> None:
    """libvirt's built-in test driver (no daemon): before, libvirt's default error handler
    printed its own lines, and a name that is no domain ended as "Invalid UUID"."""
    pytest.importorskip("libvirt")
    run = vmwipe("libvirt", *argv, "-c", "test:///default")
    assert run.returncode == 14, run.stderr
    assert run.stderr == f"vmwipe: error: domain {argv[1]}: Domain not found\n", run.stderr


# --- vmwipe libvirt status ----------------------------------------------------------------


def test_libvirt_status_of_a_protected_domain(tmp_path: Path) -> None:
    """libvirt's test driver (no daemon) holds a domain protected by the real XML edit; the
    real hook, run as libvirtd runs it, refuses it (its monitor is not there) and logs that;
    status reads both.  (tests/test_libvirt.py checks status after real hook wipes.)"""
    libvirt = pytest.importorskip("libvirt")
    from vmwipe.host_agent.libvirt.domain_xml import protect_xml
    from vmwipe.host_agent.libvirt.status import domain_status, hook_installed

    conn = libvirt.open("test:///default")
    dom = conn.lookupByName("test")
    old = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    state = Path(tempfile.mkdtemp(prefix="vw-"))  # short: the monitor socket path has a limit
    try:
        conn.defineXML(protect_xml(old, state, 1 << 20, "dimm").xml)
    finally:
        state.rmdir()
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    log_dir = tmp_path / "log"
    code = ("import sys; from vmwipe.host_agent.libvirt import hook; "
            f"hook.LOG_DIR = __import__('pathlib').Path({str(log_dir)!r}); "
            "sys.exit(hook.main(['test', 'started', 'begin', '-']))")
    run = subprocess.run([sys.executable, "-c", code], input=xml.encode(), capture_output=True,
                         timeout=60)
    assert run.returncode == 1, run.stderr  # fail closed: no monitor, no start

    st = domain_status(dom, log_dir / "hook.log")
    assert st.protected and st.region is not None and st.region["size"] == 1 << 20
    assert st.reservation.startswith("dimm (2048 KiB at ")
    assert st.policies == {"on-invalid": "fail", "reset-guard": "required", "backend": "auto",
                           "require-crng": "no"}
    assert st.files == {"ssdt": False, "zero-page": False}  # protect_xml alone writes no file
    assert st.running_protected is False  # the test domain runs since before the edit
    assert st.last_hook_event is not None and st.last_hook_event.outcome == "refused"
    assert "the guest is not allowed to run" in st.last_hook_event.message
    text = "\n".join(st.lines())
    assert text.startswith("test: protected (running), region 0x") and "refused" in text
    assert hook_installed(tmp_path) is None
    conn.close()


def test_libvirt_status_cli_lists_every_domain() -> None:
    pytest.importorskip("libvirt")
    run = vmwipe("libvirt", "status", "-c", "test:///default", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [d["domain"] for d in report["domains"]] == ["test"]
    assert report["domains"][0]["protected"] is False
    run = vmwipe("libvirt", "status", "nosuchdom", "-c", "test:///default")
    assert run.returncode == 14 and run.stderr.count("\n") == 1


@pytest.mark.parametrize("head", [b"$\xe8\x1d\x00garbage", b"QEVM\x00\x00\x00\x03\xff\xfe"],
                         ids=["not-a-stream", "corrupt-stream"])
def test_stream_errors_show_no_python_reprs(tmp_path: Path, head: bytes) -> None:
    """Before: "starts with b'$\\xe8\\x1d...'"."""
    f = tmp_path / "vm.state"
    f.write_bytes(head + bytes(8192))
    run = vmwipe("scrub", str(f), "--dry-run")
    assert run.returncode == 11 and run.stderr.count("\n") == 1, run.stderr
    for repr_ in ("b'", "b\"", "\\x", "Errno"):
        assert repr_ not in run.stderr, run.stderr
