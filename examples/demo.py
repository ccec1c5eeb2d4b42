"""`make demo`: N clones of one running VM never share a DRBG output; without vmwipe they do.

A real Debian kernel boots under QEMU with vmwipe.ko and a ChaCha20 DRBG whose
key, counter and epoch live in a vmwipe page.  The running VM is saved once
and resumed N times in three ways (see vmwipe.lab.e2e for the details):

  vmwipe    `vmwipe clone`: each copy's listed pages are zeroed before it runs
  plain     migrate-incoming + cont, nothing tells the guest it was copied
  vmgenid   the same with a new vmgenid GUID: the kernel reseeds, userspace does not

Then the kernel-CRNG scenario (see vmwipe.lab.crng): a program draws
getrandom(), /proc/sys/kernel/random/uuid and (6.11+) the vDSO getrandom(), and
reseeds with getrandom(32) when its vmwipe page reads zero; N clones per mode,
with protocol v2 (the host refills the kernel CRNG), v1 (zero ranges only) and
vmgenid alone, with and without a vmgenid device.

Then the kernel-secrets scenario (see vmwipe.lab.ksecrets): one boot, clones
with vmwipe v2 refilling the CRNG only (ksecrets_refresh=0), then with the
kernel's TCP and %p keys refilled too; in each clone a program derives the ISN
key part and timestamp offset of one fixed 4-tuple, and /proc/net/tcp shows
a socket's %pK hash. Counted: clone pairs that agree on each.

It prints what each step proves, summary tables, writes demo-out/result.json,
demo-out/vmwipe-demo.png and demo-out/vmwipe-crng.png, and exits 0 only if
every claim held.  The guest CPU is plain qemu64 (no RDRAND).  Every QEMU it
starts is killed by PID before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from vmwipe.lab import crng, ksecrets
from vmwipe.lab.e2e import CPU, MODES, RESEED_MSG, Scenario, ScenarioResult
from vmwipe.lab.shell import missing_prerequisite

INTRO = """\
vmwipe demo: {n} clones of one running VM, {k} DRBG outputs collected from each.
The DRBG keeps key, counter and a random epoch id in a vmwipe page and prints
"epoch counter value". A value computed before the snapshot but printed after
it is the same in every copy (no wipe can reach a register), so claims are
per epoch: values of epochs first seen after resume must never repeat, and
at most one old-epoch value (the one in flight) may appear per clone.
"""


class _Terminated(Exception):
    """SIGTERM: unwind so the scenario kills its QEMUs."""


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def _fmt_list(xs: list[object]) -> str:
    return " ".join("-" if x is None else str(x) for x in xs)


def summary(res: ScenarioResult, out: TextIO) -> None:
    """The human-readable tables: per scenario, per vmwipe clone, the vmgenid window."""
    n, k = res.clones, res.outputs
    how = {"vmwipe": "vmwipe clone: wiped before it ran",
           "plain": "plain restore, same vmgenid GUID",
           "vmgenid": "plain restore, new vmgenid GUID"}
    print(f"\nSummary: {n} clones x {k} outputs, one snapshot, {res.accel} ({res.cpu}), "
          f"kernel {res.kernel}", file=out)
    hdr = (f"{'scenario':<9} {'resumed by':<34} {'old-epoch outputs per clone':<28} "
           f"{'values in 2+ clones':>22}")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for mode in MODES:
        a = res.analyses.get(mode)
        if a is None:
            continue
        old = _fmt_list([c.old_epoch_outputs for c in a.clones])
        shared = str(a.shared_values)
        if mode == "vmwipe":
            shared = str(a.shared_new_values)
            if a.shared_values > a.shared_new_values:
                shared += f" (+{a.shared_values - a.shared_new_values} in flight)"
        print(f"{mode:<9} {how[mode]:<34} {old:<28} {shared:>22}", file=out)
    w = res.analyses.get("vmwipe")
    if w is not None:
        print(f"(vmwipe: values of epochs first seen after resume; {w.new_values_in_original} "
              "of them also in the original after the snapshot. An in-flight value was computed "
              "before the snapshot: no wipe can reach it.)", file=out)
    runs = res.runs.get("vmwipe", [])
    if runs:
        print("\nvmwipe clones", file=out)
        hdr = (f"{'#':>2} {'pid':>7} {'pages wiped':>11} {'paused ms':>9} {'in-flight':>9} "
               f"{'new epoch':<17} {'RAM = snapshot':<14} {'poll/gen':<9} {'shell/oops':<10} "
               f"{'kernel reseed':>13}")
        print(hdr, file=out)
        print("-" * len(hdr), file=out)
        for r, c in zip(runs, w.clones if w else [], strict=False):
            epoch = c.new_epochs[0] if c.new_epochs else "-"
            poll = f"{'woke' if r.notification.get('poll_woke') else 'NO'}/" \
                   f"{r.notification.get('generation')}"
            health = f"{'ok' if r.health.get('shell') else 'NO'}/{r.health.get('oops')}"
            reseed = f"{r.reseed_ms} ms" if r.reseed_ms is not None else "-"
            flight = str(c.old_epoch_outputs)
            if c.old_epoch_counters:
                flight += f" (#{','.join(map(str, c.old_epoch_counters))})"
            print(f"{r.index:>2} {r.pid:>7} {r.pages_wiped!s:>11} {r.paused_ms!s:>9} "
                  f"{flight:>9} {epoch:<17} "
                  f"{'identical' if r.integrity.get('identical') else 'DIFFERS':<14} "
                  f"{poll:<9} {health:<10} {reseed:>13}", file=out)
        print(f"in-flight: old-epoch outputs after resume (#counter; the last one printed before "
              f"the snapshot was #{res.last_pre_counter})", file=out)
        print("paused ms: load completed -> table read, validated, pages zeroed and verified, "
              "generation committed -> cont returned (the RAM hashing in between is excluded)",
              file=out)
    vr = res.runs.get("vmgenid", [])
    if vr:
        print(f"\nvmgenid only: the vulnerable window (cont -> kernel '{RESEED_MSG}')", file=out)
        for r in vr:
            stale = sum(1 for o in r.outputs if o.epoch == res.old_epoch)
            print(f"  clone {r.index}: {r.reseed_ms} ms, {r.reseed_outputs} DRBG outputs emitted "
                  f"meanwhile (first one after {r.first_output_ms} ms); {stale} of "
                  f"{len(r.outputs)} outputs continue the old epoch (the DRBG never noticed)",
                  file=out)
        print("  (host clock, from `cont` returning to the kernel's line arriving on the serial "
              "port; outputs are counted by their order on that same port)", file=out)
        print("  with vmwipe the window is zero: the first instruction after resume already "
              "finds the DRBG page zeroed", file=out)
    print("\nClaims", file=out)
    for claim, held in res.claims.items():
        print(f"  [{'ok' if held else 'FAILED'}] {claim}", file=out)
    t = res.timings_s
    print("\ntimings (s): " + ", ".join(f"{k} {v}" for k, v in t.items()), file=out)


CRNG_MODES = {"v2": "vmwipe v2 (kernel CRNG refilled)", "v1": "vmwipe v1 (zero ranges only)",
              "vmgenid": "vmgenid alone (no wipe)"}


def crng_summary(rows: list[dict[str, Any]], out: TextIO) -> None:
    """The kernel-CRNG table: draws after resume that two or more clones printed."""
    print("\nKernel CRNG across clones: values drawn after resume by 2+ clones "
          "(of all collected; max per clone)", file=out)
    hdr = (f"{'mode':<33} {'vmgenid':<7} {'getrandom()':>13} {'random/uuid':>13} "
           f"{'vDSO':>13} {'reseed key':>10} {'shared until':>24}")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for r in rows:
        cells = []
        for kind in ("G", "U", "V", "K"):
            n = r["draws"].get(kind, 0)
            cells.append("-" if not n else
                         f"{r['duplicated'].get(kind, 0)}/{n} ({r['max_dup_per_clone'][kind]})")
        w = r["window_ms"]
        until = "never shared" if w is None else f"{w} ms after cont"
        if w is not None and w >= r["collected_ms"] - 50:
            until = f">= {r['collected_ms']} ms (all)"
        print(f"{CRNG_MODES[r['mode']]:<33} {'on' if r['vmgenid'] else 'off':<7} "
              f"{cells[0]:>13} {cells[1]:>13} {cells[2]:>13} {cells[3]:>10} {until:>24}",
              file=out)
    print("(draws made after resume: from the iteration that found the page wiped on; lines "
          "drawn before the snapshot and printed after it are not counted. 'shared until': "
          "host clock, `cont` to the last shared line arriving.)", file=out)


KS_MODES = {"crng-only": "vmwipe v2, CRNG only (ksecrets_refresh=0)",
            "ksecrets": "vmwipe v2 + kernel secrets refilled"}


def ksecrets_summary(ks: dict[str, Any], out: TextIO) -> None:
    """The kernel-secrets table: clone pairs agreeing on each per-boot key, side by side."""
    print(f"\nKernel secrets across {ks['clones']} clones of one boot (kernel {ks['kernel']}, "
          f"{ks['seconds']} s): clone pairs that agree", file=out)
    hdr = (f"{'mode':<43} {'ISN key part':>12} {'timestamp offset':>16} {'%p hash':>8} "
           f"{'old connection alive':>20}")
    print(hdr, file=out)
    print("-" * len(hdr), file=out)
    for r in ks["rounds"]:
        n = r["pairs"]
        alive = f"{sum(c['echo_ok'] for c in r['clones'])}/{len(r['clones'])}"
        print(f"{KS_MODES[r['mode']]:<43} {r['isn_agree']:>10}/{n} {r['ts_agree']:>14}/{n} "
              f"{r['ptr_agree']:>6}/{n} {alive:>20}", file=out)
    refill = ks["rounds"][-1]["reports"]
    print(f"(one fixed 4-tuple on 127.0.0.1; ISN key part = ISN - (realtime ns >> 6), agreeing "
          f"within {ksecrets.ISN_CLOSE} ticks; refilled per the host's report: "
          f"{refill[0] if refill else '-'})", file=out)


def crng_chart(rows: list[dict[str, Any]], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install .[chart])"
    fig, ax = plt.subplots(figsize=(9, 4.2))
    labels = [f"{r['mode']}\nvmgenid {'on' if r['vmgenid'] else 'off'}" for r in rows]
    shared = [sum(r["duplicated"].values()) for r in rows]
    colors = {"v2": "tab:green", "v1": "tab:red", "vmgenid": "tab:orange"}
    bars = ax.bar(labels, shared, color=[colors[r["mode"]] for r in rows])
    ax.bar_label(bars)
    ax.set_ylabel("draws printed by 2+ clones")
    ax.set_title("kernel CRNG after resume: getrandom(), uuid, vDSO, reseed keys (-cpu qemu64)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart written to {path}"


def chart(res: ScenarioResult, path: Path) -> str:
    """A PNG of the same figures (matplotlib); returns what happened, for the log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install .[chart])"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    modes = [m for m in MODES if m in res.analyses]
    shared = [res.analyses[m].shared_new_values if m == "vmwipe" else res.analyses[m].shared_values
              for m in modes]
    colors = {"vmwipe": "tab:green", "plain": "tab:red", "vmgenid": "tab:orange"}
    bars = ax1.bar(modes, shared, color=[colors[m] for m in modes])
    ax1.bar_label(bars)
    ax1.set_title(f"DRBG values emitted by 2+ of {res.clones} clones\n"
                  f"(first {res.outputs} outputs after resume)")
    ax1.set_ylabel("duplicated values")
    w = res.runs.get("vmwipe", [])
    v = res.runs.get("vmgenid", [])
    idx = list(range(max(len(w), len(v))))
    width = 0.38
    if w:
        ax2.bar([i - width / 2 for i in range(len(w))], [r.paused_ms or 0 for r in w], width,
                color="tab:green", label="vmwipe: paused window (guest not running)")
    if v:
        ax2.bar([i + width / 2 for i in range(len(v))], [r.reseed_ms or 0 for r in v], width,
                color="tab:orange", label="vmgenid only: guest runs before the kernel reseeds")
    ax2.set_xticks(idx, [f"clone {i}" for i in idx])
    ax2.set_ylabel("ms")
    ax2.set_title("per clone, after the snapshot is loaded")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart written to {path}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clones", type=int, default=4, metavar="N", help="clones (default 4)")
    p.add_argument("--outputs", type=int, default=1000, metavar="K",
                   help="DRBG outputs collected per clone after resume (default 1000)")
    p.add_argument("--json", action="store_true",
                   help="print the full result as JSON on stdout (progress goes to stderr)")
    p.add_argument("--cpu", default=CPU, metavar="MODEL",
                   help="guest CPU model of the DRBG scenario (default %(default)s, no RDRAND: "
                   "the DRBG reseeds from getrandom(), which the host refreshed)")
    p.add_argument("--no-kernel-crng", action="store_true",
                   help="skip the kernel-CRNG scenario (four more boots)")
    p.add_argument("--no-kernel-secrets", action="store_true",
                   help="skip the kernel-secrets scenario (one more boot, 2 x max(N, 3) clones)")
    p.add_argument("--out-dir", default="demo-out", type=Path,
                   help="where result.json and the chart go (default demo-out/)")
    args = p.parse_args(argv)
    if args.clones < 2 or args.outputs < 1:
        p.error("--clones must be at least 2 and --outputs at least 1")
    out = sys.stderr if args.json else sys.stdout
    reason = missing_prerequisite()
    if reason:
        print(f"demo: cannot run: {reason}", file=sys.stderr)
        return 2
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=out, flush=True)

    print(INTRO.format(n=args.clones, k=args.outputs), file=out)
    shm_before = set(os.listdir("/dev/shm"))
    old = signal.signal(signal.SIGTERM, _on_term)
    pids: list[int] = []
    rows: list[dict[str, Any]] = []
    ks: dict[str, Any] | None = None
    try:
        with Scenario(args.clones, args.outputs, log=log, cpu=args.cpu) as sc:
            res = sc.run()
            pids = [r.pid for runs in res.runs.values() for r in runs]
        if not args.no_kernel_crng:
            log("kernel CRNG: four boots (vmgenid off/on x crng_refresh 1/0), "
                f"{args.clones} clones per mode")
            rows = crng.run(clones=args.clones, log=log)
        if not args.no_kernel_secrets:
            ks = ksecrets.run(clones=max(args.clones, 3), log=log)
    except (_Terminated, KeyboardInterrupt):
        print("demo: interrupted; every QEMU it started was killed", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"demo: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old)
    alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    new_shm = sorted(set(os.listdir("/dev/shm")) - shm_before)
    res.claims["cleanup: no clone QEMU left running"] = not alive
    res.claims["cleanup: nothing new in /dev/shm"] = not new_shm
    for r in rows:
        if r["mode"] == "v2":
            res.claims[f"kernel CRNG, v2, vmgenid {'on' if r['vmgenid'] else 'off'}: no reseed "
                       "key and no draw made after resume shared by two clones"] = r["ok_v2"]
    if ks is not None:
        res.claims["kernel secrets, CRNG-only: clone pairs share the ISN key part, timestamp "
                   "offset or %p hash (the baseline is not vacuous)"] = ks["ok_crng_only_shares"]
        res.claims["kernel secrets, refilled: no clone pair shares the ISN key part, timestamp "
                   "offset or %p hash"] = ks["ok_refill"]
        res.claims["kernel secrets: the connection established before the snapshot carries "
                   "data in every clone"] = ks["ok_connection"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**res.to_dict(), "kernel_crng": rows, "kernel_secrets": ks}
    (args.out_dir / "result.json").write_text(json.dumps(doc, indent=2) + "\n")
    if rows:
        crng_summary(rows, out)
    if ks is not None:
        ksecrets_summary(ks, out)
    summary(res, out)
    log(chart(res, args.out_dir / "vmwipe-demo.png"))
    if rows:
        log(crng_chart(rows, args.out_dir / "vmwipe-crng.png"))
    log(f"full result in {args.out_dir / 'result.json'}")
    if args.json:
        print(json.dumps(doc, indent=2))
    ok = res.ok()
    print(f"\ndemo: {'all claims held' if ok else 'SOME CLAIMS FAILED'}", file=out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
