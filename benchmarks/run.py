"""`make bench`: run every benchmark, print one table, write results/latest.json."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Row, render  # noqa: E402

BENCHES = ["bench_decode", "bench_backends", "bench_pause", "bench_scrub", "bench_fleet"]


def _qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.splitlines()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--only", action="append", help="run only this benchmark module")
    args = ap.parse_args()
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    for name in args.only or BENCHES:
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as e:
            skipped[name] = f"not available: {e}"
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += mod.run(quick=args.quick)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": __import__("os").cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": _qemu_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(render(rows))
    print(f"\nmachine: {machine}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    out = Path(__file__).resolve().parent / "results" / "latest.json"
    out.write_text(json.dumps({"machine": machine, "rows": [r.as_dict() for r in rows],
                               "skipped": skipped}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
