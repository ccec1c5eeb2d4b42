"""The `vmwipe save` CLI: `--scrub` keeps secrets off the disk, and a plain save
writes the sidecar that lets `vmwipe scrub FILE` work with no options."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import QEMU, SMALL_MACHINE, VM, qemu_available, run_cli, start_vm

from vmwipe.host_agent.qemu.launcher import start_qemu
from vmwipe.protocol import PAGE_SIZE

pytestmark = pytest.mark.skipif(not qemu_available(), reason="QEMU not installed")

SLOTS = [(0x0200_0000, 1), (0x0300_0000, 4), ((1 << 32) + 0x10_0000, 2)]


def _secret(i: int) -> bytes:
    return (b"SECRET%02d" % i + os.urandom(8)) * (PAGE_SIZE // 16)


def _plant(vm: VM) -> list[bytes]:
    secrets = [_secret(i) for i in range(len(SLOTS))]
    vm.plant(SLOTS)
    for (gpa, n), s in zip(SLOTS, secrets, strict=True):
        vm.write(gpa, s * n)
    return secrets


def test_save_scrub_never_writes_the_secret(tmp_path: Path, vm_factory: list[VM]) -> None:
    vm = start_vm(tmp_path / "a", SMALL_MACHINE)
    vm_factory.append(vm)
    secrets = _plant(vm)
    out = tmp_path / "scrubbed.sav"
    run = run_cli("save", "--paused", "--qmp", vm.qmp, "--to", str(out), "--scrub", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["pages"] == sum(n for _, n in SLOTS), report
    data = out.read_bytes()
    for s in secrets:
        assert s[:16] not in data, "a secret page reached the file"
    sidecar = json.loads(Path(str(out) + ".vmwipe.json").read_text())
    assert sidecar["region"] == {"base": vm.region.base, "size": vm.region.size}
    assert vm.status() in ("paused", "postmigrate", "prelaunch")


def test_plain_save_writes_sidecar_and_scrub_uses_it(tmp_path: Path, vm_factory: list[VM]) -> None:
    vm = start_vm(tmp_path / "b", SMALL_MACHINE)
    vm_factory.append(vm)
    secrets = _plant(vm)
    out = tmp_path / "plain.sav"
    run = run_cli("save", "--paused", "--qmp", vm.qmp, "--to", str(out), "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    sidecar = Path(report["extra"]["sidecar"])
    assert sidecar == Path(str(out) + ".vmwipe.json")
    ram = json.loads(sidecar.read_text())["ram"]
    assert any(r["gpa"] == 1 << 32 for r in ram), ram  # the pc-dimm above 4 GiB is mapped
    assert all(s[:16] in out.read_bytes() for s in secrets)  # a plain save holds them
    run = run_cli("scrub", str(out), "--json")
    assert run.returncode == 0, run.stderr
    data = out.read_bytes()
    for s in secrets:
        assert s[:16] not in data


def test_save_of_an_unprotected_vm_warns_and_writes_no_sidecar(tmp_path: Path) -> None:
    qmp = str(tmp_path / "q.sock")
    qp = start_qemu([QEMU, "-nodefaults", "-display", "none", "-M", "pc", "-m", "128M"], qmp)
    try:
        out = tmp_path / "plain.sav"
        run = run_cli("save", "--paused", "--qmp", qmp, "--to", str(out), "--json")
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report["extra"]["sidecar"] is None
        assert any("no sidecar" in w for w in report["warnings"]), report
        assert not Path(str(out) + ".vmwipe.json").exists()
    finally:
        qp.kill()
