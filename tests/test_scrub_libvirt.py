"""`vmwipe scrub` on a real `virsh save` image, then `virsh restore` of the scrubbed file.

Uses the libvirt tests' own daemon fixture (`libvirtd_fixture.LibvirtLab`: a
libvirtd started by PID, skipped when someone else's daemon owns the sockets).
The domain starts paused (`-S`), so no guest code runs; a table and secret
pages are planted through /proc/PID/mem at `gpa2hva` addresses, the domain is
saved with libvirt's save API (a raw image: header, XML, QEMU stream), scrubbed
with no options (layout and region come from the stream), and restored paused.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmwipe.host_agent.snapshot.saveimage import parse_header
from vmwipe.host_agent.snapshot.scrub import scrub_file
from vmwipe.protocol import Region, build_region, encode_host_fields, encode_ssdt

pytestmark = pytest.mark.slow
REGION = Region(0x1F00_0000, 1 << 20)
PAGE = 4096
NAME = f"vmwipe-scrub-{os.getpid()}"

try:
    from libvirtd_fixture import LibvirtLab, unavailable_reason
except ImportError:  # the libvirt fixture is not there: nothing to run against
    LibvirtLab = None  # type: ignore[assignment,misc]

    def unavailable_reason() -> str | None:
        return "tests/libvirtd_fixture.py is missing"


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    assert LibvirtLab is not None
    lab = LibvirtLab.create()
    try:
        lab.start()
    except Exception:
        lab.stop()
        raise
    try:
        yield lab
    finally:
        lab.stop()


def _xml(ssdt: Path) -> str:
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{NAME}</name><uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>512</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/></devices>
  <qemu:commandline><qemu:arg value='-acpitable'/><qemu:arg value='file={ssdt}'/></qemu:commandline>
</domain>"""


def _pid() -> int:
    return int(Path(f"/var/run/libvirt/qemu/{NAME}.pid").read_text().strip())


def _hva(dom: Any, gpa: int) -> int:
    import libvirt_qemu

    out = libvirt_qemu.qemuMonitorCommand(dom, f"gpa2hva {gpa:#x}", 1)
    m = re.search(r" is (0x[0-9a-f]+)", out)
    assert m, out
    return int(m.group(1), 16)


def _rw(dom: Any, gpa: int, data: bytes | None = None, size: int = PAGE) -> bytes:
    """Read or write guest RAM page-wise through /proc/PID/mem (root)."""
    fd = os.open(f"/proc/{_pid()}/mem", os.O_RDWR)
    try:
        out = b""
        n_total = len(data) if data is not None else size
        pos = 0
        while pos < n_total:
            n = min(n_total - pos, PAGE - (gpa + pos) % PAGE)
            hva = _hva(dom, gpa + pos)
            if data is not None:
                assert os.pwrite(fd, data[pos:pos + n], hva) == n
            else:
                out += os.pread(fd, n, hva)
            pos += n
        return out
    finally:
        os.close(fd)


def test_virsh_save_scrub_restore(lab: Any) -> None:
    import libvirt

    ssdt = lab.work / "scrub-ssdt.aml"
    ssdt.write_bytes(encode_ssdt(REGION.base, REGION.size))
    ssdt.chmod(0o644)
    dom = lab.conn.defineXML(_xml(ssdt))
    lab.domains.append(NAME)
    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    secrets = {0x200_0000: os.urandom(PAGE), 0x300_0000: os.urandom(PAGE)}
    keep = os.urandom(PAGE)
    image = build_region(REGION.size, [(0x200_0000, 1), (0x300_0000, 1)])
    _rw(dom, REGION.base, image)
    for gpa, blob in secrets.items():
        _rw(dom, gpa, blob)
    _rw(dom, 0x400_0000, keep)
    path = lab.work / "scrub.save"
    dom.save(str(path))  # virsh save
    raw = path.read_bytes()
    hdr = parse_header(raw[:92], len(raw))
    assert hdr.format == 0 and raw[hdr.stream_offset:hdr.stream_offset + 4] == b"QEVM"
    assert all(s in raw for s in secrets.values())

    rep = scrub_file(str(path))
    assert rep.container == "libvirt" and rep.pages == 2 and rep.scrubbed_copies == 2
    raw2 = path.read_bytes()
    assert len(raw2) == len(raw) and not any(s in raw2 for s in secrets.values())
    assert keep in raw2
    digest = hashlib.sha256(raw2).hexdigest()
    assert scrub_file(str(path)).noop
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest

    lab.conn.restoreFlags(str(path), None, libvirt.VIR_DOMAIN_SAVE_PAUSED)  # virsh restore
    dom = lab.conn.lookupByName(NAME)
    lab.note_qemu(NAME)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    for gpa in secrets:
        assert _rw(dom, gpa) == bytes(PAGE)
    assert _rw(dom, 0x400_0000) == keep
    header = _rw(dom, REGION.base)
    assert header[:0x40] == image[:0x40] and header[0x50:] == image[0x50:PAGE]
    assert header[0x40:0x50] == encode_host_fields(1, 2)  # the scrub counted as a wipe
    dom.resume()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    dom.destroy()
