"""The agent's two C extensions compile with no warnings (-Wall -Wextra -Werror).

`pip install` builds them with warnings on but not fatal, so a new warning would
pass unseen; this is where it fails instead.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "host_agent" / "wipe" / "_pages.c",
           ROOT / "host_agent" / "snapshot" / "_ramwalk.c"]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_builds_without_warnings(source: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (setup installs gcc)")
    res = subprocess.run(
        [cc, "-fsyntax-only", "-O2", "-Wall", "-Wextra", "-Werror",
         f"-I{sysconfig.get_paths()['include']}", str(source)],
        capture_output=True, text=True, check=False,
    )
    assert res.returncode == 0, res.stderr
