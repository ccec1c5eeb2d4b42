"""Clones never share the guest kernel's CRNG (issue 15), in a real guest under TCG.

`-cpu qemu64` (no RDRAND), one boot without a vmgenid device and one with it;
`vmwipe clone -n 4` of one saved image.  With protocol v2 (the module registers
the kernel CRNG as fill ranges and the host refills them) no reseed key and no
getrandom() / random/uuid / vDSO getrandom() draw after resume is shared by two
clones, beyond at most one in-flight draw per clone.  Side by side, measured on
the same image: a v1 agent (zero ranges only) and, with the device, vmgenid
alone.  See `vmwipe.lab.crng`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmwipe.lab import GuestImage
from vmwipe.lab.crng import BOOTS, CrngScenario, analyse, summary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=BOOTS,
                ids=[f"{'vmgenid' if v else 'no-vmgenid'}-crng_refresh={int(r)}" for v, r in BOOTS])
def scenario(request: pytest.FixtureRequest, image: GuestImage) -> Iterator[CrngScenario]:
    vmgenid, refresh = request.param
    with CrngScenario(vmgenid, clones=4, draws=150, image=image, crng_refresh=refresh) as sc:
        sc.boot_and_save()
        yield sc


def test_clones_of_one_image(scenario: CrngScenario) -> None:
    sc = scenario
    results = {mode: sc.run_mode(mode) for mode in sc.modes}
    for res in results.values():
        print(summary(res))
    if sc.crng_refresh:
        assert sc.sysfs_state == "active"
        assert "kernel CRNG registered: base_crng key+generation, input_pool" in sc.dmesg
        res = results["v2"]
        assert res.draws.get("K", 0) >= 4, "every clone saw its page wiped and reseeded"
        assert res.duplicated.get("K", 0) == 0, "two clones reseeded with the same key"
        for kind in ("G", "U", "V"):
            assert res.max_dup_per_clone.get(kind, 0) <= 1, (kind, summary(res))
        assert res.ok_v2
        if "_vdso_rng_data" in sc.dmesg:
            assert res.draws.get("V", 0) >= 4 * 100, "vDSO getrandom() draws were collected"
    else:
        assert sc.sysfs_state == "unavailable: disabled (crng_refresh=0)"
        if not sc.vmgenid:
            # the baseline is not vacuous: zero ranges alone leave the reseed key shared
            assert results["v1"].duplicated.get("K", 0) >= 2, summary(results["v1"])


def test_analyse_counts_shared_values() -> None:
    a = [(1.0, "G 1 aa"), (1.1, "K 2 " + "0" * 64), (1.2, "G 2 bb")]
    b = [(2.0, "G 1 aa"), (2.1, "K 2 " + "1" * 64), (2.5, "G 2 cc"), (2.6, "garbage")]
    res = analyse("x", False, [a, b], [0.5, 1.5])
    assert res.duplicated == {"G": 2} and res.max_dup_per_clone == {"G": 1, "K": 0}
    assert res.draws == {"G": 4, "K": 2} and res.window_ms == 500.0
