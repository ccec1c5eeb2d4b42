"""`make bench`: run every benchmark, print one table, write results/latest.json.

Each benchmark module exposes `run(quick: bool) -> list[Row]`.  A benchmark
that cannot run here (no QEMU, not enough disk) is reported as failed with its
reason and the others still run, so one missing prerequisite does not hide
the rest of the table.  The load average before and after each benchmark goes
into the JSON: on a shared machine it is the first thing to read next to a
missed target.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Row, render

BENCHES = ["bench_decode", "bench_backends", "bench_pause", "bench_scrub", "bench_fleet",
           "bench_template"]
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def _qemu_version() -> str:
    qemu = os.environ.get("VMWIPE_BENCH_QEMU", "qemu-system-x86_64")
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.splitlines()[0]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions and cases (a short smoke pass)")
    ap.add_argument("--only", action="append", choices=BENCHES,
                    help="run only this benchmark module (repeatable)")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help=f"where to write the JSON (default {RESULTS})")
    args = ap.parse_args()
    rows: list[Row] = []
    failed: dict[str, str] = {}
    per_bench: dict[str, dict[str, object]] = {}
    t_all = time.perf_counter()
    for name in args.only or BENCHES:
        print(f"running {name} (load {_load()}) ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        load_before = _load()
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
            got: list[Row] = mod.run(quick=args.quick)
        except Exception as e:  # report it, keep measuring the rest
            traceback.print_exc(file=sys.stderr)
            failed[name] = f"{type(e).__name__}: {e}"
            got = []
        rows += got
        per_bench[name] = {"seconds": round(time.perf_counter() - t, 1),
                           "load_before": load_before, "load_after": _load(), "rows": len(got)}
        print(f"  {name}: {per_bench[name]['seconds']} s", file=sys.stderr, flush=True)
    machine = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": _qemu_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_avg_end": _load(),
        "quick": args.quick,
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }
    print(render(rows))
    print(f"\nmachine: {json.dumps(machine)}")
    for name, why in failed.items():
        print(f"FAILED {name}: {why}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine, "benches": per_bench,
                               "rows": [r.as_dict() for r in rows], "failed": failed},
                              indent=2) + "\n")
    shutil.move(tmp, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
