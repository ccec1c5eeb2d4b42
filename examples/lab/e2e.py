"""End to end: clones of one snapshot never share a DRBG output, and the baselines do.

The scenario (issue 6) with a real Debian kernel and real QEMU:

1. Boot the lab guest (vmwipe.ko, `-device vmgenid,guid=auto`), start
   `drbg_stream` writing `epoch counter value` lines to a second serial port,
   plus a `poll()` waiter on /dev/vmwipe and a `/dev/kmsg` reader on the same
   port (so the kernel's vmgenid reseed shows up in the same ordered stream).
2. `vmwipe save` while everything runs.
3. Three ways to resume N copies of that one file, K outputs collected from each:

   - **vmwipe**: `vmwipe clone` (load, wipe, verify, stay paused); the RAM is
     hashed while paused, then each clone is continued.
   - **plain**: `migrate-incoming` + `cont`, vmgenid GUID unchanged; what a
     hypervisor that tells the guest nothing does.
   - **vmgenid**: the same, with a new GUID: the kernel CRNG reseeds a moment
     after resume, userspace state is untouched; we time that moment.

Every line is timestamped on the host as it arrives on the clone's serial
socket, which is connected before `cont`, so nothing a clone prints after
resume is lost.  `analyse()` is pure (tested on synthetic data); `Scenario`
drives QEMU.  Every QEMU started here is killed by its PID, and reaped, before
`Scenario.close()` returns.

Why plain `-cpu qemu64` (no RDRAND) works: the guest kernel's CRNG is part of
the snapshot, but vmwipe.ko registers it as protocol v2 fill ranges, so every
clone's `getrandom()` differs from its first instruction (the host refilled the
CRNG key and generation while it was paused).  Before v2 (or with
`crng_refresh=0`) the DRBG needed RDRAND: all four vmwipe clones reseeded to
the same epoch and printed the same values on plain qemu64.

The integrity "before" image is the original, paused right after the save:
the state every clone loads, except 16 bytes (the vmgenid GUID QEMU writes into
guest RAM while loading), which are located by value and masked as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from vmwipe.host_agent.flows.incoming import prepare_incoming
from vmwipe.host_agent.flows.target import AgentOptions, open_target
from vmwipe.host_agent.qemu.launcher import QemuProcess, start_qemu
from vmwipe.host_agent.qemu.qmp import QMPSession
from vmwipe.protocol import HOST_FIELDS_SIZE, WIPE_GENERATION_OFFSET

from .build import GuestImage, build_guest_image, default_kernel
from .guest import Console, Guest, GuestConfig, GuestError, default_accel

PAGE = 4096
CPU = "qemu64"
DRBG_INTERVAL_MS = 1  # paced so the UART drains between lines: at most one line in flight
DRBG_LINE = re.compile(r"([0-9a-f]{16}) (\d+) ([0-9a-f]{16})")
RESEED_MSG = "crng reseeded due to virtual machine fork"
# Case matters: "debug:" must not count as "BUG:".
OOPS = re.compile(r"Oops|\bBUG:|Call Trace|Kernel panic|general protection fault|WARNING: CPU")
SYSFS = "/sys/class/misc/vmwipe"
MODES = ("vmwipe", "plain", "vmgenid")
HASH_CHUNK = 32 << 20
_PR_SET_CHILD_SUBREAPER = 36

Log = Callable[[str], None]


# --- what a serial port said ---------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """One DRBG output as it arrived on the host (`t`: host monotonic seconds)."""

    epoch: str
    counter: int
    value: str
    t: float


@dataclass(frozen=True)
class Stream:
    """A serial port's lines after some point: DRBG outputs and kernel reseed notices."""

    outputs: list[Output]
    reseeds: list[tuple[float, int]]  # (arrival time, DRBG outputs seen before it)
    garbage: int  # lines that are neither (a partial line at the cut, boot log from cat)


def parse_lines(lines: Iterable[tuple[float, str]]) -> Stream:
    outputs: list[Output] = []
    reseeds: list[tuple[float, int]] = []
    garbage = 0
    for t, text in lines:
        m = DRBG_LINE.fullmatch(text.strip())
        if m:
            outputs.append(Output(m.group(1), int(m.group(2)), m.group(3), t))
        elif RESEED_MSG in text:
            reseeds.append((t, len(outputs)))
        elif text.strip():
            garbage += 1
    return Stream(outputs, reseeds, garbage)


class SerialTap:
    """Reads a QEMU `-chardev socket,server=on` on a thread; every line gets its arrival time.

    Connect it before the VM runs: a socket chardev drops what the guest writes
    while no client is attached.  `prefix` is glued to the first line, so a
    line the snapshot cut in two reads whole in the clone.
    """

    def __init__(self, path: str, prefix: str = "", log: Path | None = None,
                 timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._sock.connect(path)
                break
            except OSError:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._log = log.open("ab") if log else None
        self._lines: list[tuple[float, str]] = []
        self._partial = prefix
        self._drbg = 0
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._pump, name=f"tap {path}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            while chunk := self._sock.recv(65536):
                now = time.monotonic()
                if self._log:
                    self._log.write(chunk)
                text = chunk.decode(errors="replace").replace("\r", "")
                with self._cond:
                    *done, self._partial = (self._partial + text).split("\n")
                    for line in done:
                        self._lines.append((now, line))
                        if DRBG_LINE.fullmatch(line.strip()):
                            self._drbg += 1
                    self._cond.notify_all()
        except OSError:
            pass
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def snapshot(self) -> tuple[list[tuple[float, str]], str]:
        """Complete lines so far, and the unfinished tail."""
        with self._cond:
            return list(self._lines), self._partial

    def wait_outputs(self, n: int, timeout: float, after: int = 0) -> None:
        """Until at least `n` DRBG lines arrived (counting all lines from index `after`)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                have = sum(1 for _t, ln in self._lines[after:]
                           if DRBG_LINE.fullmatch(ln.strip())) if after else self._drbg
                if have >= n:
                    return
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    tail = "\n".join(x for _t, x in self._lines[-5:])
                    raise GuestError(f"only {have}/{n} DRBG outputs "
                                     f"({'EOF' if self._eof else 'timeout'}); tail:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def send(self, data: bytes) -> None:
        """Write to the guest's side of the port (QEMU queues it for the UART)."""
        self._sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)
        if self._log:
            self._log.close()


# --- analysis ------------------------------------------------------------------------


@dataclass
class CloneStats:
    """What one clone emitted after resume, split by epoch."""

    outputs: int
    old_epoch_outputs: int  # outputs of an epoch the original used before the snapshot
    old_epoch_counters: list[int]  # their counters (the first 5): in flight = last + 1
    new_epochs: list[str]
    first_new_index: int | None  # position of the first post-resume-epoch output


@dataclass
class Analysis:
    """Cross-clone facts about one scenario's first-K outputs."""

    clones: list[CloneStats]
    #: distinct values that two or more clones emitted (any epoch)
    shared_values: int
    #: outputs that repeat a value some other clone emitted (total - distinct)
    duplicate_outputs: int
    #: distinct values of post-resume epochs emitted by two or more clones
    shared_new_values: int
    #: post-resume epoch ids seen in two or more clones
    shared_new_epochs: int
    #: clones' post-resume-epoch values that the original emitted after the snapshot
    new_values_in_original: int
    #: clones' values (any epoch) that the original also emitted after the snapshot
    values_in_original: int

    @property
    def max_old_epoch_outputs(self) -> int:
        return max((c.old_epoch_outputs for c in self.clones), default=0)


def analyse(pre_epochs: set[str], clones: Sequence[Sequence[Output]],
            original_after: Sequence[Output] = ()) -> Analysis:
    """Per-epoch claims over each clone's first outputs after resume.

    `pre_epochs` are the epochs the original emitted before the snapshot; an
    output of one of them after resume is "old" (in flight at the snapshot, or
    a continued stream).  Everything else belongs to an epoch first seen after
    resume, and those are the values that must never repeat.
    """
    stats: list[CloneStats] = []
    owners: dict[str, set[int]] = {}
    new_owners: dict[str, set[int]] = {}
    epoch_owners: dict[str, set[int]] = {}
    total = 0
    for i, outs in enumerate(clones):
        old = 0
        old_counters: list[int] = []
        new_epochs: list[str] = []
        first_new: int | None = None
        for pos, o in enumerate(outs):
            total += 1
            owners.setdefault(o.value, set()).add(i)
            if o.epoch in pre_epochs:
                old += 1
                if len(old_counters) < 5:
                    old_counters.append(o.counter)
                continue
            if first_new is None:
                first_new = pos
            if o.epoch not in new_epochs:
                new_epochs.append(o.epoch)
            new_owners.setdefault(o.value, set()).add(i)
            epoch_owners.setdefault(o.epoch, set()).add(i)
        stats.append(CloneStats(len(outs), old, old_counters, new_epochs, first_new))
    original_values = {o.value for o in original_after}
    return Analysis(
        clones=stats,
        shared_values=sum(1 for s in owners.values() if len(s) > 1),
        duplicate_outputs=total - len(owners),
        shared_new_values=sum(1 for s in new_owners.values() if len(s) > 1),
        shared_new_epochs=sum(1 for s in epoch_owners.values() if len(s) > 1),
        new_values_in_original=len(original_values & set(new_owners)),
        values_in_original=len(original_values & set(owners)),
    )


# --- results -------------------------------------------------------------------------


@dataclass
class CloneRun:
    """One clone: how it was resumed, what it printed, and the checks made on it."""

    mode: str
    index: int
    pid: int
    outputs: list[Output] = field(default_factory=list)
    first_output_ms: float | None = None  # cont -> first DRBG line arrived
    reseed_ms: float | None = None  # cont -> kernel "crng reseeded ... fork" arrived
    reseed_outputs: int | None = None  # DRBG outputs that arrived before that line
    pages_wiped: int | None = None
    paused_ms: float | None = None  # load completed -> wipe verified -> cont returned
    agent_timings_ms: dict[str, float] = field(default_factory=dict)
    integrity: dict[str, Any] = field(default_factory=dict)
    notification: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    garbage_lines: int = 0


@dataclass
class ScenarioResult:
    """Everything one run measured; `claims` maps each claim to whether it held."""

    clones: int
    outputs: int
    accel: str
    kernel: str
    cpu: str = CPU
    old_epoch: str = ""
    last_pre_counter: int = -1  # the last output the original printed before the snapshot
    pre_snapshot_outputs: int = 0
    save_ms: float = 0.0
    snapshot_bytes: int = 0
    runs: dict[str, list[CloneRun]] = field(default_factory=dict)
    analyses: dict[str, Analysis] = field(default_factory=dict)
    original_after: int = 0
    claims: dict[str, bool] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def ok(self) -> bool:
        return bool(self.claims) and all(self.claims.values())

    def to_dict(self, with_outputs: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ("runs",)}
        d["runs"] = {}
        for mode, runs in self.runs.items():
            rows = []
            for r in runs:
                row = asdict(r)
                row["outputs"] = ([[o.epoch, o.counter, o.value] for o in r.outputs]
                                  if with_outputs else len(r.outputs))
                rows.append(row)
            d["runs"][mode] = rows
        d["ok"] = self.ok()
        return d

    def evaluate(self) -> dict[str, bool]:
        """The claims of issue 6, each a boolean (the demo's exit code and the tests use them)."""
        c: dict[str, bool] = {}
        k = self.outputs
        w = self.analyses.get("vmwipe")
        wr = self.runs.get("vmwipe", [])
        if w is not None:
            c["vmwipe: every clone emitted K outputs"] = all(len(r.outputs) >= k for r in wr)
            c["vmwipe: no post-resume value in two clones"] = w.shared_new_values == 0
            c["vmwipe: no post-resume epoch in two clones"] = w.shared_new_epochs == 0
            c["vmwipe: no post-resume value in the original after the snapshot"] = (
                w.new_values_in_original == 0)
            c["vmwipe: at most one in-flight old-epoch value per clone"] = (
                w.max_old_epoch_outputs <= 1)
            c["vmwipe: every clone reseeded (new epoch from counter 0)"] = all(
                cs.new_epochs and cs.first_new_index is not None
                and r.outputs[cs.first_new_index].counter == 0
                for cs, r in zip(w.clones, wr, strict=True))
            c["integrity: RAM outside listed pages unchanged by the wipe"] = all(
                r.integrity.get("identical") for r in wr)
            c["integrity: listed pages zero after the wipe"] = all(
                r.integrity.get("listed_zero") for r in wr)
            c["notification: poll() woke, generation advanced"] = all(
                r.notification.get("poll_woke") and r.notification.get("generation") == 1
                for r in wr)
            c["health: shell answers, no oops"] = all(
                r.health.get("shell") and r.health.get("oops") == 0 for r in wr)
        for mode in ("plain", "vmgenid"):
            a = self.analyses.get(mode)
            if a is not None:
                c[f"{mode}: duplicates appear (the test can fail)"] = a.shared_values > 0
        vr = self.runs.get("vmgenid", [])
        if vr:
            c["vmgenid: kernel reseed observed in every clone"] = all(
                r.reseed_ms is not None for r in vr)
        self.claims = c
        return c


# --- QEMU plumbing -------------------------------------------------------------------


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(option, value, 0, 0, 0)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The `vmwipe` command line, as a user runs it (own process, real exit code)."""
    return subprocess.run([sys.executable, "-m", "vmwipe.host_agent.cli", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def clone_argv(original: Sequence[str], directory: Path, guid: str,
               index: str = "{i}") -> list[str]:
    """The original's QEMU command line for a clone.

    Same machine, devices and files (so the saved state loads), minus the
    lab's QMP monitors (the launcher or `vmwipe clone` adds one); both serial
    ports go to per-clone sockets; the vmgenid GUID is `guid` ("auto" = new).
    """
    out: list[str] = []
    i = 0
    while i < len(original):
        a = original[i]
        nxt = original[i + 1] if i + 1 < len(original) else ""
        if a == "-qmp":
            i += 2
            continue
        if a == "-chardev" and nxt.startswith("stdio,id=con"):
            out += ["-chardev",
                    f"socket,id=con,path={directory}/con-{index}.sock,server=on,wait=off"]
            i += 2
            continue
        if a == "-chardev" and nxt.startswith("socket,id=drbg,"):
            out += ["-chardev",
                    f"socket,id=drbg,path={directory}/drbg-{index}.sock,server=on,wait=off"]
            i += 2
            continue
        if a == "-device" and nxt.startswith("vmgenid,"):
            out += ["-device", f"vmgenid,guid={guid}"]
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def _kill_pid(pid: int) -> None:
    """SIGKILL a QEMU we (or `vmwipe clone`, our child) started, and reap it if it is ours."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _wait_loaded(s: QMPSession, timeout: float = 120) -> None:
    """Until the incoming migration ended (QEMU leaves `inmigrate`); nothing is resumed here."""

    def done() -> bool | None:
        return True if s.status() != "inmigrate" else None

    s.wait_until(done, timeout, "the incoming migration")


def _mask(buf: bytearray, base: int, spans: Sequence[tuple[int, int]]) -> None:
    end = base + len(buf)
    for gpa, size in spans:
        lo, hi = max(gpa, base), min(gpa + size, end)
        if lo < hi:
            buf[lo - base:hi - base] = bytes(hi - lo)


def ram_digest(qmp_path: str, exclude: Sequence[tuple[int, int]]) -> str:
    """sha256 of all guest RAM with the `exclude` spans read as zero.

    Read through the agent's own memory backend (process_vm_readv), so this is
    exactly the memory the wipe engine sees.
    """
    h = hashlib.sha256()
    with QMPSession(qmp_path) as s:
        target = open_target(s, s.pid, AgentOptions(), guard=False)
        try:
            for r in target.memmap.ranges:
                for off in range(0, r.size, HASH_CHUNK):
                    n = min(HASH_CHUNK, r.size - off)
                    data = target.backend.read(r.gpa + off, n)
                    lo, hi = r.gpa + off, r.gpa + off + n
                    if any(g < hi and lo < g + size for g, size in exclude):
                        buf = bytearray(data)
                        _mask(buf, lo, exclude)
                        h.update(buf)
                    else:
                        h.update(data)
        finally:
            target.close()
    return h.hexdigest()


def find_in_ram(qmp_path: str, needle: bytes) -> list[int]:
    """Guest-physical addresses where `needle` occurs in guest RAM."""
    hits: list[int] = []
    with QMPSession(qmp_path) as s:
        target = open_target(s, s.pid, AgentOptions(), guard=False)
        try:
            for r in target.memmap.ranges:
                tail = b""
                for off in range(0, r.size, HASH_CHUNK):
                    buf = tail + target.backend.read(r.gpa + off, min(HASH_CHUNK, r.size - off))
                    base = r.gpa + off - len(tail)
                    pos = buf.find(needle)
                    while pos >= 0:
                        hits.append(base + pos)
                        pos = buf.find(needle, pos + 1)
                    tail = buf[-(len(needle) - 1):]
        finally:
            target.close()
    return hits


def read_gpa(qmp_path: str, gpa: int, size: int) -> bytes:
    with QMPSession(qmp_path) as s:
        target = open_target(s, s.pid, AgentOptions(), guard=False)
        try:
            return target.backend.read(gpa, size)
        finally:
            target.close()


# --- the scenario --------------------------------------------------------------------


class CloneLab:
    """An original guest, its snapshot and its clones' QEMUs, each owned until `close()`.

    The part `Scenario` and `crng.CrngScenario` share, kept in one place so
    that neither can leave a QEMU behind: each one is killed by its PID, and
    reaped, before `close()` returns.  The original's serial port 1 (`tap`)
    and QMP socket are laid out as `clone_argv` expects.  A context manager.
    """

    def __init__(self, directory: Path, own_dir: bool) -> None:
        self.dir = directory
        self._own_dir = own_dir
        self.guest: Guest | None = None
        self.tap: SerialTap | None = None
        self.snapshot = self.dir / "snapshot.state"
        self._pids: list[int] = []  # clone QEMUs started by `vmwipe clone`
        self._procs: list[QemuProcess] = []
        self._taps: list[SerialTap] = []
        self._socks: list[socket.socket] = []
        self._partial = ""  # the line the snapshot cut in two, glued to each clone's first

    def __enter__(self) -> Self:
        # `vmwipe clone` starts QEMUs in their own session and exits; as subreaper
        # they become our children, so we can kill *and reap* them by PID.
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kill_clones(self) -> None:
        for tap in self._taps:
            tap.close()
        self._taps.clear()
        for s in self._socks:
            s.close()
        self._socks.clear()
        for pid in self._pids:
            _kill_pid(pid)
        self._pids.clear()
        for qp in self._procs:
            qp.kill()
        self._procs.clear()

    def close(self) -> None:
        """Kill every QEMU this scenario started (by PID), remove the work directory."""
        self._kill_clones()
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        _prctl(_PR_SET_CHILD_SUBREAPER, 0)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.snapshot.unlink()

    def _original_args(self, cpu: str) -> tuple[str, ...]:
        """The original's extra QEMU arguments: serial port 1 and the agent's QMP socket."""
        return ("-cpu", cpu,
                "-chardev", f"socket,id=drbg,path={self.dir}/drbg.sock,server=on,wait=off",
                "-serial", "chardev:drbg",
                "-qmp", f"unix:{self.dir}/agent.qmp,server=on,wait=off")

    def _tap_original(self) -> SerialTap:
        self.tap = SerialTap(f"{self.dir}/drbg.sock", log=self.dir / "original.ttyS1")
        return self.tap

    def _save(self) -> dict[str, Any]:
        """`vmwipe save` of the original, as a user runs it; its JSON report."""
        r = run_cli("save", "--qmp", f"{self.dir}/agent.qmp", "--to", str(self.snapshot),
                    "--paused", "--json")
        if r.returncode != 0:
            raise GuestError(f"vmwipe save failed: {r.stderr.strip()}")
        report: dict[str, Any] = json.loads(r.stdout)
        return report

    def _attach(self, directory: Path, i: int) -> SerialTap:
        tap = SerialTap(f"{directory}/drbg-{i}.sock", prefix=self._partial,
                        log=directory / f"clone-{i}.ttyS1")
        self._taps.append(tap)
        return tap

    def _restore_plain(self, directory: Path, i: int, argv: list[str],
                       what: str) -> QemuProcess:
        """migrate-incoming and nothing else, left paused: what a hypervisor without vmwipe does."""
        qp = start_qemu(argv, str(directory / f"clone-{i}.qmp"),
                        log_path=str(directory / f"clone-{i}.log"),
                        paused=True, incoming_defer=True)
        self._procs.append(qp)
        with QMPSession(qp.qmp_path) as s:
            s.cmd("migrate-incoming", {"uri": prepare_incoming(s, str(self.snapshot))})
            _wait_loaded(s)
            if s.cmd("query-migrate").get("status") != "completed":
                raise GuestError(f"{what}: load failed: {qp.log_tail()}")
        return qp

    @staticmethod
    def _cont(qmp_paths: Iterable[str]) -> list[float]:
        """`cont` each clone in turn; when each returned (host monotonic seconds)."""
        conts: list[float] = []
        for q in qmp_paths:
            with QMPSession(q) as s:
                s.cmd("cont")
                conts.append(time.monotonic())
        return conts


class Scenario(CloneLab):
    """Boot once, snapshot once, then resume the snapshot in each mode.  A context manager.

    `log` gets one human-readable line per step, saying what it proves.
    """

    def __init__(self, clones: int = 4, outputs: int = 1000, *, log: Log | None = None,
                 workdir: Path | None = None, accel: str | None = None,
                 cpu: str = CPU, collect_timeout: float = 180) -> None:
        if clones < 2:
            raise ValueError("at least 2 clones are needed to compare them")
        if outputs < 1:
            raise ValueError("outputs must be positive")
        self.n = clones
        self.k = outputs
        self.log: Log = log or (lambda msg: None)
        super().__init__(workdir or Path(tempfile.mkdtemp(prefix="vmwipe-e2e.")),
                         own_dir=workdir is None)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.accel = accel or default_accel()
        self.cpu = cpu
        self.collect_timeout = collect_timeout
        self.image: GuestImage | None = None
        self._cut = 0  # index of the first line the original printed after the snapshot
        self._table: list[tuple[int, int]] = []  # zero ranges
        self._fills: list[tuple[int, int]] = []  # fill ranges (the kernel CRNG): host bytes
        self._guid = ""
        self._pre_epochs: set[str] = set()
        self._original_after: list[Output] = []
        kernel = default_kernel()
        self.result = ScenarioResult(clones, outputs, self.accel,
                                     kernel.release if kernel else "?", cpu)

    # -- steps --------------------------------------------------------------------------
    def run(self, modes: Sequence[str] = MODES) -> ScenarioResult:
        """All steps; the result's claims are evaluated at the end."""
        t0 = time.monotonic()
        self.boot()
        self.save()
        for mode in modes:
            t = time.monotonic()
            if mode == "vmwipe":
                self.run_vmwipe()
                self.run_original_after()
            else:
                self.run_plain(mode)
            self.result.timings_s[mode] = round(time.monotonic() - t, 1)
        self.result.timings_s["total"] = round(time.monotonic() - t0, 1)
        self.result.evaluate()
        return self.result

    def boot(self) -> None:
        t = time.monotonic()
        kernel = default_kernel()
        if kernel is None:
            raise GuestError("no installed kernel with headers")
        self.log(f"building the guest image for {kernel.release} (cached after the first run)")
        self.image = build_guest_image(kernel)
        extra = self._original_args(self.cpu)
        self.log(f"booting the guest: Debian {kernel.release}, 512 MiB, 1 vCPU ({self.cpu}), "
                 f"{self.accel}, "
                 "vmgenid, vmwipe SSDT + reset-time zero page")
        g = Guest(GuestConfig(self.image, cpus=1, accel=self.accel, extra_args=extra))
        self.guest = g.__enter__()
        tap = self._tap_original()
        con = self._console(g)
        con.check("insmod /vmwipe.ko")
        con.check("stty -F /dev/ttyS1 raw -echo")
        con.check("cat /dev/kmsg > /dev/ttyS1 &")
        con.check("vmwipe_test poll 3600000 > /tmp/poll.out 2>&1 &")
        con.check(f"drbg_stream -i {DRBG_INTERVAL_MS} > /dev/ttyS1 2>/tmp/drbg.err &")
        tap.wait_outputs(200, 60)
        self._guid = str(g.qmp("query-vm-generation-id")["guid"])
        self.result.timings_s["boot"] = round(time.monotonic() - t, 1)
        self.log("guest up: vmwipe.ko loaded, drbg_stream emitting (state in a vmwipe page), "
                 "a poll() waiter on /dev/vmwipe, /dev/kmsg copied to the same port")

    @staticmethod
    def _console(g: Guest) -> Console:
        assert g.console is not None
        return g.console

    def save(self) -> None:
        assert self.guest is not None and self.tap is not None
        g = self.guest
        self.log("snapshot: `vmwipe save` stops the running guest and writes its state "
                 "(DRBG key, counter and epoch included)")
        rep = self._save()
        time.sleep(0.3)  # let the tap drain what QEMU wrote before the stop
        lines, self._partial = self.tap.snapshot()
        self._cut = len(lines)
        pre = parse_lines(lines)
        if not pre.outputs:
            raise GuestError("the DRBG printed nothing before the snapshot")
        self.result.old_epoch = pre.outputs[-1].epoch
        self.result.last_pre_counter = pre.outputs[-1].counter
        self.result.pre_snapshot_outputs = len(pre.outputs)
        self._pre_epochs = {o.epoch for o in pre.outputs}
        self.result.save_ms = round(sum(rep["timings_ms"].values()), 1)
        self.result.snapshot_bytes = self.snapshot.stat().st_size
        table = g.table()
        self._table = table.ranges()
        self._fills = [(f.gpa, f.length) for f in table.fills]
        self.log(f"  saved {self.result.snapshot_bytes >> 20} MiB in {self.result.save_ms:.0f} ms "
                 f"after {len(pre.outputs)} outputs; last epoch {self.result.old_epoch}, counter "
                 f"{pre.outputs[-1].counter}; {sum(s for _g, s in self._table) // PAGE} pages "
                 "listed in the vmwipe table")

    def _collect(self, runs: list[CloneRun], taps: list[SerialTap],
                 starts: list[int], conts: list[float]) -> None:
        for r, tap, start, t_cont in zip(runs, taps, starts, conts, strict=True):
            tap.wait_outputs(self.k, self.collect_timeout, after=start or 0)
            lines, _ = tap.snapshot()
            st = parse_lines(lines[start:])
            r.outputs = st.outputs[:self.k]
            r.garbage_lines = st.garbage
            if st.outputs:
                r.first_output_ms = round((st.outputs[0].t - t_cont) * 1000, 1)
            if st.reseeds:
                t, before = st.reseeds[0]
                r.reseed_ms = round((t - t_cont) * 1000, 1)
                r.reseed_outputs = before

    def run_vmwipe(self) -> None:
        assert self.guest is not None
        d = self.dir / "vmwipe"
        self.log(f"vmwipe: `vmwipe clone` loads the snapshot into {self.n} new QEMUs (-S), reads "
                 "each one's table, zeroes and verifies the listed pages, and leaves it paused")
        argv = clone_argv(self.guest.qemu_args(), d, "auto")
        # Run it as a user would, and relay its progress (clone i/N, pages wiped) live.
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmwipe.host_agent.cli", "clone", str(self.snapshot),
             "-n", str(self.n), "--dir", str(d), "--paused", "--json", "--", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None and proc.stdout is not None
        err: list[str] = []
        try:
            for line in proc.stderr:
                err.append(line)
                self.log(f"  vmwipe clone: {line.rstrip()}")
            stdout = proc.stdout.read()
            proc.wait()
        except BaseException:
            # SIGTERM makes `vmwipe clone` kill every QEMU it started, then exit.
            proc.terminate()
            proc.wait(30)
            raise
        if proc.returncode != 0:
            raise GuestError(f"vmwipe clone failed ({proc.returncode}): {''.join(err[-5:])}")
        clones = json.loads(stdout)["clones"]
        self._pids += [int(c["pid"]) for c in clones]
        runs: list[CloneRun] = []
        for c in clones:
            rep = c["report"]
            timings = {k: float(v) for k, v in rep["timings_ms"].items()}
            run = CloneRun("vmwipe", int(c["index"]), int(c["pid"]),
                           pages_wiped=int(rep["wipe"]["pages"]), agent_timings_ms=timings)
            runs.append(run)
        self.result.runs["vmwipe"] = runs
        self._integrity(clones, runs)
        taps = [self._attach(d, r.index) for r in runs]
        conts: list[float] = []
        for c, run in zip(clones, runs, strict=True):
            with QMPSession(c["qmp"]) as s:
                t = time.monotonic()
                s.cmd("cont")
                conts.append(time.monotonic())
            after_load = sum(v for k, v in run.agent_timings_ms.items()
                             if k not in ("start", "load"))
            run.paused_ms = round(after_load + (conts[-1] - t) * 1000, 1)
        self.log(f"  continued all {self.n} clones; collecting {self.k} outputs from each")
        self._collect(runs, taps, [0] * len(runs), conts)
        for run in runs:
            self._check_clone(d, run)
        self.log("  -> each clone is told (poll() wakes, sysfs generation 1) and runs on normally")
        self.result.runs["vmwipe"] = runs
        self._kill_clones()

    def _integrity(self, clones: list[dict[str, Any]], runs: list[CloneRun]) -> None:
        """Hash all RAM except the listed pages and host fields: snapshot vs. each wiped clone.

        The "before" image is the original, paused at the save: exactly the
        state each clone loaded, except the 16-byte vmgenid GUID QEMU writes
        into guest RAM while loading (found by its value and masked too).
        """
        assert self.guest is not None
        base = self.guest.region.base
        exclude = [*self._table, *self._fills, (base + WIPE_GENERATION_OFFSET, HOST_FIELDS_SIZE)]
        self.log("integrity: hashing all guest RAM of each paused clone except the listed pages, "
                 f"the {len(self._fills)} fill ranges (the kernel CRNG, refilled) and the "
                 "header's host fields, against the snapshot's")
        guids: list[bytes] = []
        for c in clones:
            with QMPSession(c["qmp"]) as s:
                guids.append(uuid.UUID(str(s.cmd("query-vm-generation-id")["guid"])).bytes_le)
        # QEMU wrote each clone's GUID at the same firmware-chosen address while loading.
        hits = find_in_ram(clones[0]["qmp"], guids[0])
        spans = [(h, 16) for h in hits]
        for c, guid in zip(clones[1:], guids[1:], strict=True):
            if [read_gpa(c["qmp"], h, 16) for h in hits] != [guid] * len(hits):
                spans += [(h, 16) for h in find_in_ram(c["qmp"], guid)]
        ref = ram_digest(f"{self.dir}/agent.qmp", [*exclude, *spans])
        for c, run in zip(clones, runs, strict=True):
            t = time.monotonic()
            digest = ram_digest(c["qmp"], [*exclude, *spans])
            hash_s = time.monotonic() - t
            zero = all(read_gpa(c["qmp"], gpa, size) == bytes(size) for gpa, size in self._table)
            orig_nonzero = any(read_gpa(f"{self.dir}/agent.qmp", gpa, size) != bytes(size)
                               for gpa, size in self._table)
            host = read_gpa(c["qmp"], base + WIPE_GENERATION_OFFSET, HOST_FIELDS_SIZE)
            run.integrity = {
                "digest_before": ref, "digest_after": digest, "identical": digest == ref,
                "listed_zero": zero, "listed_nonzero_in_snapshot": orig_nonzero,
                "wipe_generation": int.from_bytes(host[:8], "little"),
                "vmgenid_guid_at": [hex(g) for g, _n in spans],
                "hash_s": round(hash_s, 2),
            }
            self.log(f"  clone {run.index}: sha256 {digest[:16]}… "
                     f"{'==' if digest == ref else '!='} snapshot {ref[:16]}…, listed pages "
                     f"{'zero' if zero else 'NOT ZERO'}, wipe_generation "
                     f"{run.integrity['wipe_generation']}")
        self.log("  -> the wipe changed nothing but the listed pages, the fill ranges and the 16 "
                 "header bytes the host owns, and the secret pages are zero before a single "
                 "guest instruction ran")

    def _check_clone(self, d: Path, run: CloneRun) -> None:
        """Inside the clone: the poll() waiter woke, sysfs generation moved, the guest is fine."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(f"{d}/con-{run.index}.sock")
        self._socks.append(s)
        con = Console(s.makefile("rb"), s.makefile("wb"), d / f"clone-{run.index}.ttyS0")
        deadline = time.monotonic() + 30
        while True:
            poll = con.check("cat /tmp/poll.out", 30)
            if "POLL OK" in poll or "POLL FAIL" in poll or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        m = re.search(r"POLL WOKE gen=(\d+) zero=(\d)", poll)
        gen = int(con.check(f"cat {SYSFS}/generation", 30).strip() or -1)
        run.notification = {
            "poll_woke": m is not None, "poll_generation": int(m.group(1)) if m else None,
            "poll_page_zero": bool(m and m.group(2) == "1"), "poll_ok": "POLL OK" in poll,
            "generation": gen,
        }
        shell = con.run("echo alive", 30)
        dmesg = con.check("dmesg", 30)
        run.health = {"shell": shell.rc == 0 and "alive" in shell.output,
                      "oops": len(OOPS.findall(dmesg))}
        self.log(f"  clone {run.index}: poll() woke at generation "
                 f"{run.notification['poll_generation']} (its page zero: "
                 f"{run.notification['poll_page_zero']}), sysfs generation {gen}, shell "
                 f"{'answers' if run.health['shell'] else 'SILENT'}, "
                 f"{run.health['oops']} oops in dmesg")

    def run_original_after(self) -> None:
        """The original continues (no wipe): its post-snapshot values must not be a clone's."""
        assert self.guest is not None and self.tap is not None
        self.log(f"original: continued after the snapshot, collecting {self.k} more outputs")
        self.guest.qmp("cont")
        self.tap.wait_outputs(self.k, self.collect_timeout, after=self._cut)
        lines, _ = self.tap.snapshot()
        after = parse_lines(lines[self._cut:]).outputs[:self.k]
        self._original_after = after
        self.result.original_after = len(after)
        self.guest.qmp("stop")  # frees the CPU for the next clones
        self._analyse("vmwipe")

    def run_plain(self, mode: str) -> None:
        """Resume N copies with no agent: migrate-incoming, cont.  `vmgenid` gets new GUIDs."""
        assert self.guest is not None
        d = self.dir / mode
        d.mkdir(exist_ok=True)
        guid = "auto" if mode == "vmgenid" else self._guid
        what = ("new vmgenid GUID each: the kernel CRNG reseeds after resume, userspace is "
                "untouched" if mode == "vmgenid" else
                "same vmgenid GUID: nothing tells the guest it was cloned")
        self.log(f"{mode}: {self.n} plain restores (migrate-incoming + cont, no wipe); {what}")
        runs: list[CloneRun] = []
        taps: list[SerialTap] = []
        for i in range(self.n):
            argv = clone_argv(self.guest.qemu_args(), d, guid, str(i))
            qp = self._restore_plain(d, i, argv, f"{mode} clone {i}")
            runs.append(CloneRun(mode, i, qp.pid))
            taps.append(self._attach(d, i))
        conts = self._cont(qp.qmp_path for qp in self._procs)
        self.log(f"  continued all {self.n}; collecting {self.k} outputs from each")
        self._collect(runs, taps, [0] * len(runs), conts)
        self.result.runs[mode] = runs
        self._kill_clones()
        self._analyse(mode)
        if mode == "vmgenid":
            for r in runs:
                self.log(f"  clone {r.index}: kernel logged '{RESEED_MSG}' "
                         f"{r.reseed_ms} ms after cont; {r.reseed_outputs} DRBG outputs had "
                         "left by then, and the DRBG never noticed at all")
            self.log("  -> vmgenid fixes the kernel's own CRNG, late; state in userspace stays "
                     "duplicated. With vmwipe the window is zero: the first instruction after "
                     "resume already sees the wiped page")

    def _analyse(self, mode: str) -> None:
        runs = self.result.runs[mode]
        a = analyse(self._pre_epochs, [r.outputs for r in runs],
                    self._original_after)
        self.result.analyses[mode] = a
        old = ", ".join(str(c.old_epoch_outputs) for c in a.clones)
        if mode == "vmwipe":
            self.log(f"  vmwipe: {a.shared_new_values} post-resume values shared between clones, "
                     f"{a.new_values_in_original} shared with the original; old-epoch values "
                     f"after resume per clone: {old} (at most 1 = the one in flight)")
            self.log("  -> each clone's DRBG found its page zeroed at its first look and reseeded "
                     "(new epoch, counter 0): no clone continued the snapshot's secret stream")
        else:
            self.log(f"  {mode}: {a.shared_values} values emitted by 2+ clones "
                     f"({a.duplicate_outputs} duplicate outputs); old-epoch outputs per clone: "
                     f"{old}")
            if mode == "plain":
                self.log("  -> without the wipe every clone continues the same secret stream: "
                         "the measurement can fail, and does")
