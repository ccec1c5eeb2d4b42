"""Build what a test guest needs: vmwipe.ko, the example programs, an initramfs.

The programs are static, except those that must be preloadable (with
libvmwipe-preload.so, the C library and the dynamic loader alongside).

Every output is cached under the build directory by a hash of its inputs, so a
second test run (or a second test module) reuses it, and a changed source file
can never be served from a stale cache. Outputs are written to a temporary
name and renamed into place, so concurrent runs never see half-written files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

KMOD_SOURCES = ("Kbuild", "compat-probes.sh", "compat.h", "vmwipe_core.c", "crng.c", "crng.h",
                "ksecrets.c", "vmwipe.h", "vmwipe_abi.h", "vmwipe_uapi.h", "vmwipe_kapi_test.c")
KMODS = ("vmwipe.ko", "vmwipe_kapi_test.ko")
EXAMPLE_SOURCES = ("vmwipe.c", "vmwipe.h", "drbg.c", "drbg.h", "drbg_stream.c", "vmwipe_test.c",
                   "retrofit_test.c", "wof_probe.c", "bssl_stream.c", "preload/vmwipe_preload.c",
                   "probe.h", "crng_stream.c", "tcp_keys.c")
UAPI_HEADER = "vmwipe_uapi.h"  # in guest_kmod/, the ioctl ABI the programs use
PROGRAMS: dict[str, tuple[str, ...]] = {
    "drbg_stream": ("drbg_stream.c", "drbg.c", "vmwipe.c"),
    "vmwipe_test": ("vmwipe_test.c", "vmwipe.c"),
    "retrofit_test": ("retrofit_test.c",),
    "crng_stream": ("crng_stream.c", "vmwipe.c"),
    "tcp_keys": ("tcp_keys.c",),
}
# Linked dynamically, so that LD_PRELOAD works: /bin/NAME in the guest, with
# the C library and the dynamic loader next to them.
DYNAMIC_PROGRAMS: dict[str, tuple[str, ...]] = {
    "wof_probe": ("wof_probe.c",),
    "bssl_stream": ("bssl_stream.c",),  # dlopen()s BoringSSL; see boringssl_files()
}
PRELOAD = "libvmwipe-preload.so"  # /lib/libvmwipe-preload.so in the guest
PRELOAD_SOURCES = ("preload/vmwipe_preload.c",)
BUSYBOX = Path("/bin/busybox")

# The guest's /init: mount the basics, silence printk on the console (it would
# interleave with command output), then run one command per console line.
# Input lines are "ID COMMAND"; after each command it prints "@@DONE ID RC".
# Echo is off and no interactive shell runs, so the console carries only
# command output and markers.
INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
echo 1 > /proc/sys/kernel/printk
stty -echo
echo "@@READY $(cat /proc/sys/kernel/random/boot_id)"
while read -r id cmd; do
    eval "$cmd" </dev/null
    echo "@@DONE $id $?"
done
echo "@@EOF"
"""


class BuildError(RuntimeError):
    """A build step failed; the message carries the tool's output."""


@dataclass(frozen=True)
class Kernel:
    """A packaged Debian kernel: the image to boot and the headers to build against.

    Installed on this host (`root` is /), or unpacked by scripts/fetch-kernel.sh
    under another root (the kernel matrix), with the same layout below it.
    """

    release: str
    root: Path = Path("/")

    @property
    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def headers(self) -> Path:
        return self.root / "usr/src" / f"linux-headers-{self.release}"

    @property
    def modules_dir(self) -> Path:
        """lib/modules/RELEASE (usr/lib/modules/RELEASE in packages from 6.19 on)."""
        for sub in ("lib/modules", "usr/lib/modules"):
            path = self.root / sub / self.release
            if (path / "modules.order").is_file():
                return path
        return self.root / "lib/modules" / self.release

    def missing(self) -> list[str]:
        """What is absent for booting and building (empty when usable)."""
        return [str(p) for p in (self.image, self.headers / "Makefile") if not p.exists()]


def source_root() -> Path:
    """The repository checkout holding guest_kmod/ and examples/.

    The lab is only useful from a checkout (it compiles the module and the
    programs), so an installed copy points here with VMWIPE_SRC.
    """
    env = os.environ.get("VMWIPE_SRC")
    root = Path(env) if env else Path(__file__).resolve().parents[2]
    if not (root / "guest_kmod" / "vmwipe_core.c").is_file():
        raise BuildError(f"no vmwipe checkout at {root} (set VMWIPE_SRC)")
    return root


def build_root() -> Path:
    """Cache directory (gitignored `build/` in the checkout unless VMWIPE_BUILD_DIR)."""
    env = os.environ.get("VMWIPE_BUILD_DIR")
    path = Path(env) if env else source_root() / "build"
    path.mkdir(parents=True, exist_ok=True)
    return path


def installed_kernels() -> list[Kernel]:
    """Kernels with both an image and headers, oldest first."""
    found = []
    for image in Path("/boot").glob("vmlinuz-*"):
        kernel = Kernel(image.name.removeprefix("vmlinuz-"))
        if not kernel.missing():
            found.append(kernel)
    return sorted(found, key=lambda k: [int(x) if x.isdigit() else -1 for x in
                                        k.release.replace("-", ".").replace("+", ".").split(".")])


def kernel_cache() -> Path:
    """Where scripts/fetch-kernel.sh unpacks kernels: $VMWIPE_KERNEL_CACHE or build/kernels."""
    env = os.environ.get("VMWIPE_KERNEL_CACHE")
    return Path(env) if env else source_root() / "build" / "kernels"


def default_kernel() -> Kernel | None:
    """VMWIPE_TEST_KERNEL if set, else the newest kernel we can both build for and boot.

    VMWIPE_TEST_KERNEL names an installed kernel, or one that scripts/fetch-kernel.sh
    unpacked with --image (the kernel matrix's, e.g. 7.3.4+deb13-amd64).
    """
    env = os.environ.get("VMWIPE_TEST_KERNEL")
    if env:
        fetched = Kernel(env, kernel_cache() / env)
        if Kernel(env).missing() and (fetched.root / ".fetched-image").is_file():
            return fetched
        return Kernel(env)
    kernels = installed_kernels()
    return kernels[-1] if kernels else None


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def _publish(tmp: Path, final: Path) -> Path:
    """Rename a finished output into place; a concurrent builder may have won."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def kbuild_command(kernel: Kernel, directory: Path) -> list[str]:
    """make W=1 ... modules for the sources in `directory`, with the compiler the kernel's
    headers ask for (scripts/kernel-make.sh: on this host, or in the Debian 13 root)."""
    return ["bash", str(source_root() / "scripts" / "kernel-make.sh"), str(kernel.headers),
            str(directory), "W=1", "CONFIG_VMWIPE_KAPI_TEST=m", "modules"]


def build_module(kernel: Kernel) -> Path:
    """vmwipe.ko for `kernel`, built with W=1; a compiler warning is a build error.

    Its directory also holds vmwipe_kapi_test.ko, the in-kernel API test client.
    """
    src = source_root() / "guest_kmod"
    key = _digest([kernel.release.encode(), *((src / f).read_bytes() for f in KMOD_SOURCES)])
    out = build_root() / "lab" / f"kmod-{kernel.release}-{key}"
    if all((out / ko).is_file() for ko in KMODS):
        return out / "vmwipe.ko"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.", dir=out.parent))
    for f in KMOD_SOURCES:
        shutil.copy2(src / f, tmp / f)
    log = _run(kbuild_command(kernel, tmp))
    if "warning:" in log:
        raise BuildError(f"vmwipe.ko has compiler warnings for {kernel.release}:\n{log}")
    # Kbuild records the directory in .cmd files; only the .ko files travel.
    final_tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.", dir=out.parent))
    for ko in KMODS:
        shutil.copy2(tmp / ko, final_tmp / ko)
    shutil.rmtree(tmp, ignore_errors=True)
    return _publish(final_tmp, out) / "vmwipe.ko"


def _build_examples() -> Path:
    """Compile every example program and the preload shim into one cached directory."""
    src = source_root() / "examples"
    uapi = source_root() / "guest_kmod" / UAPI_HEADER
    cc = os.environ.get("CC", "gcc")
    version = _run([cc, "--version"]).encode()
    key = _digest([version, uapi.read_bytes(), *((src / f).read_bytes() for f in EXAMPLE_SOURCES)])
    out = build_root() / "lab" / f"progs-{key}"
    names = [*PROGRAMS, *DYNAMIC_PROGRAMS, PRELOAD]
    if not all((out / name).is_file() for name in names):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.", dir=out.parent))
        flags = ["-O2", "-Wall", "-Wextra", "-Werror", f"-I{uapi.parent}"]
        builds = [*((name, ["-static"], files) for name, files in PROGRAMS.items()),
                  *((name, [], files) for name, files in DYNAMIC_PROGRAMS.items()),
                  (PRELOAD, ["-shared", "-fPIC", "-fvisibility=hidden"], PRELOAD_SOURCES)]
        for name, extra, files in builds:
            _run([cc, *flags, *extra, "-o", str(tmp / name), *(str(src / f) for f in files)])
        _publish(tmp, out)
    return out


def build_programs() -> dict[str, Path]:
    """The example and test programs, linked statically for a bare initramfs."""
    out = _build_examples()
    return {name: out / name for name in PROGRAMS}


def _runtime_deps(binary: Path) -> dict[str, Path]:
    """The shared libraries and loader `binary` needs, by their path in the guest (ldd)."""
    deps: dict[str, Path] = {}
    for line in _run(["ldd", str(binary)]).splitlines():
        parts = line.split()
        path = parts[2] if len(parts) > 2 and parts[1] == "=>" else parts[0] if parts else ""
        if path.startswith("/"):
            deps[path.lstrip("/")] = Path(path).resolve()
    return deps


def build_dynamic() -> dict[str, Path]:
    """Dynamically linked programs and the preload shim, with their libraries.

    Keys are paths inside the initramfs: bin/NAME, lib/libvmwipe-preload.so,
    and the C library and dynamic loader at their usual places.
    """
    out = _build_examples()
    files = {f"bin/{name}": out / name for name in DYNAMIC_PROGRAMS}
    files[f"lib/{PRELOAD}"] = out / PRELOAD
    for path in list(files.values()):
        files.update(_runtime_deps(path))
    return files


# Debian's android-libboringssl: a real BoringSSL with MADV_WIPEONFORK fork detection.
BORINGSSL = Path("/usr/lib/x86_64-linux-gnu/android/libcrypto.so.0")


def boringssl_files() -> dict[str, Path]:
    """BoringSSL's libcrypto for the initramfs (for bssl_stream), if installed here."""
    return {str(BORINGSSL).lstrip("/"): BORINGSSL} if BORINGSSL.is_file() else {}


def build_initramfs(module: Path, programs: dict[str, Path],
                    extra: dict[str, Path] | None = None) -> Path:
    """An uncompressed newc cpio: busybox, /init, the programs in /bin, the modules in /.

    `module` is vmwipe.ko; the other modules built next to it come along.
    `extra` maps more paths inside the image to files (see build_dynamic).
    """
    if not BUSYBOX.is_file():
        raise BuildError(f"{BUSYBOX} missing (install busybox-static)")
    files = {**{ko: module.parent / ko for ko in KMODS},
             **{f"bin/{n}": p for n, p in sorted(programs.items())},
             **dict(sorted((extra or {}).items()))}
    key = _digest([INIT_SCRIPT.encode(), BUSYBOX.read_bytes(),
                   *(name.encode() + path.read_bytes() for name, path in files.items())])
    out = build_root() / "lab" / f"initramfs-{key}.cpio"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="initramfs.", dir=out.parent) as tmpdir:
        root = Path(tmpdir) / "root"
        for d in ("bin", "dev", "proc", "sys", "tmp"):
            (root / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        for name, path in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, root / name)
        init = root / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        # The kernel opens /dev/console for init before devtmpfs is mounted.
        os.mknod(root / "dev" / "console", stat.S_IFCHR | 0o600, os.makedev(5, 1))
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        archive = Path(tmpdir) / "out.cpio"
        with archive.open("wb") as fh:
            proc = subprocess.run(["cpio", "-o", "-H", "newc", "--owner=0:0", "--quiet"],
                                  cwd=root, input="\n".join(names).encode(), stdout=fh,
                                  stderr=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            raise BuildError(f"cpio failed: {proc.stderr.decode(errors='replace')}")
        os.replace(archive, out)
    return out


def module_dependencies(kernel: Kernel, module: Path) -> list[Path]:
    """The kernel's own modules that `module` needs, each after what it needs in turn.

    From `modinfo -F depends` and the kernel's modules.dep. Empty when everything
    the module uses is built in, as on every Debian kernel of the matrix so far.
    """
    needed = _run(["modinfo", "-F", "depends", str(module)]).strip()
    if not needed:
        return []
    return kernel_modules(kernel, [n.replace("-", "_") for n in needed.split(",")], module.name)


def kernel_modules(kernel: Kernel, names: Sequence[str], who: str = "the guest") -> list[Path]:
    """The kernel's own modules `names`, each after what it needs in turn (modules.dep).

    A kernel scripts/fetch-kernel.sh unpacked has no modules.dep (depmod never ran on
    it): asking for no module must not need one.
    """
    if not names:
        return []
    dep_file = kernel.modules_dir / "modules.dep"
    if not dep_file.exists():
        raise BuildError(f"{who} needs {', '.join(names)}, but {dep_file} is missing "
                         f"(run depmod for {kernel.release})")
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in dep_file.read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[_module_name(path)] = (path, [_module_name(p) for p in rest.split()])
    order: list[Path] = []

    def visit(name: str) -> None:
        if name not in deps:
            raise BuildError(f"{who} needs {name}, not in {kernel.modules_dir}")
        path = kernel.modules_dir / deps[name][0]
        if path in order:
            return
        for dep in deps[name][1]:
            visit(dep)
        order.append(path)

    for name in names:
        visit(name)
    return order


def _module_name(path: str) -> str:
    name = Path(path).name
    return name[:name.index(".ko")].replace("-", "_")


def _plain_module(path: Path) -> Path:
    """`path` uncompressed (busybox insmod takes plain .ko files), cached in build/lab."""
    if path.suffix == ".ko":
        return path
    key = _digest([path.read_bytes()])
    out = build_root() / "lab" / "deps" / f"{_module_name(path.name)}-{key}.ko"
    if not out.is_file():
        tool = {".xz": "xz", ".zst": "zstd", ".gz": "gzip"}[path.suffix]
        out.parent.mkdir(parents=True, exist_ok=True)
        data = subprocess.run([tool, "-dc", str(path)], capture_output=True, check=True).stdout
        tmp = out.with_name(f"{out.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, out)
    return out


@dataclass(frozen=True)
class GuestImage:
    """Everything one boot needs, all built for the same kernel release."""

    kernel: Kernel
    module: Path
    initramfs: Path
    #: the kernel's modules vmwipe.ko needs, as paths in the initramfs, in load order
    preload: tuple[str, ...] = ()

    def insmod_commands(self, args: str = "") -> list[str]:
        """The guest commands that load vmwipe.ko (with `args`), its dependencies first."""
        return [*(f"insmod /{p}" for p in self.preload), f"insmod /vmwipe.ko{args}".rstrip()]


def build_guest_image(kernel: Kernel, module: Path | None = None,
                      with_modules: Sequence[str] = ()) -> GuestImage:
    """vmwipe.ko (built here unless given), the programs and the modules it needs.

    `with_modules`: more of the kernel's own modules (e.g. virtio_blk), with what they
    need, as /lib/modules/NAME.ko for a test to insmod in the order of their names.
    """
    module = module or build_module(kernel)
    extra = build_dynamic()
    preload = []
    for dep in module_dependencies(kernel, module):
        name = f"lib/modules/{_module_name(dep.name)}.ko"
        extra[name] = _plain_module(dep)
        preload.append(name)
    for dep in kernel_modules(kernel, with_modules):
        extra[f"lib/modules/{_module_name(dep.name)}.ko"] = _plain_module(dep)
    return GuestImage(kernel, module, build_initramfs(module, build_programs(), extra),
                      tuple(preload))


@dataclass(frozen=True)
class DiskImage:
    """A bootable raw disk (`diskimage.ensure_image`): GRUB, a kernel, vmwipe by DKMS.

    No boot writes it: each one gets its own `overlay()`.
    """

    name: str
    path: Path
    kernels: tuple[str, ...]  # releases in the image's /lib/modules


def overlay(backing: Path, path: Path, backing_format: str = "raw") -> Path:
    """A qcow2 file over `backing` (read-only from then on): what a boot or a clone writes."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b",
          str(backing.resolve()), str(path)])
    return path
