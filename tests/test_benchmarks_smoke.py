"""`make bench` keeps working: a quick pass of the decode benchmark writes rows.

Only the shape of the output is checked, never a timing: machines here are
shared and noisy, and the benchmarks report misses themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_decode_bench_writes_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only",
         "bench_decode", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["rows"], data
    assert data["failed"] == {}
    row = data["rows"][0]
    assert row["bench"] == "decode+validate"
    assert row["subject"]["runs"] >= 1 and row["baseline"]["runs"] >= 1
    assert "qemu" in data["machine"]
    assert "| decode+validate |" in proc.stdout
