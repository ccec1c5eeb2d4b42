"""ruff and mypy stay clean: the same checks as `make lint`, so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

CHECKS = {
    "ruff": [str(BIN / "ruff"), "check", "."],
    "mypy-packages": [str(BIN / "mypy"), "-p", "vmwipe.protocol", "-p", "vmwipe.host_agent",
                      "-p", "vmwipe.lab"],
    "mypy-tests": [str(BIN / "mypy"), "tests", "benchmarks"],
    "mypy-demo": [str(BIN / "mypy"), "examples/demo.py"],
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_clean(name: str) -> None:
    argv = CHECKS[name]
    if not Path(argv[0]).exists():
        pytest.skip(f"{Path(argv[0]).name} is not installed in this environment (make setup)")
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
