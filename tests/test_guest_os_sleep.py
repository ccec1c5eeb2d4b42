"""S3 and S4 on a real guest OS (issue 25): systemd suspends and hibernates a Debian disk image.

One boot per image (`make guest-images`) through GRUB, on a QEMU >= 9 (it keeps the
`suspended` run state across a save and a restore), then a chain of QEMUs on the same
disk (`vmwipe.lab.ossleep`):

- S3: `systemctl suspend`; `vmwipe save` of the sleeping VM and `vmwipe restore` into a
  fresh QEMU (the wipe while it sleeps); `system_wakeup`.  The module sees the new
  generation, forces a CRNG reseed, and user space hears of it: POLLPRI to a python3
  waiter that holds a vmwipe page, and the `VMWIPE_GENERATION` uevent to a udev rule.
- S4: `systemctl hibernate` to the image's swap partition; ACPI powers off and QEMU
  exits; a fresh QEMU boots the same disk, the initramfs resumes the image: the table is
  rebuilt and a wipe after the resume (`vmwipe save` + `vmwipe restore`) works.

Minutes per image, so only `make test-guest-os` runs them (VMWIPE_GUEST_OS_TESTS=full);
images: VMWIPE_GUEST_IMAGES (default "debian12").  Times: docs/guest-images.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from test_migstream import QEMU10

from vmwipe.lab.diskimage import ensure_image, missing_prerequisite
from vmwipe.lab.ossleep import (
    PAGE,
    POLLPRI,
    S3Result,
    S4Result,
    SleepLab,
    describe,
    woke_lines,
)

IMAGES = os.environ.get("VMWIPE_GUEST_IMAGES", "debian12").split()
FULL = os.environ.get("VMWIPE_GUEST_OS_TESTS") == "full"


@pytest.fixture(scope="module", params=IMAGES)
def lab(request: pytest.FixtureRequest) -> Iterator[SleepLab]:
    if not FULL:
        pytest.skip("S3/S4 on the disk images take minutes: make test-guest-os")
    why = missing_prerequisite()
    if why is None and not QEMU10:
        why = "no QEMU >= 9.0 (scripts/fetch-qemu10.sh, or VMWIPE_TEST_QEMU10)"
    if why:
        pytest.skip(why)
    image = ensure_image(request.param)
    with SleepLab(image, QEMU10, log=print) as lab:
        lab.boot()
        lab.prepare()
        yield lab


@pytest.fixture(scope="module")
def s3(lab: SleepLab) -> S3Result:
    r = lab.run_s3()
    print(describe(r))
    return r


@pytest.mark.slow
def test_s3_wipe_while_suspended_is_seen_at_wake(lab: SleepLab, s3: S3Result) -> None:
    r = s3
    # the guest offers ACPI S3 (deep), and systemd's suspend reached it
    assert "mem" in r.power_states.split() and "[deep]" in r.mem_sleep, r.mem_sleep
    assert r.suspend_status == "suspended"
    # the wipe while asleep: the waiter's page was listed and zeroed, every listed page
    # reads zero, the host wrote generation 1 and refilled the CRNG's ranges
    gpa = lab.waiter.pfn * PAGE
    assert r.page_before, "the waiter's pattern was not in its page before the save"
    assert r.status_after_restore == "suspended"
    assert r.restore["wipe"]["status"] == "wiped" and r.restore["wipe"]["pages"] >= 1
    assert r.host_generation == lab.waiter.gen + 1
    assert gpa in r.slot_gpas
    assert r.page_zero_after_restore and r.slots_zero_after_restore
    assert r.seed_filled
    # wake-up: the same kernel resumed (not a fresh boot) and systemd-sleep finished
    assert r.woke == "post suspend", "the firmware booted afresh instead of resuming S3"
    assert r.hook == ["pre suspend", "post suspend"], r.hook
    assert r.boot_id_same
    # the module saw the wipe (the reset at wake-up zeroed the header), rebuilt its table
    assert r.sysfs_generation == r.host_generation, "the wipe done in S3 was lost at wake-up"
    assert r.header_generation == r.host_generation and r.header_boot_id_same
    # user space was told: POLLPRI with the new generation, the page zero when it looked;
    # the uevent reached the udev rule
    assert r.polls[:1] == [(POLLPRI, r.host_generation, True)], r.polls
    assert f"UEVENT gen={r.host_generation}" in r.uevents, r.uevents
    # the forced reseed: the module mixed in the host's seed and cleared it, and
    # base_crng.generation moved on (random.c reseeds itself at PM_POST_SUSPEND as well)
    assert r.seed_zero_after, "the module did not consume the host's seed"
    assert 1 <= r.crng_reseeds <= 16, r.crng_reseeds


@pytest.mark.slow
def test_s4_hibernate_resume_rebuilds_table_and_wipes(lab: SleepLab) -> None:
    lab.ensure_alive()
    r: S4Result = lab.run_s4()
    print(describe(r))
    # the boot resumes from the swap partition: the initramfs carries RESUME= and set
    # /sys/power/resume to it (the kernel command line has no resume=)
    assert r.initramfs_resume.startswith("RESUME=UUID="), r.initramfs_resume
    assert r.resume_dev == r.swap_dev, (r.resume_dev, r.swap_dev)
    assert "[platform]" in r.disk_modes.split(), r.disk_modes
    assert r.powered_off, f"no power-off after systemctl hibernate: {r.hibernate_said}"
    assert r.region_zero_at_poweroff, "a live table at the S4 power-off"
    # a new QEMU, GRUB, the kernel: the image's initramfs resumed the hibernated system
    assert r.grub == ["Loading Linux", "Loading initial ramdisk"], r.grub
    assert r.woke == "post hibernate", "the second boot did not resume the image"
    assert r.hook == ["pre hibernate", "post hibernate"], r.hook
    b, a = r.before, r.after
    # the same kernel instance (boot id), its table rebuilt as it was
    assert a["boot_id"] == b["boot_id"]
    assert a["registered"] and a["errors"] == [], a
    assert a["header"]["boot_id"] == b["header"]["boot_id"]
    assert a["header"]["wipe_generation"] == b["header"]["wipe_generation"] == b["generation"]
    assert (a["used"], a["generation"]) == (b["used"], b["generation"])
    assert a["slot_gpas"] == b["slot_gpas"] and lab.waiter.pfn * PAGE in a["slot_gpas"]
    assert a["crng_refresh"] == "active" and a["crng"].startswith("refreshed"), a["crng"]
    # a wipe after the resume works
    gen = b["generation"] + 1
    assert r.wipe_restore["wipe"]["status"] == "wiped"
    assert r.wipe_page_zero and r.wipe_header_generation == gen
    assert r.wipe_polls[:1] == [(POLLPRI, gen, True)], r.wipe_polls
    assert r.wipe_sysfs_generation == gen
    assert f"UEVENT gen={gen}" in r.wipe_uevents, r.wipe_uevents


def test_woke_lines_parses_the_waiters_output() -> None:
    out = ("HELD pfn=0x1234 gen=0\nWOKE events=0x2 gen=1 zero=1\nnoise\n"
           "WOKE events=0x2 gen=2 zero=0\n")
    assert woke_lines(out) == [(0x2, 1, True), (0x2, 2, False)]
