"""A real libvirtd for the libvirt tests, started by hand (no systemd) and stopped by PID.

`LibvirtLab.start()` starts `virtlogd -d -p PIDFILE` and then `libvirtd -d -p
PIDFILE` (or `virtqemud`, with VMWIPE_TEST_LIBVIRT_DAEMON=virtqemud) as root,
after checking that no daemon we did not start owns the
default sockets (then the tests skip: they must not disturb somebody else's
libvirtd).  Before libvirtd starts, a stand-in for a site's own hook is written
as /etc/libvirt/hooks/qemu and the vmwipe hook is installed through the real CLI
(as qemu.d/50-vmwipe, which libvirtd runs after `qemu`), so libvirtd sees both
(hooks are read only at startup); whatever was in
/etc/libvirt/hooks is saved byte for byte and put back by `stop()`, which also
destroys and undefines every domain the tests defined and kills, by PID only,
the daemons and any QEMU of those domains that is still alive.

Where /dev/kvm does not belong to the group `kvm` (this lab's machines: a device
node made outside the container, whose gid is another group here), `start()`
gives it to `kvm` as Debian's udev rule does, and `stop()` gives it back.  Else
libvirtd's QEMU user cannot open it while libvirt's own probe can, so libvirt
judges its capability cache stale on every lookup and probes QEMU again: about
4 s per lookup, 32 s for one `defineXML` (measured on libvirt 9.0).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_DIR = Path("/var/run/libvirt")
HOOKS_DIR = Path("/etc/libvirt/hooks")
HOOK_NAMES = ("qemu", "qemu.vmwipe-chained", "qemu.d/50-vmwipe")
#: The vmwipe hook as `install-hook` installs it on libvirt >= 6.5.
DROPIN = HOOKS_DIR / "qemu.d" / "50-vmwipe"
#: install-hook adds rules here when AppArmor's libvirt abstraction is installed.
APPARMOR_LOCAL = Path("/etc/apparmor.d/local/abstractions/libvirt-qemu")
STATE_DIR = Path("/var/lib/vmwipe")
LOG_DIR = Path("/var/log/vmwipe")
URI = "qemu:///system"
#: The daemon under test: the monolithic `libvirtd` (Debian 12 and 13 package only that) or the
#: modular `virtqemud` where it is installed.  Both run /etc/libvirt/hooks/qemu the same way,
#: and qemu:///system reaches either.
DAEMON = os.environ.get("VMWIPE_TEST_LIBVIRT_DAEMON", "libvirtd")
KVM_DEVICE = Path("/dev/kvm")


def _socket_alive(path: Path) -> bool:
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def unavailable_reason() -> str | None:
    """None when this process may start its own libvirtd, else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "libvirt tests need root (libvirtd, /etc/libvirt/hooks, QEMU memory access)"
    if DAEMON not in ("libvirtd", "virtqemud"):
        return f"VMWIPE_TEST_LIBVIRT_DAEMON={DAEMON!r}: expected libvirtd or virtqemud"
    for tool in (DAEMON, "virtlogd", "virsh", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make setup installs libvirt-daemon-system)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed (pip install 'vmwipe[libvirt]')"
    for sock in ("libvirt-sock", "virtlogd-sock", "virtqemud-sock"):
        if _socket_alive(RUN_DIR / sock):
            return (f"a libvirt daemon we did not start is serving {RUN_DIR / sock}; "
                    "not touching it")
    return None


@dataclass
class _Saved:
    existed: bool
    dropin_dir_existed: bool
    files: dict[Path, tuple[bytes, int] | None] = field(default_factory=dict)


def _save_hooks() -> _Saved:
    saved = _Saved(HOOKS_DIR.is_dir(), DROPIN.parent.is_dir())
    for p in (*(HOOKS_DIR / n for n in HOOK_NAMES), APPARMOR_LOCAL):
        if p.is_symlink():
            raise RuntimeError(f"{p} is a symlink; refusing to juggle it in a test")
        saved.files[p] = (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) if p.exists() \
            else None
    return saved


def _restore_hooks(saved: _Saved) -> None:
    for p, content in saved.files.items():
        if content is None:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content[0])
            os.chmod(p, content[1])
    if not saved.dropin_dir_existed:
        with contextlib.suppress(OSError):
            DROPIN.parent.rmdir()
    if not saved.existed:
        with contextlib.suppress(OSError):
            HOOKS_DIR.rmdir()


def _give_kvm_to_its_group() -> int | None:
    """Make /dev/kvm group `kvm` as udev would; return the gid to put back, or None."""
    import grp

    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
        gid = KVM_DEVICE.stat().st_gid
    except (KeyError, OSError):
        return None
    if gid == kvm_gid:
        return None
    os.chown(KVM_DEVICE, -1, kvm_gid)
    return gid


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def _kill(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL: only ever a PID this fixture started or owns."""
    if not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class LibvirtLab:
    """Our libvirtd + virtlogd, the installed hook, a work dir, and what to clean up."""

    work: Path
    chained_log: Path
    install_output: str = ""
    libvirtd_pid: int | None = None
    virtlogd_pid: int | None = None
    conn: Any = None
    domains: list[str] = field(default_factory=list)
    qemu_pids: set[int] = field(default_factory=set)
    _hooks: _Saved | None = None
    _state_existed: bool = True
    _log_existed: bool = True
    _log_start: int = 0
    _kvm_gid: int | None = None
    timings: dict[str, float] = field(default_factory=dict)

    # -- lifecycle --------------------------------------------------------------------
    @classmethod
    def create(cls) -> LibvirtLab:
        work = Path(tempfile.mkdtemp(prefix="vmwipe-libvirt-test-", dir="/var/lib"))
        os.chmod(work, 0o755)  # QEMU runs as libvirt-qemu and opens files here
        return cls(work, work / "chained-hook.log")

    def start(self) -> None:
        t0 = time.monotonic()
        self._state_existed = STATE_DIR.exists()
        self._log_existed = LOG_DIR.exists()
        self._log_start = self._hook_log_size()
        self._hooks = _save_hooks()
        HOOKS_DIR.mkdir(parents=True, exist_ok=True)
        for name in HOOK_NAMES:  # a clean slate: our fake "previous" hook, then ours
            with contextlib.suppress(FileNotFoundError):
                (HOOKS_DIR / name).unlink()
        prev = HOOKS_DIR / "qemu"
        prev.write_text(
            "#!/bin/sh\n# stand-in for a site's own hook (vmwipe libvirt tests)\n"
            f'echo "$*" >> {self.chained_log}\ncat > /dev/null\nexit 0\n'
        )
        os.chmod(prev, 0o755)
        proc = subprocess.run(
            [sys.executable, "-m", "vmwipe.host_agent.cli", "libvirt", "install-hook"],
            capture_output=True, text=True, check=False, timeout=60,
        )
        self.install_output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"install-hook failed: {self.install_output}")
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self._kvm_gid = _give_kvm_to_its_group()
        vl_pid, ld_pid = self.work / "virtlogd.pid", self.work / f"{DAEMON}.pid"
        subprocess.run(["virtlogd", "-d", "-p", str(vl_pid)], check=True, timeout=30)
        self.virtlogd_pid = self._wait_pid(vl_pid)
        subprocess.run([DAEMON, "-d", "-p", str(ld_pid)], check=True, timeout=60)
        self.libvirtd_pid = self._wait_pid(ld_pid)
        import libvirt

        deadline = time.monotonic() + 90
        while True:
            try:
                self.conn = libvirt.open(URI)
                self.conn.getCapabilities()
                break
            except libvirt.libvirtError:
                if time.monotonic() > deadline or not _alive(self.libvirtd_pid):
                    raise
                time.sleep(0.2)
        self.timings[f"{DAEMON} start"] = time.monotonic() - t0

    def _wait_pid(self, path: Path, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = _read_pid(path)
            if pid and _alive(pid):
                return pid
            time.sleep(0.05)
        raise RuntimeError(f"no live daemon PID in {path}")

    def stop(self) -> None:
        import libvirt

        errors: list[str] = []
        if self.conn is not None:
            for name in self.domains:
                try:
                    dom = self.conn.lookupByName(name)
                except libvirt.libvirtError:
                    continue
                self.note_qemu(name)
                for step in (
                    lambda d=dom: d.destroy() if d.isActive() else None,
                    lambda d=dom: d.managedSaveRemove(0) if d.hasManagedSaveImage(0) else None,
                    lambda d=dom: [s.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
                                   for s in d.listAllSnapshots(0)],
                    lambda d=dom: d.undefineFlags(
                        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA),
                ):
                    try:
                        step()
                    except libvirt.libvirtError as e:
                        errors.append(f"{name}: {e}")
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.close()
            self.conn = None
        for pid in (self.libvirtd_pid, self.virtlogd_pid):
            if pid:
                _kill(pid)
        for pid in self.qemu_pids:  # QEMUs of our domains that outlived destroy()
            _kill(pid, 5)
        if self._kvm_gid is not None:
            with contextlib.suppress(OSError):
                os.chown(KVM_DEVICE, -1, self._kvm_gid)
            self._kvm_gid = None
        if self._hooks is not None:
            _restore_hooks(self._hooks)
        if not self._state_existed:
            shutil.rmtree(STATE_DIR, ignore_errors=True)
        if not self._log_existed:
            shutil.rmtree(LOG_DIR, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
        if errors:
            print("libvirt fixture teardown:", *errors, sep="\n  ", file=sys.stderr)

    # -- helpers ------------------------------------------------------------------------
    def note_qemu(self, name: str) -> int | None:
        """Remember the QEMU PID of one of our domains, so teardown can make sure it is gone."""
        pid = _read_pid(RUN_DIR / "qemu" / f"{name}.pid")
        if pid and _alive(pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return None
            if f"guest={name},".encode() in cmdline:
                self.qemu_pids.add(pid)
                return pid
        return None

    def virsh(self, *args: str, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} failed ({proc.returncode}): "
                                 f"{proc.stderr.strip()}")
        return proc

    def _hook_log_size(self) -> int:
        try:
            return (LOG_DIR / "hook.log").stat().st_size
        except OSError:
            return 0

    def hook_log(self) -> str:
        """What the hook logged since the fixture started."""
        try:
            with open(LOG_DIR / "hook.log", errors="replace") as f:
                f.seek(self._log_start)
                return f.read()
        except OSError:
            return ""


@dataclass
class SecondLibvirtd:
    """Another libvirtd (+ virtlogd) on this host, as a migration destination.

    libvirt refuses to migrate to "the same host" (equal hostname or host
    UUID), and its state directories are fixed for a privileged daemon.  So the
    second daemon runs in its own mount and UTS namespace: a different
    hostname, a host_uuid of its own, private bind mounts over libvirt's
    run/lib/cache/log directories and /etc/libvirt/qemu, and over the vmwipe
    monitor directory (both QEMUs use the same socket path).  Its client
    socket lives in a shared directory.  Everything else, including
    /etc/libvirt/hooks and /var/log/vmwipe, is shared, so the destination runs
    the same vmwipe hook.  Stopped by PID like the first one.
    """

    base: Path
    libvirtd_pid: int | None = None
    virtlogd_pid: int | None = None
    conn: Any = None

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.base / 'sock' / 'libvirt-sock'}"

    def start(self, monitor_dir: Path) -> None:
        import libvirt

        b = self.base
        dirs = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "cache": "/var/cache/libvirt",
                "log": "/var/log/libvirt", "etcqemu": "/etc/libvirt/qemu",
                "mon": str(monitor_dir)}
        for d in (*dirs, "sock"):
            (b / d).mkdir(parents=True, exist_ok=True)
        st = monitor_dir.stat()
        os.chown(b / "mon", st.st_uid, st.st_gid)
        os.chmod(b / "mon", stat.S_IMODE(st.st_mode))
        (b / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{b / "sock"}"\nhost_uuid = "{uuid.uuid4()}"\n')
        script = ["set -e", "hostname vmwipe-migration-dest"]
        script += [f"mount --bind {b / src} {dst}" for src, dst in dirs.items()]
        script += [f"virtlogd -d -p {b / 'virtlogd.pid'}",
                   f"libvirtd -d -f {b / 'libvirtd.conf'} -p {b / 'libvirtd.pid'}"]
        subprocess.run(["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c",
                        "\n".join(script)], check=True, timeout=60)
        self.virtlogd_pid = _read_pid(b / "virtlogd.pid")
        deadline = time.monotonic() + 90
        while True:
            self.libvirtd_pid = _read_pid(b / "libvirtd.pid")
            try:
                self.conn = libvirt.open(self.uri)
                self.conn.getCapabilities()
                return
            except libvirt.libvirtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def qemu_pid(self, name: str) -> int | None:
        return _read_pid(self.base / "run" / "qemu" / f"{name}.pid")

    def stop(self) -> None:
        import libvirt

        pids: list[int] = []
        if self.conn is not None:
            try:
                for dom in self.conn.listAllDomains(0):
                    pid = self.qemu_pid(dom.name())
                    if pid:
                        pids.append(pid)
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.destroy()
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    self.conn.close()
                self.conn = None
        for pid in (self.libvirtd_pid, self.virtlogd_pid, *pids):
            if pid:
                _kill(pid)
