"""The guest kernel's TCP keys across clones (issue 26), measured with a real kernel and QEMU.

One boot (`-cpu qemu64`: no RDRAND; no vmgenid device), one established
TCP connection over the guest's loopback (`tcp_keys pair`), and two rounds
of `vmwipe save` + `vmwipe clone -n N` of that one running guest:

- **crng-only**: vmwipe.ko loaded with `ksecrets_refresh=0`, so the wipe
  refreshes the kernel CRNG and nothing else (protocol v2 before issue 26);
- **ksecrets**: the same guest after `rmmod; insmod vmwipe.ko` with the
  defaults: net_secret (and ts_secret where the kernel has one) and ptr_key
  are registered as fill ranges and refilled in every clone.

In each clone, `tcp_keys sample` opens connections with one fixed 4-tuple on
127.0.0.1 and prints the part of each ISN that net_secret decides
(`ISN - (CLOCK_REALTIME ns >> 6)`) and the timestamp offset; the established
connection must still carry a line each way; and /proc/net/tcp prints that
connection's socket through %pK, hashed with ptr_key.  Every QEMU started
here is killed by its PID before `close()` returns (`e2e.CloneLab`).
"""

from __future__ import annotations

import json
import re
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .build import GuestImage, build_guest_image, default_kernel
from .e2e import CloneLab, Log, clone_argv, run_cli
from .guest import Console, Guest, GuestConfig, GuestError, default_accel
from .shell import sh, start, wait_output

CPU = "qemu64"
SYSFS = "/sys/class/misc/vmwipe"
LPORT, SPORT, PAIR_PORT = 5500, 5501, 5600
#: Two ISN key parts within this many 64-ns ticks (67 ms) count as one key: the
#: jitter of connect() under TCG is well inside it, and two independent keys land
#: this close with odds of 2^-11.
ISN_CLOSE = 1 << 20
#: Timestamp offsets are in ms; one key gives the same offset give or take a tick.
TS_CLOSE = 2
KEYS = re.compile(r"^KEYS (\d+) (\d+)$", re.MULTILINE)
HASHED = re.compile(r"[0-9a-f]{8,16}")  # a %p hash, not "(____ptrval____)"
#: The two rounds, in the order they run on one boot.
MODES = ("crng-only", "ksecrets")


@dataclass
class CloneKeys:
    """What one clone's kernel made of the fixed 4-tuple, and whether the old connection lives."""

    isn: int  # the median ISN key part of its samples
    ts: int  # the median timestamp offset
    isn_spread: int  # max - min of its own samples: the jitter
    sk_hash: str  # the established socket's %pK in /proc/net/tcp
    echo_ok: bool
    kernel_secrets: str  # its sysfs kernel_secrets


@dataclass
class RoundResult:
    """One round: N clones of one saved image, compared pairwise."""

    mode: str
    clones: list[CloneKeys] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)  # each clone's "kernel secrets" summary

    @staticmethod
    def _close(a: int, b: int, within: int) -> bool:
        d = (a - b) % (1 << 32)
        return min(d, (1 << 32) - d) < within

    def pairs(self) -> list[tuple[CloneKeys, CloneKeys]]:
        c = self.clones
        return [(c[i], c[j]) for i in range(len(c)) for j in range(i + 1, len(c))]

    @property
    def isn_agree(self) -> int:
        """Pairs of clones whose ISN key parts agree (within jitter)."""
        return sum(self._close(a.isn, b.isn, ISN_CLOSE) for a, b in self.pairs())

    @property
    def ts_agree(self) -> int:
        return sum(self._close(a.ts, b.ts, TS_CLOSE) for a, b in self.pairs())

    @property
    def ptr_agree(self) -> int:
        return sum(a.sk_hash == b.sk_hash for a, b in self.pairs())

    def summary(self) -> str:
        n = len(self.pairs())
        return (f"{self.mode:10} {len(self.clones)} clones: pairs agreeing on the ISN key part "
                f"{self.isn_agree}/{n}, timestamp offset {self.ts_agree}/{n}, %p hash "
                f"{self.ptr_agree}/{n}; max ISN jitter in a clone "
                f"{max(c.isn_spread for c in self.clones)} ticks; established connection "
                f"alive in {sum(c.echo_ok for c in self.clones)}/{len(self.clones)}")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "isn_agree": self.isn_agree, "ts_agree": self.ts_agree,
                "ptr_agree": self.ptr_agree, "pairs": len(self.pairs()),
                "clones": [c.__dict__ for c in self.clones], "reports": self.reports}


def sk_hash(tcp_table: str, port: int) -> str:
    """The %pK socket column of the /proc/net/tcp row whose local port is `port`."""
    for line in tcp_table.splitlines()[1:]:
        f = line.split()
        if len(f) > 11 and f[1].endswith(f":{port:04X}"):
            return f[11]
    raise GuestError(f"no socket on local port {port} in /proc/net/tcp:\n{tcp_table}")


class KsecretsScenario(CloneLab):
    """Boot once; `run_round(mode)` saves the guest and compares N clones.  A context manager."""

    def __init__(self, image: GuestImage, clones: int = 3, samples: int = 3) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="vmwipe-ksecrets.")), own_dir=True)
        self.image = image
        self.n = clones
        self.samples = samples
        self.original_sysfs = ""

    def boot(self) -> None:
        g = Guest(GuestConfig(self.image, cpus=1, accel=default_accel(),
                              extra_args=self._original_args(CPU), vmgenid=False))
        self.guest = g.__enter__()
        self._tap_original()
        for cmd in self.image.insmod_commands(" ksecrets_refresh=0"):
            sh(g, cmd)
        sh(g, "ip link set lo up")
        start(g, "pair", f"tcp_keys pair {PAIR_PORT}")
        wait_output(g, "pair", r"^PAIR READY$")
        # ptr_key is drawn at the first %p after the CRNG is ready (lazily on 6.1, which
        # prints "(____ptrval____)" until then): draw it before any snapshot
        deadline = time.monotonic() + 30
        while not HASHED.fullmatch(sk_hash(sh(g, "cat /proc/net/tcp"), PAIR_PORT)):
            if time.monotonic() > deadline:
                raise GuestError("%pK in /proc/net/tcp is still not hashed after 30 s")
            time.sleep(0.2)

    def load(self, args: str) -> str:
        """Reload vmwipe.ko with `args` in the running original; its sysfs kernel_secrets."""
        assert self.guest is not None
        sh(self.guest, f"rmmod vmwipe && insmod /vmwipe.ko {args}".rstrip())
        self.original_sysfs = sh(self.guest, f"cat {SYSFS}/kernel_secrets")
        return self.original_sysfs

    def _clone(self, d: Path) -> tuple[list[str], list[str]]:
        assert self.guest is not None
        argv = clone_argv(self.guest.qemu_args(), d, "auto")
        r = run_cli("clone", str(self.snapshot), "-n", str(self.n), "--dir", str(d), "--json",
                    "--paused", "--", *argv, timeout=600)
        if r.returncode != 0:
            raise GuestError(f"vmwipe clone failed ({r.returncode}): {r.stderr[-500:]}")
        clones = json.loads(r.stdout)["clones"]
        self._pids += [int(c["pid"]) for c in clones]
        reports = [c["report"]["wipe"]["ksecrets"]["summary"] for c in clones]
        return [str(c["qmp"]) for c in clones], reports

    def _measure(self, con: Console) -> CloneKeys:
        out = con.check(f"tcp_keys sample {LPORT} {SPORT} {self.samples}", 60)
        got = [(int(a), int(b)) for a, b in KEYS.findall(out)]
        if len(got) != self.samples:
            raise GuestError(f"tcp_keys sample printed {out!r}")
        isns = [a for a, _b in got]
        con.check("kill -USR1 $(cat /tmp/pair.pid)", 30)
        echo = ""
        for _ in range(50):
            echo = con.check("cat /tmp/pair.out", 30)
            if "ECHO" in echo:
                break
        return CloneKeys(
            isn=int(statistics.median_low(isns)), ts=int(statistics.median_low(b for _a, b in got)),
            isn_spread=max(isns) - min(isns),
            sk_hash=sk_hash(con.check("cat /proc/net/tcp", 30), PAIR_PORT),
            echo_ok="ECHO ok 1" in echo and "FAIL" not in echo,
            kernel_secrets=con.check(f"cat {SYSFS}/kernel_secrets", 30))

    def run_round(self, mode: str) -> RoundResult:
        """`vmwipe save` the running original, `vmwipe clone` it N times, measure each clone."""
        assert self.guest is not None
        self.snapshot.unlink(missing_ok=True)
        self._save()  # leaves the original paused
        d = self.dir / mode
        d.mkdir(mode=0o700)
        qmps, reports = self._clone(d)
        res = RoundResult(mode, reports=reports)
        self._cont(qmps)
        for i in range(self.n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(f"{d}/con-{i}.sock")
            self._socks.append(s)
            con = Console(s.makefile("rb"), s.makefile("wb"), d / f"clone-{i}.ttyS0")
            res.clones.append(self._measure(con))
        self._kill_clones()
        self.guest.qmp("cont")
        return res


def run_rounds(sc: KsecretsScenario, log: Log | None = None) -> dict[str, RoundResult]:
    """Boot, the crng-only round, reload with the defaults, the ksecrets round (the test's and
    the demo's sequence)."""
    say: Log = log or (lambda msg: None)
    say(f"kernel secrets: booting; {sc.n} clones with ksecrets_refresh=0")
    sc.boot()
    out = {"crng-only": sc.run_round("crng-only")}
    say("  " + out["crng-only"].summary())
    sc.load("")
    say(f"kernel secrets: vmwipe.ko reloaded with the defaults; {sc.n} clones")
    out["ksecrets"] = sc.run_round("ksecrets")
    say("  " + out["ksecrets"].summary())
    return out


def run(clones: int = 3, log: Log | None = None, image: GuestImage | None = None
        ) -> dict[str, Any]:
    """One boot of the default kernel, both rounds; JSON-ready, with the verdicts.

    `ok_crng_only_shares`: the baseline is not vacuous (some pair agrees on some key);
    `ok_refill`: with the refill no pair agrees on any; `ok_connection`: the established
    connection carried data in every clone of both rounds.
    """
    if image is None:
        kernel = default_kernel()
        if kernel is None:
            raise GuestError("no installed kernel with headers")
        image = build_guest_image(kernel)
    t0 = time.monotonic()
    with KsecretsScenario(image, clones=clones) as sc:
        res = run_rounds(sc, log)
        sysfs = sc.original_sysfs
    base, refill = res["crng-only"], res["ksecrets"]
    return {"kernel": image.kernel.release, "clones": clones, "original_sysfs": sysfs,
            "rounds": [res[m].to_dict() for m in MODES],
            "ok_crng_only_shares": base.isn_agree + base.ts_agree + base.ptr_agree > 0,
            "ok_refill": refill.isn_agree == refill.ts_agree == refill.ptr_agree == 0,
            "ok_connection": all(c.echo_ok for r in res.values() for c in r.clones),
            "seconds": round(time.monotonic() - t0, 1)}
