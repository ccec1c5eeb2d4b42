"""vmwipe.ko builds with no warnings (W=1, and sparse when installed) on the oldest and the
newest kernel Debian ships (5.10 and 7.3) and on the kernels installed here; crng.o makes
no indirect call; a kernel below the floor is refused at build time; the ioctl type is
vmwipe's own.

The whole matrix (every series, oldest and newest) is `make kmod-check`; this is the slice
`make test` carries. The 7.3 build needs gcc-14, so it runs in the Debian 13 root (shared
with the kernel-matrix boot test and `make test-debian13`; debootstrapped on first use).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KMOD = ROOT / "guest_kmod"
PASS_ENV = ("VMWIPE_KERNEL_CACHE", "VMWIPE_DEBIAN13_ROOT", "http_proxy", "https_proxy")


@pytest.fixture(scope="module")
def slice_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("kmod-builds")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "VMWIPE_BUILD_DIR": str(out),
           **{k: os.environ[k] for k in PASS_ENV if k in os.environ}}
    run = subprocess.run(["bash", str(KMOD / "check-builds.sh"), "--slice"], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout + run.stderr
    return out, run.stdout


@pytest.mark.slow
def test_oldest_newest_and_installed_kernels_build_warning_free(
        slice_builds: tuple[Path, str]) -> None:
    out, log = slice_builds
    if os.geteuid() != 0:
        pytest.skip("the 7.3 build runs in the Debian 13 root, which needs root")
    ok = {line.split(":")[1].strip() for line in log.splitlines()
          if line.startswith("check-builds: ") and "OK, no warnings" in line}
    assert "5.10.0-43-amd64" in ok and "7.3.4+deb13-amd64" in ok, log
    assert any(abi.startswith("6.12.") for abi in ok), log
    assert all("crng.o: no indirect calls" in line for line in log.splitlines()
               if "OK, no warnings" in line)
    for abi in ok:
        assert (out / f"kmod-{abi}" / "vmwipe.ko").is_file()


@pytest.mark.slow
def test_features_come_from_the_headers(slice_builds: tuple[Path, str]) -> None:
    """5.10 lacks what 7.3 has; the probes (not the version) said so."""
    out, _log = slice_builds
    old = (out / "kmod-5.10.0-43-amd64" / "compat-probed.h").read_text()
    new = (out / "kmod-7.3.4+deb13-amd64" / "compat-probed.h").read_text()
    for feature in ("VM_MAY_SPLIT", "VMA_LOOKUP", "VMFORK_NOTIFIER", "BLAKE2S_CTX"):
        assert f"/* no {feature} */" in old
    for feature in ("VM_MAY_SPLIT", "VMA_LOOKUP", "VMFORK_NOTIFIER", "BLAKE2S_CTX",
                    "PIN_WITHOUT_VMAS", "VM_FLAGS_MOD"):
        assert f"#define VMWIPE_HAVE_{feature} 1" in new


def test_indirect_call_check_can_fail(tmp_path: Path) -> None:
    """The crng.o check is not vacuous: a call through a function pointer (plain, and
    through a retpoline thunk as kernels build it) is caught."""
    src = tmp_path / "ind.c"
    src.write_text("int (*fp)(int);\nint f(int x);\nint f(int x) { return fp(x) + 1; }\n")
    for flags in ([], ["-mindirect-branch=thunk-extern"]):
        obj = tmp_path / f"ind{len(flags)}.o"
        subprocess.run(["gcc", "-O2", *flags, "-c", str(src), "-o", str(obj)], check=True)
        run = subprocess.run(["sh", str(KMOD / "no-indirect-calls.sh"), str(obj)],
                             capture_output=True, text=True)
        assert run.returncode == 1 and "makes indirect calls" in run.stderr, run.stderr
    direct = tmp_path / "direct.o"
    src.write_text("int g(int x);\nint f(int x);\nint f(int x) { return g(x) + 1; }\n")
    subprocess.run(["gcc", "-O2", "-c", str(src), "-o", str(direct)], check=True)
    assert subprocess.run(["sh", str(KMOD / "no-indirect-calls.sh"), str(direct)]).returncode == 0


def test_a_kernel_below_the_floor_is_refused(tmp_path: Path) -> None:
    """Headers without what vmwipe needs (here: none at all) stop the build with the floor."""
    run = subprocess.run(["sh", str(KMOD / "compat-probes.sh"), str(tmp_path / "probed.h"),
                          "gcc", "-nostdinc", f"-I{tmp_path}"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "Linux 5.10 or later" in run.stderr, run.stderr
    assert not (tmp_path / "probed.h").exists()


def _ioctl_types(uapi: Path) -> dict[int, set[str]]:
    """{type code: headers} of every _IO/_IOR/_IOW/_IOWR in a kernel's uapi headers, the
    type given as a number or as a macro #defined to one."""
    calls: list[tuple[str, str]] = []
    defines: dict[str, str] = {}
    for path in uapi.rglob("*.h"):
        text = path.read_text(errors="replace")
        calls += [(m, path.name) for m in
                  re.findall(r"\b_IO(?:R|W|WR)?\(\s*([A-Za-z0-9_']+)\s*,", text)]
        for name, value in re.findall(r"#\s*define\s+(\w+)\s+\(?\s*(0x[0-9a-fA-F]+|\d+)\b",
                                      text):
            defines.setdefault(name, value)
    types: dict[int, set[str]] = {}
    for arg, header in calls:
        value = arg if arg[0].isdigit() else defines.get(arg)
        if value is not None:
            types.setdefault(int(value, 0), set()).add(header)
    return types


def test_ioctl_type_is_free() -> None:
    """VMWIPE_IOC_MAGIC is no other ioctl type of the installed kernels' uapi headers
    (0xB7 was, nsfs's NSIO: ioctl numbers are global across drivers)."""
    text = (ROOT / "guest_kmod" / "vmwipe_uapi.h").read_text()
    m = re.search(r"#define VMWIPE_IOC_MAGIC\s+(0x[0-9A-Fa-f]+)", text)
    assert m, "no VMWIPE_IOC_MAGIC"
    magic = int(m.group(1), 16)
    trees = sorted(Path("/usr/src").glob("linux-headers-*-common/include/uapi"))
    if not trees:
        pytest.skip("no kernel headers installed (make setup installs them)")
    for uapi in trees:
        # drm.h builds its numbers from DRM_COMMAND_BASE (0x40) + nr: not a type
        users = _ioctl_types(uapi).get(magic, set()) - {"drm.h"}
        assert not users, f"ioctl type {magic:#x} is also used by {sorted(users)} ({uapi})"
