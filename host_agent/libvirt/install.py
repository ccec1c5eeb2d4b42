"""Install and remove the libvirt qemu hook and the AppArmor rules QEMU needs.

`install_hook` chains: an existing hook is moved to `qemu.vmwipe-chained` and
the vmwipe hook runs it first with the same arguments and stdin, passing its
stdout through, so XML rewriting hooks keep working.

The script imports `vmwipe.host_agent.libvirt.hook`.  Hooks installed before
the subpackage layout import `vmwipe.host_agent.libvirt_hook`, which stays as
a compatibility module: libvirtd runs whatever is installed, and the hook's
own fallback would otherwise refuse every protected domain until someone ran
`install-hook` again.  Installing again rewrites the script to the new path
(same marker, so it is recognised as ours and not chained).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..atomic import write_atomic
from ..errors import UsageError
from .paths import APPARMOR_LOCAL, CHAINED_NAME, HOOKS_DIR, META_URN, STATE_DIR

MARKER = "# vmwipe-libvirt-hook v1"

_SCRIPT = '''#!{python}
{marker}
# Installed by `vmwipe libvirt install-hook`; `vmwipe libvirt uninstall-hook` removes it.
# A hook that was here before lives on as {chained} and runs first.
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


def hook_script(chained: Path, python: str | None = None) -> str:
    return _SCRIPT.format(python=python or sys.executable, marker=MARKER, chained=str(chained),
                          urn=META_URN)


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
                 apparmor: Path | None = APPARMOR_LOCAL) -> list[str]:
    """Install the hook, chaining to an existing one; returns what was done."""
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


def uninstall_hook(hooks_dir: Path = HOOKS_DIR,
                   apparmor: Path | None = APPARMOR_LOCAL) -> list[str]:
    """Remove the vmwipe hook and put a chained hook back in its place."""
    hook = hooks_dir / "qemu"
    chained = hooks_dir / CHAINED_NAME
    aa = uninstall_apparmor(apparmor) if apparmor is not None else []
    if not _is_ours(hook):
        return [f"{hook} is not the vmwipe hook; nothing changed", *aa]
    done: list[str] = [*aa]
    if chained.exists() or chained.is_symlink():
        os.replace(chained, hook)
        done.append(f"moved {chained} back to {hook}")
    else:
        hook.unlink()
        done.append(f"removed {hook}")
    done.append(RESTART_NOTE)
    return done


