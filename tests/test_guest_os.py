"""A real guest OS (issue 25): Debian disk images booted through GRUB, then cloned.

Each image (`make guest-images`, cached under build/guest-images/) boots once per
module under TCG: SeaBIOS, GRUB from the disk, the distribution kernel, systemd;
udev loads vmwipe.ko (built by DKMS in the image) by its ACPI modalias, with the
region reserved by the image's GRUB configuration (the guest packages from
`make deb`, installed with apt).  No -kernel, no insmod.

Then `vmwipe save` and 3 clones with `-cpu qemu64` and no vmgenid device, by
`vmwipe clone -n 3`, by `vmwipe template --from` the save + `vmwipe clone
--template -n 3`, and, side by side, by a plain restore: unmodified programs
run right after resume (python3's secrets and uuid4, `openssl rand`, the
kernel's random/uuid) must print no value twice across the vmwipe clones or
across the template clones, and a systemd service that keeps its key in a
vmwipe page (libvmwipe) finds that page zeroed and holds a key of its own in
each; the plain clones share values and keep the snapshot's key.  The kernel's
CRNG is made to reseed just before the save (`OsCloneScenario._reseed_far`; on
6.2+ that waits for its own scheduled reseed, up to a minute), so that its next
reseed does not make the clones diverge by themselves right after resume.

Images: VMWIPE_GUEST_IMAGES (default "debian12"; `make test-guest-os` sets
"debian12 debian13").  Building an image the first time takes minutes (see
docs/guest-images.md).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from vmwipe.lab.diskimage import ensure_image, missing_prerequisite
from vmwipe.lab.osguest import KINDS, MODES, KeyState, OsCloneScenario, compare, summary

pytestmark = pytest.mark.slow

IMAGES = os.environ.get("VMWIPE_GUEST_IMAGES", "debian12").split()
CLONES = 3
ROUNDS = 2


@pytest.fixture(scope="module", params=IMAGES)
def scenario(request: pytest.FixtureRequest) -> Iterator[OsCloneScenario]:
    why = missing_prerequisite()
    if why is None and shutil.which("qemu-system-x86_64") is None:
        why = "qemu-system-x86_64 not installed"
    if why:
        pytest.skip(why)
    image = ensure_image(request.param)
    with OsCloneScenario(image, clones=CLONES, rounds=ROUNDS, log=print) as sc:
        sc.boot()
        yield sc


def test_boots_from_disk_with_the_module_loaded_by_modalias(scenario: OsCloneScenario) -> None:
    f = scenario.facts
    print(f)
    assert scenario.guest is not None
    assert "-kernel" not in scenario.guest.qemu_args()
    # GRUB passes BOOT_IMAGE; the kernel is the image's own (DKMS built the module for it)
    assert f"BOOT_IMAGE=/boot/vmlinuz-{f.kernel}" in f.cmdline
    assert f.kernel in scenario.image.kernels
    assert "memmap=0x100000$0x1f000000" in f.cmdline.split()
    # bound to the ACPI device, by the alias udev resolved, with nothing else loading it
    assert f.modalias == "acpi:VMWP0001:"
    assert f.module_driver == "vmwipe"
    assert f.alias_resolves_to == "vmwipe"
    assert f.loaded_by_config == ""
    assert f.crng_refresh == "active"
    # the guest package put it there: DKMS built the package's version for this kernel
    assert f"vmwipe/{f.package}, {f.kernel}, x86_64: installed" in f.dkms, f.dkms
    # taken out of System RAM by memmap= (e820 "Reserved"), claimed by the driver inside it
    assert f.iomem[0].lower() == "1f000000-1f0fffff : reserved", f.iomem
    assert "1f000000-1f0fffff : vmwipe" in f.iomem, f.iomem
    table = f.inspect["extra"]  # `vmwipe inspect --json` through the agent's QMP socket
    assert table["registered"] is True and table["errors"] == [], table
    assert table["header"]["wipe_generation"] == 0
    assert table["fill_ranges"], "the kernel CRNG is registered as fill ranges"


def test_clones_share_no_value_drawn_after_resume(scenario: OsCloneScenario) -> None:
    scenario.save()
    results = {mode: scenario.run_mode(mode) for mode in MODES}
    for res in results.values():
        print(f"{summary(res)} ({res.seconds:.0f} s)")
    plain = results.pop("plain")
    for wiped in results.values():  # `vmwipe clone` and `vmwipe clone --template`
        for kind in KINDS:
            assert wiped.drawn[kind] == CLONES * ROUNDS, (wiped.mode, kind, wiped.values[kind])
            assert wiped.shared[kind] == 0, (wiped.mode, kind, wiped.values[kind])
        assert all(g >= 1 for g in wiped.generations), (wiped.mode, wiped.generations)
        # vmwipe-keyd.service kept its key in a vmwipe page: the page read zero when the
        # wipe signal came, and the key it drew then is its own in every clone
        assert all(k.how == "zeroed" and k.generation >= 1 for k in wiped.keys), wiped.keys
        keys = {k.fingerprint for k in wiped.keys}
        assert len(keys) == CLONES and scenario.key_before not in keys, wiped.keys
    for kind in KINDS:
        assert plain.drawn[kind] == CLONES * ROUNDS, (kind, plain.values[kind])
    assert plain.generations == [0] * CLONES
    # restored plainly, no signal: every clone holds the snapshot's key, as first drawn
    assert plain.keys == [KeyState(0, scenario.key_before, "start")] * CLONES, plain.keys
    # the baseline is not vacuous: restored alone, the clones' kernel CRNGs draw alike
    # (measured: every value of every kind shared by all 3, or nearly)
    assert sum(plain.shared.values()) >= 2, summary(plain)


def test_compare_counts_values_two_clones_printed() -> None:
    a = ["py-secrets " + "a" * 32, "openssl " + "b" * 32, "noise", "END"]
    b = ["py-secrets " + "a" * 32, "openssl " + "c" * 32]
    res = compare("x", [a, b])
    assert res.drawn == {"py-secrets": 2, "py-uuid4": 0, "openssl": 2, "kernel-uuid": 0}
    assert res.shared == {"py-secrets": 2, "py-uuid4": 0, "openssl": 0, "kernel-uuid": 0}
