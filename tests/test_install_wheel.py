"""A non-editable install (wheel, C extensions compiled) works with no checkout in sight.

The wheel is built by pip from a copy of the tree, installed into a virtualenv in a
permanent directory, and then the copy and the wheel are deleted.  From `/`, the
installed `vmwipe` reports its version, imports its compiled extensions from the
virtualenv, installs the libvirt hook, and that hook (run as libvirtd runs it: a
clean environment) still loads the agent: it lets a plain domain run and refuses a
protected one whose QEMU is gone with the agent's own one-line reason, not the
fallback's "cannot load the agent".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.1.0"


def _tree_files() -> list[str]:
    """The tree's files: git's tracked and untracked-not-ignored ones, or (a copy without
    .git, as in make test-debian13) everything but outputs and environments."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
        return [f for f in out.decode().split("\0") if f]
    skip = {".git", ".venv", "build", "demo-out", "__pycache__", ".mypy_cache", ".ruff_cache",
            ".pytest_cache", ".hypothesis"}
    files = []
    for d, dirs, names in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x not in skip and not x.endswith(".egg-info")]
        files += [str(Path(d, n).relative_to(ROOT)) for n in names]
    return files


@pytest.fixture(scope="module")
def venv() -> Iterator[Path]:
    # not a temporary directory: install-hook refuses an interpreter that lives in one
    parent = "/var/lib" if os.access("/var/lib", os.W_OK) else str(Path.home())
    base = Path(tempfile.mkdtemp(prefix="vmwipe-wheel-test-", dir=parent))
    src = Path(tempfile.mkdtemp(prefix="vmwipe-src-"))
    try:
        for f in _tree_files():
            if (ROOT / f).is_file():  # symlinks to directories (.typecheck/) stay behind
                (src / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, src / f)
        wheels = src / "dist"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                        str(wheels), str(src)], check=True, timeout=600)
        wheel = next(wheels.glob(f"vmwipe-{VERSION}-*.whl"))
        subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True,
                       timeout=300)
        subprocess.run([str(base / "venv/bin/pip"), "install", "-q", str(wheel)], check=True,
                       timeout=600)
        shutil.rmtree(src)  # the checkout copy and the wheel are gone from here on
        yield base
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def _run(argv: list[str], input: str | None = None) -> subprocess.CompletedProcess[str]:
    """From `/`, with a bare environment (as libvirtd runs a hook)."""
    return subprocess.run(argv, cwd="/", env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120, check=False, input=input)


def test_version_and_extensions_from_the_install(venv: Path) -> None:
    r = _run([str(venv / "venv/bin/vmwipe"), "--version"])
    assert (r.returncode, r.stdout.strip()) == (0, f"vmwipe {VERSION}"), r.stderr
    r = _run([str(venv / "venv/bin/python"), "-I", "-c",
              "import vmwipe.host_agent.wipe._pages as p, vmwipe.host_agent.snapshot._ramwalk "
              "as w; print(p.__file__); print(w.__file__)"])
    assert r.returncode == 0, r.stderr
    for line in r.stdout.split():
        assert line.startswith(str(venv / "venv")) and line.endswith(".so"), line


def test_hook_from_the_install_outlives_the_tree(venv: Path) -> None:
    from test_libvirt_unit import domain

    from vmwipe.host_agent.libvirt.domain_xml import protect_xml

    hooks = venv / "hooks"
    r = _run([str(venv / "venv/bin/vmwipe"), "libvirt", "install-hook", "--hooks-dir",
              str(hooks), "--no-apparmor", "--layout", "qemu.d"])
    assert r.returncode == 0, r.stderr
    assert "editable" not in r.stdout, r.stdout
    hook = hooks / "qemu.d" / "50-vmwipe"
    assert hook.read_text().startswith(f"#!{venv / 'venv/bin/python'}")  # python3.11
    plain = _run([str(hook), "guest1", "started", "begin", "-"], input=domain())
    assert (plain.returncode, plain.stdout, plain.stderr) == (0, "", "")
    protected = protect_xml(domain(), venv / "state").xml  # no QEMU behind its monitor
    r = _run([str(hook), "guest1", "started", "begin", "-"], input=protected)
    assert r.returncode == 1 and r.stderr.startswith("vmwipe: guest1: "), r.stderr
    assert "cannot load the agent" not in r.stderr
