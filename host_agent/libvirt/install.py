"""Install and remove the libvirt qemu hook and the AppArmor rules QEMU needs.

Two layouts (`install_hook(layout=...)`):

- `qemu.d` (libvirt >= 6.5, so every supported host: Debian 12 has 9.0, Debian 13
  11.3): the hook is `hooks/qemu.d/50-vmwipe`.  libvirtd runs `hooks/qemu` first,
  then every script in `qemu.d/` in alphabetical order, each with the XML the one
  before printed (or the original, if it printed nothing), and fails the operation
  if any of them fails.  Nothing of another package is touched, and a package that
  owns `hooks/qemu` (oVirt's VDSM replaces it on upgrade) cannot drop the wipe;
- `chain` (older libvirt): an existing `hooks/qemu` is moved to
  `qemu.vmwipe-chained` and the vmwipe hook runs it first with the same
  arguments and stdin, passing its stdout through, so XML rewriting hooks keep
  working.  Installing with `qemu.d` later undoes the chain.

`auto` picks by the libvirt daemon's version.  The hook's interpreter is the one
that runs `install-hook` (the installed `vmwipe`'s); `check_interpreter` refuses one
in a temporary or build directory and one that cannot import vmwipe by itself, since
libvirtd would run a hook that breaks once that directory is gone.

The script imports `vmwipe.host_agent.libvirt.hook`.  Hooks installed before
the subpackage layout import `vmwipe.host_agent.libvirt_hook`, which stays as
a compatibility module: libvirtd runs whatever is installed, and the hook's
own fallback would otherwise refuse every protected domain until someone ran
`install-hook` again.  Installing again rewrites the script to the new path
(same marker, so it is recognised as ours and not chained).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..atomic import write_atomic
from ..errors import UsageError
from .paths import APPARMOR_LOCAL, CHAINED_NAME, DROPIN_NAME, HOOKS_DIR, META_URN, STATE_DIR

MARKER = "# vmwipe-libvirt-hook v1"

_SCRIPT = '''#!{python}
{marker}
# Installed by `vmwipe libvirt install-hook`; `vmwipe libvirt uninstall-hook` removes it.
{chain_note}
# Wipes protected domains at `started begin` after a restore; see vmwipe.host_agent.libvirt.hook.
import os, subprocess, sys

CHAINED = {chained!r}
try:
    from vmwipe.host_agent.libvirt.hook import main
except Exception as e:  # the agent is broken: keep other domains working, fail protected ones
    data = sys.stdin.buffer.read()
    rc = 0
    if os.access(CHAINED, os.X_OK):
        p = subprocess.run([CHAINED, *sys.argv[1:]], input=data, stdout=subprocess.PIPE)
        sys.stdout.buffer.write(p.stdout)
        rc = p.returncode
    if rc == 0 and sys.argv[2:4] == ["started", "begin"] and {urn!r} in data:
        print(f"vmwipe hook: cannot load the agent ({{e}}); refusing to run a protected domain",
              file=sys.stderr)
        rc = 1
    sys.exit(rc)
sys.exit(main(sys.argv[1:], chained=CHAINED))
'''


def hook_script(chained: Path | None, python: str | None = None) -> str:
    """The hook's text; `chained` is the hook it runs first (chain layout), None in qemu.d."""
    note = (f"# A hook that was here before lives on as {chained} and runs first."
            if chained else "# libvirtd runs ../qemu and the other qemu.d scripts itself.")
    return _SCRIPT.format(python=python or sys.executable, marker=MARKER,
                          chained=str(chained) if chained else "", urn=META_URN,
                          chain_note=note)


#: The first libvirt release that runs the scripts in hooks/qemu.d/ (docs/hooks.rst).
QEMU_D_SINCE = (6, 5, 0)
LAYOUTS = ("auto", "qemu.d", "chain")


def libvirt_version() -> tuple[int, int, int] | None:
    """The installed libvirt daemon's version (`libvirtd --version`), else the library's."""
    for daemon in ("libvirtd", "virtqemud"):
        exe = shutil.which(daemon) or next(
            (p for p in (f"/usr/sbin/{daemon}", f"/sbin/{daemon}") if os.access(p, os.X_OK)), None)
        if exe is None:
            continue
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        m = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
        if m:
            return (int(m[1]), int(m[2]), int(m[3]))
    try:
        import libvirt
    except ImportError:
        return None
    v = int(libvirt.getVersion())
    return (v // 1_000_000, v // 1000 % 1000, v % 1000)


def choose_layout(layout: str) -> str:
    if layout != "auto":
        return layout
    v = libvirt_version()
    if v is None:
        raise UsageError("cannot tell the libvirt version (no libvirtd or virtqemud found): "
                         "pass --layout qemu.d (libvirt >= 6.5) or --layout chain")
    return "qemu.d" if v >= QEMU_D_SINCE else "chain"


def _temp_dirs() -> list[Path]:
    dirs = {Path(tempfile.gettempdir()), Path("/tmp"), Path("/var/tmp"), Path("/dev/shm")}
    return [d.resolve() for d in dirs if d.is_dir()]


#: Directory names that mark a build tree (setuptools, pybuild, tox, nox) when they sit
#: beside a project's build file; `debian/` beside `debian/control` is dpkg-buildpackage's.
_BUILD_DIRS = {"build", ".pybuild", ".tox", ".nox"}
_PROJECT_FILES = ("pyproject.toml", "setup.py", "Makefile")


def _unfit(path: Path) -> str | None:
    p = Path(os.path.abspath(path))
    for d in _temp_dirs():
        if p == d or d in p.parents or p.resolve() == d or d in p.resolve().parents:
            return f"is in the temporary directory {d}"
    for d in p.parents:
        if d.name in _BUILD_DIRS and any((d.parent / f).exists() for f in _PROJECT_FILES):
            return f"is inside the build tree {d}"
        if d.name == "debian" and (d / "control").is_file():
            return f"is inside the package build tree {d}"
    return None


def check_interpreter(python: str) -> list[str]:
    """Refuse an interpreter libvirtd could not run for long; returns notes to print.

    libvirtd runs the hook with a clean environment long after this command ended, so
    the interpreter must import vmwipe by itself (no PYTHONPATH, no current directory)
    from a place that is not a temporary or build directory.
    """
    why = _unfit(Path(python))
    if why:
        raise UsageError(f"the hook's interpreter {python} {why}: libvirtd would run a hook "
                         "that breaks once it is cleaned up; install vmwipe (the Debian package, "
                         "or pip into a permanent virtualenv) and run its `vmwipe libvirt "
                         "install-hook`, or pass --python")
    try:
        proc = subprocess.run(
            [python, "-I", "-c", "import vmwipe.host_agent.libvirt.hook as h; print(h.__file__)"],
            capture_output=True, text=True, timeout=60, check=False, cwd="/", env={})
    except OSError as e:
        raise UsageError(f"the hook's interpreter {python} does not run: "
                         f"{e.strerror or e}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"the hook's interpreter {python} cannot import vmwipe without this "
                         f"shell's environment ({last}); install vmwipe for it first")
    where = Path(proc.stdout.strip())
    why = _unfit(where)
    if why:
        raise UsageError(f"{python} imports vmwipe from {where.parents[1]}, which {why}; "
                         "install vmwipe (not from a build tree) first")
    if "site-packages" not in where.parts and "dist-packages" not in where.parts:
        return [f"note: {python} imports vmwipe from the source tree {where.parents[1]} (an "
                "editable install): the hook breaks if that tree moves or is deleted"]
    return []


def _is_ours(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return MARKER.encode() in f.read(4096)
    except OSError:
        return False


_AA_BEGIN = "# BEGIN vmwipe (vmwipe libvirt install-hook; uninstall-hook removes it)"
_AA_END = "# END vmwipe"


def apparmor_rules(state_dir: Path = STATE_DIR) -> str:
    """What QEMU needs beyond libvirt's generated profile: qemu:commandline files are unknown
    to virt-aa-helper, so the SSDT, the zero page and the monitor socket are granted here.

    Every QEMU includes this abstraction, and all of them run as the same user, so the
    socket rule must not be a glob: one compromised QEMU could otherwise drive every
    other protected domain's second monitor (pmemsave, `migrate exec:`, `cont`).  Each
    domain's profile is `libvirt-UUID` and its socket `mon/libvirt-UUID.qmp`, so
    `@{profile_name}` (AppArmor >= 3.0) admits exactly its own.  The SSDT and zero page
    are public data: reading another domain's is harmless.
    """
    return "\n".join([
        _AA_BEGIN,
        f"  {state_dir}/domains/*/vmwipe-ssdt.aml r,",
        f"  {state_dir}/domains/*/vmwipe-zero-page.bin r,",
        f"  {state_dir}/mon/@{{profile_name}}.qmp rw,",
        _AA_END,
    ]) + "\n"


def _strip_block(text: str) -> str:
    if _AA_BEGIN not in text:
        return text
    head, rest = text.split(_AA_BEGIN, 1)
    tail = rest.split(_AA_END, 1)[1] if _AA_END in rest else ""
    return head + tail.removeprefix("\n")


def install_apparmor(path: Path = APPARMOR_LOCAL) -> list[str]:
    """Add the vmwipe rules to the local libvirt-qemu abstraction, if AppArmor's is installed."""
    if not path.exists():
        return []
    text = path.read_text()
    new = _strip_block(text)
    if new and not new.endswith("\n"):
        new += "\n"
    new += apparmor_rules()
    if new == text:
        return []
    path.write_text(new)
    return [f"added the vmwipe AppArmor rules to {path} (used from the next domain start)"]


def uninstall_apparmor(path: Path = APPARMOR_LOCAL) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text()
    new = _strip_block(text)
    if new == text:
        return []
    path.write_text(new)
    return [f"removed the vmwipe AppArmor rules from {path}"]


RESTART_NOTE = ("libvirtd reads hooks only when it starts: restart it now "
                "(systemctl restart libvirtd, or virtqemud on modular daemons)")


def install_hook(hooks_dir: Path = HOOKS_DIR, python: str | None = None,
                 apparmor: Path | None = APPARMOR_LOCAL, layout: str = "auto") -> list[str]:
    """Install the hook (qemu.d drop-in or chained `qemu`); returns what was done."""
    if layout not in LAYOUTS:
        raise UsageError(f"--layout {layout}: expected one of {', '.join(LAYOUTS)}")
    python = python or sys.executable
    notes = check_interpreter(python)
    if choose_layout(layout) == "chain":
        done = _install_chain(hooks_dir, python, apparmor)
    else:
        done = _install_dropin(hooks_dir, python, apparmor)
    if done[-1] == RESTART_NOTE:  # the restart stays the last thing said
        return [*done[:-1], *notes, RESTART_NOTE]
    return [*done, *notes]


def _install_dropin(hooks_dir: Path, python: str, apparmor: Path | None) -> list[str]:
    dropin = hooks_dir / DROPIN_NAME
    text = hook_script(None, python)
    done: list[str] = []
    hook = hooks_dir / "qemu"
    if _is_ours(hook):  # an earlier chain install: put the site's hook back first
        done += [d for d in _uninstall_chain(hooks_dir) if d != RESTART_NOTE]
    aa = install_apparmor(apparmor) if apparmor is not None else []
    if _is_ours(dropin) and dropin.read_text() == text and not done:
        return [f"{dropin} is already the vmwipe hook; nothing changed", *aa]
    dropin.parent.mkdir(parents=True, exist_ok=True)
    if (dropin.exists() or dropin.is_symlink()) and not _is_ours(dropin):
        raise UsageError(f"{dropin} exists and is not the vmwipe hook; move it away first")
    verb = "updated" if dropin.exists() else "installed"
    write_atomic(dropin, text.encode(), 0o755)
    done.append(f"{verb} the vmwipe hook as {dropin} (libvirtd runs it after {hook}, "
                "if that exists, and fails the operation if either fails)")
    return [*done, *aa, RESTART_NOTE]


def _install_chain(hooks_dir: Path, python: str, apparmor: Path | None) -> list[str]:
    hooks_dir.mkdir(parents=True, exist_ok=True)
    hook = hooks_dir / "qemu"
    chained = hooks_dir / CHAINED_NAME
    text = hook_script(chained, python)
    done: list[str] = []
    foreign = (hook.exists() or hook.is_symlink()) and not _is_ours(hook)
    if foreign and (chained.exists() or chained.is_symlink()):
        raise UsageError(f"{hook} is not the vmwipe hook and {chained} already exists; "
                         "move one of them away first")
    aa = install_apparmor(apparmor) if apparmor is not None else []
    if _is_ours(hook):
        if hook.read_text() == text:
            return [f"{hook} is already the vmwipe hook; nothing changed", *aa]
        write_atomic(hook, text.encode(), 0o755)
        return [f"updated the vmwipe hook in {hook}", *aa, RESTART_NOTE]
    if foreign:
        os.rename(hook, chained)
        done.append(f"moved the existing hook {hook} to {chained}; the vmwipe hook runs it "
                    "first with the same arguments and stdin")
        if not os.access(chained, os.X_OK):
            done.append(f"note: {chained} is not executable, so libvirt did not run it "
                        "before and the vmwipe hook will not either")
    write_atomic(hook, text.encode(), 0o755)
    done.append(f"installed the vmwipe hook as {hook}")
    done += aa
    done.append(RESTART_NOTE)
    return done


def _uninstall_chain(hooks_dir: Path) -> list[str]:
    hook = hooks_dir / "qemu"
    chained = hooks_dir / CHAINED_NAME
    if not _is_ours(hook):
        return []
    if chained.exists() or chained.is_symlink():
        os.replace(chained, hook)
        return [f"moved {chained} back to {hook}", RESTART_NOTE]
    hook.unlink()
    return [f"removed {hook}", RESTART_NOTE]


def uninstall_hook(hooks_dir: Path = HOOKS_DIR,
                   apparmor: Path | None = APPARMOR_LOCAL) -> list[str]:
    """Remove the vmwipe hook (either layout) and put a chained hook back in its place."""
    dropin = hooks_dir / DROPIN_NAME
    aa = uninstall_apparmor(apparmor) if apparmor is not None else []
    done: list[str] = [*aa]
    if _is_ours(dropin):
        dropin.unlink()
        done += [f"removed {dropin}", RESTART_NOTE]
    for d in _uninstall_chain(hooks_dir):
        if d not in done:
            done.append(d)
    if RESTART_NOTE not in done:
        return [f"no vmwipe hook in {hooks_dir / 'qemu'} or {dropin}; nothing changed", *aa]
    done.remove(RESTART_NOTE)
    return [*done, RESTART_NOTE]
