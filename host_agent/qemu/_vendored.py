"""Where the Debian 12 package keeps its private copy of qemu.qmp.

Debian 12 has no python3-qemu-qmp (Debian 13 has it in trixie-backports, forky
and sid), so vmwipe's Debian 12 package carries qemu.qmp 0.0.6 from its PyPI
sdist, with its licence, in a directory of its own (docs/packaging.md says why).
Only when `qemu.qmp` cannot be imported from the interpreter's own path is that
directory appended, so a python3-qemu-qmp or pip-installed copy always wins and
nothing else on the system sees the private one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

#: Installed by debian/rules on Debian 12 only.
VENDOR_DIR = Path("/usr/share/vmwipe/vendor")


def add_vendored_qmp() -> None:
    try:
        if importlib.util.find_spec("qemu.qmp") is not None:
            return
    except ModuleNotFoundError:  # no `qemu` namespace at all
        pass
    if (VENDOR_DIR / "qemu" / "qmp").is_dir() and str(VENDOR_DIR) not in sys.path:
        sys.path.append(str(VENDOR_DIR))
