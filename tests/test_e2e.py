"""Issue 6 end to end: clones of one snapshot never share a DRBG output; the baselines do.

The slow tests boot the guest once for the module (vmwipe.lab.e2e.Scenario):
`vmwipe save` of a guest running the example DRBG, then N clones resumed by
`vmwipe clone`, N by a plain restore and N by a plain restore with a new
vmgenid GUID, K outputs collected from each.  Each claim of the issue is its
own test.  The fast tests feed synthetic streams to the analysis, so a broken
analysis (one that could never fail) is caught without QEMU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmwipe.lab.e2e import (
    Analysis,
    CloneRun,
    Output,
    Scenario,
    ScenarioResult,
    analyse,
    clone_argv,
    parse_lines,
)
from vmwipe.lab.shell import missing_prerequisite

ROOT = Path(__file__).resolve().parents[1]
N = int(os.environ.get("VMWIPE_E2E_CLONES", "4"))
K = int(os.environ.get("VMWIPE_E2E_OUTPUTS", "1000"))


def outs(epoch: str, start: int, n: int, tag: str = "") -> list[Output]:
    """Synthetic DRBG outputs: values are a function of (epoch, counter), like the real DRBG."""
    return [Output(epoch, c, f"{tag}{epoch}{c:08x}", float(c)) for c in range(start, start + n)]


# --- analysis on synthetic data (fast) ---------------------------------------------------


def test_parse_lines_splits_outputs_reseeds_and_garbage() -> None:
    lines = [
        (1.0, "aaaaaaaaaaaaaaaa 7 0123456789abcdef"),
        (1.1, "5,379,8918731,-;random: crng reseeded due to virtual machine fork"),
        (1.2, "bbbbbbbbbbbbbbbb 0 fedcba9876543210\r"),
        (1.3, "6,1,0,-;Linux version ..."),
        (1.4, ""),
    ]
    st = parse_lines(lines)
    assert [(o.epoch, o.counter) for o in st.outputs] == [
        ("aaaaaaaaaaaaaaaa", 7), ("bbbbbbbbbbbbbbbb", 0)]
    assert st.reseeds == [(1.1, 1)]
    assert st.garbage == 1


def test_analysis_vmwipe_like_clones_share_nothing() -> None:
    old = "o" * 16
    clones = [[*outs(old, 100, 1), *outs(f"{i:016x}", 0, 50)] for i in range(4)]
    a = analyse({old}, clones, outs(old, 100, 50))
    assert a.shared_new_values == 0 and a.shared_new_epochs == 0
    assert a.new_values_in_original == 0
    assert [c.old_epoch_outputs for c in a.clones] == [1, 1, 1, 1]
    assert [c.old_epoch_counters for c in a.clones] == [[100]] * 4
    assert a.shared_values == 1  # the in-flight value, identical in every clone
    assert all(c.first_new_index == 1 for c in a.clones)


def test_analysis_plain_restore_duplicates_everything() -> None:
    old = "o" * 16
    clones = [outs(old, 100, 50) for _ in range(3)]
    a = analyse({old}, clones, outs(old, 100, 50))
    assert a.shared_values == 50 and a.duplicate_outputs == 100
    assert a.max_old_epoch_outputs == 50
    assert a.values_in_original == 50
    assert all(c.new_epochs == [] for c in a.clones)


def test_analysis_catches_a_duplicated_reseed() -> None:
    """Two clones reseeding from the same (duplicated) CRNG: same epoch, same values."""
    old = "o" * 16
    clones = [outs("e1" * 8, 0, 20), outs("e1" * 8, 0, 20), outs("e2" * 8, 0, 20)]
    a = analyse({old}, clones)
    assert a.shared_new_epochs == 1 and a.shared_new_values == 20


def _result_with(analysis: Analysis, clones: list[list[Output]]) -> ScenarioResult:
    res = ScenarioResult(len(clones), len(clones[0]), "tcg", "test")
    runs = []
    for i, o in enumerate(clones):
        r = CloneRun("vmwipe", i, 0, outputs=o, pages_wiped=1, paused_ms=1.0)
        r.integrity = {"identical": True, "listed_zero": True}
        r.notification = {"poll_woke": True, "generation": 1}
        r.health = {"shell": True, "oops": 0}
        runs.append(r)
    res.runs["vmwipe"] = runs
    res.analyses["vmwipe"] = analysis
    return res


def test_claims_fail_on_bad_data() -> None:
    """The same claim code the slow tests rely on turns False when clones share values."""
    old = "o" * 16
    good = [[*outs(old, 5, 1), *outs(f"{i:016x}", 0, 9)] for i in range(3)]
    res = _result_with(analyse({old}, good), good)
    assert res.evaluate() and res.ok()
    shared = [outs("e" * 16, 0, 10) for _ in range(3)]
    res = _result_with(analyse({old}, shared), shared)
    res.evaluate()
    assert not res.ok()
    assert not res.claims["vmwipe: no post-resume value in two clones"]
    stale = [outs(old, 5, 3) + outs(f"{i:016x}", 0, 7) for i in range(3)]
    res = _result_with(analyse({old}, stale), stale)
    res.evaluate()
    assert not res.claims["vmwipe: at most one in-flight old-epoch value per clone"]


def test_clone_argv_keeps_the_machine_and_swaps_the_endpoints(tmp_path: Path) -> None:
    orig = ["qemu-system-x86_64", "-accel", "tcg", "-chardev", "stdio,id=con,signal=off",
            "-serial", "chardev:con", "-qmp", "unix:/x/qmp.sock,server=on,wait=off",
            "-device", "vmgenid,guid=auto", "-cpu", "qemu64,+rdrand",
            "-chardev", "socket,id=drbg,path=/x/drbg.sock,server=on,wait=off",
            "-serial", "chardev:drbg", "-qmp", "unix:/x/agent.qmp,server=on,wait=off"]
    out = clone_argv(orig, tmp_path, "1234", "3")
    assert "-qmp" not in out
    assert f"socket,id=con,path={tmp_path}/con-3.sock,server=on,wait=off" in out
    assert f"socket,id=drbg,path={tmp_path}/drbg-3.sock,server=on,wait=off" in out
    assert "vmgenid,guid=1234" in out
    assert out.count("-serial") == 2 and "qemu64,+rdrand" in out


# --- the real scenario (slow) ------------------------------------------------------------


@pytest.fixture(scope="module")
def result() -> Iterator[ScenarioResult]:
    """One boot, one snapshot, N clones in each of the three modes."""
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    with Scenario(N, K, log=lambda msg: print(msg, flush=True)) as sc:
        res = sc.run()
    print(json.dumps(res.to_dict(), indent=1))
    pids = [r.pid for runs in res.runs.values() for r in runs]
    left = [p for p in pids if os.path.exists(f"/proc/{p}")]
    assert not left, f"clone QEMUs still exist: {left}"
    yield res


@pytest.mark.slow
def test_vmwipe_clones_never_share_a_post_resume_value(result: ScenarioResult) -> None:
    a = result.analyses["vmwipe"]
    runs = result.runs["vmwipe"]
    assert all(len(r.outputs) == K for r in runs)
    assert a.shared_new_values == 0, a
    assert a.shared_new_epochs == 0, a
    assert a.new_values_in_original == 0, a
    assert result.original_after == K
    epochs = [c.new_epochs[0] for c in a.clones]
    assert len(set(epochs)) == N and result.old_epoch not in epochs


@pytest.mark.slow
def test_vmwipe_at_most_one_in_flight_value(result: ScenarioResult) -> None:
    a = result.analyses["vmwipe"]
    for c, r in zip(a.clones, result.runs["vmwipe"], strict=True):
        assert c.old_epoch_outputs <= 1, c
        # the in-flight one is the output right after the last one printed before the save
        assert c.old_epoch_counters in ([], [result.last_pre_counter + 1]), c
        assert c.first_new_index == c.old_epoch_outputs
        assert r.outputs[c.first_new_index].counter == 0  # a fresh seed
        assert [o.counter for o in r.outputs[c.first_new_index:]] == list(
            range(K - c.old_epoch_outputs))


@pytest.mark.slow
def test_vmwipe_clone_wiped_and_paused_briefly(result: ScenarioResult) -> None:
    for r in result.runs["vmwipe"]:
        assert r.pages_wiped == 2  # the DRBG's state page and the poll waiter's page
        assert r.paused_ms is not None and 0 < r.paused_ms < 2000


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "vmgenid"])
def test_baselines_duplicate(result: ScenarioResult, mode: str) -> None:
    """Without the wipe the old epoch continues in every clone: the test can fail."""
    a = result.analyses[mode]
    assert all(c.old_epoch_outputs == K and not c.new_epochs for c in a.clones), a.clones
    assert a.shared_values == K
    assert a.duplicate_outputs == (N - 1) * K
    assert a.values_in_original == K  # and they are what the original printed, too


@pytest.mark.slow
def test_vmgenid_window_measured(result: ScenarioResult) -> None:
    for r in result.runs["vmgenid"]:
        assert r.reseed_ms is not None and 0 < r.reseed_ms < 30_000, r
        assert r.reseed_outputs is not None and r.reseed_outputs >= 0


@pytest.mark.slow
def test_integrity_ram_unchanged_outside_listed_pages(result: ScenarioResult) -> None:
    for r in result.runs["vmwipe"]:
        i = r.integrity
        assert i["identical"], i
        assert i["digest_before"] == i["digest_after"]
        assert i["listed_zero"] and i["listed_nonzero_in_snapshot"], i
        assert i["wipe_generation"] == 1
        assert len(i["vmgenid_guid_at"]) == 1, i  # the only byte QEMU itself rewrote


@pytest.mark.slow
def test_notification_and_health(result: ScenarioResult) -> None:
    for r in result.runs["vmwipe"]:
        assert r.notification["poll_woke"] and r.notification["poll_ok"], r.notification
        assert r.notification["poll_generation"] == 1 and r.notification["poll_page_zero"]
        assert r.notification["generation"] == 1
        assert r.health == {"shell": True, "oops": 0}


@pytest.mark.slow
def test_all_claims(result: ScenarioResult) -> None:
    failed = [c for c, ok in result.claims.items() if not ok]
    assert not failed


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path: Path) -> None:
    """`make demo`'s program, small: exit 0, JSON on stdout, table and chart written."""
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    shm = set(os.listdir("/dev/shm"))
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--clones", "2",
                        "--outputs", "200", "--json", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout)
    assert res["ok"] and res["clones"] == 2 and res["outputs"] == 200
    assert "values in 2+ clones" in p.stderr and "[ok]" in p.stderr
    ks = res["kernel_secrets"]  # one boot, 3 clones each way (issue 26)
    assert ks["clones"] == 3 and ks["ok_crng_only_shares"] and ks["ok_refill"], ks
    base, refill = ks["rounds"]
    assert (base["mode"], refill["mode"]) == ("crng-only", "ksecrets")
    assert base["isn_agree"] + base["ts_agree"] + base["ptr_agree"] > 0, base
    assert refill["isn_agree"] == refill["ts_agree"] == refill["ptr_agree"] == 0, refill
    assert "net_secret: registered" in ks["original_sysfs"], ks["original_sysfs"]
    assert "Kernel secrets across 3 clones" in p.stderr
    assert (tmp_path / "result.json").is_file()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (tmp_path / "vmwipe-demo.png").stat().st_size > 1000
    assert set(os.listdir("/dev/shm")) <= shm
