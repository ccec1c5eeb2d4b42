"""vmwipe.ko in a q35 guest booted by OVMF with SMM (Debian's `ovmf`, the Secure Boot
build, which requires SMM: the usual secure-boot setup).

On a 512 MiB q35 guest the default region, 0x1f000000, lies in the top 16 MiB of low RAM,
where OVMF puts TSEG and locks it.  Writes from outside SMM are dropped there and reads give
0xff, so the host would read no table and resume the guest as if nothing were registered.
The module must prove at bind that its region keeps what it writes, and refuse otherwise,
saying why.  One boot (measured: 37 s to the shell under TCG at load 12, the direct-kernel
SeaBIOS guests take a few seconds less).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmwipe.lab import Guest, GuestConfig, GuestImage
from vmwipe.lab.shell import rc, sh
from vmwipe.protocol import MAGIC

pytestmark = pytest.mark.slow

OVMF = Path("/usr/share/OVMF")
CODE, VARS = OVMF / "OVMF_CODE_4M.secboot.fd", OVMF / "OVMF_VARS_4M.fd"


@pytest.fixture(scope="module")
def ovmf_smm(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    if not (CODE.is_file() and VARS.is_file()):
        pytest.skip(f"{CODE} missing: apt-get install ovmf (make setup does)")
    varstore = tmp_path_factory.mktemp("ovmf") / "vars.fd"
    shutil.copyfile(VARS, varstore)
    # No memmap=: OVMF reserves TSEG in the memory map itself.
    cfg = GuestConfig(image, machine="q35,smm=on", reserve=False, boot_timeout=300, extra_args=(
        "-global", "driver=cfi.pflash01,property=secure,value=on",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={varstore}"))
    with Guest(cfg) as g:
        yield g


def test_region_in_tseg_is_refused(ovmf_smm: Guest) -> None:
    g = ovmf_smm
    region = g.region
    assert f"{region.base:08x}-" in sh(g, "grep -i reserved /proc/iomem")  # TSEG, reserved
    sh(g, "insmod /vmwipe.ko crng_refresh=0")  # the module loads; its probe refuses
    log = sh(g, "dmesg | grep vmwipe")
    assert "does not keep what is written" in log, log
    assert rc(g, "test -e /sys/bus/platform/devices/VMWP0001:00/driver") != 0
    assert rc(g, "test -e /dev/vmwipe") != 0
    assert g.read_phys(region.base, len(MAGIC)) != MAGIC
