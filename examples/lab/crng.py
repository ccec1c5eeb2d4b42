"""The guest kernel's CRNG across clones (issue 15), measured with a real kernel and QEMU.

One boot per setting of the vmgenid device and of vmwipe.ko's `crng_refresh`
(`-cpu qemu64`: no RDRAND, so nothing but the host can make clones diverge
early).  In the guest, vmwipe.ko and `crng_stream`: every 2 ms a
getrandom() draw, a /proc/sys/kernel/random/uuid read and, on 6.11+, a vDSO
getrandom() draw; a 32-byte getrandom() reseed key whenever its vmwipe page
reads zero.  Its lines go to a second serial port whose socket is connected
before `cont`, so everything a clone prints after resume is collected.

`vmwipe save`, then N clones of that one file in each mode:

- **v2**: `vmwipe clone -n N` with `crng_refresh=1`: zero ranges zeroed, fill
  ranges (the kernel CRNG) refilled with fresh host bytes, verified,
  committed, then `cont`;
- **v1**: the same with `crng_refresh=0`: the module registers no fill range
  and forces no reseed, so the wipe is what v1 did (zero ranges only);
- **vmgenid**: no wipe, a plain restore with a new vmgenid GUID (only with
  the device and `crng_refresh=0`): the kernel reseeds itself some time after
  resume.

Which draws were made after resume: a clone prints lines that were drawn
before the snapshot too (still in its tty buffer, or in flight in the
iteration the VM stopped in).  A wiped clone marks the boundary itself: its K
line's iteration began after resume (it found the page zeroed, which happened
before its first instruction), and so did every later one.  A draw is
*duplicated* when two clones printed it from such an iteration; for a clone
with no K (vmgenid alone) every line counts.  The claim for v2: every clone
reseeds, and no draw after resume -- reseed keys included -- is duplicated.
Every QEMU started here is killed by its PID before `close()` returns.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .build import GuestImage, build_guest_image, default_kernel
from .e2e import CloneLab, Log, SerialTap, clone_argv, run_cli
from .guest import Guest, GuestConfig, GuestError, default_accel

CPU = "qemu64"
LINE = re.compile(r"([GUVK]) (\d+) ([0-9a-f-]+)")
KINDS = ("G", "U", "V", "K")
KIND_NAMES = {"G": "getrandom()", "U": "random/uuid", "V": "vDSO getrandom()",
              "K": "reseed key (getrandom(32) on a zeroed page)"}
SYSFS = "/sys/class/misc/vmwipe"


@dataclass
class ModeResult:
    """One mode's N clones, compared with each other."""

    mode: str
    vmgenid: bool
    clones: int
    draws: dict[str, int] = field(default_factory=dict)  # kind -> lines after resume, all clones
    duplicated: dict[str, int] = field(default_factory=dict)  # kind -> lines shared by >= 2
    max_dup_per_clone: dict[str, int] = field(default_factory=dict)
    window_ms: float | None = None  # last duplicated line after `cont`, max over the clones
    collected_ms: float = 0.0  # how long the clones were collected after `cont`
    #: lines printed after `cont` from iterations begun before the snapshot, max per clone
    carried_max: int = 0

    @property
    def ok_v2(self) -> bool:
        """The v2 claim: every clone reseeded (printed a K), and no draw made after resume,
        reseed keys included, was printed by two clones."""
        return not any(self.duplicated.values()) and self.draws.get("K", 0) >= self.clones


def analyse(mode: str, vmgenid: bool, clones: Sequence[Sequence[tuple[float, str]]],
            conts: Sequence[float]) -> ModeResult:
    """Pure: which values two or more clones drew after resume, and until when."""
    res = ModeResult(mode, vmgenid, len(clones))
    owners: dict[tuple[str, str], set[int]] = defaultdict(set)
    parsed: list[list[tuple[float, str, str]]] = []
    for i, lines in enumerate(clones):
        rows = [(t, m[1], int(m[2]), m[3]) for t, line in lines
                if (m := LINE.fullmatch(line.strip()))]
        cut = min((seq for _t, kind, seq, _v in rows if kind == "K"), default=None)
        mine = [(t, kind, v) for t, kind, seq, v in rows if cut is None or seq >= cut]
        res.carried_max = max(res.carried_max, len(rows) - len(mine))
        for _t, kind, v in mine:
            owners[(kind, v)].add(i)
        parsed.append(mine)
    last_dup: list[float] = []
    for i, mine in enumerate(parsed):
        per_kind: dict[str, int] = defaultdict(int)
        for t, kind, value in mine:
            res.draws[kind] = res.draws.get(kind, 0) + 1
            if len(owners[(kind, value)]) > 1:
                per_kind[kind] += 1
                res.duplicated[kind] = res.duplicated.get(kind, 0) + 1
                last_dup.append((t - conts[i]) * 1000)
        for kind in {k for _t, k, _v in mine}:
            res.max_dup_per_clone[kind] = max(res.max_dup_per_clone.get(kind, 0),
                                              per_kind.get(kind, 0))
    if last_dup:
        res.window_ms = round(max(last_dup), 1)
    if parsed and any(parsed):
        res.collected_ms = round(min((m[-1][0] - c) * 1000 for m, c in zip(parsed, conts,
                                                                           strict=True) if m), 1)
    return res


def wait_draws(tap: SerialTap, n: int, timeout: float) -> None:
    """Until the tap has `n` getrandom() lines (TCG on a shared 2-core machine is slow)."""
    deadline = time.monotonic() + timeout
    while sum(1 for _t, ln in tap.snapshot()[0] if ln.startswith("G ")) < n:
        if time.monotonic() > deadline:
            tail = "\n".join(ln for _t, ln in tap.snapshot()[0][-5:])
            raise GuestError(f"fewer than {n} draws in {timeout} s; tail:\n{tail}")
        time.sleep(0.1)


class CrngScenario(CloneLab):
    """Boot once (`vmgenid` or not), save once, resume N clones per mode.  A context manager.

    The QEMU bookkeeping (clones killed by PID in `close()`) is `e2e.CloneLab`'s.
    """

    def __init__(self, vmgenid: bool, clones: int = 4, draws: int = 150, *,
                 log: Log | None = None, image: GuestImage | None = None,
                 accel: str | None = None, crng_refresh: bool = True) -> None:
        self.vmgenid = vmgenid
        self.n = clones
        self.k = draws
        self.log: Log = log or (lambda msg: None)
        super().__init__(Path(tempfile.mkdtemp(prefix="vmwipe-crng.")), own_dir=True)
        self.accel = accel or default_accel()
        self.crng_refresh = crng_refresh
        kernel = default_kernel()
        if image is None:
            if kernel is None:
                raise GuestError("no installed kernel with headers")
            image = build_guest_image(kernel)
        self.image = image
        self.sysfs_state = ""
        self.dmesg = ""
        self.clone_reports: list[dict[str, Any]] = []  # `vmwipe clone --json`'s, last run

    def boot_and_save(self) -> None:
        extra = self._original_args(CPU)
        self.log(f"booting ({CPU}, {'with' if self.vmgenid else 'without'} vmgenid, "
                 f"crng_refresh={int(self.crng_refresh)})")
        g = Guest(GuestConfig(self.image, cpus=1, accel=self.accel, extra_args=extra,
                              vmgenid=self.vmgenid))
        self.guest = g.__enter__()
        tap = self._tap_original()
        assert g.console is not None
        param = "" if self.crng_refresh else " crng_refresh=0"
        for cmd in self.image.insmod_commands(param):
            g.console.check(cmd)
        self.sysfs_state = g.console.check(f"cat {SYSFS}/crng_refresh").strip()
        self.dmesg = g.console.check("dmesg | grep 'kernel CRNG' || true").strip()
        g.console.check("stty -F /dev/ttyS1 raw -echo")
        g.console.check("crng_stream -i 2 > /dev/ttyS1 2>/tmp/crng.err &")
        wait_draws(tap, 50, 60)
        self._save()
        time.sleep(0.3)
        _lines, self._partial = tap.snapshot()
        self.log(f"  saved; sysfs crng_refresh: {self.sysfs_state}")

    def _clone_cli(self, d: Path, argv: list[str]) -> list[str]:
        """`vmwipe clone -n N` as a user runs it; the clones' QMP sockets."""
        r = run_cli("clone", str(self.snapshot), "-n", str(self.n), "--dir", str(d), "--json",
                    "--paused", "--", *argv, timeout=600)
        if r.returncode != 0:
            raise GuestError(f"vmwipe clone failed ({r.returncode}): {r.stderr[-500:]}")
        clones = json.loads(r.stdout)["clones"]
        self.clone_reports = clones
        self._pids += [int(c["pid"]) for c in clones]
        return [str(c["qmp"]) for c in clones]

    @property
    def modes(self) -> tuple[str, ...]:
        if self.crng_refresh:
            return ("v2",)
        return ("v1", "vmgenid") if self.vmgenid else ("v1",)

    def run_mode(self, mode: str) -> ModeResult:
        """`v2` and `v1` are `vmwipe clone` (which one depends on crng_refresh at boot)."""
        assert self.guest is not None and mode in self.modes
        d = self.dir / mode
        d.mkdir(mode=0o700)  # `vmwipe clone --dir` takes only a private directory
        guid = "auto"
        self.log(f"{mode}: {self.n} clones")
        if mode in ("v2", "v1"):
            qmps = self._clone_cli(d, clone_argv(self.guest.qemu_args(), d, guid))
        else:
            qmps = []
            for i in range(self.n):
                argv = clone_argv(self.guest.qemu_args(), d, guid, str(i))
                qmps.append(self._restore_plain(d, i, argv, f"clone {i}").qmp_path)
        taps = [self._attach(d, i) for i in range(self.n)]
        conts = self._cont(qmps)
        for tap in taps:
            wait_draws(tap, self.k, 120)
        res = analyse(mode, self.vmgenid, [t.snapshot()[0] for t in taps], conts)
        self._kill_clones()
        self.log("  " + summary(res))
        return res


def summary(r: ModeResult) -> str:
    parts = [f"{k} {r.duplicated.get(k, 0)}/{r.draws[k]} dup (max {r.max_dup_per_clone[k]}"
             "/clone)" for k in KINDS if r.draws.get(k)]
    window = "none" if r.window_ms is None else f"{r.window_ms} ms"
    return (f"{r.mode:8} vmgenid={'on ' if r.vmgenid else 'off'} " + "; ".join(parts)
            + f"; shared until {window} after cont (collected {r.collected_ms} ms; "
            f"<= {r.carried_max} lines per clone from before the snapshot)")


#: (vmgenid device, crng_refresh): the four boots that give every mode
BOOTS = ((False, True), (False, False), (True, True), (True, False))


def run(boots: Sequence[tuple[bool, bool]] = BOOTS, clones: int = 4, draws: int = 150,
        log: Log | None = None) -> list[dict[str, Any]]:
    """Every mode of every boot: v2 and v1 with and without vmgenid, and vmgenid alone."""
    out: list[dict[str, Any]] = []
    for vmgenid, refresh in boots:
        with CrngScenario(vmgenid, clones, draws, log=log, crng_refresh=refresh) as sc:
            sc.boot_and_save()
            for mode in sc.modes:
                res = sc.run_mode(mode)
                out.append({**asdict(res), "ok_v2": res.ok_v2, "crng_refresh": sc.sysfs_state})
    return out


if __name__ == "__main__":  # python -m vmwipe.lab.crng
    print(json.dumps(run(log=lambda m: print(m, file=sys.stderr)), indent=1))
