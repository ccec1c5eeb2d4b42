"""The kernel matrix's slice in `make test` (issue 22): the newest kernel, end to end.

The newest Debian kernel of `vmwipe.lab.matrix.KERNELS` is fetched (cached in
$VMWIPE_KERNEL_CACHE), vmwipe.ko is built against it with W=1 (in the Debian 13
root: its kbuild needs gcc-14), the kernel boots under TCG and `vmwipe clone -n 3`
of one saved image must share no draw and no reseed key. The whole matrix is
`make kernel-matrix` (docs/kernel-matrix.md); the oldest and newest builds are in
test_kmod_build.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmwipe.lab.matrix import BEGIN, END, KERNELS, Row, render_table, run_kernel, update_doc


@pytest.fixture(scope="module")
def newest() -> Row:
    if os.geteuid() != 0:
        pytest.skip("needs root (the Debian 13 root for the gcc-14 build, chroot and mounts)")
    return run_kernel(KERNELS[-1], boot=True, log=print)


@pytest.mark.slow
def test_newest_kernel_builds_boots_and_clones_share_nothing(newest: Row) -> None:
    r = newest
    print(render_table([r]))
    assert r.builds, r.first_error
    assert r.warnings == [], r.warnings
    assert r.error is None, r.error
    assert r.crng_refresh == "active", r.dmesg
    assert r.host_crng is not None and r.host_crng.startswith("refreshed ("), r.host_crng
    assert r.draws.get("K", 0) >= 3, "every clone saw its page wiped and printed a reseed key"
    assert r.draws.get("G", 0) >= 3 * 100, "the getrandom() draws were collected"
    assert r.draws.get("V", 0) >= 3 * 100, "vDSO getrandom() exists on 7.x and was drawn"
    assert r.shared_draws == 0 and r.shared_keys == 0, r.duplicated


def test_table_and_doc_say_what_failed(tmp_path: Path) -> None:
    failed = Row("5.10.0-46-amd64", "bullseye-security", "Debian 11", builds=False,
                 warnings=["a.c:1:2: warning: x"], first_error="a.c:3:4: error: no may_split")
    ok = Row("7.3.4+deb13-amd64", "trixie-backports", "newest", builds=True, booted=True,
             crng_refresh="active", host_crng="refreshed (3 ranges)", draws={"G": 450, "K": 3},
             duplicated={})
    shared = Row("6.1.0-57-amd64", "bookworm-security", "x", builds=True, booted=True,
                 crng_refresh="unavailable: disabled", draws={"G": 450, "U": 450, "K": 3},
                 duplicated={"G": 4, "U": 2, "K": 3}, error="only 2 of 3 clones printed a key")
    table = render_table([failed, ok, shared]).splitlines()
    assert len(table) == 5
    assert "| **no** | 1 | - | - | - | - |" in table[2] and "error: no may_split" in table[2]
    assert "| yes | 0 | active | refreshed (3 ranges) | 0 | 0 |" in table[3]
    assert "| - | 6 | 3 |" in table[4] and "**only 2 of 3 clones printed a key**" in table[4]
    assert failed.shared_draws is None and shared.shared_draws == 6 and shared.shared_keys == 3
    doc = tmp_path / "m.md"
    doc.write_text(f"intro\n{BEGIN}\nold\n{END}\nafter\n")
    update_doc(doc, "T", "H")
    assert doc.read_text() == f"intro\n{BEGIN}\nH\n\nT\n{END}\nafter\n"
